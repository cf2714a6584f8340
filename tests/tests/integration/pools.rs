//! Pools built from one `Config`: both ORMs on the sample schema, token rotation under load,
//! startup parameters, TLS modes, and fast, typed auth failures.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dal::credentials::Token;
use dal::diesel_async::RunQueryDsl;
use dal::local::LocalPostgres;
use dal::{Connector, Credentials, PoolSettings, SslMode, TokenStrategy};
use entity::customer;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};

#[tokio::test]
async fn both_orms_query_the_sample_schema_through_one_config() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "shop").await;
    let connector = Connector::new(pg.config("shop", "shop", &password))
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();

    tests::seaorm_round_trip(&db, "seaorm").await;
    tests::diesel_round_trip(&diesel, "diesel").await;
    let client = raw.get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert_eq!(
        connector.cache().fetches(),
        1,
        "a static password is fetched once"
    );
    connector.shutdown().await;
}

/// A source that mints tokens the way Lakebase and DSQL do: each fetch a new one, which the
/// server accepts at login until `ttl` has passed, whatever was minted since.
fn rotating_source(
    pg: Arc<LocalPostgres>,
    role: &'static str,
    ttl: Duration,
    minted: Arc<AtomicU64>,
) -> Credentials {
    Credentials::source(move || {
        let pg = Arc::clone(&pg);
        let minted = Arc::clone(&minted);
        async move {
            let expires = SystemTime::now() + ttl;
            let token = pg.mint_token(role, expires);
            minted.fetch_add(1, Ordering::Relaxed);
            Ok::<_, dal::local::Error>(Token::new(token, Some(expires)))
        }
    })
}

async fn rotation_with_a_custom_source(strategy: TokenStrategy) {
    let pg = Arc::new(tests::server().await);
    tests::app_database(&pg, "rot").await;
    pg.create_token_role("rot").await.unwrap();
    let ttl = Duration::from_secs(3);
    let minted = Arc::new(AtomicU64::new(0));
    let config = pg
        .config("rot", "rot", "unused")
        .credentials(rotating_source(
            Arc::clone(&pg),
            "rot",
            ttl,
            Arc::clone(&minted),
        ))
        .strategy(strategy);
    tests::rotation_workload(config, ttl).await;
    assert!(
        AtomicU64::load(&minted, Ordering::Relaxed) >= 3,
        "expected a new token per TTL, minted {}",
        AtomicU64::load(&minted, Ordering::Relaxed)
    );
}

#[tokio::test]
async fn tokens_rotate_under_load_with_the_eager_strategy() {
    rotation_with_a_custom_source(TokenStrategy::Eager).await;
}

#[tokio::test]
async fn tokens_rotate_under_load_with_the_lazy_strategy() {
    rotation_with_a_custom_source(TokenStrategy::Lazy).await;
}

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

#[tokio::test]
async fn every_pooled_connection_carries_application_name_and_search_path() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "tele").await;
    let admin = pg.admin("tele").await.unwrap();
    admin
        .batch_execute("CREATE SCHEMA app AUTHORIZATION tele")
        .await
        .unwrap();
    let config = pg
        .config("tele", "tele", &password)
        .application_name("dal-tests/1.0")
        .search_path("app, public")
        .statement_timeout(Duration::from_secs(7));
    let connector = Connector::new(config).await.unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();

    use sea_orm::{ConnectionTrait, Statement};
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_setting('search_path') AS sp, current_setting('statement_timeout') AS st",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "sp").unwrap(), "app, public");
    assert_eq!(row.try_get::<String>("", "st").unwrap(), "7s");

    let mut conn = diesel.get().await.unwrap();
    let sp: Setting = diesel::sql_query("SELECT current_setting('search_path') AS value")
        .get_result(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sp.value, "app, public");
    let client = raw.get().await.unwrap();
    let sp: String = client
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sp, "app, public");

    // The vendor's own check: pg_stat_activity shows the name for the connections of both pools.
    let names: Vec<String> = admin
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE usename = 'tele' ORDER BY application_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    assert!(names.iter().all(|n| n == "dal-tests/1.0"), "{names:?}");
    connector.shutdown().await;
}

async fn connect_with(pg: &LocalPostgres, mode: SslMode, ca: bool, host: &str) -> dal::Result<()> {
    let mut config = pg.superuser_config("postgres").ssl_mode(mode);
    config.host = host.to_owned();
    if !ca {
        config.ssl_root_cert = None;
    }
    let connector = Connector::new(config).await?;
    let (client, connection): (_, dal::Connection) = connector.connect().await?;
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(ssl, mode != SslMode::Disable);
    Ok(())
}

/// Whether `client`'s session is outside a transaction block: over the simple protocol, a
/// statement outside one starts with its transaction.
async fn outside(client: &tokio_postgres::Client) -> bool {
    let messages = client
        .simple_query("SELECT statement_timestamp() = transaction_timestamp()")
        .await
        .unwrap();
    let row = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0) == Some("t")),
        _ => None,
    });
    row.expect("one row")
}

/// A client that comes back inside a transaction is handed out again outside it, with TLS
/// (the pool reads the transaction status off the wire) and without (it cannot, and runs the
/// check the other pools run); `prepare_cached` works either way.
#[tokio::test]
async fn the_tokio_postgres_pool_ends_a_transaction_left_open_with_and_without_tls() {
    let pg = tests::server().await;
    for mode in [SslMode::VerifyFull, SslMode::Disable] {
        let one = PoolSettings::builder().max_size(1).build().unwrap();
        let config = pg.superuser_config("postgres").ssl_mode(mode).pool(one);
        let connector = Connector::new(config).await.unwrap();
        let pool = connector.postgres_pool().await.unwrap();
        for _ in 0..3 {
            let client = pool.get().await.unwrap();
            assert!(
                outside(&client).await,
                "{mode:?}: handed out inside a transaction"
            );
            let select = client.prepare_cached("SELECT 1").await.unwrap();
            client.batch_execute("BEGIN").await.unwrap();
            let one: i32 = client.query_one(&select, &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
            assert!(!outside(&client).await, "{mode:?}: BEGIN did not begin");
        }
        connector.shutdown().await;
    }
}

/// A connector to `pg` as its superuser, with pools of one connection: every checkout
/// gets the connection the last one gave back.
async fn one_connection(pg: &LocalPostgres) -> Connector {
    let one = PoolSettings::builder().max_size(1).build().unwrap();
    Connector::new(pg.superuser_config("postgres").pool(one))
        .await
        .unwrap()
}

/// Fails inside a transaction block (see dal's pool checks): succeeds outside one.
const OUTSIDE_TRANSACTION: &str =
    "SELECT 1 / (statement_timestamp() = transaction_timestamp())::int";

/// A Diesel connection that comes back inside a transaction a statement of the user's own
/// began (diesel-async's transaction manager knows nothing of it) is handed out again
/// outside it, with TLS (the pool reads the transaction status off the wire) and without
/// (every checkout checks).
#[tokio::test]
async fn the_diesel_pool_ends_a_transaction_a_raw_begin_left_open_with_and_without_tls() {
    use dal::diesel_async::SimpleAsyncConnection as _;
    let pg = tests::server().await;
    for mode in [SslMode::VerifyFull, SslMode::Disable] {
        let one = PoolSettings::builder().max_size(1).build().unwrap();
        let config = pg.superuser_config("postgres").ssl_mode(mode).pool(one);
        let connector = Connector::new(config).await.unwrap();
        let pool = connector.diesel_pool().await.unwrap();
        for _ in 0..3 {
            let mut conn = pool.get().await.unwrap();
            let outside = conn.batch_execute(OUTSIDE_TRANSACTION).await;
            assert!(
                outside.is_ok(),
                "{mode:?}: handed out inside a transaction: {outside:?}"
            );
            conn.batch_execute("BEGIN").await.unwrap();
            assert!(
                conn.batch_execute(OUTSIDE_TRANSACTION).await.is_err(),
                "{mode:?}: BEGIN did not begin"
            );
        }
        connector.shutdown().await;
    }
}

/// The same through SeaORM, whose pool checks out a connection per statement: a `BEGIN`
/// sent as a statement of the user's own, unprepared or prepared, behind a comment, or
/// after another statement, does not leave the next statement inside a transaction.
#[tokio::test]
async fn the_seaorm_pool_ends_a_transaction_a_raw_begin_left_open() {
    let pg = tests::server().await;
    let connector = one_connection(&pg).await;
    let db = connector.seaorm().await.unwrap();
    let outside = || db.execute_unprepared(OUTSIDE_TRANSACTION);
    for begin in ["BEGIN", "/* select */ begin", "SELECT 1; START TRANSACTION"] {
        outside().await.unwrap();
        db.execute_unprepared(begin).await.unwrap();
        let next = outside().await;
        assert!(
            next.is_ok(),
            "{begin:?}: left inside a transaction: {next:?}"
        );
    }
    let begin = Statement::from_string(DbBackend::Postgres, "BEGIN");
    db.execute_raw(begin).await.unwrap();
    let next = outside().await;
    assert!(
        next.is_ok(),
        "a prepared BEGIN: left inside a transaction: {next:?}"
    );
    connector.shutdown().await;
}

/// A string that begins a transaction and fails inside it leaves an aborted transaction
/// block (SQLSTATE `25P02` for every statement after), which sqlx reports as no transaction:
/// the sqlx and SeaORM pools end it before the next caller's statement.
#[tokio::test]
async fn a_connection_left_in_an_aborted_transaction_serves_the_next_caller() {
    let pg = tests::server().await;
    let connector = one_connection(&pg).await;
    let sqlx = connector.sqlx_pool().await.unwrap();
    let aborting = sea_orm::sqlx::raw_sql("BEGIN; SELECT 1/0")
        .execute(&sqlx)
        .await;
    assert!(aborting.is_err());
    sea_orm::sqlx::raw_sql(OUTSIDE_TRANSACTION)
        .execute(&sqlx)
        .await
        .expect("the sqlx pool's next statement runs outside any transaction");
    let db = connector.seaorm().await.unwrap();
    assert!(db.execute_unprepared("BEGIN; SELECT 1/0").await.is_err());
    db.execute_unprepared(OUTSIDE_TRANSACTION)
        .await
        .expect("the SeaORM pool's next statement runs outside any transaction");
    connector.shutdown().await;
}

/// A Diesel connection whose instrumentation its user replaced comes back without the
/// pool's record of it (its lifetime, its queries in flight, stale statements): the pool
/// closes it, and the next checkout gets another connection (another server process).
#[tokio::test]
async fn a_diesel_connection_whose_instrumentation_was_replaced_is_not_reused() {
    use dal::diesel_async::AsyncConnection as _;
    let pg = tests::server().await;
    let connector = one_connection(&pg).await;
    let pool = connector.diesel_pool().await.unwrap();
    let pid = || async {
        let mut conn = pool.get().await.unwrap();
        let pid: Pid = dal::diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result(&mut *conn)
            .await
            .unwrap();
        (pid.pid, conn)
    };
    let (first, conn) = pid().await;
    drop(conn);
    let (again, mut conn) = pid().await;
    assert_eq!(first, again, "a connection in good order is reused");
    conn.set_instrumentation(|_: dal::diesel::connection::InstrumentationEvent<'_>| {});
    drop(conn);
    let (next, _) = pid().await;
    assert_ne!(next, first, "reused without the pool's record of it");
    connector.shutdown().await;
}

/// A client given back while a row stream it started is still open: the stream's replies
/// wait for their reader, so the next request on that connection would wait behind them.
/// The pool hands out another connection instead, and the stream still gets every row, even
/// read slowly.
#[tokio::test]
async fn a_client_given_back_with_an_open_row_stream_is_not_handed_out_again() {
    use futures_util::StreamExt as _;
    let pg = tests::server().await;
    let connector = one_connection(&pg).await;
    let pool = connector.postgres_pool().await.unwrap();
    let client = pool.get().await.unwrap();
    let rows = client
        .query_raw(
            "SELECT generate_series(1, 200000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    let mut rows = Box::pin(rows);
    let first: i32 = rows.next().await.unwrap().unwrap().get(0);
    assert_eq!(first, 1);
    drop(client);
    // Only a failure waits this long: the next checkout answers at once or never.
    let next = tokio::time::timeout(Duration::from_secs(60), async {
        let client = pool.get().await.unwrap();
        client
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    })
    .await;
    assert_eq!(
        next.ok(),
        Some(2),
        "the next request waited behind the stream"
    );
    // A slow reader: the pool dropped the client it could not hand out, and the connection
    // is closed only after 5 s without progress; the stream, still open, keeps it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut rest = 0;
    while let Some(row) = rows.next().await {
        row.unwrap();
        rest += 1;
    }
    assert_eq!(rest, 199_999);
    connector.shutdown().await;
}

#[tokio::test]
async fn tls_modes_verify_what_they_promise() {
    let pg = tests::server().await;
    connect_with(&pg, SslMode::VerifyFull, true, "localhost")
        .await
        .expect("verify-full against the test CA");
    connect_with(&pg, SslMode::VerifyFull, true, "127.0.0.1")
        .await
        .expect("verify-full by address");
    connect_with(&pg, SslMode::Require, false, "localhost")
        .await
        .expect("require without a CA");
    connect_with(&pg, SslMode::Disable, false, "localhost")
        .await
        .expect("disable");
    // A server reached under a name its certificate does not hold: refused by verify-full,
    // accepted by verify-ca, which checks the chain only.
    let wrong_name = |mode| {
        let mut config = pg.superuser_config("postgres").ssl_mode(mode);
        config.host = "db.invalid".into();
        config.hostaddr = Some([127, 0, 0, 1].into());
        async move {
            let connector = Connector::new(config).await?;
            connector.connect().await.map(|_| ())
        }
    };
    let err = wrong_name(SslMode::VerifyFull).await.unwrap_err();
    let chain = anyhow_chain(&err);
    assert!(chain.contains("NotValidForName"), "{chain}");
    wrong_name(SslMode::VerifyCa)
        .await
        .expect("verify-ca ignores the name");
    // Every pool kind reaches the server at hostaddr, and verifies its certificate against
    // the host name.
    let by_address = |mode, host: &str| {
        let mut config = pg.superuser_config("postgres").ssl_mode(mode);
        config.host = host.into();
        config.hostaddr(Ipv4Addr::LOCALHOST.into())
    };
    // verify-ca, and require with a CA (libpq verifies the chain then, "the same as
    // verify-ca"), check the chain alone. sqlx trusts the public roots besides the configured
    // CA, so any publicly trusted certificate would pass: the SeaORM and sqlx pools (and so
    // the migration command) refuse both.
    for mode in [SslMode::VerifyCa, SslMode::Require] {
        let connector = Connector::new(by_address(mode, "db.invalid"))
            .await
            .unwrap();
        assert_eq!(connector.ssl_mode(), SslMode::VerifyCa);
        let raw = connector.postgres_pool().await.unwrap();
        raw.get()
            .await
            .unwrap_or_else(|e| panic!("{mode} by address ignores the name: {e}"));
        let refusals = [
            connector.seaorm().await.err().map(|e| e.to_string()),
            connector.sqlx_pool().await.err().map(|e| e.to_string()),
        ];
        for refused in refusals {
            let refused = refused.unwrap_or_else(|| panic!("{mode}: a sqlx pool was built"));
            assert!(
                refused.starts_with("invalid setting PGSSLMODE") && refused.contains("verify-full"),
                "{refused}"
            );
        }
        connector.shutdown().await;
    }
    let connector = Connector::new(by_address(SslMode::VerifyFull, "localhost"))
        .await
        .unwrap();
    let db = connector.seaorm().await.expect("a SeaORM pool by address");
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT host(inet_server_addr()) AS addr",
        ))
        .await
        .expect("sqlx connects to hostaddr")
        .expect("one row");
    assert_eq!(row.try_get::<String>("", "addr").unwrap(), "127.0.0.1");
    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .expect("tokio-postgres connects to hostaddr");
    connector.shutdown().await;
    let connector = Connector::new(by_address(SslMode::VerifyFull, "db.invalid"))
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    let err = db.execute_unprepared("SELECT 1").await.unwrap_err();
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    connector.shutdown().await;
    let unknown_ca = connect_with(&pg, SslMode::VerifyFull, false, "localhost")
        .await
        .unwrap_err();
    assert!(!unknown_ca.is_auth_failure(), "{unknown_ca:?}");
    let chain = format!("{:?}", anyhow_chain(&unknown_ca));
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("unknown issuer"),
        "{chain}"
    );
}

/// libpq verifies the chain under `require` when given a CA ("the same as verify-ca"), and
/// so does dal: a CA named for nothing would let a user think the server was verified. A
/// server whose certificate another CA signed is refused (the CA's own server, by
/// `tls_modes_verify_what_they_promise`).
#[tokio::test]
async fn require_with_a_ca_verifies_the_chain_as_libpq_does() {
    let pg = tests::server().await;
    // Another CA: refused, where TLS left unverified would connect.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    let config = pg
        .superuser_config("postgres")
        .ssl_mode(SslMode::Require)
        .ssl_root_cert(&other);
    let connector = Connector::new(config).await.unwrap();
    let err = connector.connect().await.map(|_| ()).unwrap_err();
    let chain = anyhow_chain(&err);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("unknown issuer"),
        "{chain}"
    );
    connector.shutdown().await;
}

fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s} / {s:?}"));
        source = s.source();
    }
    out
}

#[tokio::test]
async fn a_wrong_password_fails_fast_with_sqlstate_28p01() {
    let pg = tests::server().await;
    pg.create_role("bad", "right", None).await.unwrap();
    let config = pg.config("postgres", "bad", "wrong").pool(
        PoolSettings::builder()
            .acquire_timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    let connector = Connector::new(config).await.unwrap();

    let started = Instant::now();
    let err = connector.connect().await.err().expect("refused");
    assert!(matches!(err, dal::Error::AuthFailed { .. }), "{err:?}");
    assert_eq!(err.sqlstate(), Some("28P01"));

    let diesel = connector.diesel_pool().await.unwrap();
    let err = diesel.get().await.err().expect("refused");
    assert!(err.is_auth_failure(), "{err:?}");
    assert_eq!(err.sqlstate(), Some("28P01"));
    let raw = connector.postgres_pool().await.unwrap();
    let err = raw.get().await.expect_err("refused");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let db = connector.seaorm().await.unwrap();
    let err = customer::Entity::find().all(&db).await.unwrap_err();
    assert!(
        err.to_string().contains("28P01")
            || err.to_string().contains("password authentication failed"),
        "{err}"
    );
    // Each refusal invalidated the token and tried one fresh one: more than one fetch.
    assert!(connector.cache().fetches() >= 2);
}

#[derive(diesel::QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// A connection past its lifetime is never handed out, whether or not the pool's reaper has
/// come by: Aurora DSQL ends connections at 60 minutes, so one handed out at 59:59 fails under
/// its query. Each pool hands out a connection, takes it back, and after the lifetime hands
/// out a new one (another server process).
#[tokio::test]
async fn no_pool_hands_out_a_connection_past_its_lifetime() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "aged").await;
    let lifetime = Duration::from_secs(1);
    let settings = PoolSettings::builder()
        .max_size(1)
        .max_lifetime(Some(lifetime))
        .lifetime_jitter(0.0)
        .idle_timeout(None)
        .build()
        .unwrap();
    let connector = Connector::new(pg.config("aged", "aged", &password).pool(settings))
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    let dpool = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let pids = || async {
        let seaorm = tests::seaorm_backend_pid(&db).await;
        let mut conn = dpool.get().await.unwrap();
        let diesel: Pid = dal::diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result(&mut *conn)
            .await
            .unwrap();
        let raw: i32 = raw
            .get()
            .await
            .unwrap()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        [seaorm, diesel.pid, raw]
    };
    let first = pids().await;
    tokio::time::sleep(lifetime + Duration::from_millis(300)).await;
    let second = pids().await;
    for (kind, (a, b)) in ["seaorm", "diesel", "postgres"]
        .into_iter()
        .zip(first.into_iter().zip(second))
    {
        assert_ne!(
            a, b,
            "the {kind} pool handed out a connection past its lifetime"
        );
    }
    connector.shutdown().await;
}

/// A server whose `shared_preload_libraries` lists Lakebase's (and which shows it to every
/// role, as Lakebase does) is taken for Lakebase though its host name does not say so.
#[tokio::test]
async fn a_server_with_lakebases_libraries_is_lakebase() {
    let pg = dal::local::LocalPostgres::start_lakebase_like()
        .await
        .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL server: {e}"));
    let lb = tests::lakebase(&pg, "likelb", std::time::Duration::from_secs(60)).await;
    let connector = Connector::new(lb.client_config(&pg, "likelb").unwrap())
        .await
        .unwrap();
    assert!(connector.is_lakebase().await.unwrap());
    connector.shutdown().await;
    // Its stand-in libraries go with it.
    let root = pg.root().to_owned();
    drop(lb);
    drop(pg);
    assert!(!root.exists(), "{} left behind", root.display());
}

/// A plain PostgreSQL server is not taken for Lakebase: neither its host name nor its
/// `shared_preload_libraries` (read over a real connection) says so.
#[tokio::test]
async fn a_plain_server_is_not_lakebase() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "plainpg").await;
    let connector = Connector::new(pg.config("plainpg", "plainpg", &password))
        .await
        .unwrap();
    assert!(!connector.is_lakebase().await.unwrap());
    assert_eq!(
        connector.connections_opened(),
        1,
        "one connection asked the server"
    );
}

/// A read-only endpoint beside the primary (here the same server reached as 127.0.0.1, with
/// TLS verified for that address): its SeaORM and Diesel pools read what the primary wrote,
/// with the primary's token (no fetch of their own), and every write through them fails
/// with SQLSTATE 25006.
#[tokio::test]
async fn a_read_only_connector_reads_with_the_same_token_and_refuses_writes() {
    use dal::diesel_async::RunQueryDsl;
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "replica", Duration::from_secs(60)).await;
    let config = lb
        .client_config(&pg, "replica")
        .unwrap()
        .read_only_host("127.0.0.1");
    let connector = Connector::new(config).await.unwrap();
    let db = connector.seaorm().await.unwrap();
    db.execute_unprepared("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('primary')")
        .await
        .unwrap();
    let fetched = connector.cache().fetches();

    let replica = connector.read_only().unwrap();
    assert_eq!(
        replica.active_endpoint(),
        format!("127.0.0.1:{}", pg.port())
    );
    let read = replica.seaorm().await.unwrap();
    let rows = read
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT body FROM notes",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let err = dal::Error::from(
        read.execute_unprepared("INSERT INTO notes VALUES ('replica')")
            .await
            .unwrap_err(),
    );
    assert!(err.is_read_only(), "{err:?}");
    let diesel = replica.diesel_pool().await.unwrap();
    let mut conn = diesel.get().await.unwrap();
    let err = dal::Error::from(
        dal::diesel::sql_query("UPDATE notes SET body = 'replica'")
            .execute(&mut *conn)
            .await
            .unwrap_err(),
    );
    assert!(err.is_read_only(), "{err:?}");
    drop(conn);
    assert_eq!(
        connector.cache().fetches(),
        fetched,
        "the replica used the primary's token"
    );
    let kept: i64 = pg
        .admin("replica")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM notes WHERE body = 'primary'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);

    // Without a read-only host there is no read-only connector.
    let plain = Connector::new(lb.client_config(&pg, "replica").unwrap())
        .await
        .unwrap();
    assert_eq!(
        plain.read_only().unwrap_err().to_string(),
        "invalid setting DAL_READ_ONLY_HOST: no read-only endpoint is configured: set \
         DAL_READ_ONLY_HOST (Config::read_only_host) to the replica's host"
    );
    connector.shutdown().await;
    assert!(matches!(
        replica.diesel_pool().await.map(drop),
        Err(dal::Error::PoolClosed)
    ));
}

/// The read-only connector shares its connector's token cache: its shutdown closes its own
/// pools and leaves the cache alone. It stopped the refresher and dropped the listeners, a
/// plain sqlx pool's among them, so that pool's connections logged in with an expired token
/// once its last one ran out.
#[tokio::test]
async fn shutting_down_the_read_only_connector_leaves_the_token_refresh_running() {
    let pg = tests::server().await;
    let ttl = Duration::from_secs(3);
    let lb = tests::lakebase(&pg, "replica_down", ttl).await;
    let config = lb
        .client_config(&pg, "replica_down")
        .unwrap()
        .strategy(TokenStrategy::Eager)
        .read_only_host("127.0.0.1");
    let connector = Connector::new(config).await.unwrap();
    let _sqlx = connector.sqlx_pool().await.unwrap();
    let listeners = connector.cache().listeners();
    assert!(listeners >= 1, "the plain sqlx pool listens for new tokens");
    let replica = connector.read_only().unwrap();
    replica.seaorm().await.unwrap();
    replica.shutdown().await;
    assert_eq!(connector.cache().listeners(), listeners);
    // The refresher fetches the next token before this one expires, with no caller asking.
    let fetched = connector.cache().fetches();
    let deadline = Instant::now() + ttl * 10;
    while connector.cache().fetches() == fetched {
        assert!(
            Instant::now() < deadline,
            "no token was fetched in {:?} of 3 s tokens: the refresher stopped",
            ttl * 10
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connector.shutdown().await;
}

/// Callers waiting for a connection get one in the order they asked: with more callers than
/// connections, one that just gave a connection back does not take it again ahead of those
/// already waiting. Every caller gets its share; and each checkout of the Diesel and
/// tokio-postgres pools counts how many others were served while it waited, which in arrival
/// order is at most the callers ahead of it. (SeaORM checks out inside each statement, so
/// only its shares are counted.) Each pool has opened its connections before the callers
/// start: while a pool is still opening them, a caller waiting for a new one can be overtaken
/// by callers served by the ones already open (bb8 hands an idle connection to whichever
/// caller asks first), for as long as a login takes.
#[tokio::test]
async fn callers_waiting_for_a_connection_are_served_in_the_order_they_asked() {
    const CALLERS: u64 = 12;
    const CHECKOUTS: u64 = 600;
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "queue").await;
    let pool = PoolSettings::builder().max_size(2).build().unwrap();
    let connector = Connector::new(pg.config("queue", "queue", &password).pool(pool))
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    // Both connections of each pool open, each held until the other is.
    let hold = "SELECT pg_sleep(0.2)";
    let (a, b) = tokio::join!(db.execute_unprepared(hold), db.execute_unprepared(hold));
    a.and(b).unwrap();
    let (a, b) = tokio::join!(diesel.get(), diesel.get());
    drop((a.unwrap(), b.unwrap()));
    let (a, b) = tokio::join!(raw.get(), raw.get());
    drop((a.unwrap(), b.unwrap()));
    for kind in ["seaorm", "diesel", "postgres"] {
        let served = Arc::new(AtomicU64::new(0));
        let callers = (0..CALLERS).map(|_| {
            let (served, db, diesel, raw) =
                (Arc::clone(&served), db.clone(), diesel.clone(), raw.clone());
            tokio::spawn(async move {
                // `served.load` would be Diesel's `RunQueryDsl::load`.
                let served_now = || AtomicU64::load(&served, Ordering::Relaxed);
                let (mut mine, mut most_overtaken) = (0, 0);
                while served_now() < CHECKOUTS {
                    let before = served_now();
                    let overtaken = || served.fetch_add(1, Ordering::Relaxed) - before;
                    match kind {
                        "seaorm" => {
                            db.execute_unprepared("SELECT 1").await.unwrap();
                            overtaken();
                        }
                        "diesel" => {
                            let mut conn = diesel.get().await.unwrap();
                            most_overtaken = most_overtaken.max(overtaken());
                            dal::diesel::sql_query("SELECT 1")
                                .execute(&mut *conn)
                                .await
                                .unwrap();
                        }
                        _ => {
                            let client = raw.get().await.unwrap();
                            most_overtaken = most_overtaken.max(overtaken());
                            client.batch_execute("SELECT 1").await.unwrap();
                        }
                    }
                    mine += 1;
                }
                (mine, most_overtaken)
            })
        });
        let outcomes: Vec<(u64, u64)> = futures_util::future::join_all(callers)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let least = outcomes.iter().map(|o| o.0).min().unwrap();
        let most = outcomes.iter().map(|o| o.1).max().unwrap();
        println!(
            "{kind}: the least served caller got {least}; at most {most} served while one waited"
        );
        assert!(
            least >= CHECKOUTS / CALLERS / 4,
            "{kind}: a caller was served {least} times of {CHECKOUTS}"
        );
        assert!(
            most <= 2 * CALLERS,
            "{kind}: a caller waited while {most} others were served"
        );
    }
    connector.shutdown().await;
}

/// Each pool ends the sessions it closes (retired at their lifetime, or at shutdown) the
/// way the server expects: the protocol's Terminate message then TLS's close_notify, as
/// libpq's `PQfinish` does (Diesel's, which diesel-async drops: close_notify). A socket
/// dropped without them makes the server log each session's end as an error (over TLS,
/// PostgreSQL reports an end without close_notify as "could not receive data from client:
/// Connection reset by peer"), once per connection and so at every rotation.
#[tokio::test]
async fn pools_log_out_of_the_sessions_they_close() {
    let pg = tests::server().await;
    let role = "goodbye";
    pg.create_role(role, PASSWORD, None).await.unwrap();
    pg.create_database(role, Some(role)).await.unwrap();
    let short = PoolSettings::builder()
        .max_size(2)
        .max_lifetime(Some(Duration::from_secs(1)))
        .build()
        .unwrap();
    let connector = Connector::new(pg.config(role, role, PASSWORD).pool(short))
        .await
        .unwrap();
    let pools = UseEach::build(&connector).await;
    // Used until the pools have retired connections at their lifetime.
    let deadline = Instant::now() + Duration::from_secs(120);
    while connector.connections_opened() < 12 {
        pools.once().await;
        assert!(
            Instant::now() < deadline,
            "the pools renewed no connection in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    connector.shutdown().await;
    drop(pools);
    assert_logged_out(&pg, role).await;
}

/// The same when the program ends its runtime right after the connector's shutdown, as a
/// service on its way out does.
#[tokio::test]
async fn sessions_end_with_a_logout_when_the_runtime_ends_right_after_shutdown() {
    let pg = tests::server().await;
    let role = "farewell";
    pg.create_role(role, PASSWORD, None).await.unwrap();
    pg.create_database(role, Some(role)).await.unwrap();
    let config = pg.config(role, role, PASSWORD);
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let connector = Connector::new(config).await.unwrap();
            UseEach::build(&connector).await.once().await;
            connector.shutdown().await;
        });
        // The runtime ends here, and with it whatever its tasks had left to do.
    })
    .await
    .unwrap();
    assert_logged_out(&pg, role).await;
}

const PASSWORD: &str = "a-password";

/// One pool of each kind.
struct UseEach(dal::SeaOrmPool, dal::DieselPool, dal::PgClientPool);

impl UseEach {
    async fn build(connector: &Connector) -> Self {
        Self(
            connector.seaorm().await.unwrap(),
            connector.diesel_pool().await.unwrap(),
            connector.postgres_pool().await.unwrap(),
        )
    }

    /// A statement through each.
    async fn once(&self) {
        let one = Statement::from_string(DbBackend::Postgres, "SELECT 1");
        self.0.execute_raw(one).await.unwrap();
        let mut conn = self.1.get().await.unwrap();
        dal::diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, "SELECT 1")
            .await
            .unwrap();
        drop(conn);
        let client = self.2.get().await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
    }
}

/// Waits until `role` has no session left, then asserts that the server logged none ending
/// without a logout.
async fn assert_logged_out(pg: &LocalPostgres, role: &str) {
    let admin = pg.admin("postgres").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} sessions still open a minute after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = pg.log_tail();
    let unclean: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("could not receive data from client") || l.contains("unexpected EOF")
        })
        .collect();
    assert!(
        unclean.is_empty(),
        "the server logged {} sessions ended without a logout:\n{}",
        unclean.len(),
        unclean.join("\n")
    );
}

/// Every connection the pools open turns Nagle's algorithm off (`TCP_NODELAY`), as libpq and
/// tokio-postgres do. With it on, a write that follows another before the server has answered
/// (at every login, the startup message right after TLS's last handshake record) waits for the
/// server's delayed acknowledgement, 40 ms on Linux each time. sqlx 0.9.0 left it on.
#[tokio::test]
async fn every_pool_opens_its_connections_without_nagle_delay() {
    let pg = tests::server().await;
    let password = tests::owned_database(&pg, "nodelay").await;
    let connector = Connector::new(pg.config("nodelay", "nodelay", &password))
        .await
        .unwrap();
    let mut seen = sockets_at(pg.port());

    let db = connector.seaorm().await.unwrap();
    db.execute_unprepared("SELECT 1").await.unwrap();
    assert_new_sockets_without_delay("SeaORM", pg.port(), &mut seen);

    let diesel = connector.diesel_pool().await.unwrap();
    let mut conn = diesel.get().await.unwrap();
    dal::diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, "SELECT 1")
        .await
        .unwrap();
    drop(conn);
    assert_new_sockets_without_delay("Diesel", pg.port(), &mut seen);

    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .unwrap()
        .batch_execute("SELECT 1")
        .await
        .unwrap();
    assert_new_sockets_without_delay("tokio-postgres", pg.port(), &mut seen);

    let sqlx = connector.sqlx_pool().await.unwrap();
    sea_orm::sqlx::query("SELECT 1")
        .execute(&sqlx)
        .await
        .unwrap();
    assert_new_sockets_without_delay("sqlx", pg.port(), &mut seen);

    connector.shutdown().await;
}

/// This process's connected TCP sockets with `port` at either end: each one's `/proc/self/fd` link
/// (which names its inode) and whether it has `TCP_NODELAY`.
pub(crate) fn sockets_at(port: u16) -> Vec<(String, bool)> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !link.starts_with("socket:") {
            continue;
        }
        // SAFETY: `borrow_raw` needs the descriptor open while it is borrowed: it was listed
        // open a moment ago, and is borrowed only to be duplicated at once. Closed and its
        // number reused in between, the duplicate would be of another file, whose ports would
        // not match.
        let Ok(fd) = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned() else {
            continue;
        };
        let socket = socket2::SockRef::from(&fd);
        let port_of = |addr: std::io::Result<socket2::SockAddr>| {
            addr.ok()
                .and_then(|addr| addr.as_socket())
                .map(|a| a.port())
        };
        // Connected sockets only: a listener has no peer.
        let Some(peer) = port_of(socket.peer_addr()) else {
            continue;
        };
        if peer != port && port_of(socket.local_addr()) != Some(port) {
            continue;
        }
        if let Ok(nodelay) = socket.tcp_nodelay() {
            found.push((link, nodelay));
        }
    }
    found
}

/// Asserts that `pool` opened connections to `port` since `seen` was taken, each without
/// Nagle's algorithm, and adds them to `seen`.
fn assert_new_sockets_without_delay(pool: &str, port: u16, seen: &mut Vec<(String, bool)>) {
    let new: Vec<_> = sockets_at(port)
        .into_iter()
        .filter(|(link, _)| seen.iter().all(|(known, _)| known != link))
        .collect();
    assert!(!new.is_empty(), "the {pool} pool opened no connection");
    let delayed = new.iter().filter(|(_, nodelay)| !nodelay).count();
    assert_eq!(
        delayed,
        0,
        "{delayed} of the {} connections of the {pool} pool have Nagle's algorithm on \
         (no TCP_NODELAY): a login waits for the server's delayed ACK, 40 ms on Linux",
        new.len()
    );
    seen.extend(new);
}

/// The SeaORM pool reads its CA file once, when the connector is built, as the Diesel and
/// tokio-postgres pools do: its connections share one TLS configuration instead of each
/// reading the file again and building a root store of its own (CPU at every login, and
/// memory held by every connection). A CA file removed afterwards, or replaced by one that
/// does not parse, leaves the pools as they were.
#[tokio::test]
async fn the_seaorm_pool_reads_its_ca_file_once() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "caonce").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(pg.ca_cert_path(), &ca).unwrap();
    let connector = Connector::new(pg.config("caonce", "caonce", &password).ssl_root_cert(&ca))
        .await
        .unwrap();
    std::fs::write(&ca, "not a certificate").unwrap();

    let db = connector.seaorm().await.unwrap();
    // Four at once, each the first connection of the pool or one more.
    let held = futures_util::future::try_join_all((0..4).map(|_| {
        use sea_orm::TransactionTrait;
        db.begin()
    }))
    .await
    .expect("connections open with the CA read when the connector was built");
    for txn in held {
        txn.rollback().await.unwrap();
    }
    let raw = connector.postgres_pool().await.unwrap();
    raw.get().await.expect("so do the other pools' connections");
    connector.shutdown().await;
}

/// One connect, its token's fetch and a second try after a refused login included, ends
/// within the connect timeout, and when the second try runs out of it, the answer is the
/// refusal (a timeout would read as an unreachable server, and fail over from it). Each step
/// had a timeout of its own: with a credential service taking 2 s a fetch and a 3 s connect
/// timeout, the connect waited for the second fetch to finish.
#[tokio::test]
async fn one_connect_with_a_refused_token_ends_within_the_connect_timeout() {
    let pg = tests::server().await;
    tests::app_database(&pg, "slow_refused").await;
    pg.create_token_role("slow_refused").await.unwrap();
    let fetched = Arc::new(AtomicU64::new(0));
    let done = Arc::clone(&fetched);
    let mut config = pg
        .config("slow_refused", "slow_refused", "unused")
        .credentials(Credentials::source(move || {
            let done = Arc::clone(&done);
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                done.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Token::new("not a token the server minted", None))
            }
        }))
        .strategy(TokenStrategy::Lazy);
    config.connect_timeout = Duration::from_secs(3);
    let connector = Connector::new(config).await.unwrap();
    let err = connector.connect().await.err().expect("no connection");
    assert_eq!(
        AtomicU64::load(&fetched, Ordering::SeqCst),
        1,
        "the connect waited for the second fetch"
    );
    assert!(err.is_auth_failure(), "{err:?}");
    connector.shutdown().await;
}

/// A login the server refuses for another reason than its credentials (SQLSTATE `28000`
/// from a role that may not log in, as from a `pg_hba.conf` with no line for the connection)
/// is not taken for a refused token: no new token is fetched, and the error says what the
/// server said. Before, each connect fetched a second token and reported "the token or
/// password is wrong or has expired".
#[tokio::test]
async fn a_role_that_may_not_log_in_is_not_a_refused_token() {
    let pg = Arc::new(tests::server().await);
    tests::app_database(&pg, "nologin").await;
    pg.create_token_role("nologin").await.unwrap();
    pg.admin("postgres")
        .await
        .unwrap()
        .batch_execute("ALTER ROLE nologin NOLOGIN")
        .await
        .unwrap();
    let minted = Arc::new(AtomicU64::new(0));
    let config = pg
        .config("nologin", "nologin", "unused")
        .credentials(rotating_source(
            Arc::clone(&pg),
            "nologin",
            Duration::from_secs(60),
            Arc::clone(&minted),
        ))
        .strategy(TokenStrategy::Lazy);
    let connector = Connector::new(config).await.unwrap();
    let err = connector.connect().await.err().expect("no login");
    assert!(!err.is_auth_failure(), "{err:?}");
    assert_eq!(err.sqlstate(), Some("28000"));
    let said = format!("{:#}", anyhow::Error::new(err));
    assert!(said.contains("is not permitted to log in"), "{said}");
    assert_eq!(
        AtomicU64::load(&minted, Ordering::Relaxed),
        1,
        "tokens fetched"
    );
    connector.shutdown().await;
}

/// The error of one connection of every kind `connector` opens, for a server that refuses
/// them all: its own connection, a Diesel and a tokio-postgres checkout, a SeaORM statement.
async fn errors_of_every_kind(connector: &Connector) -> Vec<dal::Error> {
    let mut errors = vec![connector.connect().await.map(drop).unwrap_err()];
    let diesel = connector.diesel_pool().await.unwrap();
    errors.push(diesel.get().await.map(drop).unwrap_err());
    let raw = connector.postgres_pool().await.unwrap();
    errors.push(raw.get().await.map(drop).unwrap_err());
    let db = connector.seaorm().await.unwrap();
    errors.push(dal::Error::from(
        customer::Entity::find().all(&db).await.unwrap_err(),
    ));
    errors
}

/// A server whose `pg_hba.conf` line for the user asks for a method the drivers cannot
/// speak (here `gss`: GSSAPI) answered: its error says so, and is neither an unreachable
/// server ("check the host and port") nor worth retrying, for every kind of connection.
/// Before, the tokio-postgres connections reported it as `Unreachable`, and SeaORM's as a
/// lost connection: both to be retried.
#[tokio::test]
async fn a_login_method_the_drivers_cannot_speak_is_not_an_unreachable_server() {
    let pg = tests::server().await;
    pg.create_role("kerberized", "pw", None).await.unwrap();
    let hba = pg.root().join("data").join("pg_hba.conf");
    let lines = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all kerberized 0.0.0.0/0 gss\n{lines}")).unwrap();
    pg.admin("postgres")
        .await
        .unwrap()
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let config = pg.config("postgres", "kerberized", "pw").pool(
        PoolSettings::builder()
            .acquire_timeout(Duration::from_secs(600))
            .build()
            .unwrap(),
    );
    let connector = Connector::new(config).await.unwrap();

    for err in errors_of_every_kind(&connector).await {
        let said = anyhow_chain(&err);
        assert!(said.contains("authentication method"), "{said}");
        assert!(!said.contains("check the host and port"), "{said}");
        assert!(
            !err.is_retryable() && !err.is_auth_failure() && !err.is_connection_failure(),
            "{err:?}"
        );
    }
    connector.shutdown().await;
}

/// A certificate the client refuses for another reason than its CA (here, one not issued for
/// the host name the configuration names) is a TLS failure, named as one, and not worth
/// retrying or failing over from, for every kind of connection: a name or a date does not
/// mend itself. Before, it was a "database error" or a lost connection, both retried.
#[tokio::test]
async fn a_certificate_refused_for_its_name_is_a_tls_failure_not_retried() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "misnamed").await;
    let mut config = pg.config("misnamed", "misnamed", &password).pool(
        PoolSettings::builder()
            .acquire_timeout(Duration::from_secs(600))
            .build()
            .unwrap(),
    );
    config.host = "not-the-server.example".to_owned();
    let config = config.hostaddr(std::net::IpAddr::from([127, 0, 0, 1]));
    let connector = Connector::new(config).await.unwrap();

    for err in errors_of_every_kind(&connector).await {
        let said = anyhow_chain(&err);
        assert!(said.contains("NotValidForName"), "{said}");
        assert!(said.contains("not-the-server.example"), "{said}");
        assert!(
            !err.is_retryable() && !err.is_connection_failure() && !err.is_auth_failure(),
            "{said}: {err:?}"
        );
    }
    connector.shutdown().await;
}
