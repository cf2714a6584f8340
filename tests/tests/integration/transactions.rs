//! Transactions against a real server: serialization failures retried through each ORM,
//! every transaction mode proven from inside the transaction, savepoints and the Aurora DSQL
//! guard, result expectations, metrics, health and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use dal::SeaOrmTransaction;
use dal::credentials::Token;
use dal::diesel_async::{
    AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager,
};
use dal::local::LocalPostgres;
use dal::{Connector, Credentials, Isolation, PoolSettings, RetryPolicy, Target, TxMode};
use diesel::sql_types::{BigInt, Text};
use sea_orm::{ConnectionTrait, Statement};
use tokio::sync::Barrier;

const ACCOUNTS: i64 = 3;
const OPENING: i64 = 1000;

/// A connector for a fresh database `name` holding `accounts` (three hot rows) and
/// `transfers` (one row per committed transfer, keyed by its number).
async fn bank(pg: &LocalPostgres, name: &str, target: Target) -> Connector {
    let password = tests::app_database(pg, name).await;
    let config = pg
        .config(name, name, &password)
        .target(target)
        .search_path("public")
        .pool(PoolSettings::builder().max_size(16).build().unwrap());
    let connector = Connector::new(config).await.expect("connector");
    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, {OPENING} FROM generate_series(1, {ACCOUNTS}) g;
             CREATE TABLE transfers (id bigint PRIMARY KEY);"
        ))
        .await
        .unwrap();
    connector
}

/// The total balance and the numbers of the committed transfers.
async fn books(connector: &Connector) -> (i64, Vec<i64>) {
    let raw = connector.postgres_pool().await.unwrap();
    let client = raw.get().await.unwrap();
    let total: i64 = client
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    let ids = client
        .query("SELECT id FROM transfers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (total, ids)
}

/// Transfer `n` moves 1 between two of the three accounts; any two transfers share one.
fn route(n: i64) -> (i64, i64) {
    let from = n % ACCOUNTS + 1;
    (from, from % ACCOUNTS + 1)
}

/// The two new balances of a transfer, as `(account, balance)` in account order: rows are
/// written in one order, as applications do to avoid deadlocks. The three routes form a
/// cycle; written in route order, three transfers could each hold one row and wait for the
/// next, and each such deadlock waits out `deadlock_timeout` (1 s), which on a loaded machine
/// ate the retry budget (a run took 290 s). Conflicts remain: every transfer reads both rows
/// before it writes.
fn writes(from: i64, a: i64, to: i64, b: i64) -> [(i64, i64); 2] {
    let mut writes = [(from, a - 1), (to, b + 1)];
    writes.sort_unstable();
    writes
}

fn serializable() -> TxMode {
    TxMode::new().isolation(Isolation::Serializable)
}

/// The first attempt of every transfer waits at `barrier` after reading, so that all of them
/// read before any writes: the conflicts are certain, not a matter of timing.
#[derive(Clone)]
struct Gate {
    barrier: Arc<Barrier>,
    first: Arc<AtomicBool>,
}

impl Gate {
    fn new(barrier: &Arc<Barrier>) -> Self {
        Self {
            barrier: Arc::clone(barrier),
            first: Arc::new(AtomicBool::new(true)),
        }
    }

    async fn pass(&self) {
        if self.first.swap(false, Ordering::SeqCst) {
            self.barrier.wait().await;
        }
    }
}

async fn seaorm_balance(txn: &SeaOrmTransaction, id: i64) -> dal::Result<i64> {
    let row = txn
        .query_one_raw(Statement::from_string(
            txn.get_database_backend(),
            format!("SELECT balance FROM accounts WHERE id = {id}"),
        ))
        .await?
        .expect("account row");
    Ok(row.try_get::<i64>("", "balance")?)
}

async fn seaorm_transfer(txn: &SeaOrmTransaction, n: i64, gate: Gate) -> dal::Result<()> {
    let (from, to) = route(n);
    let a = seaorm_balance(txn, from).await?;
    let b = seaorm_balance(txn, to).await?;
    gate.pass().await;
    // Writing what was read makes a lost update visible in the total.
    let [(x, x_balance), (y, y_balance)] = writes(from, a, to, b);
    txn.execute_unprepared(&format!(
        "UPDATE accounts SET balance = {x_balance} WHERE id = {x};
         UPDATE accounts SET balance = {y_balance} WHERE id = {y};
         INSERT INTO transfers VALUES ({n});"
    ))
    .await?;
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Balance {
    #[diesel(sql_type = BigInt)]
    balance: i64,
}

async fn diesel_balance(conn: &mut AsyncPgConnection, id: i64) -> dal::Result<i64> {
    let row: Balance = diesel::sql_query(format!("SELECT balance FROM accounts WHERE id = {id}"))
        .get_result(conn)
        .await?;
    Ok(row.balance)
}

async fn diesel_transfer(conn: &mut AsyncPgConnection, n: i64, gate: Gate) -> dal::Result<()> {
    let (from, to) = route(n);
    let a = diesel_balance(conn, from).await?;
    let b = diesel_balance(conn, to).await?;
    gate.pass().await;
    let [(x, x_balance), (y, y_balance)] = writes(from, a, to, b);
    for sql in [
        format!("UPDATE accounts SET balance = {x_balance} WHERE id = {x}"),
        format!("UPDATE accounts SET balance = {y_balance} WHERE id = {y}"),
        format!("INSERT INTO transfers VALUES ({n})"),
    ] {
        diesel::sql_query(sql).execute(conn).await?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Orm {
    SeaOrm,
    Diesel,
}

/// Runs `count` concurrent transfers under SERIALIZABLE; returns each one's outcome.
async fn transfers(
    connector: &Connector,
    orm: Orm,
    policy: RetryPolicy,
    count: i64,
) -> Vec<dal::Result<()>> {
    let tx = connector.transactions().with_policy(policy);
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let barrier = Arc::new(Barrier::new(count as usize));
    let tasks: Vec<_> = (1..=count)
        .map(|n| {
            let (tx, db, diesel, gate) =
                (tx.clone(), db.clone(), diesel.clone(), Gate::new(&barrier));
            tokio::spawn(async move {
                match orm {
                    Orm::SeaOrm => {
                        tx.seaorm(&db, serializable(), |txn| {
                            Box::pin(seaorm_transfer(txn, n, gate.clone()))
                        })
                        .await
                    }
                    Orm::Diesel => {
                        tx.diesel(&diesel, serializable(), |conn| {
                            Box::pin(diesel_transfer(conn, n, gate.clone()))
                        })
                        .await
                    }
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("transfers finish")
            .expect("task");
        outcomes.push(outcome);
    }
    outcomes
}

async fn concurrent_transfers(orm: Orm) {
    let pg = tests::server().await;
    const N: i64 = 8;

    // With retries: every transfer commits exactly once and the total is conserved.
    let connector = bank(&pg, "bank_retry", Target::Postgres).await;
    let patient = RetryPolicy::builder()
        .attempts(100)
        .delays(Duration::from_millis(1), Duration::from_millis(20))
        .build()
        .unwrap();
    for outcome in transfers(&connector, orm, patient, N).await {
        outcome.unwrap_or_else(|e| panic!("{orm:?}: {e:?}"));
    }
    let (total, ids) = books(&connector).await;
    assert_eq!(total, ACCOUNTS * OPENING, "{orm:?}");
    assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "{orm:?}");
    connector.shutdown().await;

    // Without retries: the conflicts reach the caller as typed errors, and only the
    // transfers reported as committed are in the books.
    let connector = bank(&pg, "bank_once", Target::Postgres).await;
    let outcomes = transfers(&connector, orm, RetryPolicy::no_retries(), N).await;
    let mut committed = Vec::new();
    for (n, outcome) in (1..=N).zip(&outcomes) {
        match outcome {
            Ok(()) => committed.push(n),
            Err(e) => {
                assert!(e.is_conflict(), "{orm:?}: {e:?}");
                assert!(
                    matches!(e, dal::Error::RetriesExhausted { attempts: 1, .. }),
                    "{orm:?}: {e:?}"
                );
                assert!(
                    matches!(e.sqlstate(), Some("40001" | "40P01") | None),
                    "{e:?}"
                );
            }
        }
    }
    assert!(committed.len() < N as usize, "{orm:?}: no transfer failed");
    let (total, ids) = books(&connector).await;
    assert_eq!(total, ACCOUNTS * OPENING, "{orm:?}");
    assert_eq!(ids, committed, "{orm:?}");
    connector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seaorm_transfers_under_serializable_commit_once_with_retries() {
    concurrent_transfers(Orm::SeaOrm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn diesel_transfers_under_serializable_commit_once_with_retries() {
    concurrent_transfers(Orm::Diesel).await;
}

#[derive(Debug, PartialEq, Eq, diesel::QueryableByName)]
struct Settings {
    #[diesel(sql_type = Text)]
    isolation: String,
    #[diesel(sql_type = Text)]
    read_only: String,
    #[diesel(sql_type = Text)]
    deferrable: String,
}

const SETTINGS: &str = "SELECT current_setting('transaction_isolation') AS isolation, \
    current_setting('transaction_read_only') AS read_only, \
    current_setting('transaction_deferrable') AS deferrable";

#[tokio::test]
async fn every_transaction_mode_holds_inside_the_transaction_for_both_orms() {
    let pg = tests::server().await;
    let connector = bank(&pg, "modes", Target::Postgres).await;
    let tx = connector.transactions();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let levels = [
        (None, "read committed"),
        (Some(Isolation::ReadCommitted), "read committed"),
        (Some(Isolation::RepeatableRead), "repeatable read"),
        (Some(Isolation::Serializable), "serializable"),
    ];
    let mut checked = 0;
    for (level, isolation) in levels {
        for read_only in [false, true] {
            for deferrable in [false, true] {
                let mut mode = TxMode::new().read_only(read_only).deferrable(deferrable);
                if let Some(level) = level {
                    mode = mode.isolation(level);
                }
                let on_off = |b: bool| if b { "on" } else { "off" }.to_owned();
                let expected = Settings {
                    isolation: isolation.to_owned(),
                    read_only: on_off(read_only),
                    deferrable: on_off(deferrable),
                };
                let seen = tx
                    .seaorm(&db, mode, |txn| {
                        Box::pin(async move {
                            let row = txn
                                .query_one_raw(Statement::from_string(
                                    txn.get_database_backend(),
                                    SETTINGS,
                                ))
                                .await?
                                .expect("a row");
                            Ok(Settings {
                                isolation: row.try_get("", "isolation")?,
                                read_only: row.try_get("", "read_only")?,
                                deferrable: row.try_get("", "deferrable")?,
                            })
                        })
                    })
                    .await
                    .unwrap();
                assert_eq!(seen, expected, "SeaORM {mode:?}");
                let seen = tx
                    .diesel(&diesel, mode, |conn| {
                        Box::pin(async move {
                            Ok(diesel::sql_query(SETTINGS)
                                .get_result::<Settings>(conn)
                                .await?)
                        })
                    })
                    .await
                    .unwrap();
                assert_eq!(seen, expected, "Diesel {mode:?}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 16);

    // Read-only is enforced, not only reported.
    let err = tx
        .diesel(&diesel, TxMode::new().read_only(true), |conn| {
            Box::pin(async move {
                Ok(diesel::sql_query("UPDATE accounts SET balance = 0")
                    .execute(conn)
                    .await?)
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("25006"), "{err:?}");
    connector.shutdown().await;
}

async fn names(connector: &Connector) -> Vec<String> {
    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .unwrap()
        .query("SELECT name FROM notes ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A connector for a fresh database `name` whose search path holds `notes`, empty.
async fn with_notes(pg: &LocalPostgres, name: &str) -> Connector {
    let password = tests::app_database(pg, name).await;
    let config = pg.config(name, name, &password).search_path("public");
    let connector = Connector::new(config).await.expect("connector");
    notes(&connector).await;
    connector
}

async fn notes(connector: &Connector) {
    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE IF NOT EXISTS notes (name text PRIMARY KEY); TRUNCATE notes")
        .await
        .unwrap();
}

/// PostgreSQL answers the COMMIT of a transaction a failed statement aborted with a ROLLBACK
/// and no error. Work that swallows such a failure gets it back from the commit (SQLSTATE
/// `25P02`), not a success for writes that were rolled back; the connection serves on.
#[tokio::test]
async fn committing_after_a_swallowed_failure_fails_in_both_orms() {
    let pg = tests::server().await;
    let connector = bank(&pg, "swallowed", Target::Postgres).await;
    let tx = connector.transactions();
    notes(&connector).await;
    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    let err = tx
        .seaorm(&db, TxMode::new(), |txn| {
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO notes VALUES ('written')")
                    .await?;
                let duplicate = txn
                    .execute_unprepared("INSERT INTO notes VALUES ('written')")
                    .await;
                assert!(duplicate.is_err());
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("25P02"), "{err:?}");
    let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
    txn.execute_unprepared("INSERT INTO notes VALUES ('written')")
        .await
        .unwrap();
    assert!(txn.execute_unprepared("SELECT 1/0").await.is_err());
    let err = dal::Error::from(txn.commit().await.unwrap_err());
    assert_eq!(err.sqlstate(), Some("25P02"), "{err:?}");
    assert!(names(&connector).await.is_empty());
    db.execute_unprepared("INSERT INTO notes VALUES ('seaorm')")
        .await
        .unwrap();

    let diesel = connector.diesel_pool_with(&one_connection()).await.unwrap();
    let err = tx
        .diesel(&diesel, TxMode::new(), |conn| {
            Box::pin(async move {
                diesel::sql_query("INSERT INTO notes VALUES ('written')")
                    .execute(conn)
                    .await?;
                let duplicate = diesel::sql_query("INSERT INTO notes VALUES ('written')")
                    .execute(conn)
                    .await;
                assert!(duplicate.is_err());
                Ok(())
            })
        })
        .await
        .unwrap_err();
    match &err {
        dal::Error::Diesel(diesel::result::Error::DatabaseError(_, info)) => assert!(
            info.message().starts_with("current transaction is aborted"),
            "{err:?}"
        ),
        other => panic!("expected the server's refusal, got {other:?}"),
    }
    let mut conn = diesel.get().await.unwrap();
    diesel::sql_query("INSERT INTO notes VALUES ('diesel')")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(names(&connector).await, ["diesel", "seaorm"]);
    connector.shutdown().await;
}

/// Rows 1 and 2, then a division by zero: the first row comes back before the error, which
/// a caller that takes one row (Diesel's `get_result`) never reads.
const FAILS_AFTER_TWO_ROWS: &str =
    "SELECT CASE WHEN g < 3 THEN g ELSE 1 / (g - g) END AS n FROM generate_series(1::bigint, 5) g";

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    n: i64,
}

/// A statement that fails after its first rows aborts the transaction even when its caller
/// took the first row and never read the error; PostgreSQL then answers COMMIT with ROLLBACK
/// and no error. dal reports that commit as failed, with the SQLSTATE of the failure that
/// aborted the transaction over TLS (where the pool follows the wire), and checks before
/// the commit without it.
#[tokio::test]
async fn a_commit_after_an_error_nobody_read_fails_in_both_orms() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "unread").await;
    let config = pg
        .config("unread", "unread", &password)
        .search_path("public");
    let connector = Connector::new(config.clone()).await.expect("connector");
    let plain = Connector::new(config.ssl_mode(dal::SslMode::Disable))
        .await
        .expect("connector without TLS");
    notes(&connector).await;
    for (connector, name) in [(&connector, "tls"), (&plain, "plain")] {
        let diesel = connector.diesel_pool_with(&one_connection()).await.unwrap();
        let err = connector
            .transactions()
            .diesel(&diesel, TxMode::new(), |conn| {
                Box::pin(async move {
                    diesel::sql_query(format!("INSERT INTO notes VALUES ('{name}')"))
                        .execute(conn)
                        .await?;
                    let first: N = diesel::sql_query(FAILS_AFTER_TWO_ROWS)
                        .get_result(conn)
                        .await?;
                    assert_eq!(first.n, 1);
                    Ok(())
                })
            })
            .await
            .expect_err("a commit the server answered with ROLLBACK must fail");
        match (name, &err) {
            // Over TLS the commit's answer tells, with the failed statement's SQLSTATE.
            ("tls", dal::Error::RolledBackAtCommit { .. }) => {
                assert_eq!(err.sqlstate(), Some("22012"), "{err}")
            }
            // Without, a statement before the commit finds the transaction aborted.
            ("plain", dal::Error::Diesel(diesel::result::Error::DatabaseError(_, info))) => {
                assert!(
                    info.message().starts_with("current transaction is aborted"),
                    "{err:?}"
                )
            }
            _ => panic!("{name}: expected the commit to fail, got {err:?}"),
        }
        assert!(!names(connector).await.iter().any(|n| n == name), "{name}");
        let mut conn = diesel.get().await.unwrap();
        diesel::sql_query(format!("INSERT INTO notes VALUES ('{name}')"))
            .execute(&mut *conn)
            .await
            .unwrap();
    }

    // A serialization failure so hidden is retried like any other.
    let diesel = connector.diesel_pool_with(&one_connection()).await.unwrap();
    let mut conn = diesel.get().await.unwrap();
    dal::diesel_async::SimpleAsyncConnection::batch_execute(
        &mut *conn,
        "CREATE SEQUENCE calls;
         CREATE FUNCTION conflict_once(g bigint) RETURNS bigint LANGUAGE plpgsql AS $$
         BEGIN
           IF nextval('calls') = 1 THEN
             RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
           END IF;
           RETURN g;
         END $$",
    )
    .await
    .unwrap();
    drop(conn);
    connector
        .transactions()
        .diesel(&diesel, TxMode::new(), |conn| {
            Box::pin(async move {
                diesel::sql_query("INSERT INTO notes VALUES ('retried')")
                    .execute(conn)
                    .await?;
                let sql = "SELECT CASE WHEN g < 2 THEN g ELSE conflict_once(g) END AS n \
                           FROM generate_series(1::bigint, 3) g";
                let _: N = diesel::sql_query(sql).get_result(conn).await?;
                Ok(())
            })
        })
        .await
        .expect("retried after the conflict");

    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    let err = connector
        .transactions()
        .seaorm(&db, TxMode::new(), |txn| {
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO notes VALUES ('seaorm')")
                    .await?;
                txn.query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    FAILS_AFTER_TWO_ROWS,
                ))
                .await?;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("22012"), "{err:?}");
    assert_eq!(names(&connector).await, ["plain", "retried", "tls"]);
    plain.shutdown().await;
    connector.shutdown().await;
}

/// A SeaORM statement whose future was dropped (the work gave up on it) and which then
/// failed with a serialization failure is read at COMMIT, and the transaction runs again, as
/// through Diesel: the conflict was read and dropped before the commit, which then failed
/// with `25P02` ("current transaction is aborted"), not retried. The statement waits for an
/// advisory lock the test holds, so that it is dropped while it waits and fails only after.
#[tokio::test]
async fn a_conflict_in_a_dropped_seaorm_statement_is_read_at_commit_and_retried() {
    let pg = tests::server().await;
    let connector = with_notes(&pg, "dropped").await;
    let raw = connector.postgres_pool().await.unwrap();
    raw.get()
        .await
        .unwrap()
        .batch_execute(
            "CREATE SEQUENCE calls;
             CREATE FUNCTION conflict_once() RETURNS bigint LANGUAGE plpgsql AS $$
             BEGIN
               IF nextval('calls') = 1 THEN
                 RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
               END IF;
               RETURN 0;
             END $$",
        )
        .await
        .unwrap();
    let (holder, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let holder = Arc::new(std::sync::Mutex::new(Some(holder)));
    let attempts = Arc::new(AtomicU64::new(0));
    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    connector
        .transactions()
        .seaorm(&db, TxMode::new(), |txn| {
            let (holder, attempts) = (Arc::clone(&holder), Arc::clone(&attempts));
            Box::pin(async move {
                attempts.fetch_add(1, Ordering::Relaxed);
                txn.execute_unprepared("INSERT INTO notes VALUES ('dropped')")
                    .await?;
                let held = holder.lock().unwrap().take();
                let statement =
                    txn.execute_unprepared("SELECT pg_advisory_xact_lock(4242), conflict_once()");
                let Some(held) = held else {
                    statement.await?;
                    return Ok(());
                };
                // Given up once it waits for the lock; the lock goes with the session.
                tokio::select! {
                    done = statement => panic!("ran while the lock was held: {done:?}"),
                    () = waits_for_a_lock(&held) => {}
                }
                drop(held);
                Ok(())
            })
        })
        .await
        .expect("run again after the conflict read at commit");
    assert_eq!(AtomicU64::load(&attempts, Ordering::Relaxed), 2);
    assert_eq!(names(&connector).await, ["dropped"]);
    connector.shutdown().await;
}

/// A SeaORM transaction whose connection was lost before its COMMIT was sent (here while
/// reading the answer owed to a statement the work dropped) fails with the lost connection,
/// not [`dal::Error::AmbiguousCommit`]: nothing can have been committed, and the ambiguity
/// sent its caller to check for writes that cannot be there.
#[tokio::test]
async fn a_seaorm_connection_lost_before_its_commit_is_no_ambiguous_commit() {
    let pg = tests::server().await;
    let connector = with_notes(&pg, "lost").await;
    let (holder, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("SELECT pg_advisory_lock(4243)")
        .await
        .unwrap();
    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    let holder = Arc::new(holder);
    let err = connector
        .transactions()
        .seaorm(&db, TxMode::new(), |txn| {
            let holder = Arc::clone(&holder);
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO notes VALUES ('lost')")
                    .await?;
                tokio::select! {
                    done = txn.execute_unprepared("SELECT pg_advisory_xact_lock(4243)") => {
                        panic!("ran while the lock was held: {done:?}")
                    }
                    () = waits_for_a_lock(&holder) => {}
                }
                holder
                    .batch_execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks \
                         WHERE locktype = 'advisory' AND NOT granted",
                    )
                    .await
                    .unwrap();
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert!(
        !matches!(err, dal::Error::AmbiguousCommit { .. }) && err.is_connection_failure(),
        "{err:?}"
    );
    assert!(names(&connector).await.is_empty());
    connector.shutdown().await;
}

/// The same when the connection was lost with no word from the server, as a network cut
/// looks (here its backend killed with `SIGKILL`): the work swallowed the statement's I/O
/// error and returned, and the COMMIT, written to the dead connection, was called ambiguous.
#[tokio::test]
async fn a_seaorm_connection_lost_without_a_word_before_its_commit_is_no_ambiguous_commit() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let pg = tests::server().await;
    let connector = with_notes(&pg, "killed").await;
    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    let err = connector
        .transactions()
        .seaorm(&db, TxMode::new(), |txn| {
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO notes VALUES ('lost')")
                    .await?;
                let pid: i32 = txn
                    .query_one_raw(Statement::from_string(
                        sea_orm::DbBackend::Postgres,
                        "SELECT pg_backend_pid() AS pid",
                    ))
                    .await?
                    .unwrap()
                    .try_get("", "pid")?;
                let pid = Pid::from_raw(pid);
                kill(pid, Signal::SIGKILL).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while kill(pid, None).is_ok() {
                    assert!(std::time::Instant::now() < deadline, "the backend lives on");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let lost = txn.execute_unprepared("SELECT 1").await;
                assert!(lost.is_err(), "{lost:?}");
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert!(
        !matches!(err, dal::Error::AmbiguousCommit { .. }) && err.is_connection_failure(),
        "{err:?}"
    );
    // The server restarts after a backend's crash, and its recovery, with the test servers'
    // `synchronous_commit=off`, may lose what committed before: the rows are not checked.
    connector.shutdown().await;
}

/// How a test ends the session of a transaction's connection while its work waits.
#[derive(Clone, Copy, Debug)]
enum SessionEnd {
    /// `idle_in_transaction_session_timeout` (FATAL `25P03`), set as the server's or the
    /// role's setting would be: no statement of the work's own tells the pool.
    IdleTimeout,
    /// The same, set by a `SET LOCAL` of the work's own, after which the pool checks the
    /// connection before it hands it out again.
    IdleTimeoutBySet,
    /// `pg_terminate_backend` (FATAL `57P01`).
    Terminated,
}

/// The errors of a SeaORM and a Diesel transaction whose session `end` ended while the work
/// waited, the work then running one more statement when `statement_after`, else
/// committing. Each wrote a row first.
async fn ended_in_the_work(
    connector: &Connector,
    end: SessionEnd,
    statement_after: bool,
) -> [dal::Error; 2] {
    let (watcher, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let watcher = Arc::new(watcher);
    let tx = connector.transactions();
    // Ends the session of backend `pid` as `end` says, and returns once it has ended.
    let end_session = move |watcher: Arc<dal::tokio_postgres::Client>, pid: i32| async move {
        if let SessionEnd::Terminated = end {
            dal::tokio_postgres::Client::execute(
                &watcher,
                "SELECT pg_terminate_backend($1)",
                &[&pid],
            )
            .await
            .unwrap();
        }
        ended(&watcher, pid).await;
    };
    let idle = match end {
        SessionEnd::IdleTimeout => {
            "SELECT set_config('idle_in_transaction_session_timeout', '50', true)"
        }
        SessionEnd::IdleTimeoutBySet => "SET LOCAL idle_in_transaction_session_timeout = 50",
        SessionEnd::Terminated => "SELECT 1",
    };

    let db = connector.seaorm_with(&one_connection()).await.unwrap();
    let seaorm = tx
        .seaorm(&db, TxMode::new(), |txn| {
            let watcher = Arc::clone(&watcher);
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO notes VALUES ('seaorm')")
                    .await?;
                let pid = txn
                    .query_one_raw(Statement::from_string(
                        txn.get_database_backend(),
                        "SELECT pg_backend_pid()",
                    ))
                    .await?
                    .expect("a row")
                    .try_get_by_index::<i32>(0)?;
                txn.execute_unprepared(idle).await?;
                end_session(watcher, pid).await;
                if statement_after {
                    txn.execute_unprepared("INSERT INTO notes VALUES ('seaorm after')")
                        .await?;
                }
                Ok(())
            })
        })
        .await
        .unwrap_err();
    // The next request never meets the ended session: its pool of one closed it.
    db.execute_unprepared("SELECT 1")
        .await
        .unwrap_or_else(|e| panic!("SeaORM's next request after {seaorm}: {e}"));

    let pool = connector.diesel_pool_with(&one_connection()).await.unwrap();
    let diesel = tx
        .diesel(&pool, TxMode::new(), |conn| {
            let watcher = Arc::clone(&watcher);
            Box::pin(async move {
                diesel::sql_query("INSERT INTO notes VALUES ('diesel')")
                    .execute(conn)
                    .await?;
                let pid = diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
                    "pg_backend_pid()",
                ))
                .get_result::<i32>(conn)
                .await?;
                diesel::sql_query(idle).execute(conn).await?;
                end_session(watcher, pid).await;
                if statement_after {
                    diesel::sql_query("INSERT INTO notes VALUES ('diesel after')")
                        .execute(conn)
                        .await?;
                }
                Ok(())
            })
        })
        .await
        .unwrap_err();
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query("SELECT 1")
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("Diesel's next request after {diesel}: {e}"));
    [seaorm, diesel]
}

/// A transaction whose session the server ended while it sat idle in it
/// (`idle_in_transaction_session_timeout`, SQLSTATE `25P03`: a slow call between two
/// statements) fails with that SQLSTATE in both ORMs, at COMMIT or at the next statement,
/// and not as [`dal::Error::AmbiguousCommit`]: the server ends only an idle session that
/// way, before any COMMIT reached it, so nothing can have been committed. Diesel's driver
/// drops the server's error: its COMMIT met a closed connection and was called ambiguous,
/// and its next statement failed with "connection closed", a retryable connection failure
/// with no SQLSTATE. The next request through either pool then opens a new connection:
/// SeaORM's pool kept the ended one after the COMMIT that read the server's FATAL error,
/// and its next request failed on the closed socket.
#[tokio::test]
async fn a_session_ended_idle_in_its_transaction_fails_with_25p03_in_both_orms() {
    let pg = tests::server().await;
    let connector = with_notes(&pg, "idled").await;
    for (end, statement_after) in [
        (SessionEnd::IdleTimeout, false),
        (SessionEnd::IdleTimeout, true),
        (SessionEnd::IdleTimeoutBySet, false),
    ] {
        for err in ended_in_the_work(&connector, end, statement_after).await {
            assert!(
                !matches!(err, dal::Error::AmbiguousCommit { .. }),
                "{err:?}"
            );
            assert_eq!(err.sqlstate(), Some("25P03"), "{err:?}");
            assert!(!err.is_retryable(), "{err:?}");
        }
    }
    assert!(names(&connector).await.is_empty());
    connector.shutdown().await;
}

/// A Diesel transaction whose session was terminated (`pg_terminate_backend`) while its
/// work waited fails at COMMIT with the lost connection, not [`dal::Error::AmbiguousCommit`]:
/// the driver had closed the connection, so the COMMIT never left. (sqlx sends SeaORM's
/// COMMIT and reads the server's FATAL as its answer: that one stays ambiguous, since a
/// session can be terminated after its COMMIT committed.)
#[tokio::test]
async fn a_diesel_commit_that_never_left_is_no_ambiguous_commit() {
    let pg = tests::server().await;
    let connector = with_notes(&pg, "terminated").await;
    let [_, diesel] = ended_in_the_work(&connector, SessionEnd::Terminated, false).await;
    assert!(
        !matches!(diesel, dal::Error::AmbiguousCommit { .. }) && diesel.is_connection_failure(),
        "{diesel:?}"
    );
    assert!(names(&connector).await.is_empty());
    connector.shutdown().await;
}

/// A Diesel connection lost in the work (the driver's own "connection closed", with no
/// answer from the server), or a statement the driver refused to send, runs once, whatever
/// the server last answered on that connection:
/// after a conflict retried on it, the pool read that old SQLSTATE off the wire for the lost
/// connection, and ran the work again and again for as long as its retries allow.
#[tokio::test]
async fn a_diesel_connection_lost_in_the_work_is_not_taken_for_an_earlier_conflict() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "lostwork").await;
    let config = pg.config("lostwork", "lostwork", &password);
    let connector = Connector::new(config).await.expect("connector");
    let tx = connector.transactions();
    let pool = connector.diesel_pool_with(&one_connection()).await.unwrap();
    let attempts = AtomicU64::new(0);
    tx.diesel(&pool, TxMode::new(), |conn| {
        let first = attempts.fetch_add(1, Ordering::Relaxed) == 0;
        Box::pin(async move {
            if first {
                diesel::sql_query(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )
                .execute(conn)
                .await?;
            }
            Ok(())
        })
    })
    .await
    .unwrap();
    assert_eq!(AtomicU64::load(&attempts, Ordering::Relaxed), 2);
    let runs = AtomicU64::new(0);
    let err = tx
        .diesel(&pool, TxMode::new(), |_conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                Err::<(), _>(dal::Error::Diesel(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UnableToSendCommand,
                    Box::new("connection closed".to_owned()),
                )))
            })
        })
        .await
        .unwrap_err();
    assert_eq!(AtomicU64::load(&runs, Ordering::Relaxed), 1, "{err:?}");
    // Nor a statement the driver refused to send (a NUL byte in its text), which no answer
    // came for either.
    let runs = AtomicU64::new(0);
    let err = tx
        .diesel(&pool, TxMode::new(), |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                diesel::sql_query("SELECT 1\0").execute(conn).await?;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(AtomicU64::load(&runs, Ordering::Relaxed), 1, "{err:?}");
    assert!(!err.is_retryable(), "{err:?}");
    connector.shutdown().await;
}

/// A Diesel COMMIT whose connection was lost after it left is an ambiguous commit, also after
/// a conflict the work caught in a savepoint: diesel-async then rolls back after the failed
/// COMMIT, that fails as well on the lost connection, and its error
/// (`RollbackErrorOnCommit`) hid the COMMIT's, so a write the server had committed read as
/// a failure that committed nothing. The COMMIT waits here for a synchronous standby that
/// never comes, and its session is ended while it waits: committed, and no answer.
#[tokio::test]
async fn a_diesel_commit_lost_after_it_left_is_ambiguous_after_a_caught_conflict() {
    let pg = tests::server().await;
    let admin = pg.admin("postgres").await.unwrap();
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let connector = with_notes(&pg, "syncrep").await;
    let (watcher, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    let ender = tokio::spawn(async move {
        let waiting = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                       WHERE wait_event = 'SyncRep'";
        while watcher.query(waiting, &[]).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let tx = connector.transactions();
    let pool = connector.diesel_pool_with(&one_connection()).await.unwrap();
    let inner = tx.clone();
    let work = tx.diesel(&pool, TxMode::new(), move |conn| {
        let tx = inner.clone();
        Box::pin(async move {
            diesel::sql_query("INSERT INTO notes VALUES ('committed')")
                .execute(conn)
                .await?;
            let caught = tx
                .diesel_savepoint(conn, |sp| {
                    Box::pin(async move {
                        diesel::sql_query(
                            "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                        )
                        .execute(sp)
                        .await?;
                        Ok(())
                    })
                })
                .await;
            assert!(caught.is_err());
            diesel::sql_query("SET LOCAL synchronous_commit = on")
                .execute(conn)
                .await?;
            Ok(())
        })
    });
    // Ended by `ender` while its COMMIT waits; a work that failed before it, or a COMMIT
    // that did not wait, fails the test here instead of waiting for ever.
    let err = tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("the COMMIT waited for the standby and its session was never ended")
        .unwrap_err();
    ender.abort();
    assert!(matches!(err, dal::Error::AmbiguousCommit { .. }), "{err:?}");
    assert_eq!(names(&connector).await, ["committed"]);
    connector.shutdown().await;
}

/// Returns once the session of backend `pid` has ended.
async fn ended(client: &dal::tokio_postgres::Client, pid: i32) {
    let alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1";
    while client
        .query_one(alive, &[&pid])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Returns once some session waits for an advisory lock.
async fn waits_for_a_lock(client: &dal::tokio_postgres::Client) {
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    while client
        .query_one(waiting, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn one_connection() -> PoolSettings {
    PoolSettings::builder().max_size(1).build().unwrap()
}

/// Two transactions that write the same two rows in opposite orders deadlock: PostgreSQL
/// ends one with SQLSTATE `40P01`, and it runs again. Here on a server whose messages are in
/// German: diesel-async keeps no SQLSTATE for a deadlock, so dal reads it off the wire, not
/// from the translated message.
#[tokio::test]
async fn a_diesel_deadlock_runs_again_whatever_the_language_of_the_servers_messages() {
    let pg = LocalPostgres::start_localized("de")
        .await
        .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL server: {e}"));
    let connector = bank(&pg, "deadlock", Target::Postgres).await;
    let diesel = connector.diesel_pool().await.unwrap();
    let tx = connector.transactions();
    let barrier = Arc::new(Barrier::new(2));
    let attempts = Arc::new(AtomicU64::new(0));
    let run = |first: i64, second: i64| {
        let (tx, diesel, gate) = (tx.clone(), diesel.clone(), Gate::new(&barrier));
        let attempts = Arc::clone(&attempts);
        async move {
            tx.diesel(&diesel, TxMode::new(), move |conn| {
                let (gate, attempts) = (gate.clone(), Arc::clone(&attempts));
                Box::pin(async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    let update = |id: i64, by: i64| {
                        format!("UPDATE accounts SET balance = balance + {by} WHERE id = {id}")
                    };
                    diesel::sql_query(update(first, -1)).execute(conn).await?;
                    // Each holds its first row when it asks for its second.
                    gate.pass().await;
                    diesel::sql_query(update(second, 1)).execute(conn).await?;
                    Ok(())
                })
            })
            .await
        }
    };
    let (a, b) = tokio::join!(run(1, 2), run(2, 1));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(
        AtomicU64::load(&attempts, Ordering::SeqCst),
        3,
        "one of the two ran again"
    );
    assert_eq!(books(&connector).await.0, ACCOUNTS * OPENING);
    connector.shutdown().await;
}

/// SeaORM's transaction handles are owned, so a savepoint can outlive the one around it,
/// whose end rolls back the savepoints still open inside it. Such a handle is ended: what it
/// runs fails, and ending it ends nothing else, not the whole transaction, nor a newer
/// savepoint at the same depth.
#[tokio::test]
async fn a_savepoint_ended_with_the_one_around_it_touches_nothing_after() {
    use sea_orm::TransactionTrait;
    let pg = tests::server().await;
    let connector = bank(&pg, "out_of_order", Target::Postgres).await;
    notes(&connector).await;
    let db = connector.seaorm().await.unwrap();
    let insert = |name: &str| format!("INSERT INTO notes VALUES ('{name}')");
    let is_ended = |e: sea_orm::DbErr| assert!(e.to_string().contains("has ended"), "{e}");

    let txn = db.begin().await.unwrap();
    txn.execute_unprepared(&insert("outer")).await.unwrap();
    let s1 = txn.begin().await.unwrap();
    let s2 = s1.begin().await.unwrap();
    s2.execute_unprepared(&insert("never committed"))
        .await
        .unwrap();
    s1.commit().await.unwrap();
    is_ended(s2.execute_unprepared(&insert("stray")).await.unwrap_err());
    // Ended out of order: the transaction stays open around the work that follows.
    is_ended(s2.rollback().await.unwrap_err());
    txn.execute_unprepared(&insert("after")).await.unwrap();

    // A newer savepoint at the depth of an ended one is not taken for it.
    let stale = {
        let s1 = txn.begin().await.unwrap();
        let s2 = s1.begin().await.unwrap();
        s1.rollback().await.unwrap();
        s2
    };
    let s1 = txn.begin().await.unwrap();
    let s2 = s1.begin().await.unwrap();
    is_ended(
        stale
            .execute_unprepared(&insert("stray"))
            .await
            .unwrap_err(),
    );
    drop(stale);
    s2.execute_unprepared(&insert("newer")).await.unwrap();
    s2.commit().await.unwrap();
    s1.commit().await.unwrap();
    txn.commit().await.unwrap();
    assert_eq!(names(&connector).await, ["after", "newer", "outer"]);
    connector.shutdown().await;
}

#[tokio::test]
async fn a_rolled_back_savepoint_keeps_the_outer_work_in_both_orms() {
    let pg = tests::server().await;
    let connector = bank(&pg, "nested", Target::Postgres).await;
    let tx = connector.transactions();

    notes(&connector).await;
    let db = connector.seaorm().await.unwrap();
    let inner = tx.clone();
    tx.seaorm(&db, TxMode::new(), move |txn| {
        let tx = inner.clone();
        Box::pin(async move {
            txn.execute_unprepared("INSERT INTO notes VALUES ('outer')")
                .await?;
            let err = tx
                .seaorm_savepoint(txn, |sp| {
                    Box::pin(async move {
                        sp.execute_unprepared("INSERT INTO notes VALUES ('dropped')")
                            .await?;
                        Err::<(), _>(dal::Error::abort("changed my mind"))
                    })
                })
                .await
                .unwrap_err();
            assert!(matches!(err, dal::Error::Aborted(_)), "{err:?}");
            // A failed statement aborts only the savepoint, not the outer transaction.
            let err = tx
                .seaorm_savepoint(txn, |sp| {
                    Box::pin(async move {
                        sp.execute_unprepared("INSERT INTO notes VALUES ('outer')")
                            .await?;
                        Ok(())
                    })
                })
                .await
                .unwrap_err();
            assert_eq!(err.sqlstate(), Some("23505"), "{err:?}");
            tx.seaorm_savepoint(txn, |sp| {
                Box::pin(async move {
                    sp.execute_unprepared("INSERT INTO notes VALUES ('kept')")
                        .await?;
                    Ok(())
                })
            })
            .await?;
            txn.execute_unprepared("INSERT INTO notes VALUES ('after')")
                .await?;
            Ok(())
        })
    })
    .await
    .unwrap();
    assert_eq!(names(&connector).await, ["after", "kept", "outer"]);

    notes(&connector).await;
    let diesel = connector.diesel_pool().await.unwrap();
    let inner = tx.clone();
    tx.diesel(&diesel, TxMode::new(), move |conn| {
        let tx = inner.clone();
        Box::pin(async move {
            diesel::sql_query("INSERT INTO notes VALUES ('outer')")
                .execute(conn)
                .await?;
            let err = tx
                .diesel_savepoint(conn, |sp| {
                    Box::pin(async move {
                        diesel::sql_query("INSERT INTO notes VALUES ('dropped')")
                            .execute(sp)
                            .await?;
                        diesel::sql_query("INSERT INTO notes VALUES ('outer')")
                            .execute(sp)
                            .await?;
                        Ok(())
                    })
                })
                .await
                .unwrap_err();
            assert_eq!(err.sqlstate(), Some("23505"), "{err:?}");
            tx.diesel_savepoint(conn, |sp| {
                Box::pin(async move {
                    diesel::sql_query("INSERT INTO notes VALUES ('kept')")
                        .execute(sp)
                        .await?;
                    Ok(())
                })
            })
            .await?;
            diesel::sql_query("INSERT INTO notes VALUES ('after')")
                .execute(conn)
                .await?;
            Ok(())
        })
    })
    .await
    .unwrap();
    assert_eq!(names(&connector).await, ["after", "kept", "outer"]);

    // Outside a transaction a savepoint is refused rather than turned into a transaction.
    let mut conn = diesel.get().await.unwrap();
    let err = tx
        .diesel_savepoint(&mut conn, |_| Box::pin(async { Ok(()) }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            dal::Error::Diesel(diesel::result::Error::NotInTransaction)
        ),
        "{err:?}"
    );
    connector.shutdown().await;
}

#[tokio::test]
async fn on_a_dsql_target_nested_transactions_fail_before_anything_is_sent() {
    let pg = tests::server().await;
    let connector = bank(&pg, "dsqlguard", Target::Dsql).await;
    assert_eq!(connector.target(), Target::Dsql);
    notes(&connector).await;
    let tx = connector.transactions();
    let ran = Arc::new(AtomicBool::new(false));

    let db = connector.seaorm().await.unwrap();
    let (inner, flag) = (tx.clone(), Arc::clone(&ran));
    tx.seaorm(&db, TxMode::new(), move |txn| {
        let (tx, flag) = (inner.clone(), Arc::clone(&flag));
        Box::pin(async move {
            txn.execute_unprepared("INSERT INTO notes VALUES ('seaorm')")
                .await?;
            let err = tx
                .seaorm_savepoint(txn, |_| {
                    flag.store(true, Ordering::SeqCst);
                    Box::pin(async { Ok(()) })
                })
                .await
                .unwrap_err();
            assert!(matches!(err, dal::Error::SavepointUnsupported), "{err:?}");
            assert!(err.to_string().contains("DSQL has no SAVEPOINT"), "{err}");
            // SeaORM's own nesting (`begin`, `transaction`) as well.
            let err = sea_orm::TransactionTrait::begin(txn)
                .await
                .map(drop)
                .unwrap_err();
            assert!(err.to_string().contains("DSQL has no SAVEPOINT"), "{err}");
            Ok(())
        })
    })
    .await
    .unwrap();

    let diesel = connector.diesel_pool().await.unwrap();
    let (inner, flag) = (tx.clone(), Arc::clone(&ran));
    tx.diesel(&diesel, TxMode::new(), move |conn| {
        let (tx, flag) = (inner.clone(), Arc::clone(&flag));
        Box::pin(async move {
            diesel::sql_query("INSERT INTO notes VALUES ('diesel')")
                .execute(conn)
                .await?;
            let err = tx
                .diesel_savepoint(conn, |_| {
                    flag.store(true, Ordering::SeqCst);
                    Box::pin(async { Ok(()) })
                })
                .await
                .unwrap_err();
            assert!(matches!(err, dal::Error::SavepointUnsupported), "{err:?}");
            // Still at depth 1: no SAVEPOINT was issued.
            let depth = AnsiTransactionManager::transaction_manager_status_mut(conn)
                .transaction_depth()?
                .map(|d| d.get());
            assert_eq!(depth, Some(1));
            Ok(())
        })
    })
    .await
    .unwrap();
    assert!(
        !AtomicBool::load(&ran, Ordering::SeqCst),
        "the nested work never runs"
    );
    // The outer transactions went on and committed.
    assert_eq!(names(&connector).await, ["diesel", "seaorm"]);
    connector.shutdown().await;
}

#[tokio::test]
async fn result_expectations_count_the_rows_of_both_orms() {
    use dal::diesel::{ExpressionMethods, QueryDsl};
    use dal::expect::{Rows, at_least_one, at_most_one, exactly_one, none};
    use entity::schema::customers;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

    let pg = tests::server().await;
    let connector = bank(&pg, "expect", Target::Postgres).await;
    let db = connector.seaorm().await.unwrap();
    let pool = connector.diesel_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "one").await;
    tests::seaorm_round_trip(&db, "two").await;
    tests::seaorm_round_trip(&db, "two").await;
    let rows = |e: dal::Error| match e {
        dal::Error::RowCount { expected, actual } => (expected, actual),
        other => panic!("{other:?}"),
    };
    let find = |name: &'static str| {
        entity::customer::Entity::find().filter(entity::customer::Column::Name.eq(name))
    };
    assert_eq!(
        rows(exactly_one(find("none").all(&db)).await.unwrap_err()),
        (Rows::ExactlyOne, 0)
    );
    assert_eq!(exactly_one(find("one").all(&db)).await.unwrap().name, "one");
    assert_eq!(
        rows(exactly_one(find("two").all(&db)).await.unwrap_err()),
        (Rows::ExactlyOne, 2)
    );
    assert!(at_most_one(find("none").all(&db)).await.unwrap().is_none());
    assert!(at_most_one(find("one").all(&db)).await.unwrap().is_some());
    assert_eq!(
        rows(at_most_one(find("two").all(&db)).await.unwrap_err()),
        (Rows::AtMostOne, 2)
    );
    assert_eq!(
        rows(at_least_one(find("none").all(&db)).await.unwrap_err()),
        (Rows::AtLeastOne, 0)
    );
    assert_eq!(at_least_one(find("two").all(&db)).await.unwrap().len(), 2);
    none(find("none").all(&db)).await.unwrap();
    assert_eq!(
        rows(none(find("one").all(&db)).await.unwrap_err()),
        (Rows::None, 1)
    );

    let mut conn = pool.get().await.unwrap();
    let q = |name: &'static str| {
        customers::table
            .filter(customers::name.eq(name))
            .select(customers::email)
    };
    let err = exactly_one(q("none").load::<String>(&mut *conn))
        .await
        .unwrap_err();
    assert_eq!(rows(err), (Rows::ExactlyOne, 0));
    let email = exactly_one(q("one").load::<String>(&mut *conn))
        .await
        .unwrap();
    assert!(email.starts_with("one-"), "{email}");
    let err = exactly_one(q("two").load::<String>(&mut *conn))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "expected exactly one row, but 2 row(s) came back"
    );
    assert_eq!(rows(err), (Rows::ExactlyOne, 2));
    assert_eq!(
        at_most_one(q("none").load::<String>(&mut *conn))
            .await
            .unwrap(),
        None
    );
    let err = at_most_one(q("two").load::<String>(&mut *conn))
        .await
        .unwrap_err();
    assert_eq!(rows(err), (Rows::AtMostOne, 2));
    let err = at_least_one(q("none").load::<String>(&mut *conn))
        .await
        .unwrap_err();
    assert_eq!(rows(err), (Rows::AtLeastOne, 0));
    let err = none(q("two").load::<String>(&mut *conn)).await.unwrap_err();
    assert_eq!(rows(err), (Rows::None, 2));
    drop(conn);
    connector.shutdown().await;
}

fn counter(
    snapshot: &[(
        metrics_util::CompositeKey,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
) -> u64 {
    snapshot
        .iter()
        .filter(|(key, _)| key.key().name() == name)
        .map(|(_, value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

fn gauge(
    snapshot: &[(
        metrics_util::CompositeKey,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
) -> Option<f64> {
    snapshot.iter().find_map(|(key, value)| match value {
        metrics_util::debugging::DebugValue::Gauge(g) if key.key().name() == name => {
            Some(g.into_inner())
        }
        _ => None,
    })
}

/// The values recorded into the histogram `name` whose labels include `label`.
fn histogram(
    snapshot: &[(
        metrics_util::CompositeKey,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
    label: (&str, &str),
) -> usize {
    snapshot
        .iter()
        .filter(|(key, _)| {
            key.key().name() == name && key.key().labels().any(|l| (l.key(), l.value()) == label)
        })
        .map(|(_, value)| match value {
            metrics_util::debugging::DebugValue::Histogram(values) => values.len(),
            _ => 0,
        })
        .sum()
}

// One thread, so that the recorder installed for this thread sees the background tasks too.
#[tokio::test(flavor = "current_thread")]
async fn metrics_move_on_refresh_auth_failure_and_retry() {
    use dal::telemetry::*;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    // Each snapshot takes the counts since the one before; all of them are kept, to look
    // for secrets at the end.
    let seen = std::cell::RefCell::new(String::new());
    let snapshot = || {
        let values = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| (key, value))
            .collect::<Vec<_>>();
        seen.borrow_mut().push_str(&format!("{values:?}"));
        values
    };

    let pg = tests::server().await;
    let password = tests::app_database(&pg, "metered").await;
    snapshot();

    // Refresh: a source of expiring tokens, refreshed once more after an invalidation.
    let fetched = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&fetched);
    let pw = password.clone();
    let config = pg
        .config("metered", "metered", "unused")
        .credentials(Credentials::source(move || {
            count.fetch_add(1, Ordering::SeqCst);
            let pw = pw.clone();
            async move {
                Ok::<_, dal::Error>(Token::new(
                    pw,
                    Some(SystemTime::now() + Duration::from_secs(600)),
                ))
            }
        }));
    let connector = Connector::new(config).await.unwrap();
    let token = connector.cache().token().await.unwrap();
    connector.cache().invalidate(&token);
    connector.cache().token().await.unwrap();
    let now = snapshot();
    assert_eq!(counter(&now, TOKEN_REFRESHES), 2);
    let left = gauge(&now, TOKEN_REMAINING_SECONDS).expect("remaining seconds");
    assert!(left > 500.0 && left <= 600.0, "{left}");

    // Connections opened, and a retried transaction: the first attempt meets a real 40001.
    let pool = connector.diesel_pool().await.unwrap();
    let first = Arc::new(AtomicBool::new(true));
    connector
        .transactions()
        .diesel(&pool, serializable(), move |conn| {
            let first = first.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                if first {
                    diesel::sql_query(
                        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                    )
                    .execute(conn)
                    .await?;
                }
                Ok(())
            })
        })
        .await
        .unwrap();
    let now = snapshot();
    assert_eq!(counter(&now, TX_RETRIES), 1);
    assert_eq!(counter(&now, TX_COMMITS), 1);
    assert_eq!(counter(&now, TX_ROLLBACKS), 1);
    assert!(counter(&now, CONNECTIONS_OPENED) > 0);
    assert!(gauge(&now, POOL_CONNECTIONS).is_some());
    // Each attempt checked a connection out, and timed its queries: the failed one too.
    assert!(histogram(&now, POOL_ACQUIRE_SECONDS, ("pool", "diesel")) >= 2);
    assert!(histogram(&now, QUERY_SECONDS, ("failed", "true")) >= 1);
    assert!(histogram(&now, QUERY_SECONDS, ("failed", "false")) >= 2);
    assert_eq!(AtomicU64::load(&fetched, Ordering::SeqCst), 2);
    connector.shutdown().await;

    // Auth failure: a static password is refused once (the same one is not sent again).
    let config = pg.config("metered", "metered", "wrong");
    let connector = Connector::new(config).await.unwrap();
    let err = connector.connect().await.err().expect("refused");
    assert!(err.is_auth_failure(), "{err:?}");
    let now = snapshot();
    assert_eq!(counter(&now, AUTH_FAILURES), 1);
    connector.shutdown().await;

    // No label or key carries a secret.
    let everything = format!("{:?}", snapshot());
    assert!(
        !everything.contains(&password),
        "a metric holds the password"
    );
}

#[tokio::test]
async fn health_reports_pools_and_token_expiry_and_shutdown_closes_every_pool() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "healthy").await;
    let pw = password.clone();
    let expires = SystemTime::now() + Duration::from_secs(900);
    let config = pg
        .config("healthy", "healthy", "unused")
        .credentials(Credentials::source(move || {
            let pw = pw.clone();
            async move { Ok::<_, dal::Error>(Token::new(pw, Some(expires))) }
        }));
    let connector = Connector::new(config).await.unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "h").await;
    tests::diesel_round_trip(&diesel, "h").await;
    raw.get()
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    let health = connector.health();
    assert!(health.is_healthy(), "{health:?}");
    assert_eq!(health.token_source, "custom");
    assert_eq!(health.token_expires_at, Some(expires));
    let left = health.token_remaining.expect("remaining");
    assert!(
        left > Duration::from_secs(800) && left <= Duration::from_secs(900),
        "{left:?}"
    );
    let mut kinds: Vec<_> = health.pools.iter().map(|p| p.kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["diesel", "postgres", "seaorm"]);
    for pool in &health.pools {
        assert!(pool.connections >= 1 && pool.idle >= 1, "{pool:?}");
    }
    assert!(!format!("{health:?}").contains(&password));

    let admin = pg.admin("postgres").await.unwrap();
    let sessions = || async {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'healthy'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n
    };
    assert!(sessions().await >= 3);

    connector.shutdown().await;
    let health = connector.health();
    assert!(health.shut_down && !health.is_healthy());
    assert!(matches!(
        diesel.get().await.err(),
        Some(dal::Error::PoolClosed)
    ));
    assert!(matches!(
        raw.get().await.err(),
        Some(dal::Error::PoolClosed)
    ));
    assert!(matches!(
        connector.diesel_pool().await.err(),
        Some(dal::Error::PoolClosed)
    ));
    for pool in &health.pools {
        assert_eq!(pool.connections, 0, "{pool:?}");
    }
    // The server sees the sessions end (a backend leaves pg_stat_activity as it exits).
    let mut left = sessions().await;
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = sessions().await;
    }
    assert_eq!(left, 0, "sessions still open after shutdown");
}

/// The default retry budget carries ordinary contention: 16 tasks (half SeaORM, half Diesel)
/// each make 40 SERIALIZABLE transfers among three hot accounts; none gives up, each commits
/// once, and the total is conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_retry_budget_carries_ordinary_contention() {
    const TASKS: i64 = 16;
    const EACH: i64 = 40;
    let pg = tests::server().await;
    let connector = bank(&pg, "bank_default", Target::Postgres).await;
    let tx = connector.transactions();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let open = Gate::new(&Arc::new(Barrier::new(1)));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (tx, db, diesel, gate) = (tx.clone(), db.clone(), diesel.clone(), open.clone());
            tokio::spawn(async move {
                let (mut failed, mut most) = (Vec::new(), 0);
                for k in 1..=EACH {
                    let n = task * EACH + k;
                    let mut tries = 0u32;
                    let outcome = if task % 2 == 0 {
                        tx.seaorm(&db, serializable(), |txn| {
                            tries += 1;
                            Box::pin(seaorm_transfer(txn, n, gate.clone()))
                        })
                        .await
                    } else {
                        tx.diesel(&diesel, serializable(), |conn| {
                            tries += 1;
                            Box::pin(diesel_transfer(conn, n, gate.clone()))
                        })
                        .await
                    };
                    most = most.max(tries);
                    if let Err(e) = outcome {
                        failed.push(format!("{n}: {e}"));
                    }
                }
                (failed, most)
            })
        })
        .collect();
    let (mut failed, mut most) = (Vec::new(), 0);
    for task in tasks {
        let (lost, tries) = task.await.expect("task");
        failed.extend(lost);
        most = most.max(tries);
    }
    println!(
        "{} transfers by {TASKS} tasks, {} failed, at most {most} attempts for one, in {:?}",
        TASKS * EACH,
        failed.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let (total, ids) = books(&connector).await;
    assert_eq!(total, ACCOUNTS * OPENING);
    assert_eq!(ids, (1..=TASKS * EACH).collect::<Vec<_>>());
    connector.shutdown().await;
}

/// Aurora DSQL answers optimistic-concurrency conflicts outside explicit transactions too
/// (`OC001` right after a migration changed a table): `idempotent` runs a statement again
/// after each, counts the retries by code, and returns any other failure at once.
#[tokio::test(flavor = "current_thread")]
async fn idempotent_statements_are_run_again_after_occ_conflicts() {
    use dal::telemetry::TX_RETRIES;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let pg = tests::server().await;
    let password = tests::app_database(&pg, "occ").await;
    let connector = Connector::new(pg.config("occ", "occ", &password))
        .await
        .unwrap();
    let db = connector.seaorm().await.unwrap();
    // The first two calls lose a data conflict, the third a schema conflict, as DSQL words
    // them (SQLSTATE 40001); a sequence counts the calls, since it ignores rollbacks.
    db.execute_unprepared(
        "CREATE SEQUENCE calls; \
         CREATE FUNCTION occ() RETURNS text LANGUAGE plpgsql AS $$ BEGIN \
           CASE nextval('calls') \
             WHEN 1, 2 THEN RAISE EXCEPTION 'change conflicts with another transaction, please retry: (OC000)' USING ERRCODE = '40001'; \
             WHEN 3 THEN RAISE EXCEPTION 'schema has been updated by another transaction, please retry: (OC001)' USING ERRCODE = '40001'; \
             ELSE RETURN 'done'; \
           END CASE; END $$",
    )
    .await
    .unwrap();

    let attempts = AtomicU64::new(0);
    let value = connector
        .transactions()
        .idempotent(|| async {
            attempts.fetch_add(1, Ordering::SeqCst);
            let row = db
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT occ() AS v",
                ))
                .await?
                .expect("one row");
            Ok(row.try_get::<String>("", "v")?)
        })
        .await
        .unwrap();
    assert_eq!(
        (value.as_str(), AtomicU64::load(&attempts, Ordering::SeqCst)),
        ("done", 4)
    );
    // A snapshot takes the counts since the one before: one for both codes.
    let snapshot = snapshotter.snapshot().into_vec();
    let retries = |reason: &str| {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == TX_RETRIES
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == reason)
            })
            .map(|(_, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum::<u64>()
    };
    assert_eq!((retries("OC000"), retries("OC001")), (2, 1));

    // Any other failure is the caller's at once.
    attempts.store(0, Ordering::SeqCst);
    let err = connector
        .transactions()
        .idempotent(|| async {
            attempts.fetch_add(1, Ordering::SeqCst);
            db.execute_unprepared("SELECT 1 / 0").await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("22012"), "{err:?}");
    assert_eq!(AtomicU64::load(&attempts, Ordering::SeqCst), 1);
    connector.shutdown().await;
}

/// A statement past a limit of the server fails with SQLSTATE `53400`, the code Aurora DSQL
/// refuses logins over its rate with; only such a login (a `FATAL` error: the session is
/// gone) is a connection failure. The statement counted as one: `idempotent` ran it again
/// for the whole retry budget, and callers' own retries would too.
#[tokio::test]
async fn a_statement_past_a_server_limit_is_no_connection_failure() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "limited").await;
    // A superuser's setting: every session of the database gets it.
    pg.admin("limited")
        .await
        .unwrap()
        .batch_execute("ALTER DATABASE limited SET temp_file_limit = '64kB'")
        .await
        .unwrap();
    let connector = Connector::new(pg.config("limited", "limited", &password))
        .await
        .unwrap();
    const SORT: &str = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 200000) g \
                        ORDER BY g DESC OFFSET 0) sorted";
    let clients = connector.postgres_pool().await.unwrap();
    let db = connector.seaorm().await.unwrap();
    let tx = connector.transactions();
    let attempts = AtomicU64::new(0);
    for orm in ["tokio-postgres", "seaorm"] {
        attempts.store(0, Ordering::SeqCst);
        let err = tx
            .idempotent(|| async {
                attempts.fetch_add(1, Ordering::SeqCst);
                if orm == "seaorm" {
                    db.execute_unprepared(&format!("SET work_mem = '64kB'; {SORT}"))
                        .await?;
                } else {
                    let client = clients.get().await?;
                    client
                        .batch_execute(&format!("SET work_mem = '64kB'; {SORT}"))
                        .await?;
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate(), Some("53400"), "{orm}: {err:?}");
        assert!(!err.is_connection_failure(), "{orm}: {err:?}");
        assert!(!err.is_retryable(), "{orm}: {err:?}");
        assert_eq!(
            AtomicU64::load(&attempts, Ordering::SeqCst),
            1,
            "{orm}: attempts"
        );
    }
    connector.shutdown().await;
}

/// A statement its driver refuses to send (a NUL byte in its text, more than 65,535
/// parameters: refused before anything is written) is no lost connection, in any pool kind,
/// and is not retried: each was called a connection failure and run again for the whole
/// retry budget (20 s), and the SeaORM pool closed its healthy connection each time, as it
/// did after the server's refusal of a NUL byte that sqlx sends.
#[tokio::test]
async fn a_statement_the_driver_refuses_to_send_is_no_lost_connection() {
    let pg = tests::server().await;
    let connector = with_notes(&pg, "unsendable").await;
    let tx = connector.transactions();
    let one = one_connection();
    let postgres = connector.postgres_pool_with(&one).await.unwrap();
    let diesel = connector.diesel_pool_with(&one).await.unwrap();
    let seaorm = connector.seaorm_with(&one).await.unwrap();
    // Each pool's one connection, open.
    drop(postgres.get().await.unwrap());
    drop(diesel.get().await.unwrap());
    seaorm.execute_unprepared("SELECT 1").await.unwrap();
    let opened = connector.connections_opened();
    let too_many = vec![sea_orm::Value::Int(Some(1)); 65_536];
    for kind in ["tokio-postgres", "Diesel", "SeaORM, NUL", "SeaORM"] {
        let runs = AtomicU64::new(0);
        let err = tx
            .idempotent(|| async {
                runs.fetch_add(1, Ordering::Relaxed);
                match kind {
                    "tokio-postgres" => {
                        let client = postgres.get().await?;
                        client.batch_execute("SELECT 1\0").await?;
                    }
                    "Diesel" => {
                        let mut conn = diesel.get().await?;
                        diesel::sql_query("SELECT 1\0").execute(&mut conn).await?;
                    }
                    // sqlx sends it, and the server refuses it (08P01, an ERROR that leaves
                    // the session as it was).
                    "SeaORM, NUL" => {
                        seaorm.execute_unprepared("SELECT 1\0").await?;
                    }
                    _ => {
                        let values = sea_orm::Values(too_many.clone());
                        let statement = Statement::from_sql_and_values(
                            sea_orm::DbBackend::Postgres,
                            "SELECT 1",
                            values,
                        );
                        seaorm.execute_raw(statement).await?;
                    }
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(
            AtomicU64::load(&runs, Ordering::Relaxed),
            1,
            "{kind}: {err:?}"
        );
        assert!(
            !err.is_connection_failure() && !err.is_retryable(),
            "{kind}: {err:?}"
        );
    }
    assert_eq!(
        connector.connections_opened(),
        opened,
        "every pool kept its connection"
    );
    connector.shutdown().await;
}
