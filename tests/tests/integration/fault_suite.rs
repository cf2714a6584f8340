//! The fault suite: one bounded write workload through both ORMs, which records every
//! acknowledged write and checks the database at the end, run under each fault. Each test
//! prints its figures (`cargo nextest run --no-capture -E 'test(fault_suite::)'`):
//! requests, failed, lost acknowledged writes, duplicated writes, and the recovery time where
//! there is one.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dal::diesel_async::RunQueryDsl;
use dal::local::{LocalLakebase, LocalPostgres};
use dal::{Config, Connector, PoolSettings, TxMode};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// Writes through SeaORM and Diesel by turns, each a row of `acks` with a new id.
struct Workload {
    connector: Connector,
    seaorm: dal::SeaOrmPool,
    diesel: dal::DieselPool,
    next: AtomicI64,
    /// Each acknowledged write, and when.
    acked: Mutex<Vec<(i64, Instant)>>,
    /// Each failed write, and when.
    failed: Mutex<Vec<(String, Instant)>>,
    /// Told of every acknowledged write.
    acks: tokio::sync::Notify,
}

/// Writers running until [`stop`](Self::stop)ped.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Stops the writers once each has finished its write under way.
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// The longest pause of a writer between two writes, when it writes as fast as it is answered.
const WRITE_PAUSE: Duration = Duration::from_millis(5);

/// What a run left: every figure the issue asks for.
#[derive(Debug, PartialEq)]
struct Figures {
    requests: usize,
    failed: usize,
    lost: usize,
    /// Rows written more than once (the table has no key, so a replayed write would show).
    duplicates: usize,
}

impl Workload {
    async fn new(config: Config) -> Arc<Self> {
        // Short-lived connections, so that new ones open (and log in) all through each run.
        Self::with_lifetime(config, Duration::from_millis(700)).await
    }

    async fn with_lifetime(config: Config, lifetime: Duration) -> Arc<Self> {
        let pool = PoolSettings::builder()
            .max_size(4)
            .max_lifetime(Some(lifetime))
            .idle_timeout(Some(lifetime * 5 / 7))
            .acquire_timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let connector = Connector::new(config.pool(pool)).await.expect("connector");
        let seaorm = connector.seaorm().await.unwrap();
        let diesel = connector.diesel_pool().await.unwrap();
        seaorm
            .execute_unprepared("CREATE TABLE IF NOT EXISTS acks (id bigint NOT NULL)")
            .await
            .unwrap();
        Arc::new(Self {
            connector,
            seaorm,
            diesel,
            next: AtomicI64::new(1),
            acked: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
            acks: tokio::sync::Notify::new(),
        })
    }

    /// One write: even ids through SeaORM, odd ones through Diesel; every other one of each
    /// in a transaction of [`Transactions`](dal::Transactions), which runs it again after a
    /// failure that certainly rolled it back (a `BEGIN` on a lost connection, say), so that
    /// a retry of a write that did commit would show as a duplicate.
    async fn write(&self) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let insert = move || {
            Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO acks (id) VALUES ($1)",
                [id.into()],
            )
        };
        let diesel_insert = move || {
            dal::diesel::sql_query("INSERT INTO acks (id) VALUES ($1)")
                .bind::<dal::diesel::sql_types::BigInt, _>(id)
        };
        let in_transaction = id / 2 % 2 == 1;
        let tx = self.connector.transactions();
        let outcome = match (id % 2 == 0, in_transaction) {
            (true, false) => self
                .seaorm
                .execute_raw(insert())
                .await
                .map(drop)
                .map_err(dal::Error::from),
            (true, true) => {
                tx.seaorm(&self.seaorm, TxMode::new(), |txn| {
                    Box::pin(async move { Ok(txn.execute_raw(insert()).await.map(drop)?) })
                })
                .await
            }
            (false, false) => match self.diesel.get().await {
                Ok(mut conn) => diesel_insert()
                    .execute(&mut *conn)
                    .await
                    .map(drop)
                    .map_err(dal::Error::from),
                Err(e) => Err(e),
            },
            (false, true) => {
                tx.diesel(&self.diesel, TxMode::new(), |conn| {
                    Box::pin(async move { Ok(diesel_insert().execute(conn).await.map(drop)?) })
                })
                .await
            }
        };
        let orm = if id % 2 == 0 { "seaorm" } else { "diesel" };
        let outcome = outcome.map_err(|e| {
            let mut shown = format!("{orm} {id}: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                shown.push_str(&format!(": {c}"));
                cause = c.source();
            }
            shown
        });
        match outcome {
            Ok(()) => {
                self.acked.lock().unwrap().push((id, Instant::now()));
                self.acks.notify_waiters();
            }
            Err(e) => self.failed.lock().unwrap().push((e, Instant::now())),
        }
    }

    /// Four writers for `period`, each writing as fast as it is answered.
    async fn run_for(self: &Arc<Self>, period: Duration) {
        self.run_paced(period, WRITE_PAUSE).await;
    }

    /// Runs the writers a second at a time until `done`; fails after a minute, naming `what`.
    async fn run_until(self: &Arc<Self>, what: &str, done: impl Fn() -> bool) {
        for _ in 0..60 {
            if done() {
                return;
            }
            self.run_for(Duration::from_secs(1)).await;
        }
        panic!("not so after a minute of writes: {what}");
    }

    /// Four writers for `period`, each pausing up to `pause` (at random) after each write.
    async fn run_paced(self: &Arc<Self>, period: Duration, pause: Duration) {
        let writers = self.start(pause);
        tokio::time::sleep(period).await;
        writers.stop().await;
    }

    /// Four writers, each pausing up to `pause` (at random) after each write, until stopped.
    fn start(self: &Arc<Self>, pause: Duration) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..4)
            .map(|_| {
                let (w, stop) = (Arc::clone(self), Arc::clone(&stop));
                tokio::spawn(async move {
                    while !AtomicBool::load(&stop, Ordering::SeqCst) {
                        w.write().await;
                        tokio::time::sleep(pause.mul_f64(fastrand::f64())).await;
                    }
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Waits until both ORMs have written since `since`, then lets `writers` write for one
    /// more second (so that a failure that comes late still counts) and stops them. Returns
    /// the recovery time (see [`recovery_after`](Self::recovery_after)); panics with the
    /// failures if the ORMs have not both written within a minute, a bound against a hang
    /// only: a busy machine can take seconds to restart a server.
    async fn recover(&self, writers: Writers, since: Instant) -> Duration {
        let recovered = async {
            loop {
                let ack = self.acks.notified();
                if self.recovery_after(since).is_some() {
                    return;
                }
                ack.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), recovered)
            .await
            .is_err()
        {
            panic!(
                "both ORMs should write again within a minute: {:?}",
                self.failures()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        writers.stop().await;
        self.recovery_after(since).unwrap()
    }

    /// The figures, checking every acknowledged write against the table.
    async fn figures(&self, admin: &tokio_postgres::Client) -> Figures {
        let mut present = std::collections::HashSet::new();
        let mut duplicates = 0;
        for row in admin.query("SELECT id FROM acks", &[]).await.unwrap() {
            if !present.insert(row.get::<_, i64>(0)) {
                duplicates += 1;
            }
        }
        let acked = self.acked.lock().unwrap();
        let failed = self.failed.lock().unwrap();
        Figures {
            requests: acked.len() + failed.len(),
            failed: failed.len(),
            lost: acked.iter().filter(|(id, _)| !present.contains(id)).count(),
            duplicates,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failed
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// No request failed, no acknowledged write is missing, none was applied twice.
    fn assert_clean(&self, figures: &Figures) {
        assert_eq!(
            (figures.failed, figures.lost, figures.duplicates),
            (0, 0, 0),
            "{:?}",
            self.failures()
        );
    }

    /// How long after `since` requests went on failing, or waited for their first
    /// acknowledgement: the later of the last failure and each ORM's first acknowledged write
    /// after `since`. `None` when either ORM has not written since.
    fn recovery_after(&self, since: Instant) -> Option<Duration> {
        let acked = self.acked.lock().unwrap();
        let first = |parity| {
            acked
                .iter()
                .filter(|(id, at)| id % 2 == parity && *at >= since)
                .map(|(_, at)| *at)
                .min()
        };
        let (seaorm, diesel) = (first(0)?, first(1)?);
        let last_failure = self
            .failed
            .lock()
            .unwrap()
            .iter()
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(since);
        Some(
            seaorm
                .max(diesel)
                .max(last_failure)
                .saturating_duration_since(since),
        )
    }
}

fn report(name: &str, figures: &Figures, extra: &str) {
    println!(
        "fault suite | {name} | requests {} | failed {} | lost acknowledged writes {} | \
         duplicates {} {extra}",
        figures.requests, figures.failed, figures.lost, figures.duplicates
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_connection_churn() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "f_rotation", Duration::from_secs(2)).await;
    let w = Workload::new(lb.client_config(&pg, "f_rotation").unwrap()).await;
    w.run_for(Duration::from_secs(7)).await;
    let figures = w.figures(&pg.admin("f_rotation").await.unwrap()).await;
    report(
        "token rotation (2 s tokens, 0.7 s connections)",
        &figures,
        "",
    );
    w.assert_clean(&figures);
    assert!(w.connector.cache().fetches() >= 3);
    w.connector.shutdown().await;
}

/// What an outage run leaves: the server and the service (alive until dropped), the workload,
/// its figures, its recovery time after the service came back, and how many requests the
/// service refused while down.
type Outage = (
    LocalPostgres,
    LocalLakebase,
    Arc<Workload>,
    Figures,
    Duration,
    usize,
);

/// Writes while the credential service (tokens living `ttl`, refreshed `margin` ahead of
/// expiry) is down for `down`, from one second into the life of the first token, until both
/// ORMs write again after it.
async fn outage(database: &str, ttl: Duration, margin: Duration, down: Duration) -> Outage {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, database, ttl).await;
    let cache = dal::CacheSettings::builder()
        .refresh_margin(margin)
        .build()
        .unwrap();
    let w = Workload::new(lb.client_config(&pg, database).unwrap().cache(cache)).await;
    // Timed from the token, not from the writers, so that a slow start takes nothing from
    // the token's life left after the outage.
    let expires = w.connector.cache().expires_at().expect("a token");
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let minted = tokio::time::Instant::now() + left - ttl;
    let writers = w.start(WRITE_PAUSE);
    tokio::time::sleep_until(minted + Duration::from_secs(1)).await;
    let before = lb.requests();
    lb.set_down(true);
    tokio::time::sleep(down).await;
    let refused = lb.requests() - before;
    lb.set_down(false);
    let recovery = w.recover(writers, Instant::now()).await;
    let figures = w.figures(&pg.admin(database).await.unwrap()).await;
    (pg, lb, w, figures, recovery, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_outage_shorter_than_the_token_life() {
    // The refresh is due 2.7 to 3 s into the token's life, in the outage (1 to 4 s).
    let (_pg, _lb, w, figures, _, refused) = outage(
        "f_outage",
        Duration::from_secs(6),
        Duration::from_secs(3),
        Duration::from_secs(3),
    )
    .await;
    report(
        "credential service down 3 s (6 s tokens)",
        &figures,
        &format!("| refused {refused}"),
    );
    w.assert_clean(&figures);
    assert!(refused >= 1, "the outage met no refresh");
    w.connector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_failing_credential_service() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "f_flaky", Duration::from_secs(8)).await;
    // A refresh that meets these failures takes over 3 s (Retry-After included): it starts 5 s
    // ahead of expiry, as a one-hour token's refresh starts five minutes ahead. The SeaORM pool
    // cannot wait for a token once its own has expired, so the lead must cover the retries.
    let cache = dal::CacheSettings::builder()
        .refresh_margin(Duration::from_secs(5))
        .build()
        .unwrap();
    let config = lb.client_config(&pg, "f_flaky").unwrap().cache(cache);
    let w = Workload::new(config).await;
    lb.set_latency(Duration::from_millis(400));
    let fetched = w.connector.cache().fetches();
    lb.fail_next(2, 500);
    w.run_until("the refresh met the 500s", || lb.failures_pending() == 0)
        .await;
    lb.fail_next(2, 429);
    w.run_until("the refresh met the 429s", || lb.failures_pending() == 0)
        .await;
    // The refresh that met the 429s completes with the writers on.
    w.run_until("the refresh after the 429s completed", || {
        w.connector.cache().fetches() >= fetched + 2
    })
    .await;
    let figures = w.figures(&pg.admin("f_flaky").await.unwrap()).await;
    report(
        "credential service 400 ms slow, 2 x 500 then 2 x 429 + Retry-After (8 s tokens)",
        &figures,
        "",
    );
    w.assert_clean(&figures);
    w.connector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_idle_connections() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "f_terminated", Duration::from_secs(60)).await;
    // Connections that live through the test, so that the server is what ends them.
    let config = lb.client_config(&pg, "f_terminated").unwrap();
    let w = Workload::with_lifetime(config, Duration::from_secs(60)).await;
    let admin = pg.admin("postgres").await.unwrap();
    let role = lb.config().role.clone();
    let mut terminated = 0;
    for _ in 0..5 {
        w.run_for(Duration::from_millis(500)).await;
        // Between bursts every pooled connection is idle, for longer than the pools hand a
        // connection out again unchecked (0.5 s): the server closes them all.
        tokio::time::sleep(Duration::from_millis(600)).await;
        terminated += admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = $1 AND state = 'idle'",
                &[&role],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
    }
    w.run_for(Duration::from_millis(500)).await;
    let figures = w.figures(&pg.admin("f_terminated").await.unwrap()).await;
    report(
        "idle connections terminated by the server, 5 times",
        &figures,
        &format!("| terminated {terminated}"),
    );
    assert!(terminated > 0);
    w.assert_clean(&figures);
    w.connector.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_outage_longer_than_the_token_life() {
    // The token expires during the outage: new connections cannot log in until it ends.
    let (_pg, _lb, w, figures, recovery, refused) = outage(
        "f_long_outage",
        Duration::from_secs(3),
        Duration::from_millis(600),
        Duration::from_secs(5),
    )
    .await;
    report(
        "credential service down 5 s (3 s tokens)",
        &figures,
        &format!("| refused {refused} | recovery {} ms", recovery.as_millis()),
    );
    assert!(refused >= 1, "the outage met no refresh");
    assert_eq!((figures.lost, figures.duplicates), (0, 0));
    // The refresher keeps trying through the outage and every pool uses its first new token:
    // failures stop within a retry interval (500 ms at most).
    assert!(recovery < Duration::from_secs(3), "{recovery:?}");
    w.connector.shutdown().await;
}

/// Writes on while the dev cluster stops with `stop` and starts again; reports the figures
/// and returns the recovery time.
async fn restart_under_writes(
    name: &str,
    database: &str,
    stop: fn(&std::path::Path) -> dal::local::Result<bool>,
) -> Duration {
    let dev = tests::DevCluster::new();
    let pg = LocalPostgres::dev_in(dev.path())
        .await
        .expect("dev cluster");
    let password = tests::app_database(&pg, database).await;
    let w = Workload::new(pg.config(database, database, &password)).await;
    let writers = w.start(WRITE_PAUSE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(stop(dev.path()).unwrap(), "the server was running");
    let pg = LocalPostgres::dev_in(dev.path()).await.expect("restart");
    let recovery = w.recover(writers, Instant::now()).await;
    let figures = w.figures(&pg.admin(database).await.unwrap()).await;
    report(
        name,
        &figures,
        &format!("| recovery {} ms", recovery.as_millis()),
    );
    assert_eq!((figures.lost, figures.duplicates), (0, 0));
    w.connector.shutdown().await;
    recovery
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_server_restart() {
    // `pg_ctl stop -m fast`: every session ended, a checkpoint, then the server starts again.
    let recovery = restart_under_writes(
        "PostgreSQL fast restart",
        "f_restart",
        LocalPostgres::stop_dev_in,
    )
    .await;
    assert!(recovery < Duration::from_secs(2), "{recovery:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_server_restart() {
    // `pg_ctl stop -m immediate`: sessions cut, the next start replays the WAL. Every write
    // acknowledged before the crash is still there.
    let recovery = restart_under_writes(
        "PostgreSQL immediate restart (crash recovery)",
        "f_crash",
        LocalPostgres::crash_dev_in,
    )
    .await;
    assert!(recovery < Duration::from_secs(2), "{recovery:?}");
}

/// Aurora DSQL ends every connection after 60 minutes; here the cluster ends them after 9 s
/// (checked every 2.25 s), and the pools retire theirs after at most 4 s, or up to that again
/// while a replacement is still logging in: in 30 s of writes through both ORMs, none fails.
/// Each write takes 0.3 s and writers pause up to 1.5 s, so that connections sit idle past
/// their lifetime and a connection the server ends is likely to be in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_retired_before_the_server_ends_them() {
    let pg = crate::dsql::dsql_cluster().await;
    pg.admin("dsql")
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE acks (id bigint NOT NULL); \
             CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
               'BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END'; \
             CREATE TRIGGER slow BEFORE INSERT ON acks FOR EACH ROW EXECUTE FUNCTION slow(); \
             ALTER TABLE acks OWNER TO admin",
        )
        .await
        .unwrap();
    let config = crate::dsql::config(&pg, "admin", pg.dsql_source("admin").unwrap());
    let w = Workload::with_lifetime(config, Duration::from_secs(4)).await;
    let _age_limit = pg.limit_connection_age(Duration::from_secs(9));
    w.run_paced(Duration::from_secs(30), Duration::from_millis(1500))
        .await;
    let figures = w.figures(&pg.admin("dsql").await.unwrap()).await;
    let opened = w.connector.connections_opened();
    report(
        "connections ended by the server at 9 s (pools retire them at 4 s)",
        &figures,
        &format!("| Diesel connections opened {opened}"),
    );
    w.assert_clean(&figures);
    // Connections were replaced all through the run (about 30 / 4 per pool connection).
    assert!(opened >= 8, "{opened}");
    w.connector.shutdown().await;
}

/// An Aurora DSQL multi-region cluster loses its nearest endpoint (a regional outage: the
/// endpoint stops listening and its connections end) while both ORMs write: new connections
/// move to the peer endpoint, with tokens signed for the peer's region, no acknowledged write
/// is lost, and both ORMs write again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regional_outage_fails_over_to_the_peer_endpoint() {
    use dal::local::{LOCAL_DSQL_PEER_HOST, LocalDsqlEndpoint};
    let pg = crate::dsql::dsql_cluster().await;
    let near = LocalDsqlEndpoint::start(&pg).await.unwrap();
    let peer = LocalDsqlEndpoint::start_peer(&pg).await.unwrap();
    let config = near
        .config(&pg, "admin", "dsql")
        .unwrap()
        .failover(peer.config(&pg, "admin", "dsql").unwrap());
    let w = Workload::new(config).await;
    let writers = w.start(WRITE_PAUSE);
    tokio::time::sleep(Duration::from_secs(1)).await;
    near.set_down(true);
    let recovery = w.recover(writers, Instant::now()).await;
    let figures = w.figures(&pg.admin("dsql").await.unwrap()).await;
    report(
        "regional outage of the nearest DSQL endpoint (multi-region)",
        &figures,
        &format!("| recovery {} ms", recovery.as_millis()),
    );
    assert_eq!((figures.lost, figures.duplicates), (0, 0));
    assert_eq!(
        w.connector.active_endpoint(),
        format!("{LOCAL_DSQL_PEER_HOST}:{}", peer.port())
    );
    assert!(recovery < Duration::from_secs(2), "{recovery:?}");
    w.connector.shutdown().await;
}
