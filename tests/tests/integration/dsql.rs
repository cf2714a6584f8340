//! Aurora DSQL IAM tokens checked at login, as DSQL checks them: the local cluster accepts a
//! SigV4-presigned `DbConnect`/`DbConnectAdmin` URL signed with its local keys until
//! `X-Amz-Date` + `X-Amz-Expires`, and only `admin` may use `DbConnectAdmin`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dal::credentials::{Clock, CredentialSource, Dsql};
use dal::diesel_async::RunQueryDsl;
use dal::local::{LOCAL_DSQL_HOST, LOCAL_DSQL_REGION, LocalDsqlEndpoint, LocalPostgres};
use dal::{Config, ConnectionRate, Connector, Credentials, PoolSettings, Target};
use migration::MigratorTrait;
use sea_orm::TransactionTrait;

struct Fixed(SystemTime);

impl Clock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// A cluster with the DSQL roles: `admin` owning database `dsql`, `app` with its own schema.
pub(crate) async fn dsql_cluster() -> LocalPostgres {
    let pg = tests::server().await;
    pg.create_token_role("admin").await.unwrap();
    pg.create_token_role("app").await.unwrap();
    pg.create_database("dsql", Some("admin")).await.unwrap();
    pg.admin("dsql")
        .await
        .unwrap()
        .batch_execute("CREATE SCHEMA app AUTHORIZATION app; GRANT USAGE ON SCHEMA public TO app")
        .await
        .unwrap();
    pg
}

pub(crate) fn config(pg: &LocalPostgres, user: &str, source: Dsql) -> Config {
    Config::new(LOCAL_DSQL_HOST, user)
        .port(pg.port())
        .database("dsql")
        .ssl_root_cert(pg.ca_cert_path())
        .credentials(Credentials::source(source))
}

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

#[tokio::test]
async fn admin_and_custom_roles_log_in_with_iam_tokens() {
    let pg = dsql_cluster().await;

    // admin: DbConnectAdmin, schema public, DSQL's migrations.
    let admin = pg.dsql_source("admin").unwrap();
    let token = admin.fetch().await.unwrap();
    assert!(
        token
            .expose()
            .starts_with(&format!("{LOCAL_DSQL_HOST}/?Action=DbConnectAdmin&")),
        "unexpected token shape"
    );
    let connector = Connector::new(config(&pg, "admin", admin))
        .await
        .expect("admin logs in with its token");
    assert_eq!(connector.target(), Target::Dsql);
    migration::DsqlMigrator::up(&tests::migration_db(&connector).await, None)
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "dsql-admin").await;
    tests::diesel_round_trip(&diesel, "dsql-admin").await;
    connector.shutdown().await;

    // A custom role: DbConnect, and its own schema on every pooled connection.
    let app = pg.dsql_source("app").unwrap();
    let token = app.fetch().await.unwrap();
    assert!(
        token
            .expose()
            .starts_with(&format!("{LOCAL_DSQL_HOST}/?Action=DbConnect&"))
    );
    let connector = Connector::new(config(&pg, "app", app))
        .await
        .expect("app logs in with its token");
    let diesel = connector.diesel_pool().await.unwrap();
    let mut conn = diesel.get().await.unwrap();
    let sp: Setting = diesel::sql_query("SELECT current_setting('search_path') AS value")
        .get_result(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sp.value, "app");
    let db = connector.seaorm().await.unwrap();
    use sea_orm::{ConnectionTrait, Statement};
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_setting('search_path') AS sp",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "sp").unwrap(), "app");
    connector.shutdown().await;
    let (accepted, refused) = pg.token_logins();
    assert!(accepted >= 4, "{accepted}");
    assert_eq!(refused, 0);
}

#[tokio::test]
async fn tokens_dsql_would_refuse_are_refused_at_login_with_28000() {
    let pg = dsql_cluster().await;
    let token = |source: Dsql| async move { source.fetch().await.unwrap().expose().to_owned() };
    let refused = |result: dal::Result<tokio_postgres::Client>| {
        let err = result.expect_err("the login should have been refused");
        assert!(err.is_auth_failure(), "{err:?}");
        assert_eq!(err.sqlstate(), Some("28000"), "{err:?}");
    };

    let admin = token(pg.dsql_source("admin").unwrap()).await;
    tests::login(&pg, "admin", &admin)
        .await
        .expect("a fresh admin token logs in");
    let app = token(pg.dsql_source("app").unwrap()).await;
    tests::login(&pg, "app", &app)
        .await
        .expect("a fresh DbConnect token logs in");

    // Signed with other keys.
    let foreign = Dsql::new(LOCAL_DSQL_HOST, "admin", Some(LOCAL_DSQL_REGION))
        .unwrap()
        .with_static_credentials(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
        );
    refused(tests::login(&pg, "admin", &token(foreign).await).await);
    // The right keys, a forged signature.
    let mut forged = admin.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    refused(tests::login(&pg, "admin", &forged).await);
    // A lifetime stretched after signing.
    let stretched = admin.replacen("X-Amz-Expires=900", "X-Amz-Expires=9000", 1);
    assert_ne!(stretched, admin);
    refused(tests::login(&pg, "admin", &stretched).await);
    // Expired: signed 20 minutes ago for 15.
    let old = pg.dsql_source("admin").unwrap().with_clock(Arc::new(Fixed(
        SystemTime::now() - Duration::from_secs(1200),
    )));
    refused(tests::login(&pg, "admin", &token(old).await).await);
    // Only admin may use DbConnectAdmin, and admin connects with DbConnectAdmin only.
    refused(tests::login(&pg, "app", &admin).await);
    refused(tests::login(&pg, "admin", &app).await);
}

/// A non-admin role whose name needs quoting lands in its own schema, not in a folded one.
#[tokio::test]
async fn a_mixed_case_role_lands_in_its_own_schema() {
    let pg = dsql_cluster().await;
    pg.create_token_role("AppUser").await.unwrap();
    pg.admin("dsql")
        .await
        .unwrap()
        .batch_execute(r#"CREATE SCHEMA "AppUser" AUTHORIZATION "AppUser""#)
        .await
        .unwrap();
    let connector = Connector::new(config(&pg, "AppUser", pg.dsql_source("AppUser").unwrap()))
        .await
        .unwrap();
    let pool = connector.postgres_pool().await.unwrap();
    let client = pool.get().await.unwrap();
    let schema: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema.as_deref(), Some("AppUser"));
    drop(client);
    let db = connector.seaorm().await.unwrap();
    use sea_orm::{ConnectionTrait, Statement};
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_schema() AS s",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "s").unwrap(), "AppUser");
    connector.shutdown().await;
}

/// Opens `pools` pools of 10 connections each at once (a Diesel and a tokio-postgres pool per
/// connector) through `endpoint`, each connector limited to `rate`, and holds every connection
/// until all have answered a query: how many failed, and how long until all had answered.
async fn storm(
    pg: &LocalPostgres,
    endpoint: &LocalDsqlEndpoint,
    pools: usize,
    rate: ConnectionRate,
) -> (usize, Duration) {
    let settings = PoolSettings::builder()
        .max_size(10)
        .acquire_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut connectors = Vec::new();
    for _ in 0..pools / 2 {
        let config = endpoint
            .config(pg, "admin", "dsql")
            .unwrap()
            .connection_rate(rate)
            .connect_timeout(Duration::from_secs(30))
            .pool(settings.clone());
        connectors.push(Connector::new(config).await.unwrap());
    }
    let started = std::time::Instant::now();
    let (results, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    for connector in &connectors {
        let diesel = connector.diesel_pool().await.unwrap();
        let postgres = connector.postgres_pool().await.unwrap();
        for _ in 0..10 {
            let (diesel, postgres) = (diesel.clone(), postgres.clone());
            let (sent, mut waiting) = (results.clone(), released.clone());
            tokio::spawn(async move {
                let mut conn = diesel.get().await;
                let ok = match &mut conn {
                    Ok(conn) => dal::diesel::sql_query("SELECT 1")
                        .execute(&mut **conn)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                sent.send(ok).unwrap();
                let _ = waiting.wait_for(|r| *r).await;
            });
            let (results, mut released) = (results.clone(), released.clone());
            tokio::spawn(async move {
                let client = postgres.get().await;
                let ok = match &client {
                    Ok(client) => client
                        .simple_query("SELECT 1")
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                results.send(ok).unwrap();
                let _ = released.wait_for(|r| *r).await;
            });
        }
    }
    drop(results);
    let mut failed = Vec::new();
    for _ in 0..pools * 10 {
        if let Err(e) = answered.recv().await.unwrap() {
            failed.push(e);
        }
    }
    let took = started.elapsed();
    release.send(true).unwrap();
    for connector in connectors {
        connector.shutdown().await;
    }
    if !failed.is_empty() {
        eprintln!("first failures: {:?}", &failed[..failed.len().min(3)]);
    }
    (failed.len(), took)
}

/// 200 connections from 20 pools at once against DSQL's connection rate (here 100 per second
/// with bursts of 20, so that 200 exceed it): none fails. Without a limit of its own the
/// connector tries refused connections again. With one under the server's, the connector holds
/// its rate and the server refuses few or none: a connection that waits for the CPU after its
/// place was granted can reach the server together with later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_under_the_rate_limit_has_no_failures() {
    let pg = dsql_cluster().await;
    let endpoint = LocalDsqlEndpoint::start(&pg).await.unwrap();
    let server = ConnectionRate::new(100, 20).unwrap();

    endpoint.limit_connection_rate(Some(server));
    let unlimited = ConnectionRate::new(1_000_000, 1_000_000).unwrap();
    let (failed, took) = storm(&pg, &endpoint, 20, unlimited).await;
    let refused_unlimited = endpoint.refused();
    println!(
        "connection storm | 200 connections, server 100/s burst 20, no client limit | failed \
         {failed} | refused and tried again {refused_unlimited} | all answered in {took:?}"
    );
    assert_eq!(failed, 0);
    // 200 at once against a bucket of 20 filled at 100 per second.
    assert!(refused_unlimited >= 100, "{refused_unlimited}");

    // A client limit under the server's rate, on an endpoint of its own (a pool may still be
    // opening a connection it no longer needs on the first one).
    let endpoint = LocalDsqlEndpoint::start(&pg).await.unwrap();
    endpoint.limit_connection_rate(Some(server));
    let client = ConnectionRate::new(80, 10).unwrap();
    let (failed, took) = storm(&pg, &endpoint, 20, client).await;
    let refused = endpoint.refused();
    println!(
        "connection storm | 200 connections, server 100/s burst 20, client 80/s burst 10 | \
         failed {failed} | refused and tried again {refused} | all answered in {took:?}"
    );
    assert_eq!(failed, 0);
    assert!(refused < refused_unlimited / 2, "{refused}");
    // The client held its rate: 190 connections beyond its burst at 80 per second.
    assert!(
        took >= Duration::from_secs_f64(190.0 / 80.0 * 0.95),
        "{took:?}"
    );
}

/// A cluster whose database `dsql` refuses what DSQL refuses, and a connector to it as
/// `admin`.
async fn checked_cluster() -> (LocalPostgres, Connector) {
    let pg = dsql_cluster().await;
    pg.enable_dsql_checks("dsql", dal::local::DsqlChecks::Enforce)
        .await
        .unwrap();
    let connector = Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()))
        .await
        .unwrap();
    (pg, connector)
}

/// Aurora DSQL runs every transaction at repeatable read, with optimistic concurrency: a write
/// to a row changed since the transaction began fails with SQLSTATE 40001. A checked local
/// database does the same. At PostgreSQL's default, read committed, the second writer
/// overwrote the first: a conflict that dal's retries never met in a test.
#[tokio::test]
async fn a_write_that_conflicts_fails_with_40001_as_on_dsql() {
    let (_pg, connector) = checked_cluster().await;
    let (first, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let (second, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    first
        .batch_execute("CREATE TABLE kv (k text PRIMARY KEY, v text)")
        .await
        .unwrap();
    first
        .batch_execute("INSERT INTO kv VALUES ('a', '0')")
        .await
        .unwrap();
    first
        .batch_execute("BEGIN; SELECT v FROM kv WHERE k = 'a'")
        .await
        .unwrap();
    second
        .batch_execute("UPDATE kv SET v = '1' WHERE k = 'a'")
        .await
        .unwrap();
    let err = first
        .batch_execute("UPDATE kv SET v = '2' WHERE k = 'a'")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("40001"), "{err:?}");
    first.batch_execute("ROLLBACK").await.unwrap();
}

/// Each PostgreSQL feature DSQL refuses is refused by a checked local database, with SQLSTATE
/// 0A000 and a message naming it, while what DSQL accepts goes through.
#[tokio::test]
async fn what_dsql_refuses_is_refused_locally() {
    let (_pg, connector) = checked_cluster().await;
    let (client, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let accepted = [
        "CREATE TABLE p (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v text UNIQUE)",
        "CREATE TABLE e (x int)",
        "CREATE INDEX ON e (x)",
        "CREATE SEQUENCE q1 CACHE 65536",
        "CREATE TABLE i (id bigint GENERATED ALWAYS AS IDENTITY (CACHE 65536) PRIMARY KEY)",
        "CREATE FUNCTION one() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE VIEW pv AS SELECT id FROM p",
        "INSERT INTO p (v) VALUES ('a')",
        "BEGIN; INSERT INTO p (v) VALUES ('b'); UPDATE p SET v = 'c' WHERE v = 'b'; COMMIT",
        "BEGIN; CREATE TABLE one_ddl (x int); COMMIT",
        "DELETE FROM e",
    ];
    for sql in accepted {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let refused = [
        (
            "CREATE TABLE c (id uuid PRIMARY KEY, p uuid REFERENCES p (id))",
            "foreign keys",
        ),
        (
            "ALTER TABLE e ADD FOREIGN KEY (x) REFERENCES i (id)",
            "foreign keys",
        ),
        ("CREATE TABLE s (id serial PRIMARY KEY)", "SERIAL columns"),
        ("CREATE SEQUENCE q2 CACHE 100", "sequences with a CACHE"),
        ("CREATE TEMP TABLE t (x int)", "temporary tables"),
        ("CREATE TABLE j (x jsonb)", "jsonb columns"),
        ("ALTER TABLE e ADD COLUMN j jsonb", "jsonb columns"),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
            "functions in languages other than SQL",
        ),
        ("CREATE INDEX ON p (v, id)", "synchronous CREATE INDEX"),
        (
            "CREATE TRIGGER tr BEFORE INSERT ON e FOR EACH ROW EXECUTE FUNCTION one()",
            "triggers",
        ),
        ("CREATE TYPE mood AS ENUM ('ok')", "types"),
        ("CREATE TABLE copy AS SELECT * FROM p", "CREATE TABLE AS"),
        (
            "CREATE TABLE pt (x int) PARTITION BY RANGE (x)",
            "partitioned",
        ),
        (
            "BEGIN; CREATE TABLE a1 (x int); CREATE TABLE a2 (x int); COMMIT",
            "more than one DDL statement",
        ),
        (
            "BEGIN; CREATE TABLE b1 (x int); INSERT INTO p (v) VALUES ('d'); COMMIT",
            "DDL and DML in one transaction",
        ),
        (
            "BEGIN; INSERT INTO p (v) VALUES ('e'); CREATE TABLE b2 (x int); COMMIT",
            "DDL and DML in one transaction",
        ),
        // A write that matched no row is a write all the same.
        (
            "BEGIN; DELETE FROM e WHERE x = -1; CREATE TABLE b3 (x int); COMMIT",
            "DDL and DML in one transaction",
        ),
        ("TRUNCATE e", "TRUNCATE"),
    ];
    for (sql, feature) in refused {
        let err = client
            .batch_execute(sql)
            .await
            .expect_err(&format!("{sql} should have been refused"));
        client.batch_execute("ROLLBACK").await.unwrap();
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {err:?}"));
        assert_eq!(db.code().code(), "0A000", "{sql}: {db:?}");
        assert!(
            db.message().starts_with("Aurora DSQL does not support")
                && db.message().contains(feature),
            "{sql}: {}",
            db.message()
        );
    }
    // Nothing that was refused is left behind.
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname IN ('c', 's', 'j', 'a1', 'a2', 'b1', 'b2', 'b3', 'pt', 'copy')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    connector.shutdown().await;
}

/// The sample schema migrates on a checked database with `DsqlMigrator`, `fresh` included; the plain
/// `Migrator` (one transaction per migration) is refused with a message that names the fix.
#[tokio::test]
async fn the_sample_schema_migrates_on_checked_dsql_only_with_the_dsql_migrator() {
    use dal::local::DsqlChecks;
    let pg = dsql_cluster().await;
    pg.create_database("plain", Some("admin")).await.unwrap();
    for database in ["dsql", "plain"] {
        pg.enable_dsql_checks(database, DsqlChecks::Enforce)
            .await
            .unwrap();
    }
    let dsql = Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()))
        .await
        .unwrap();
    let db = tests::migration_db(&dsql).await;
    // Given a transaction, where DSQL allows one DDL statement and no DDL with DML, each
    // way of running the migrations is refused before it sends anything, naming the fix.
    {
        use sea_orm::TransactionTrait;
        let tx = db.begin().await.unwrap();
        for (method, run) in [
            ("up", migration::DsqlMigrator::up(&tx, None)),
            ("down", migration::DsqlMigrator::down(&tx, None)),
            ("fresh", migration::DsqlMigrator::fresh(&tx)),
            ("refresh", migration::DsqlMigrator::refresh(&tx)),
            ("reset", migration::DsqlMigrator::reset(&tx)),
            ("uninstall", migration::DsqlMigrator::uninstall(&tx)),
        ] {
            let message = run.await.expect_err("a transaction is refused").to_string();
            assert!(
                message.contains(&format!("DsqlMigrator::{method} was given a transaction"))
                    && message.contains("give it the connection"),
                "{method}: {message}"
            );
        }
        tx.commit().await.expect("nothing was sent that aborted it");
    }
    migration::DsqlMigrator::up(&db, None)
        .await
        .expect("DsqlMigrator runs clean under DSQL's rules");
    tests::seaorm_round_trip(&db, "checked").await;
    // `fresh` drops every table, each in a transaction of its own, and migrates again.
    migration::DsqlMigrator::fresh(&db)
        .await
        .expect("DsqlMigrator's fresh runs clean under DSQL's rules");
    tests::seaorm_round_trip(&db, "after fresh").await;
    dsql.shutdown().await;

    let plain =
        Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()).database("plain"))
            .await
            .unwrap();
    let db = tests::migration_db(&plain).await;
    let err = migration::Migrator::up(&db, None)
        .await
        .expect_err("the plain Migrator mixes DDL in one transaction");
    let message = err.to_string();
    assert!(
        message.contains("Aurora DSQL does not support") && message.contains("DsqlMigrator"),
        "{message}"
    );
    plain.shutdown().await;
}

/// Two runs of the DSQL migrator at once (two replicas migrating as they start; DSQL has no
/// advisory lock to take first) both succeed: the one that loses a race reads what is still
/// pending and goes on. Before, both read the same pending migrations and one failed on the
/// other's table or `seaql_migrations` row.
#[tokio::test]
async fn two_dsql_migration_runs_at_once_both_succeed() {
    use dal::local::DsqlChecks;
    let pg = dsql_cluster().await;
    pg.create_database("twice", Some("admin")).await.unwrap();
    pg.enable_dsql_checks("twice", DsqlChecks::Enforce)
        .await
        .unwrap();
    let connect = || async {
        Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()).database("twice"))
            .await
            .unwrap()
    };
    let (one, two) = (connect().await, connect().await);
    let (db_one, db_two) = (
        tests::migration_db(&one).await,
        tests::migration_db(&two).await,
    );
    let (first, second) = tokio::join!(
        migration::DsqlMigrator::up(&db_one, None),
        migration::DsqlMigrator::up(&db_two, None)
    );
    first.expect("the first run");
    second.expect("the second run");
    tests::seaorm_round_trip(&db_one, "after two runs").await;
    one.shutdown().await;
    two.shutdown().await;
}

/// A DSQL migration run whose `CREATE TABLE` meets another run's table first goes on, with
/// each of the errors PostgreSQL raises for two `CREATE TABLE IF NOT EXISTS` at once: the
/// table (`42P07`), its row type (`42710`, from `TypeCreate`), or the catalog's unique
/// index (`23505`). Here an event trigger raises the code at the run's first `CREATE TABLE`,
/// as the race does: in a run of all pending migrations, in one of a number of steps (which
/// reads what is pending first), and in a program that reads what is pending before its run
/// (as `examples::migrate` does, to say how many it applied); each read creates
/// `seaql_migrations` when it is missing. Before, `42710` ended the run (`type
/// "seaql_migrations" already exists`, seen when two runs started together), and a read
/// before the run failed with every code.
#[tokio::test]
async fn a_dsql_migration_run_meeting_another_runs_table_goes_on() {
    let pg = dsql_cluster().await;
    let runs = ["42P07", "42710", "23505"]
        .into_iter()
        .flat_map(|code| [(code, "all"), (code, "steps"), (code, "read")]);
    for (code, run) in runs {
        let database = format!("met_{}_{run}", code.to_lowercase());
        let run = format!("{code}, {run}");
        pg.create_database(&database, Some("admin")).await.unwrap();
        let admin = pg.admin(&database).await.unwrap();
        admin
            .batch_execute(&format!(
                "CREATE SEQUENCE met; \
                 CREATE FUNCTION meet_once() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
                 BEGIN \
                   IF nextval('met') = 1 THEN \
                     RAISE EXCEPTION 'another run created it first' USING ERRCODE = '{code}'; \
                   END IF; \
                 END $$; \
                 CREATE EVENT TRIGGER meet_once ON ddl_command_start \
                   WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION meet_once()"
            ))
            .await
            .unwrap();
        let connector = Connector::new(
            config(&pg, "admin", pg.dsql_source("admin").unwrap()).database(&database),
        )
        .await
        .unwrap();
        let db = tests::migration_db(&connector).await;
        let migrated = async {
            use migration::DsqlMigrator;
            if run.ends_with("read") {
                let pending = DsqlMigrator::get_pending_migrations(&db).await?;
                assert_eq!(pending.len(), 3, "{run}");
            }
            let steps = run.ends_with("steps").then_some(3);
            DsqlMigrator::up(&db, steps).await
        };
        migrated
            .await
            .unwrap_or_else(|e| panic!("{run}: a run that met another's table goes on: {e}"));
        let met: i64 = admin
            .query_one("SELECT last_value FROM met", &[])
            .await
            .unwrap()
            .get(0);
        assert!(met > 1, "{run}: the run never tried again ({met})");
        tests::seaorm_round_trip(&db, &database).await;
        connector.shutdown().await;
    }
}

/// A DSQL migration run that loses a race at every migration (replicas starting together,
/// each ahead on one migration and behind on the next) goes on as long as each retry moves
/// it forward: the pauses start over after progress. Before, the four pauses were one
/// budget for the whole run, and it failed at its third migration (six lost races). Here
/// each migration's record in `seaql_migrations` conflicts twice (SQLSTATE `40001`, as
/// another run's commit would make it) before it goes in.
#[tokio::test]
async fn a_dsql_migration_run_losing_a_race_at_every_migration_completes() {
    let pg = dsql_cluster().await;
    pg.create_database("raced", Some("admin")).await.unwrap();
    let admin = pg.admin("raced").await.unwrap();
    let versions = [
        "m20260101_000001_create_customers",
        "m20260101_000002_create_orders",
        "m20260101_000003_create_order_items",
    ];
    for version in versions {
        admin
            .batch_execute(&format!("CREATE SEQUENCE \"lost_{version}\""))
            .await
            .unwrap();
    }
    admin
        .batch_execute(
            "CREATE TABLE seaql_migrations (version varchar NOT NULL PRIMARY KEY, \
             applied_at bigint NOT NULL); ALTER TABLE seaql_migrations OWNER TO admin; \
             CREATE FUNCTION lose_twice() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
             BEGIN \
               IF nextval(format('%I', 'lost_' || NEW.version)) <= 2 THEN \
                 RAISE EXCEPTION 'change conflicts with another transaction' \
                   USING ERRCODE = '40001'; \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER lose_twice BEFORE INSERT ON seaql_migrations \
               FOR EACH ROW EXECUTE FUNCTION lose_twice()",
        )
        .await
        .unwrap();
    let connector =
        Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()).database("raced"))
            .await
            .unwrap();
    let db = tests::migration_db(&connector).await;
    migration::DsqlMigrator::up(&db, None)
        .await
        .expect("a run that moves forward at every retry completes");
    for version in versions {
        let lost: i64 = admin
            .query_one(&format!("SELECT last_value FROM \"lost_{version}\""), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            lost, 3,
            "{version}: two lost races and the insert that went in"
        );
    }
    connector.shutdown().await;
}

/// A DSQL rollback cut off midway (the process killed, the connection lost; here triggers
/// fail a statement once) leaves a state `up` repairs: each DDL statement commits on its own
/// there, and the record, deleted after the tables were dropped, stayed when its deletion
/// was cut off, so `up` found nothing pending, and the service met a missing table. Nor does
/// `fresh` cut off leave the record of a dropped table: it drops the record first.
#[tokio::test]
async fn a_dsql_rollback_cut_off_midway_leaves_what_up_repairs() {
    let pg = dsql_cluster().await;
    pg.create_database("cutoff", Some("admin")).await.unwrap();
    let admin = pg.admin("cutoff").await.unwrap();
    let connector =
        Connector::new(config(&pg, "admin", pg.dsql_source("admin").unwrap()).database("cutoff"))
            .await
            .unwrap();
    let db = tests::migration_db(&connector).await;
    let tables = || async {
        admin
            .query(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'public' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let all = ["customers", "order_items", "orders", "seaql_migrations"];
    let pending = || async {
        migration::DsqlMigrator::get_pending_migrations(&db)
            .await
            .unwrap()
            .len()
    };
    migration::DsqlMigrator::up(&db, None).await.unwrap();
    // Cuts: the record's deletion, once; the drop `cut_at` counts to (0: none).
    admin
        .batch_execute(
            "CREATE SCHEMA cuts; CREATE SEQUENCE cuts.deletes; \
             CREATE FUNCTION cuts.delete() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
             AS $$ \
             BEGIN \
               IF nextval('cuts.deletes') = 1 THEN RAISE EXCEPTION 'cut off'; END IF; \
               RETURN OLD; \
             END $$; \
             CREATE TRIGGER cut_delete BEFORE DELETE ON seaql_migrations \
               FOR EACH ROW EXECUTE FUNCTION cuts.delete(); \
             CREATE TABLE cuts.at (n bigint); INSERT INTO cuts.at VALUES (0); \
             CREATE SEQUENCE cuts.drops; \
             CREATE FUNCTION cuts.drop() RETURNS event_trigger LANGUAGE plpgsql \
             SECURITY DEFINER AS $$ \
             BEGIN \
               IF nextval('cuts.drops') = (SELECT n FROM cuts.at) THEN \
                 RAISE EXCEPTION 'cut off'; \
               END IF; \
             END $$; \
             CREATE EVENT TRIGGER cut_drop ON sql_drop EXECUTE FUNCTION cuts.drop()",
        )
        .await
        .unwrap();
    let cut_at_drop = |n: i64| {
        let admin = &admin;
        async move {
            admin
                .execute("UPDATE cuts.at SET n = $1", &[&n])
                .await
                .unwrap();
            admin
                .batch_execute("SELECT setval('cuts.drops', 1, false)")
                .await
                .unwrap();
        }
    };

    // Cut off at the record: nothing is dropped.
    migration::DsqlMigrator::down(&db, Some(1))
        .await
        .expect_err("cut off");
    migration::DsqlMigrator::up(&db, None).await.unwrap();
    assert_eq!(tables().await, all);
    // Cut off at the drop after it: pending again, and `up` makes it anew.
    cut_at_drop(1).await;
    migration::DsqlMigrator::down(&db, Some(1))
        .await
        .expect_err("cut off");
    assert_eq!(pending().await, 1);
    cut_at_drop(0).await;
    migration::DsqlMigrator::up(&db, None).await.unwrap();
    assert_eq!(
        (tables().await, pending().await),
        (all.map(String::from).to_vec(), 0)
    );
    // The rollback goes through once nothing cuts it off.
    migration::DsqlMigrator::down(&db, Some(1)).await.unwrap();
    assert_eq!(tables().await, ["customers", "orders", "seaql_migrations"]);
    migration::DsqlMigrator::up(&db, None).await.unwrap();

    // `fresh`, cut off at its second drop: what it dropped first is the record, even where
    // the catalog lists it after the others (made anew after them here).
    migration::DsqlMigrator::uninstall(&db).await.unwrap();
    migration::DsqlMigrator::up(&db, None).await.unwrap();
    let listed = admin
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            &[],
        )
        .await
        .unwrap();
    assert_ne!(
        listed[0].get::<_, String>(0),
        "seaql_migrations",
        "the catalog lists the records first: this test would not show their order"
    );
    cut_at_drop(2).await;
    migration::DsqlMigrator::fresh(&db)
        .await
        .expect_err("cut off");
    cut_at_drop(0).await;
    migration::DsqlMigrator::up(&db, None).await.unwrap();
    assert_eq!(tables().await, all);
    connector.shutdown().await;
}

/// An endpoint that refuses connections for a limit (a full server's `53300`; Aurora DSQL's
/// connection rate, `53400`) is busy, not out of reach: the refusal is the answer, and
/// nothing goes to the peer region. Before, the connect that met it tried the peer, and one
/// that opened there moved every pool to it for good.
#[tokio::test]
async fn a_limit_refusal_is_no_reason_to_fail_over() {
    let pg = dsql_cluster().await;
    let near = LocalDsqlEndpoint::start(&pg).await.unwrap();
    let peer = LocalDsqlEndpoint::start_peer(&pg).await.unwrap();
    let config = near
        .config(&pg, "admin", "dsql")
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .failover(peer.config(&pg, "admin", "dsql").unwrap());
    let connector = Connector::new(config).await.unwrap();
    let active = connector.active_endpoint();
    pg.set_connection_limit("admin", Some(1)).await.unwrap();
    let (_held, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let refused = connector.connect().await.map(drop).unwrap_err();
    assert_eq!(refused.sqlstate(), Some("53300"), "{refused:?}");
    assert_eq!(peer.accepted(), 0, "the peer was tried");
    assert_eq!(connector.active_endpoint(), active);

    // Nor does a SeaORM transaction that found its pool full, whose `BEGIN` timed out.
    pg.set_connection_limit("admin", None).await.unwrap();
    let db = connector
        .seaorm_with(
            &PoolSettings::builder()
                .max_size(1)
                .acquire_timeout(Duration::from_millis(200))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let open = db.begin().await.unwrap();
    let opened = near.accepted();
    let err = connector
        .transactions()
        .with_policy(dal::RetryPolicy::no_retries())
        .seaorm(&db, dal::TxMode::new(), |_| Box::pin(async { Ok(()) }))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, dal::Error::RetriesExhausted { last, .. } if last.is_connection_failure()),
        "{err:?}"
    );
    assert_eq!(
        near.accepted(),
        opened,
        "a connection opened to follow a failover"
    );
    assert_eq!((peer.accepted(), connector.active_endpoint()), (0, active));
    drop(open);
    connector.shutdown().await;
}

/// A connect refused for a limit tries again with the token it has: nothing about the limit
/// makes the token suspect. Uncached, each try fetched a new one, some fifteen credential
/// requests in a connect timeout of 10 s (for Lakebase, calls to a service that may answer
/// 429, and then the connects fail for the token instead).
#[tokio::test]
async fn a_connect_refused_for_a_limit_tries_again_with_its_token() {
    let pg = dsql_cluster().await;
    let config = config(&pg, "admin", pg.dsql_source("admin").unwrap())
        .strategy(dal::TokenStrategy::Uncached)
        .connect_timeout(Duration::from_secs(2));
    let connector = Connector::new(config).await.unwrap();
    pg.set_connection_limit("admin", Some(1)).await.unwrap();
    let (_held, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let fetched = connector.cache().fetches();
    let started = std::time::Instant::now();
    let refused = connector.connect().await.map(drop).unwrap_err();
    assert_eq!(refused.sqlstate(), Some("53300"), "{refused:?}");
    // Tried again until the timeout (pauses of 20 ms doubling), with one token.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not tried again"
    );
    assert_eq!(connector.cache().fetches(), fetched + 1);
    connector.shutdown().await;
}

/// The local endpoint forwards both ways without Nagle's algorithm, as the client and the
/// server send: with it on, the last short piece of a reply waited for the client's delayed
/// ACK, and a query of 2,000 rows took 53 ms through the endpoint against 2.4 ms direct, which
/// no real endpoint adds.
#[tokio::test]
async fn the_local_endpoint_forwards_without_nagle_delay() {
    let pg = dsql_cluster().await;
    let endpoint = LocalDsqlEndpoint::start(&pg).await.unwrap();
    let connector = Connector::new(endpoint.config(&pg, "app", "dsql").unwrap())
        .await
        .unwrap();
    let (client, connection) = connector.connect().await.unwrap();
    let connection = tokio::spawn(connection);
    client.batch_execute("SELECT 1").await.unwrap();

    let sockets: Vec<_> = [endpoint.port(), pg.port()]
        .into_iter()
        .flat_map(crate::pools::sockets_at)
        .collect();
    // The client's socket to the endpoint, and the endpoint's two: from the client, to the
    // server.
    assert!(sockets.len() >= 3, "{sockets:?}");
    let delayed = sockets.iter().filter(|(_, nodelay)| !nodelay).count();
    assert_eq!(
        delayed,
        0,
        "{delayed} of {} sockets through the endpoint have Nagle's algorithm on",
        sockets.len()
    );
    drop(client);
    connection.await.unwrap().unwrap();
}

/// Each endpoint of a multi-region cluster accepts only tokens signed for it, as DSQL's do
/// (the SigV4 signature covers the host): a pool that went on signing for the endpoint it
/// failed over from is refused at the other. Both local endpoints accepted both endpoints'
/// tokens, so such a pool passed.
#[tokio::test]
async fn each_endpoint_of_a_cluster_accepts_only_tokens_signed_for_it() {
    let pg = dsql_cluster().await;
    let near = LocalDsqlEndpoint::start(&pg).await.unwrap();
    let peer = LocalDsqlEndpoint::start_peer(&pg).await.unwrap();
    for (at, other) in [(&near, &peer), (&peer, &near)] {
        let own = Connector::new(at.config(&pg, "admin", "dsql").unwrap())
            .await
            .unwrap();
        own.connect().await.map(drop).expect("its own token");
        own.shutdown().await;
        let others = other
            .config(&pg, "admin", "dsql")
            .unwrap()
            .credentials
            .expect("the other endpoint's source");
        let config = at.config(&pg, "admin", "dsql").unwrap().credentials(others);
        let wrong = Connector::new(config).await.unwrap();
        let err = wrong.connect().await.map(drop).unwrap_err();
        assert!(err.is_auth_failure(), "{at:?}: {err:?}");
        wrong.shutdown().await;
    }
}

/// A login with a password goes through a local DSQL endpoint as straight to the server:
/// the endpoints connect from addresses of their own, which `pg_hba.conf` names for token
/// logins, and for the others as for 127.0.0.1.
#[tokio::test]
async fn a_password_login_goes_through_each_endpoint() {
    let pg = dsql_cluster().await;
    for endpoint in [
        LocalDsqlEndpoint::start(&pg).await.unwrap(),
        LocalDsqlEndpoint::start_peer(&pg).await.unwrap(),
    ] {
        let config = pg.superuser_config("postgres").port(endpoint.port());
        let connector = Connector::new(config).await.unwrap();
        let (client, connection) = connector.connect().await.expect("a password login");
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.unwrap();
        connector.shutdown().await;
    }
}
