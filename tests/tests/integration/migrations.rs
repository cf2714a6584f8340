//! Migrations: up, down to zero, up again, against a real server.

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

async fn applied(db: &DatabaseConnection) -> Vec<String> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT version FROM seaql_migrations ORDER BY version",
    ))
    .await
    .expect("read seaql_migrations")
    .iter()
    .map(|row| row.try_get::<String>("", "version").unwrap())
    .collect()
}

async fn tables(db: &DatabaseConnection) -> Vec<String> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT table_name::text AS name FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> 'seaql_migrations' ORDER BY 1",
    ))
    .await
    .expect("list tables")
    .iter()
    .map(|row| row.try_get::<String>("", "name").unwrap())
    .collect()
}

#[tokio::test]
async fn up_down_up_round_trip() {
    let pg = tests::server().await;
    let db = tests::migrated(&pg, "round_trip").await;
    let all = vec![
        "m20260101_000001_create_customers".to_owned(),
        "m20260101_000002_create_orders".to_owned(),
        "m20260101_000003_create_order_items".to_owned(),
    ];
    assert_eq!(applied(&db).await, all);
    assert_eq!(tables(&db).await, ["customers", "order_items", "orders"]);

    // Running `up` again changes nothing.
    Migrator::up(&db, None).await.expect("second up");
    assert_eq!(applied(&db).await, all);

    Migrator::down(&db, None).await.expect("down to zero");
    assert!(applied(&db).await.is_empty());
    assert!(tables(&db).await.is_empty());

    Migrator::up(&db, None).await.expect("up again");
    assert_eq!(applied(&db).await, all);
    assert_eq!(tables(&db).await, ["customers", "order_items", "orders"]);
    assert!(
        Migrator::get_pending_migrations(&db)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn constraints_hold() {
    let pg = tests::server().await;
    let db = tests::migrated(&pg, "constraints").await;
    let run = |sql: &'static str| {
        let db = db.clone();
        async move { db.execute_unprepared(sql).await }
    };
    run("INSERT INTO customers (id, email, name) VALUES \
         ('0190c7f0-0000-7000-8000-000000000001', 'a@example.com', 'A')")
    .await
    .expect("insert customer");
    let dup = run("INSERT INTO customers (id, email, name) VALUES \
                   ('0190c7f0-0000-7000-8000-000000000002', 'a@example.com', 'B')")
    .await
    .unwrap_err();
    assert!(dup.to_string().contains("customers_email_key"), "{dup}");
    let bad_status = run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a1', '0190c7f0-0000-7000-8000-000000000001', 'lost')")
    .await
    .unwrap_err();
    assert!(
        bad_status.to_string().contains("check constraint"),
        "{bad_status}"
    );
    let orphan = run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a2', '0190c7f0-0000-7000-8000-00000000ffff', 'paid')")
    .await
    .unwrap_err();
    assert!(
        orphan.to_string().contains("fk_orders_customer_id"),
        "{orphan}"
    );
    run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a3', '0190c7f0-0000-7000-8000-000000000001', 'paid')")
    .await
    .expect("insert order");
    let zero_qty = run(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents) \
         VALUES ('0190c7f0-0000-7000-8000-0000000000a3', 1, 'X', 0, 100)",
    )
    .await
    .unwrap_err();
    assert!(
        zero_qty.to_string().contains("check constraint"),
        "{zero_qty}"
    );
}

/// A service writing to `customers` while a transaction that wrote to it stays open (a slow
/// request, a batch job), on a database migrated up to the customers table: the orders
/// migration's foreign key needs a lock on `customers` that the open transaction holds.
struct Busy {
    pg: dal::local::LocalPostgres,
    connector: dal::Connector,
    db: DatabaseConnection,
    open: dal::tokio_postgres::Client,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    worst_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    service: tokio::task::JoinHandle<()>,
}

impl Busy {
    /// The service and its open transaction on `database`; the service's connections and
    /// the migration's end each statement after `statement_timeout`
    /// (`DAL_STATEMENT_TIMEOUT_MS` in the `.env` they share), if given.
    async fn start(database: &str, statement_timeout: Option<std::time::Duration>) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

        let pg = tests::server().await;
        let password = tests::owned_database(&pg, database).await;
        let mut config = pg.config(database, database, &password);
        if let Some(timeout) = statement_timeout {
            config = config.statement_timeout(timeout);
        }
        let connector = dal::Connector::new(config).await.unwrap();
        let db = tests::migration_db(&connector).await;
        Migrator::up(&db, Some(1)).await.expect("customers");

        // The service: writes to customers, one after another.
        let pool = connector.postgres_pool().await.unwrap();
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let worst_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let service = tokio::spawn({
            let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
            let worst_us = worst_us.clone();
            async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = std::time::Instant::now();
                    let written = async {
                        pool.get()
                            .await?
                            .execute(
                                "INSERT INTO customers (id, email, name) \
                                 VALUES (gen_random_uuid(), gen_random_uuid()::text, 'service')",
                                &[],
                            )
                            .await
                            .map_err(dal::Error::Database)
                    }
                    .await;
                    worst_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
                    match written {
                        Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                        Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            }
        });

        // The open transaction, holding its write lock on customers.
        let (open, connection) = connector.connect().await.unwrap();
        tokio::spawn(connection);
        open.batch_execute(
            "BEGIN; INSERT INTO customers (id, email, name) \
             VALUES (gen_random_uuid(), 'open@example.com', 'open')",
        )
        .await
        .unwrap();
        Busy {
            pg,
            connector,
            db,
            open,
            done,
            failed,
            worst_us,
            stop,
            service,
        }
    }

    /// Waits until the service has written `n` more rows.
    async fn writes_on(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let before = self.done.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while self.done.load(Ordering::SeqCst) < before + n {
            assert!(std::time::Instant::now() < deadline, "the service stalled");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Stops the service; asserts that none of its writes failed and that none waited
    /// longer than `most` (each try of the migration stalls them for its lock timeout at most).
    async fn finish(self, most: std::time::Duration) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        self.service.await.unwrap();
        let worst = std::time::Duration::from_micros(self.worst_us.load(Ordering::SeqCst));
        println!(
            "service writes {}, failed {}, worst write {} ms (lock_timeout {})",
            self.done.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            worst.as_millis(),
            migration::LOCK_TIMEOUT
        );
        assert_eq!(self.failed.load(Ordering::SeqCst), 0);
        assert!(worst < most, "a write waited {worst:?}");
        self.connector.shutdown().await;
        drop(self.pg);
    }
}

/// A migration under a running service whose open transaction never ends. Waiting for its
/// lock, the migration would queue every later write to `customers` behind it, and the
/// service would stall for as long as that transaction stays open. Each try of a migration
/// bounds its lock waits (`lock_timeout`): it gives up instead (SQLSTATE `55P03`), tries
/// again after a pause (`migration::LOCK_RETRY_PAUSES`), and after the last try the run fails
/// with that error; the service's writes go on throughout, and run again once the
/// transaction has ended, the migration succeeds. A `statement_timeout` shorter than the
/// lock timeout, the service's own (`DAL_STATEMENT_TIMEOUT_MS` in its `.env`), does not end
/// the migration's statements: before, the first try failed with SQLSTATE `57014`. Nor does
/// the migration wait for its lock for longer than a quarter of that timeout: the service's
/// writes queued behind it were ended by their own timeout (`57014`), one at each try.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_that_cannot_take_its_lock_gives_up_instead_of_stalling_the_service() {
    let busy = Busy::start("busy", Some(std::time::Duration::from_secs(1))).await;
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        Migrator::up(&busy.db, None),
    )
    .await
    .expect("the migration waited on the lock, and the service's writes behind it")
    .expect_err("the lock is held");
    assert!(err.to_string().contains("lock timeout"), "{err}");
    // The transaction is still open, and the service writes on.
    busy.writes_on(10).await;
    busy.open.batch_execute("COMMIT").await.unwrap();
    Migrator::up(&busy.db, None)
        .await
        .expect("once the transaction ended");
    assert!(
        Migrator::get_pending_migrations(&busy.db)
            .await
            .unwrap()
            .is_empty()
    );
    busy.finish(std::time::Duration::from_secs(10)).await;
}

/// The same, with the transaction ending after the migration's first try gave up: the run
/// tries again after a pause and completes, with no command to run again and no write of
/// the service failed. Before, the run failed with `55P03` at its first try.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_that_gave_up_on_its_lock_tries_again_and_completes() {
    use std::time::Duration;

    let busy = Busy::start("busy_retry", None).await;
    let migrating = tokio::spawn({
        let db = busy.db.clone();
        async move { Migrator::up(&db, None).await }
    });
    // The migration's backend: waiting for its lock, then, once its lock timeout has fired,
    // not waiting (its pause before the next try; a poll that misses one pause sees the next).
    let (watch, connection) = busy.connector.connect().await.unwrap();
    tokio::spawn(connection);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let waiting = "SELECT pid, wait_event_type = 'Lock' FROM pg_stat_activity \
                   WHERE datname = current_database() AND query LIKE 'ALTER TABLE%'";
    let mut seen_waiting = None;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the migration never waited on its lock, or never gave up on it"
        );
        assert!(!migrating.is_finished(), "{:?}", migrating.await);
        let rows = watch.query(waiting, &[]).await.unwrap();
        let backend = rows
            .iter()
            .map(|row| (row.get::<_, i32>(0), row.get::<_, Option<bool>>(1)))
            .find(|(pid, _)| seen_waiting.is_none_or(|seen| seen == *pid));
        match (seen_waiting, backend) {
            (None, Some((pid, Some(true)))) => seen_waiting = Some(pid),
            (Some(_), None | Some((_, Some(false) | None))) => break,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    busy.open.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), migrating)
        .await
        .expect("the migration's next try")
        .unwrap()
        .expect("the run completes once the transaction ended");
    assert!(
        Migrator::get_pending_migrations(&busy.db)
            .await
            .unwrap()
            .is_empty()
    );
    busy.writes_on(10).await;
    busy.finish(Duration::from_secs(10)).await;
}

/// A migration chosen to end a deadlock is tried again, as one that gave up on its lock is:
/// PostgreSQL rolls back one transaction of a lock cycle (SQLSTATE `40P01`), and with
/// `deadlock_timeout` (1 s by default) under the migration's `lock_timeout`
/// (`migration::LOCK_TIMEOUT`, 2 s), that is often the migration. Here a trigger on
/// `seaql_migrations` raises `40P01` at the first migration's record, as the deadlock
/// detector would in its transaction. Before, the run failed at its first migration.
#[tokio::test]
async fn a_migration_ended_by_a_deadlock_tries_again_and_completes() {
    let pg = tests::server().await;
    pg.create_database("deadlocked", None).await.unwrap();
    let admin = pg.admin("deadlocked").await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE seaql_migrations (version varchar NOT NULL PRIMARY KEY, \
             applied_at bigint NOT NULL); \
             CREATE SEQUENCE records; \
             CREATE FUNCTION end_the_first() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF nextval('records') = 1 THEN \
                 RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER end_the_first BEFORE INSERT ON seaql_migrations \
               FOR EACH ROW EXECUTE FUNCTION end_the_first()",
        )
        .await
        .unwrap();
    let db = tests::seaorm(&pg, "deadlocked").await;
    Migrator::up(&db, None)
        .await
        .expect("a run whose migration ended a deadlock completes");
    assert_eq!(applied(&db).await.len(), 3);
    let records: i64 = admin
        .query_one("SELECT last_value FROM records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(records, 4, "one record rolled back, then three");
}

/// A run waits for the migration lock however long the other run migrates: the connector's
/// `statement_timeout` (`DAL_STATEMENT_TIMEOUT_MS`) ended the wait with SQLSTATE `57014`, and
/// a role's `lock_timeout` with `55P03`. And the run that holds it keeps it while its lock's
/// session sits idle: a role's `idle_session_timeout` ended that session, which let the
/// waiting run in to apply the same migrations.
#[tokio::test]
async fn the_migration_lock_waits_past_the_statement_timeout() {
    use std::time::{Duration, Instant};
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "lock_wait").await;
    pg.admin("postgres")
        .await
        .unwrap()
        .batch_execute(
            "ALTER ROLE lock_wait SET lock_timeout = '1s'; \
             ALTER ROLE lock_wait SET idle_session_timeout = '1s'",
        )
        .await
        .unwrap();
    let config = || pg.config("lock_wait", "lock_wait", &password);
    let first = dal::Connector::new(config()).await.unwrap();
    let held = migration::MigrationLock::acquire(&first).await.unwrap();
    let impatient = dal::Connector::new(config().statement_timeout(Duration::from_secs(1)))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        migration::MigrationLock::acquire(&impatient)
            .await
            .map(|lock| lock.is_some())
    });
    let watch = pg.admin("lock_wait").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let waits = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    while watch.query_one(waits, &[]).await.unwrap().get::<_, i64>(0) < 1 {
        assert!(Instant::now() < deadline, "the second run never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past its statement timeout, it still waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "{:?}", waiting.await);
    drop(held);
    assert!(waiting.await.unwrap().unwrap());
    first.shutdown().await;
}

/// Migrations run in a caller's transaction leave its settings as they were: each migration
/// bounds its lock waits and idle time and lifts `statement_timeout` for its transaction,
/// which here is the caller's, so before, the caller's work after the migrations ran with no
/// statement timeout and lost its session after 10 s idle (SQLSTATE `25P03`). The
/// transaction's own `SET LOCAL` values come back too, not the session's, after every command
/// that runs migrations.
#[tokio::test]
async fn migrations_in_a_callers_transaction_leave_its_settings_as_they_were() {
    use sea_orm::TransactionTrait;
    let pg = tests::server().await;
    let password = tests::owned_database(&pg, "in_tx").await;
    let config = pg
        .config("in_tx", "in_tx", &password)
        .statement_timeout(std::time::Duration::from_secs(30));
    let connector = dal::Connector::new(config).await.unwrap();
    let db = tests::migration_db(&connector).await;
    let tx = db.begin().await.unwrap();
    Migrator::up(&tx, None)
        .await
        .expect("migrations in a transaction");
    // The session's own: the connector's statement timeout, the server's defaults.
    assert_eq!(settings_in(&tx).await, ["30s", "0", "0", "0"]);
    // The transaction's own, through every command that runs migrations.
    tx.execute_unprepared(
        "SET LOCAL statement_timeout = '7s'; SET LOCAL lock_timeout = '5s'; \
         SET LOCAL idle_in_transaction_session_timeout = '20s'; \
         SET LOCAL client_connection_check_interval = '3s'",
    )
    .await
    .unwrap();
    Migrator::down(&tx, Some(1)).await.expect("down");
    assert_eq!(
        settings_in(&tx).await,
        ["7s", "5s", "20s", "3s"],
        "after down"
    );
    Migrator::up(&tx, None).await.expect("up");
    assert_eq!(
        settings_in(&tx).await,
        ["7s", "5s", "20s", "3s"],
        "after up"
    );
    Migrator::refresh(&tx).await.expect("refresh");
    assert_eq!(
        settings_in(&tx).await,
        ["7s", "5s", "20s", "3s"],
        "after refresh"
    );
    Migrator::fresh(&tx).await.expect("fresh");
    assert_eq!(
        settings_in(&tx).await,
        ["7s", "5s", "20s", "3s"],
        "after fresh"
    );
    Migrator::reset(&tx).await.expect("reset");
    assert_eq!(
        settings_in(&tx).await,
        ["7s", "5s", "20s", "3s"],
        "after reset"
    );
    tx.commit().await.unwrap();
    connector.shutdown().await;
}

/// `statement_timeout`, `lock_timeout`, `idle_in_transaction_session_timeout` and
/// `client_connection_check_interval` in `tx`.
async fn settings_in(tx: &sea_orm::DatabaseTransaction) -> Vec<String> {
    let mut values = Vec::new();
    for name in [
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "client_connection_check_interval",
    ] {
        let row = tx
            .query_one_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("SELECT current_setting('{name}') AS value"),
            ))
            .await
            .unwrap()
            .unwrap();
        values.push(row.try_get::<String>("", "value").unwrap());
    }
    values
}

/// A run cut off while a migration's transaction is still open on the server (here its
/// `COMMIT`, waiting for a synchronous standby, when the run's future is dropped; a process
/// killed during a long statement is the same) hands the migration lock on only once that
/// transaction has ended, and the next run then applies the rest. Before, the lock went with
/// the run's own session at once, while the migration it guarded was still committing: the
/// next run read that migration as pending, and would apply it a second time.
#[tokio::test]
async fn the_migration_lock_is_handed_on_once_a_cut_off_runs_transaction_has_ended() {
    use std::time::{Duration, Instant};
    let pg = tests::server().await;
    let password = tests::owned_database(&pg, "cut_off").await;
    let connector = || async {
        dal::Connector::new(pg.config("cut_off", "cut_off", &password))
            .await
            .unwrap()
    };
    // The first migration, and `seaql_migrations`, whose creation is no migration's.
    let setup = connector().await;
    Migrator::up(&tests::migration_db(&setup).await, Some(1))
        .await
        .unwrap();
    setup.shutdown().await;
    let admin = pg.admin("postgres").await.unwrap();
    for sql in [
        "ALTER ROLE cut_off SET synchronous_commit = on",
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let connector = connector().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let until = |what: &'static str, sql: &'static str| {
        let admin = &admin;
        async move {
            while admin.query(sql, &[]).await.unwrap().is_empty() {
                assert!(Instant::now() < deadline, "{what}: never");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    let first = tokio::spawn({
        let connector = connector.clone();
        async move {
            let _lock = migration::MigrationLock::acquire(&connector).await.unwrap();
            Migrator::up(&tests::migration_db(&connector).await, None).await
        }
    });
    until(
        "the second migration's COMMIT waits for the standby",
        "SELECT 1 FROM pg_stat_activity WHERE datname = 'cut_off' AND wait_event = 'SyncRep'",
    )
    .await;
    first.abort();
    let _ = first.await;
    until(
        "the cut-off run's lock is given up",
        "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a \
         USING (pid) WHERE l.locktype = 'advisory' AND a.state = 'idle')",
    )
    .await;

    let next = tokio::spawn({
        let connector = connector.clone();
        async move {
            migration::MigrationLock::acquire(&connector)
                .await
                .map(drop)
        }
    });
    let waiting = "SELECT 1 FROM pg_stat_activity WHERE datname = 'cut_off' \
                   AND wait_event_type = 'Lock' AND wait_event = 'advisory'";
    while admin.query(waiting, &[]).await.unwrap().is_empty() {
        assert!(
            !next.is_finished(),
            "the next run took the lock while the cut-off run's COMMIT was still waiting"
        );
        assert!(Instant::now() < deadline, "the next run never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for sql in [
        "ALTER SYSTEM RESET synchronous_standby_names",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    next.await.unwrap().unwrap();
    let _lock = migration::MigrationLock::acquire(&connector).await.unwrap();
    let db = tests::migration_db(&connector).await;
    Migrator::up(&db, None).await.unwrap();
    assert_eq!(applied(&db).await.len(), 3);
    connector.shutdown().await;
}
