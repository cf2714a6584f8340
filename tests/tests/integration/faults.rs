//! The driver layer under faults: futures cancelled at every await point, with the figure that
//! matters most, lost acknowledged writes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use dal::diesel_async::RunQueryDsl;
use dal::local::LocalPostgres;
use dal::{Connector, PoolSettings, TxMode};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

/// Polls `inner` until it has answered `Pending` `pendings` times, then drops it: the
/// cancellation a timeout or a `select!` makes, at a chosen await point rather than at a
/// chosen time, so that a loaded machine hits the same points as an idle one.
struct CancelAfter<F> {
    inner: Pin<Box<F>>,
    pendings: usize,
}

impl<F: Future> Future for CancelAfter<F> {
    /// `None` when cancelled.
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending if self.pendings == 0 => Poll::Ready(None),
            Poll::Pending => {
                self.pendings -= 1;
                Poll::Pending
            }
        }
    }
}

fn cancel_after<F: Future>(pendings: usize, inner: F) -> CancelAfter<F> {
    CancelAfter {
        inner: Box::pin(inner),
        pendings,
    }
}

/// What a run of cancellations left behind.
#[derive(Debug, Default)]
struct Figures {
    cancelled: usize,
    writes: usize,
    lost: usize,
}

/// A database `name` owned by a role of that name, and a connector to it as that role with
/// `pool`'s settings.
async fn app_connector(name: &str, pool: PoolSettings) -> (LocalPostgres, Connector) {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, name).await;
    let connector = Connector::new(pg.config(name, name, &password).pool(pool))
        .await
        .unwrap();
    (pg, connector)
}

/// A database with a table of acknowledged writes, and a connector with pools of one
/// connection, so that every cancellation leaves its mark on the next user.
async fn setup(name: &str) -> (LocalPostgres, Connector, tokio_postgres::Client) {
    let one = PoolSettings::builder().max_size(1).build().unwrap();
    let (pg, connector) = app_connector(name, one).await;
    let admin = pg.admin(name).await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE TABLE acks (id bigint PRIMARY KEY); ALTER TABLE acks OWNER TO {name}"
        ))
        .await
        .unwrap();
    (pg, connector, admin)
}

/// SeaORM's write of the row `id`.
fn insert_ack(id: i64) -> Statement {
    Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO acks (id) VALUES ($1)",
        [id.into()],
    )
}

/// Diesel's write of the row `id`.
async fn insert_ack_through_diesel(
    conn: &mut dal::diesel_async::AsyncPgConnection,
    id: i64,
) -> dal::diesel::QueryResult<usize> {
    dal::diesel::sql_query("INSERT INTO acks (id) VALUES ($1)")
        .bind::<dal::diesel::sql_types::BigInt, _>(id)
        .execute(conn)
        .await
}

/// Whether another session sees the row `id`: an acknowledged write that it does not see
/// was never committed.
async fn visible(admin: &tokio_postgres::Client, id: i64) -> bool {
    admin
        .query_opt("SELECT 1 FROM acks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .is_some()
}

/// The figures of a sweep: every round was cancelled before it finished, every write after a
/// cancellation was acknowledged, none lost, and no session was left inside a transaction.
async fn nothing_lost(
    kind: &str,
    figures: &Figures,
    connector: &Connector,
    admin: &tokio_postgres::Client,
    user: &str,
) {
    println!(
        "{kind}: {figures:?}, connections opened {}",
        connector.connections_opened()
    );
    // Every round is cancelled at least at the work's sleep. Round trips pend too, unless
    // the thread was preempted between sending and reading and the answer was already there
    // (a busy CI machine does that): so at least one cancellation per round, and usually
    // three or more.
    assert!(figures.cancelled >= ROUNDS, "{figures:?}");
    assert_eq!(figures.writes, figures.cancelled + ROUNDS, "{figures:?}");
    assert_eq!(figures.lost, 0, "{figures:?}");
    no_session_left_in_a_transaction(admin, user).await;
}

async fn no_session_left_in_a_transaction(admin: &tokio_postgres::Client, user: &str) {
    let stuck: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state LIKE 'idle in transaction%'",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stuck, 0, "sessions left idle in a transaction");
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Sweeps the cancellation point `rounds` times: `attempt(n)` is cancelled after `n` pendings
/// (`Some(finished)`), for n = 0, 1, ... until it finishes; after each, `write(id)` makes an
/// autocommit write through the same one-connection pool, which must be visible to another
/// session if it was acknowledged.
async fn sweep<'a>(
    rounds: usize,
    admin: &tokio_postgres::Client,
    mut attempt: impl FnMut(usize) -> Boxed<'a, bool>,
    mut write: impl FnMut(i64) -> Boxed<'a, bool>,
) -> Figures {
    let mut figures = Figures::default();
    let mut id = 0;
    for _ in 0..rounds {
        for pendings in 0.. {
            let finished = attempt(pendings).await;
            figures.cancelled += usize::from(!finished);
            id += 1;
            if write(id).await {
                figures.writes += 1;
                figures.lost += usize::from(!visible(admin, id).await);
            }
            if finished {
                break;
            }
        }
    }
    figures
}

/// Rounds of cancellation sweeps per test: enough for the windows the issue measured
/// (about one cancellation in four left a transaction open) to be hit many times.
const ROUNDS: usize = 30;

#[tokio::test]
async fn a_cancelled_seaorm_transaction_never_swallows_the_next_write() {
    let (_pg, connector, admin) = setup("cancel_seaorm").await;
    let db = connector.seaorm().await.unwrap();
    let tx = connector.transactions();
    let (db, tx) = (&db, &tx);
    let figures = sweep(
        ROUNDS,
        &admin,
        |pendings| {
            let work = tx.seaorm(db, TxMode::new(), |t| {
                Box::pin(async move {
                    t.execute_unprepared("SELECT 1").await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(())
                })
            });
            Box::pin(async move { cancel_after(pendings, work).await.is_some() })
        },
        |id| Box::pin(async move { db.execute_raw(insert_ack(id)).await.is_ok() }),
    )
    .await;
    nothing_lost("SeaORM", &figures, &connector, &admin, "cancel_seaorm").await;
}

/// A SeaORM transaction dropped before its end (a cancelled request, an early return) holds
/// no lock while its connection waits in the pool: it is rolled back at once, and the
/// connection is kept. A dropped savepoint is undone before its transaction's next statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_seaorm_transaction_lets_go_of_its_locks_at_once() {
    let (_pg, connector, admin) = setup("dropped_seaorm").await;
    let db = connector.seaorm().await.unwrap();
    let insert = insert_ack;
    db.execute_raw(insert(1)).await.unwrap();
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("SELECT id FROM acks WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    drop(txn);
    // Nothing uses the pool from here on. Another session takes the same row lock, waiting
    // for the rollback; without one it would fail after the lock timeout.
    admin
        .batch_execute(
            "BEGIN; SET LOCAL lock_timeout = '120s'; \
             SELECT id FROM acks WHERE id = 1 FOR UPDATE; COMMIT",
        )
        .await
        .expect("the dropped transaction's lock is released without another checkout");
    no_session_left_in_a_transaction(&admin, "dropped_seaorm").await;

    let txn = db.begin().await.unwrap();
    txn.execute_raw(insert(2)).await.unwrap();
    let savepoint = txn.begin().await.unwrap();
    savepoint.execute_raw(insert(3)).await.unwrap();
    drop(savepoint);
    txn.execute_raw(insert(4)).await.unwrap();
    txn.commit().await.unwrap();
    assert!(visible(&admin, 2).await && visible(&admin, 4).await);
    assert!(
        !visible(&admin, 3).await,
        "the dropped savepoint's write was rolled back"
    );
    assert_eq!(connector.connections_opened(), 1, "the connection was kept");
}

/// A savepoint's `SAVEPOINT`, `RELEASE` or `ROLLBACK TO` cancelled at any await point
/// leaves the transaction around it as it was: its acknowledged writes, before and after,
/// commit with it. A savepoint the server had opened for a cancelled `begin` swallowed the
/// outer transaction's later writes when a later savepoint of the same name was undone.
#[tokio::test]
async fn a_cancelled_seaorm_savepoint_never_undoes_the_transaction_around_it() {
    let (_pg, connector, admin) = setup("cancel_savepoint").await;
    let db = connector.seaorm().await.unwrap();
    let insert = insert_ack;
    let (mut cancelled, mut lost) = (0, Vec::new());
    for pendings in 0..4 {
        let id = |n: i64| 10 * pendings as i64 + n;
        let txn = db.begin().await.unwrap();
        cancelled += usize::from(cancel_after(pendings, txn.begin()).await.is_none());
        txn.execute_raw(insert(id(1))).await.unwrap();
        let released = txn.begin().await.unwrap();
        released.execute_raw(insert(id(2))).await.unwrap();
        cancelled += usize::from(cancel_after(pendings, released.commit()).await.is_none());
        txn.execute_raw(insert(id(3))).await.unwrap();
        let undone = txn.begin().await.unwrap();
        undone.execute_raw(insert(id(4))).await.unwrap();
        cancelled += usize::from(cancel_after(pendings, undone.rollback()).await.is_none());
        txn.execute_raw(insert(id(5))).await.unwrap();
        // A dropped savepoint is rolled back before the next statement, which is cancelled.
        let dropped = txn.begin().await.unwrap();
        dropped.execute_raw(insert(id(6))).await.unwrap();
        drop(dropped);
        cancelled += usize::from(
            cancel_after(pendings, txn.execute_raw(insert(id(7))))
                .await
                .is_none(),
        );
        txn.execute_raw(insert(id(8))).await.unwrap();
        txn.commit().await.unwrap();
        assert!(!visible(&admin, id(6)).await, "a dropped savepoint's write");
        for n in [1, 3, 5, 8] {
            if !visible(&admin, id(n)).await {
                lost.push(id(n));
            }
        }
        assert!(
            !visible(&admin, id(4)).await,
            "a rolled back savepoint's write"
        );
    }
    println!("SeaORM savepoints: cancelled {cancelled}, lost {lost:?}");
    assert!(cancelled >= 4, "cancelled {cancelled}");
    assert_eq!(lost, Vec::<i64>::new(), "acknowledged writes lost");
    no_session_left_in_a_transaction(&admin, "cancel_savepoint").await;
}

/// A statement that fails in a SeaORM savepoint, its answer read or its future dropped
/// after it was sent, leaves the transaction around it going once the savepoint ends: sqlx
/// hands a dropped statement's error to the next statement, which it then does not send, and
/// a `RELEASE` after a failure fails too; the savepoint stayed open on the server, aborted,
/// while dal counted it ended, and every later statement failed with 25P02.
#[tokio::test]
async fn a_failed_statement_in_a_seaorm_savepoint_leaves_the_transaction_going() {
    let (_pg, connector, admin) = setup("failed_savepoint").await;
    let db = connector.seaorm().await.unwrap();
    let insert = insert_ack;
    db.execute_raw(insert(0)).await.unwrap();
    let txn = db.begin().await.unwrap();
    txn.execute_raw(insert(1)).await.unwrap();
    // Its error read, the savepoint committed: the commit fails, and the savepoint is undone.
    let sp = txn.begin().await.unwrap();
    assert!(sp.execute_raw(insert(0)).await.is_err());
    assert!(sp.commit().await.is_err());
    txn.execute_raw(insert(2)).await.unwrap();
    // Its future dropped after the statement was sent (unless a busy machine had the answer
    // there by the first poll), the savepoint dropped.
    let refused = |done: Option<Result<_, _>>| assert!(done.is_none_or(|done| done.is_err()));
    let sp = txn.begin().await.unwrap();
    sp.execute_raw(insert(3)).await.unwrap();
    refused(cancel_after(0, sp.execute_raw(insert(0))).await);
    drop(sp);
    txn.execute_raw(insert(4)).await.unwrap();
    // The same, the savepoint rolled back.
    let sp = txn.begin().await.unwrap();
    refused(cancel_after(0, sp.execute_raw(insert(0))).await);
    sp.rollback().await.unwrap();
    txn.execute_raw(insert(5)).await.unwrap();
    txn.commit().await.unwrap();
    for (id, kept) in [(1, true), (2, true), (3, false), (4, true), (5, true)] {
        assert_eq!(visible(&admin, id).await, kept, "row {id}");
    }
    assert_eq!(connector.connections_opened(), 1, "the connection was kept");

    // Dropped while a savepoint's statement holds the connection on a task of its own (on
    // this one-thread runtime, not yet run): rolled back once that ends, the connection kept
    // (it was closed, a login more each time).
    let txn = db.begin().await.unwrap();
    txn.execute_raw(insert(6)).await.unwrap();
    assert!(cancel_after(0, txn.begin()).await.is_none());
    drop(txn);
    db.execute_raw(insert(7)).await.unwrap();
    assert!(!visible(&admin, 6).await && visible(&admin, 7).await);
    assert_eq!(connector.connections_opened(), 1, "the connection was kept");
}

/// A Diesel savepoint whose future was dropped inside the transaction's work (a timeout
/// around it), dal's own or one diesel-async nests (`conn.transaction(..)` inside the work),
/// never turns the transaction's commit into the savepoint's `RELEASE`: the transaction then
/// either commits every write its work was told succeeded, or fails. Diesel counted the
/// savepoint as still open, and its `COMMIT` became a `RELEASE`, reported as a commit, while
/// the transaction stayed open and was rolled back by the pool (for diesel-async's own
/// savepoints, writes 111, 113, 121 and 123 were lost so).
#[tokio::test]
async fn a_cancelled_diesel_savepoint_never_turns_a_commit_into_a_release() {
    use dal::diesel_async::AsyncConnection as _;
    let (_pg, connector, admin) = setup("cancel_diesel_savepoint").await;
    let pool = connector.diesel_pool().await.unwrap();
    let tx = connector.transactions();
    let insert = insert_ack_through_diesel;
    let (mut cancelled, mut lost) = (0, Vec::new());
    for (round, pendings) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)] {
        let [before, inside, after] = [1, 2, 3].map(|n| 100 * round + 10 * pendings as i64 + n);
        let was_cancelled = Arc::new(AtomicBool::new(false));
        let done = tx
            .diesel(&pool, TxMode::new(), |conn| {
                let (tx, was_cancelled) = (tx.clone(), Arc::clone(&was_cancelled));
                Box::pin(async move {
                    insert(conn, before).await?;
                    // Three pauses at least, however fast the round trips come back.
                    let savepoint: futures_util::future::BoxFuture<'_, dal::Result<()>> =
                        if round == 0 {
                            Box::pin(tx.diesel_savepoint(conn, |sp| {
                                Box::pin(async move {
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                    insert(sp, inside).await?;
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    Ok(())
                                })
                            }))
                        } else {
                            let conn = &mut *conn;
                            Box::pin(async move {
                                conn.transaction(async |sp| {
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                    insert(sp, inside).await?;
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    dal::diesel::QueryResult::Ok(())
                                })
                                .await
                                .map_err(dal::Error::Diesel)
                            })
                        };
                    if cancel_after(pendings, savepoint).await.is_none() {
                        was_cancelled.store(true, Ordering::SeqCst);
                    }
                    insert(conn, after).await?;
                    Ok(())
                })
            })
            .await;
        cancelled += usize::from(AtomicBool::load(&was_cancelled, Ordering::SeqCst));
        match done {
            Ok(()) => {
                for id in [before, after] {
                    if !visible(&admin, id).await {
                        lost.push(id);
                    }
                }
            }
            // Rolled back as a whole, and said so.
            Err(e) => {
                assert!(matches!(e, dal::Error::Aborted(_)), "{e:?}");
                assert!(!visible(&admin, before).await && !visible(&admin, after).await);
            }
        }
    }
    println!("Diesel savepoints: cancelled {cancelled}, lost {lost:?}");
    assert_eq!(cancelled, 6);
    assert_eq!(lost, Vec::<i64>::new(), "acknowledged writes lost");
    no_session_left_in_a_transaction(&admin, "cancel_diesel_savepoint").await;
}

#[tokio::test]
async fn a_cancelled_diesel_transaction_never_swallows_the_next_write() {
    let (_pg, connector, admin) = setup("cancel_diesel").await;
    let pool = connector.diesel_pool().await.unwrap();
    let tx = connector.transactions();
    let (pool, tx) = (&pool, &tx);
    let figures = sweep(
        ROUNDS,
        &admin,
        |pendings| {
            let work = tx.diesel(pool, TxMode::new(), |conn| {
                Box::pin(async move {
                    dal::diesel::sql_query("SELECT 1").execute(conn).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(())
                })
            });
            Box::pin(async move { cancel_after(pendings, work).await.is_some() })
        },
        |id| {
            Box::pin(async move {
                let mut conn = pool.get().await.unwrap();
                insert_ack_through_diesel(&mut conn, id).await.is_ok()
            })
        },
    )
    .await;
    nothing_lost("Diesel", &figures, &connector, &admin, "cancel_diesel").await;
}

#[tokio::test]
async fn a_cancelled_begin_on_a_plain_checkout_never_swallows_the_next_write() {
    cancelled_begins_on_plain_checkouts("cancel_raw").await;
}

/// The same on two worker threads: the client's connection task runs beside the checkout, so
/// a request a dropped future queued may be on its way to the socket as the pool looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_begin_on_a_plain_checkout_never_swallows_the_next_write_on_two_threads() {
    cancelled_begins_on_plain_checkouts("cancel_raw_mt").await;
}

async fn cancelled_begins_on_plain_checkouts(name: &str) {
    let (_pg, connector, admin) = setup(name).await;
    let pool = connector.postgres_pool().await.unwrap();
    let pool = &pool;
    let figures = sweep(
        ROUNDS,
        &admin,
        |pendings| {
            let work = async move {
                let client = pool.get().await.unwrap();
                client.batch_execute("BEGIN").await.unwrap();
                client.batch_execute("SELECT 1").await.unwrap();
                client.batch_execute("COMMIT").await.unwrap();
            };
            Box::pin(async move { cancel_after(pendings, work).await.is_some() })
        },
        |id| {
            Box::pin(async move {
                let client = pool.get().await.unwrap();
                let insert = "INSERT INTO acks (id) VALUES ($1)";
                tokio_postgres::Client::execute(&client, insert, &[&id])
                    .await
                    .is_ok()
            })
        },
    )
    .await;
    nothing_lost("tokio-postgres", &figures, &connector, &admin, name).await;
}

/// One failed connection attempt fails one caller: eight callers on an empty pool of eight,
/// a role allowed seven connections (the eighth login is refused with SQLSTATE 53300, as a
/// platform's connection limit answers); seven callers get their connection.
#[tokio::test]
async fn one_failed_connect_fails_one_waiting_caller_only() {
    let pg = tests::server().await;
    for kind in ["diesel", "postgres"] {
        let role = format!("one_fails_{kind}");
        let password = tests::app_database(&pg, &role).await;
        pg.set_connection_limit(&role, Some(7)).await.unwrap();
        let mut config = pg
            .config(&role, &role, &password)
            .pool(PoolSettings::builder().max_size(8).build().unwrap());
        // The refused login is tried again for up to the connect timeout: well inside the
        // acquire timeout (10 s), so that the caller gets the refusal, not a timeout of its own.
        config.connect_timeout = Duration::from_secs(3);
        let connector = Connector::new(config).await.unwrap();
        // Each caller keeps its connection until all have answered, so that none is served
        // by a connection another caller gave back.
        let outcomes: Vec<Result<(), String>> = match kind {
            "diesel" => {
                let pool = connector.diesel_pool().await.unwrap();
                let got = futures_util::future::join_all((0..8).map(|_| pool.get())).await;
                got.iter()
                    .map(|r| {
                        r.as_ref()
                            .map(drop)
                            .map_err(|e| format!("{:?}", e.sqlstate()))
                    })
                    .collect()
            }
            _ => {
                let pool = connector.postgres_pool().await.unwrap();
                let got = futures_util::future::join_all((0..8).map(|_| pool.get())).await;
                got.iter()
                    .map(|r| {
                        r.as_ref()
                            .map(drop)
                            .map_err(|e| format!("{:?}", e.sqlstate()))
                    })
                    .collect()
            }
        };
        let failed: Vec<_> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
        println!(
            "{kind}: 8 callers, 1 refused login, {} failed",
            failed.len()
        );
        assert_eq!(
            failed,
            [&format!("{:?}", Some("53300"))],
            "{kind}: {outcomes:?}"
        );
        connector.shutdown().await;
    }
}

/// Idle connections the server closed (`pg_terminate_backend`, as a restart or an idle
/// timeout does) are never handed out: the next requests on every pool kind all succeed.
/// "Idle" is idle for longer than the pools' 0.5 s window in which a connection that just came
/// back is handed out again on its closed flag alone, without a round trip.
#[tokio::test]
async fn connections_the_server_closed_are_never_handed_out() {
    let pool = PoolSettings::builder().max_size(3).build().unwrap();
    let (pg, connector) = app_connector("terminated", pool).await;
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let admin = pg.admin("postgres").await.unwrap();
    let (mut requests, mut failed) = (0, Vec::new());
    for round in 0..3 {
        // Three connections of each kind open and idle, then all terminated.
        let (a, b, c) = tokio::join!(
            futures_util::future::join_all((0..3).map(|_| diesel.get())),
            futures_util::future::join_all((0..3).map(|_| raw.get())),
            futures_util::future::join_all(
                (0..3).map(|_| async { db.execute_unprepared("SELECT pg_sleep(0.01)").await })
            ),
        );
        assert!(a.iter().all(Result::is_ok), "round {round}");
        assert!(b.iter().all(Result::is_ok), "round {round}");
        assert!(c.iter().all(Result::is_ok), "round {round}");
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(600)).await;
        let terminated: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'terminated'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(terminated >= 3, "round {round}: {terminated}");
        for _ in 0..3 {
            requests += 3;
            let mut conn = diesel.get().await;
            if let Ok(conn) = conn.as_mut() {
                if let Err(e) = dal::diesel::sql_query("SELECT 1")
                    .execute(&mut **conn)
                    .await
                {
                    failed.push(format!("diesel: {e}"));
                }
            } else if let Err(e) = conn {
                failed.push(format!("diesel get: {e}"));
            }
            match raw.get().await {
                Ok(client) => {
                    if let Err(e) = client.batch_execute("SELECT 1").await {
                        failed.push(format!("postgres: {e}"));
                    }
                }
                Err(e) => failed.push(format!("postgres get: {e}")),
            }
            if let Err(e) = db.execute_unprepared("SELECT 1").await {
                failed.push(format!("seaorm: {e}"));
            }
        }
    }
    println!(
        "terminated idle connections: requests {requests}, failed {}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    connector.shutdown().await;
}

/// A checkout whose check was cancelled (a connection idle past the pools' 0.5 s window is
/// checked before it goes out) gives the connection back unchecked; it is checked again
/// before it goes out, so that one the server closed meanwhile is never handed out. Every
/// kind: the check is cancelled at its first await, its question sent to a server process
/// stopped so that no answer can come first; the server then ends the session, and the next
/// request must succeed.
#[tokio::test]
async fn a_connection_whose_check_was_cancelled_is_checked_before_it_goes_out() {
    use dal::diesel::sql_types::Integer;
    let (_pg, connector, admin) = setup("unchecked").await;
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let pid_sql = "SELECT pg_backend_pid() AS pid";
    let mut failed = Vec::new();
    for kind in ["seaorm", "diesel", "postgres"] {
        let pid: i32 = match kind {
            "seaorm" => tests::seaorm_backend_pid(&db).await,
            "diesel" => {
                let mut conn = diesel.get().await.unwrap();
                dal::diesel::select(dal::diesel::dsl::sql::<Integer>("pg_backend_pid()"))
                    .get_result(&mut *conn)
                    .await
                    .unwrap()
            }
            _ => raw
                .get()
                .await
                .unwrap()
                .query_one(pid_sql, &[])
                .await
                .unwrap()
                .get(0),
        };
        // Idle past the window: the next checkout checks.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stopped = Stopped::new(pid);
        let answered = match kind {
            "seaorm" => cancel_after(0, db.execute_unprepared("SELECT 1"))
                .await
                .is_some(),
            "diesel" => cancel_after(0, diesel.get()).await.is_some(),
            _ => cancel_after(0, raw.get()).await.is_some(),
        };
        assert!(!answered, "{kind}: the checkout did not wait for its check");
        admin
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        drop(stopped);
        let gone = async {
            while admin
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_some()
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), gone)
            .await
            .expect("the session ended within a minute");
        if let Err(e) = next_request(kind, &db, &diesel, &raw).await {
            failed.push(format!("{kind}: {e}"));
        }
    }
    println!("checks cancelled: requests 3, failed {}", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    connector.shutdown().await;
}

/// A transaction dropped while its server does not answer (a request's own timeout fired
/// during a stall: a server that froze, a flow a firewall dropped without a word) costs no
/// request: the next one, sent at once to a pool of one connection, runs on another. The
/// SeaORM pool rolls such a transaction back on a task of its own and the tokio-postgres
/// pool checks the connection at its next checkout, each with no bound: the SeaORM pool's
/// place stayed taken, and every request failed, for as long as the server did not answer,
/// and the tokio-postgres pool's next checkout waited out the acquire timeout and failed.
/// (Diesel's pool closes such a connection as it comes back: diesel-async marks it broken.)
/// The client then closes each stalled session's socket while the server is still silent.
#[tokio::test]
async fn a_transaction_dropped_while_the_server_does_not_answer_costs_no_request() {
    use dal::diesel::sql_types::Integer;
    let (_pg, connector, admin) = setup("stalled").await;
    let transactions = connector.transactions();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let pid_sql = "SELECT pg_backend_pid() AS pid";
    let mut failed = Vec::new();
    let mut stopped = Vec::new();
    for (id, kind) in [(1, "seaorm"), (2, "diesel"), (3, "postgres")] {
        let insert = format!("INSERT INTO acks VALUES ({id})");
        // Each request's statement goes out inside its transaction and its answer never comes:
        // the request's timeout drops it.
        match kind {
            "seaorm" => {
                let txn = db.begin().await.unwrap();
                txn.execute_unprepared(&insert).await.unwrap();
                let pid: i32 = txn
                    .query_one_raw(Statement::from_string(DbBackend::Postgres, pid_sql))
                    .await
                    .unwrap()
                    .unwrap()
                    .try_get("", "pid")
                    .unwrap();
                stopped.push((kind, Stopped::new(pid)));
                let answered = cancel_after(0, txn.execute_unprepared("SELECT 1")).await;
                assert!(answered.is_none(), "seaorm: the statement had its answer");
            }
            "diesel" => {
                let pid: i32 = {
                    let mut conn = diesel.get().await.unwrap();
                    dal::diesel::select(dal::diesel::dsl::sql::<Integer>("pg_backend_pid()"))
                        .get_result(&mut *conn)
                        .await
                        .unwrap()
                };
                // The pool's one connection: the backend stops once the insert is answered.
                let stalled = Arc::new(tokio::sync::Notify::new());
                let stalling = Arc::clone(&stalled);
                let work = transactions.diesel(&diesel, TxMode::new(), move |conn| {
                    let (insert, stalling) = (insert.clone(), Arc::clone(&stalling));
                    Box::pin(async move {
                        dal::diesel::sql_query(insert).execute(conn).await?;
                        stop(pid);
                        stalling.notify_one();
                        dal::diesel::sql_query("SELECT 1").execute(conn).await?;
                        Ok(())
                    })
                });
                let mut work = std::pin::pin!(work);
                tokio::select! {
                    done = &mut work => panic!("diesel: the transaction ended: {done:?}"),
                    () = stalled.notified() => {}
                }
                stopped.push((kind, Stopped(nix::unistd::Pid::from_raw(pid))));
            }
            _ => {
                let mut client = raw.get().await.unwrap();
                let txn = client.transaction().await.unwrap();
                txn.batch_execute(&insert).await.unwrap();
                let pid: i32 = txn.query_one(pid_sql, &[]).await.unwrap().get(0);
                stopped.push((kind, Stopped::new(pid)));
                let answered = cancel_after(0, txn.batch_execute("SELECT 1")).await;
                assert!(answered.is_none(), "postgres: the statement had its answer");
            }
        }
        if let Err(e) = next_request(kind, &db, &diesel, &raw).await {
            failed.push(format!("{kind}: {e}"));
        }
    }
    // Each stalled session's socket is closed by the client while its server still says
    // nothing: tokio-postgres kept the socket of a client dropped with replies owed.
    let mut kept = Vec::new();
    for (kind, Stopped(pid)) in &stopped {
        let port: i32 = admin
            .query_one(
                "SELECT client_port FROM pg_stat_activity WHERE pid = $1",
                &[&pid.as_raw()],
            )
            .await
            .unwrap()
            .get(0);
        let closed = tokio::time::timeout(Duration::from_secs(60), async {
            while established(port) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        if closed.await.is_err() {
            kept.push(*kind);
        }
    }
    drop(stopped);
    for id in [1, 2, 3] {
        assert!(
            !visible(&admin, id).await,
            "write {id} was never acknowledged"
        );
    }
    println!(
        "transactions dropped in a stall: requests 3, failed {}, sockets kept open {}",
        failed.len(),
        kept.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert!(kept.is_empty(), "still open a minute on: {kept:?}");
    connector.shutdown().await;
}

/// One request through the pool of `kind` (`seaorm`, `diesel` or `postgres`), its error as text.
async fn next_request(
    kind: &str,
    db: &dal::SeaOrmPool,
    diesel: &dal::DieselPool,
    raw: &dal::PgClientPool,
) -> Result<(), String> {
    match kind {
        "seaorm" => db
            .execute_unprepared("SELECT 2")
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        "diesel" => match diesel.get().await {
            Ok(mut conn) => dal::diesel::sql_query("SELECT 2")
                .execute(&mut *conn)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        _ => match raw.get().await {
            Ok(client) => client
                .batch_execute("SELECT 2")
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Whether this machine has an established loopback TCP socket on local port `port`
/// (`/proc/net/tcp`, state `01`).
fn established(port: i32) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"01")
    })
}

/// A server process stopped (`SIGSTOP`) until dropped.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn new(pid: i32) -> Self {
        stop(pid);
        Self(nix::unistd::Pid::from_raw(pid))
    }
}

/// Stops the server process `pid` (`SIGSTOP`); [`Stopped`] lets it go on.
fn stop(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The customers whose email starts with `before`, through a Diesel checkout.
async fn diesel_customers_before(pool: &dal::DieselPool) -> diesel::QueryResult<usize> {
    use dal::diesel::{QueryDsl, TextExpressionMethods};
    use entity::schema::customers;
    let mut conn = pool.get().await.unwrap();
    customers::table
        .filter(customers::email.like("before%"))
        .select(customers::name)
        .load::<String>(&mut *conn)
        .await
        .map(|rows| rows.len())
}

/// The customers counted in a transaction of each ORM: SeaORM's, then Diesel's.
async fn customers_in_transactions(
    tx: &dal::Transactions,
    db: &dal::SeaOrmPool,
    diesel: &dal::DieselPool,
) -> (Result<usize, String>, Result<usize, String>) {
    use dal::diesel::QueryDsl;
    use entity::schema::customers;
    use sea_orm::EntityTrait;
    let seaorm = tx
        .seaorm(db, TxMode::new(), |t| {
            Box::pin(async move { Ok(entity::customer::Entity::find().all(t).await?.len()) })
        })
        .await;
    let diesel = tx
        .diesel(diesel, TxMode::new(), |conn| {
            Box::pin(async move {
                Ok(customers::table
                    .select(customers::name)
                    .load::<String>(conn)
                    .await?
                    .len())
            })
        })
        .await;
    (
        seaorm.map_err(|e| e.to_string()),
        diesel.map_err(|e| e.to_string()),
    )
}

/// The same schema change on a server whose messages are in German, as one installed under a
/// German locale sends them: the pools tell a stale statement by the error's routine, not its
/// message, so one query fails on the Diesel connection before it is replaced, and
/// transactions of both ORMs run their work again, as in English.
#[tokio::test]
async fn a_stale_statement_is_told_whatever_the_language_of_the_servers_messages() {
    let pg = match LocalPostgres::start_localized("de").await {
        Ok(pg) => pg,
        Err(e) => panic!("cannot start the test PostgreSQL server: {e}"),
    };
    let password = tests::app_database(&pg, "altered").await;
    let admin = pg.admin("altered").await.unwrap();
    let missing = admin
        .batch_execute("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    let message = missing.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("existiert nicht")),
        "the server's messages are not in German ({message:?}): the test needs PostgreSQL's \
         German translations (postgres-15.mo in /usr/share/locale/de/LC_MESSAGES)"
    );
    let one = PoolSettings::builder().max_size(1).build().unwrap();
    let connector = Connector::new(pg.config("altered", "altered", &password).pool(one))
        .await
        .unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let db = connector.seaorm().await.unwrap();
    tests::diesel_round_trip(&diesel, "before").await;
    let query = || diesel_customers_before(&diesel);
    let rows = query().await.unwrap();
    let alter = |to: u32| {
        let admin = &admin;
        async move {
            admin
                .batch_execute(&format!(
                    "ALTER TABLE customers ALTER COLUMN name TYPE varchar({to})"
                ))
                .await
                .unwrap()
        }
    };
    alter(200).await;
    let mut failed = Vec::new();
    for round in 0..4 {
        match query().await {
            Ok(n) => assert_eq!(n, rows),
            Err(e) => failed.push((round, e.to_string())),
        }
    }
    println!("after ALTER TABLE, German messages: Diesel failed {failed:?} of 4");
    assert!(
        matches!(failed.as_slice(), [(0, _)]),
        "one query fails, then the connection is replaced: {failed:?}"
    );

    let tx = connector.transactions();
    let all = customers_in_transactions(&tx, &db, &diesel).await;
    assert!(matches!(all, (Ok(_), Ok(_))), "{all:?}");
    alter(300).await;
    assert_eq!(customers_in_transactions(&tx, &db, &diesel).await, all);
    connector.shutdown().await;
}

/// A client held across a schema change (a queue consumer, a batch job) fails one query:
/// once its connection has met a stale statement, `prepare_cached` prepares anew, where it
/// handed out the stale statement again until the client went back to the pool.
#[tokio::test]
async fn a_client_held_across_a_schema_change_fails_one_query() {
    let (pg, connector) = app_connector("held", PoolSettings::default()).await;
    let raw = connector.postgres_pool().await.unwrap();
    let pooled = raw.get().await.unwrap();
    let client: &tokio_postgres::Client = &pooled;
    let select = "SELECT name FROM customers";
    let statement = pooled.prepare_cached(select).await.unwrap();
    client.query(&statement, &[]).await.unwrap();
    pg.admin("held")
        .await
        .unwrap()
        .batch_execute("ALTER TABLE customers ALTER COLUMN name TYPE varchar(300)")
        .await
        .unwrap();
    let mut failed = 0;
    for _ in 0..3 {
        let statement = pooled.prepare_cached(select).await.unwrap();
        if let Err(e) = client.query(&statement, &[]).await {
            assert!(format!("{e:?}").contains("cached plan"), "{e:?}");
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "queries failed on the stale statement");
    drop(pooled);
    connector.shutdown().await;
}

/// An enum type of the schema, to Diesel: looked up by name once per connection.
#[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(name = "mood"))]
struct MoodType;

/// A value of `mood`, to Diesel and to tokio-postgres: its label, as PostgreSQL sends an enum.
#[derive(Debug, diesel::expression::AsExpression)]
#[diesel(sql_type = MoodType)]
struct Mood(&'static str);

impl diesel::serialize::ToSql<MoodType, diesel::pg::Pg> for Mood {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
    ) -> diesel::serialize::Result {
        std::io::Write::write_all(out, self.0.as_bytes())?;
        Ok(diesel::serialize::IsNull::No)
    }
}

impl tokio_postgres::types::ToSql for Mood {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        ty.name() == "mood"
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A migration under a running service that recreates a type (the usual way to drop a value
/// of an enum): statements prepared with the old type, and Diesel's lookup of the type by
/// name, which it keeps for the connection's life, name a type that is gone. PostgreSQL
/// answers each with SQLSTATE XX000 ("cache lookup failed for type"): every write that binds
/// the type failed on every connection from before, until it retired. The pools replace such
/// a connection (Diesel, tokio-postgres) or make it forget its statements (SeaORM, whose
/// casts into the type failed so 4 times of 4) as they do one with a stale statement, so at
/// most one write per connection fails, and none in a transaction or in work marked
/// idempotent.
#[tokio::test]
async fn a_type_recreated_under_a_running_service_fails_at_most_one_write_per_connection() {
    let one = PoolSettings::builder().max_size(1).build().unwrap();
    let (pg, connector) = app_connector("retyped", one).await;
    let admin = pg.admin("retyped").await.unwrap();
    admin
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('calm', 'glad'); CREATE TABLE moods (m mood); \
             ALTER TABLE moods OWNER TO retyped; ALTER TYPE mood OWNER TO retyped",
        )
        .await
        .unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let insert = "INSERT INTO moods (m) VALUES ($1)";
    let diesel_write = || async {
        let mut conn = diesel.get().await.unwrap();
        diesel::sql_query(insert)
            .bind::<MoodType, _>(Mood("calm"))
            .execute(&mut conn)
            .await
    };
    let raw_write = || async {
        let pooled = raw.get().await.unwrap();
        let statement = pooled.prepare_cached(insert).await?;
        let client: &tokio_postgres::Client = &pooled;
        client.execute(&statement, &[&Mood("calm")]).await
    };
    // SeaORM's casts into the type: one that reads no table altered with it keeps its plan.
    let db = connector.seaorm().await.unwrap();
    let seaorm_write = || {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT CAST($1 AS mood)::text",
            ["calm".into()],
        ))
    };
    diesel_write().await.unwrap();
    raw_write().await.unwrap();
    seaorm_write().await.unwrap();

    // The migration: the type recreated with the values it keeps.
    let recreate = || {
        admin.batch_execute(
            "ALTER TYPE mood RENAME TO mood_old; CREATE TYPE mood AS ENUM ('calm'); \
             ALTER TYPE mood OWNER TO retyped; \
             ALTER TABLE moods ALTER COLUMN m TYPE mood USING m::text::mood; DROP TYPE mood_old",
        )
    };
    recreate().await.unwrap();
    let (mut diesel_failed, mut raw_failed, mut seaorm_failed) = (0, 0, 0);
    for _ in 0..4 {
        if let Err(e) = diesel_write().await {
            assert!(e.to_string().contains("cache lookup failed"), "{e}");
            diesel_failed += 1;
        }
        if let Err(e) = raw_write().await {
            assert!(format!("{e:?}").contains("cache lookup failed"), "{e:?}");
            raw_failed += 1;
        }
        if let Err(e) = seaorm_write().await {
            assert!(e.to_string().contains("cache lookup failed"), "{e}");
            seaorm_failed += 1;
        }
    }
    println!(
        "after the type was recreated: Diesel {diesel_failed} failed of 4, tokio-postgres \
         {raw_failed} failed of 4, SeaORM {seaorm_failed} failed of 4"
    );
    assert!(diesel_failed <= 1, "Diesel: {diesel_failed} of 4 failed");
    assert!(raw_failed <= 1, "tokio-postgres: {raw_failed} of 4 failed");
    assert!(seaorm_failed <= 1, "SeaORM: {seaorm_failed} of 4 failed");

    // Work the caller marked idempotent is tried again on the replaced connection.
    recreate().await.unwrap();
    let retried = connector.transactions();
    let raw_written = retried
        .idempotent(|| async { raw_write().await.map_err(dal::Error::Database) })
        .await;
    assert_eq!(raw_written.unwrap(), 1, "tokio-postgres, idempotent");
    let diesel_written = retried
        .idempotent(|| async { diesel_write().await.map_err(dal::Error::Diesel) })
        .await;
    assert_eq!(diesel_written.unwrap(), 1, "Diesel, idempotent");
    let seaorm_read = retried
        .idempotent(|| async { seaorm_write().await.map_err(dal::Error::SeaOrm) })
        .await;
    assert!(seaorm_read.is_ok(), "SeaORM, idempotent: {seaorm_read:?}");

    // A transaction tries again on a connection of its own: none fails.
    recreate().await.unwrap();
    let written = connector
        .transactions()
        .diesel(&diesel, TxMode::new(), |conn| {
            Box::pin(async move {
                diesel::sql_query(insert)
                    .bind::<MoodType, _>(Mood("calm"))
                    .execute(conn)
                    .await
                    .map_err(dal::Error::Diesel)
            })
        })
        .await;
    assert_eq!(written.unwrap(), 1);
    connector.shutdown().await;
}

/// A migration under a running service: a column's type changes while pooled connections hold
/// prepared statements of the old shape. PostgreSQL refuses such a statement (SQLSTATE 0A000,
/// "cached plan must not change result type"); the ORMs cannot retry it, but the pools make the
/// connection forget (SeaORM) or replace it (Diesel, and tokio-postgres with statements from
/// `prepare_cached`), so at most one query per connection fails.
#[tokio::test]
async fn a_schema_change_fails_at_most_one_query_per_connection_and_no_transaction() {
    use sea_orm::EntityTrait;
    let one = PoolSettings::builder().max_size(1).build().unwrap();
    let (pg, connector) = app_connector("altered", one).await;
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "before").await;
    tests::diesel_round_trip(&diesel, "before").await;
    let diesel_query = || diesel_customers_before(&diesel);
    let seaorm_query = || async {
        entity::customer::Entity::find()
            .all(&db)
            .await
            .map(|r| r.len())
    };
    let raw_query = || async {
        let client = raw.get().await.unwrap();
        let select = "SELECT name FROM customers WHERE email LIKE 'before%'";
        let statement = client.prepare_cached(select).await?;
        client.query(&statement, &[]).await.map(|rows| rows.len())
    };
    assert_eq!(diesel_query().await.unwrap(), 2);
    assert_eq!(seaorm_query().await.unwrap(), 2);
    assert_eq!(raw_query().await.unwrap(), 2);

    pg.admin("altered")
        .await
        .unwrap()
        .batch_execute("ALTER TABLE customers ALTER COLUMN name TYPE varchar(200)")
        .await
        .unwrap();
    let (mut diesel_failed, mut seaorm_failed, mut raw_failed) = (0, 0, 0);
    for round in 0..4 {
        match raw_query().await {
            Ok(n) => assert_eq!(n, 2),
            Err(e) => {
                assert!(
                    round == 0
                        && e.as_db_error()
                            .is_some_and(|e| e.message().contains("cached plan")),
                    "{round}: {e}"
                );
                raw_failed += 1;
            }
        }
        match diesel_query().await {
            Ok(n) => assert_eq!(n, 2),
            Err(e) => {
                assert!(
                    round == 0 && e.to_string().contains("cached plan"),
                    "{round}: {e}"
                );
                diesel_failed += 1;
            }
        }
        match seaorm_query().await {
            Ok(n) => assert_eq!(n, 2),
            Err(e) => {
                assert!(
                    round == 0 && e.to_string().contains("cached plan"),
                    "{round}: {e}"
                );
                seaorm_failed += 1;
            }
        }
    }
    println!(
        "after ALTER TABLE: Diesel {diesel_failed} failed of 4, SeaORM {seaorm_failed} failed \
         of 4, tokio-postgres {raw_failed} failed of 4"
    );
    assert_eq!(raw_failed, 1, "the cached statement was stale once");

    // Transactions retry such a statement: none fails. Each runs once first, so that its
    // statements are prepared on the pooled connection when the schema changes.
    let tx = connector.transactions();
    let in_transactions = || customers_in_transactions(&tx, &db, &diesel);
    assert_eq!(in_transactions().await, (Ok(2), Ok(2)));
    pg.admin("altered")
        .await
        .unwrap()
        .batch_execute("ALTER TABLE customers ALTER COLUMN name TYPE varchar(300)")
        .await
        .unwrap();
    assert_eq!(in_transactions().await, (Ok(2), Ok(2)));
    connector.shutdown().await;
}

/// Lifecycles: every sqlx pool's token listener goes at shutdown (the SeaORM pool takes its
/// token per connection and has none), and shutdown does not wait without bound for a
/// connection a caller still holds.
#[tokio::test]
async fn shutdown_lets_go_of_every_pool_and_does_not_wait_without_bound() {
    let pool = PoolSettings::builder()
        .acquire_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (_pg, connector) = app_connector("lifecycle", pool).await;
    for _ in 0..5 {
        let sqlx = connector.sqlx_pool().await.unwrap();
        sea_orm::sqlx::query("SELECT 1")
            .execute(&sqlx)
            .await
            .unwrap();
    }
    let db = connector.seaorm().await.unwrap();
    db.execute_unprepared("SELECT 1").await.unwrap();
    assert_eq!(connector.cache().listeners(), 5);
    let sqlx = connector.sqlx_pool().await.unwrap();
    let held = sqlx.acquire().await.unwrap();
    // Bounded only against a hang: shutdown waits about the acquire timeout for `held`.
    tokio::time::timeout(Duration::from_secs(120), connector.shutdown())
        .await
        .expect("shutdown returns while a connection is held");
    assert_eq!(connector.cache().listeners(), 0);
    drop(held);
}

/// SeaORM under steady churn (1.5 s lifetime, 1 s idle timeout) and eight workers: no acquire
/// times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaorm_acquires_do_not_stall_under_connection_churn() {
    let pool = PoolSettings::builder()
        .max_size(8)
        .max_lifetime(Some(Duration::from_millis(1500)))
        .idle_timeout(Some(Duration::from_secs(1)))
        .acquire_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (_pg, connector) = app_connector("churn", pool).await;
    let db = connector.seaorm().await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(12);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                while std::time::Instant::now() < until {
                    match db.execute_unprepared("SELECT 1").await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, Vec::new());
    for worker in workers {
        let (o, f) = worker.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!("SeaORM churn: {ok} queries, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    connector.shutdown().await;
}

/// Logins off the request path: under steady load, each connection is replaced ahead of its
/// lifetime by one opened in the background, so the pools themselves never open a connection
/// (bb8 counts every one it opens) and no Diesel or tokio-postgres checkout waits for one. The
/// replacement opens a quarter of the lifetime (1 s here) before the end: the margin for a
/// login on a busy machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_replaced_ahead_of_their_lifetime_off_the_request_path() {
    let pool = PoolSettings::builder()
        .max_size(4)
        .max_lifetime(Some(Duration::from_secs(4)))
        .build()
        .unwrap();
    let (_pg, connector) = app_connector("renewed", pool).await;
    assert_logins_stay_off_the_request_path(&connector, Duration::from_secs(4)).await;
}

/// A pool left idle for longer than its lifetime, within its idle timeout, has its next
/// `min_idle` connections logged in before its last ones end, so that the requests that
/// resume find them: before, the idle connections stayed in the pools past their end, and the
/// first checkouts after the idle spell retired them and waited for logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_spell_longer_than_the_lifetime_puts_no_login_on_the_request_path() {
    let lifetime = Duration::from_secs(6);
    let pool = PoolSettings::builder()
        .max_size(4)
        .min_idle(2)
        .max_lifetime(Some(lifetime))
        .idle_timeout(Some(Duration::from_secs(120)))
        .build()
        .unwrap();
    let (_pg, connector) = app_connector("idlespell", pool).await;
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    let created = |s: dal::bb8::State| s.statistics.connections_created;
    let waited = |s: dal::bb8::State| s.statistics.get_waited;
    // Two connections of each at once, as a burst of requests takes them.
    let burst = || async {
        let (a, b, c) = tokio::join!(
            futures_util::future::join_all((0..2).map(|_| async {
                let mut conn = diesel.get().await?;
                dal::diesel::sql_query("SELECT 1")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| dal::Error::Pool(e.to_string()))
            })),
            futures_util::future::join_all((0..2).map(|_| db.execute_unprepared("SELECT 1"))),
            futures_util::future::join_all((0..2).map(|_| async {
                raw.get().await?.batch_execute("SELECT 1").await?;
                Ok::<_, dal::Error>(())
            })),
        );
        let failed: Vec<String> = (a.into_iter().map(|r| r.err().map(|e| e.to_string())))
            .chain(b.into_iter().map(|r| r.err().map(|e| e.to_string())))
            .chain(c.into_iter().map(|r| r.err().map(|e| e.to_string())))
            .flatten()
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
    };
    burst().await;
    let opened_before = connector.connections_opened();

    tokio::time::sleep(lifetime.mul_f64(2.5)).await;
    let renewed = connector.connections_opened() - opened_before;
    // Read only now: bb8 counts a connection it opened for a caller after handing it over.
    let before = [
        created(db.state()),
        created(diesel.state()),
        created(raw.state()),
    ];
    let waited_before = (waited(diesel.state()), waited(raw.state()));
    burst().await;
    let after = [
        created(db.state()),
        created(diesel.state()),
        created(raw.state()),
    ];
    println!(
        "idle spell of 2.5 lifetimes: {renewed} connections opened in the background; \
         opened at the burst by seaorm {}, diesel {}, tokio-postgres {}",
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
    );
    // Each pool's two lived through at least two lifetimes.
    assert!(renewed >= 12, "renewed {renewed}");
    assert_eq!(after, before, "a pool logged in on the request path");
    assert_eq!(
        (waited(diesel.state()), waited(raw.state())),
        waited_before,
        "a Diesel or tokio-postgres checkout waited"
    );
    connector.shutdown().await;
}

/// Logins off the request path even when a login takes longer than the whole lifetime: each
/// takes 8.4 s more here (a server slow to log in, or a Lakebase endpoint waking from zero)
/// against an 8 s lifetime, so each replacement, opened at most half the lifetime ahead,
/// arrives after its predecessor's end. The predecessor serves on until it does, for up to
/// the lifetime again: the 3.6 s left is the margin for the login itself (on a busy runtime
/// sharing two cores, a sqlx login took 1.5-2.2 s longer than a tokio-postgres one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_slower_than_the_lifetime_still_stays_off_the_request_path() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "slowlogin").await;
    let lifetime = Duration::from_secs(8);
    let pool = PoolSettings::builder()
        .max_size(4)
        .max_lifetime(Some(lifetime))
        .lifetime_jitter(0.0)
        // The first connections log in on the request path: 10 s, the default, would leave
        // a slow login 1.6 s.
        .acquire_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut config = pg.config("slowlogin", "slowlogin", &password).pool(pool);
    config.port = slow_logins(pg.port(), lifetime.mul_f64(1.05)).await;
    config.connect_timeout = Duration::from_secs(30);
    let connector = Connector::new(config).await.unwrap();
    assert_logins_stay_off_the_request_path(&connector, lifetime).await;
}

/// A way to the server on `port` on which every login takes `delay` longer: each
/// connection's first message waits that long before it is passed on.
async fn slow_logins(port: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let local = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    local
}

/// Four workers use each pool of `connector` (four connections each, kept for `lifetime`) for
/// two and a quarter lifetimes, and on until every connection has been replaced (at most a
/// minute): none is replaced by the pools themselves, no request fails and no Diesel or
/// tokio-postgres checkout waits.
async fn assert_logins_stay_off_the_request_path(connector: &Connector, lifetime: Duration) {
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    // Four connections of each, open and warm.
    let (a, b, c) = tokio::join!(
        futures_util::future::join_all((0..4).map(|_| diesel.get())),
        futures_util::future::join_all((0..4).map(|_| db.begin())),
        futures_util::future::join_all((0..4).map(|_| raw.get())),
    );
    assert!(a.iter().all(Result::is_ok) && b.iter().all(Result::is_ok));
    assert!(c.iter().all(Result::is_ok));
    drop((a, b, c));
    // The four connections each pool opened above. Not read from bb8: it counts a connection
    // it opened after putting it in the pool, where the caller waiting for it may take it
    // first, so its count can lag behind the callers it served.
    let created = |s: dal::bb8::State| s.statistics.connections_created;
    let before = (4, 4, 4);
    let waited = |s: dal::bb8::State| s.statistics.get_waited;
    let waited_before = (waited(diesel.state()), waited(raw.state()));
    let opened_before = connector.connections_opened();
    let started = std::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (db, diesel, raw) = (db.clone(), diesel.clone(), raw.clone());
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut failed = Vec::new();
                while !AtomicBool::load(&stop, Ordering::Relaxed) {
                    if let Err(e) = db.execute_unprepared("SELECT 1").await {
                        failed.push(format!("seaorm: {e}"));
                    }
                    match diesel.get().await {
                        Ok(mut conn) => {
                            if let Err(e) =
                                dal::diesel::sql_query("SELECT 1").execute(&mut *conn).await
                            {
                                failed.push(format!("diesel: {e}"));
                            }
                        }
                        Err(e) => failed.push(format!("diesel get: {e}")),
                    }
                    match raw.get().await {
                        Ok(client) => {
                            if let Err(e) = client.batch_execute("SELECT 1").await {
                                failed.push(format!("tokio-postgres: {e}"));
                            }
                        }
                        Err(e) => failed.push(format!("tokio-postgres get: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                failed
            })
        })
        .collect();
    // Each replacement counts as it logs in; the twelve connections each need one.
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < lifetime.mul_f64(2.25)
        || (connector.connections_opened() - opened_before < 12
            && started.elapsed() < Duration::from_secs(60))
    {
        ticks.tick().await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = Vec::new();
    for worker in workers {
        failed.extend(worker.await.unwrap());
    }
    let renewed = connector.connections_opened() - opened_before;
    println!(
        "renewed {renewed}; opened by the pools: seaorm {}, diesel {}, tokio-postgres {}",
        created(db.state()) - before.0,
        created(diesel.state()) - before.1,
        created(raw.state()) - before.2,
    );
    assert!(failed.is_empty(), "{failed:?}");
    // Every connection lived through at least one lifetime.
    assert!(renewed >= 12, "renewed {renewed}");
    let after = (
        created(db.state()),
        created(diesel.state()),
        created(raw.state()),
    );
    assert_eq!(after, before);
    assert_eq!(
        (waited(diesel.state()), waited(raw.state())),
        waited_before,
        "a Diesel or tokio-postgres checkout waited"
    );
    connector.shutdown().await;
}

/// Ends every session of `role`, so that each pool must log in again. The sessions have been
/// idle for longer than the 0.5 s in which pools hand a connection out again unchecked.
async fn terminate_sessions(pg: &LocalPostgres, role: &str) {
    tokio::time::sleep(Duration::from_millis(600)).await;
    let admin = pg.admin("postgres").await.unwrap();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
}

/// A token the server stops accepting before the expiry it claims (revoked early, or a
/// skewed clock): each pool kind fetches a fresh one when its login is refused and goes on,
/// and the first pool to learn of it fetches for all (one fetch per refusal). The SeaORM pool
/// learns of it through `transactions()`, or takes the token another pool fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_before_its_expiry_is_replaced_for_every_pool_kind() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "f_revoked", Duration::from_secs(600)).await;
    let role = lb.config().role.clone();
    let settings = PoolSettings::builder().max_size(1).build().unwrap();
    let config = lb.client_config(&pg, "f_revoked").unwrap().pool(settings);
    let connector = Connector::new(config).await.unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    let clients = connector.postgres_pool().await.unwrap();
    let tx = connector.transactions();

    let seaorm_in_transaction = || {
        tx.seaorm(&db, TxMode::new(), |txn| {
            Box::pin(async move {
                txn.execute_unprepared("SELECT 1").await?;
                Ok(())
            })
        })
    };
    let seaorm_plain = || db.execute_unprepared("SELECT 1");
    let diesel_query = || async {
        let mut conn = diesel.get().await?;
        dal::diesel::sql_query("SELECT 1")
            .execute(&mut *conn)
            .await
            .map_err(dal::Error::from)
    };
    let client_query = || async {
        let client = clients.get().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(dal::Error::from)
    };

    for first in ["seaorm", "diesel", "tokio-postgres"] {
        let refused = connector.cache().current().expect("a token in use");
        lb.revoke(refused.expose());
        terminate_sessions(&pg, &role).await;
        let fetches = connector.cache().fetches();
        match first {
            "seaorm" => seaorm_in_transaction().await.expect("seaorm, first"),
            "diesel" => drop(diesel_query().await.expect("diesel, first")),
            _ => drop(client_query().await.expect("tokio-postgres, first")),
        }
        seaorm_in_transaction().await.expect("seaorm transaction");
        seaorm_plain().await.expect("seaorm, pushed the new token");
        diesel_query().await.expect("diesel");
        client_query().await.expect("tokio-postgres");
        assert_eq!(
            connector.cache().fetches(),
            fetches + 1,
            "one fetch replaces the refused token ({first} first)"
        );
    }
    connector.shutdown().await;
}

/// With three endpoints and the active one out of reach, a peer that answers with a
/// refusal (a limit, `53300`; a refused login, `28P01`) is passed over for the next one: the
/// search ends where a connection opens. Before, the first peer's refusal ended it, and the
/// third endpoint, which answered, was never tried; every connect failed so.
#[tokio::test]
async fn a_peers_refusal_passes_the_search_on_to_the_next_endpoint() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "threeway").await;
    pg.create_role("threeway_limited", &password, None)
        .await
        .unwrap();
    pg.set_connection_limit("threeway_limited", Some(0))
        .await
        .unwrap();
    let (_closed, closed) = tests::closed_port();
    // Its own connect timeout, for a login on a busy machine: the others' 1 s bounds the
    // limit's retries.
    let answering = pg
        .config("threeway", "threeway", &password)
        .connect_timeout(Duration::from_secs(60));
    let answering_at = format!("{}:{}", pg.host(), pg.port());
    for refusing in [
        pg.config("threeway", "threeway_limited", &password),
        pg.config("threeway", "threeway", "not-the-password"),
    ] {
        let config = pg
            .config("threeway", "threeway", &password)
            .port(closed)
            .connect_timeout(Duration::from_secs(1))
            .failover(refusing)
            .failover(answering.clone());
        let connector = Connector::new(config).await.unwrap();
        let (client, connection) = connector.connect().await.unwrap();
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.unwrap();
        assert_eq!(connector.active_endpoint(), answering_at);
        connector.shutdown().await;
    }
}

/// A SeaORM statement whose future is dropped before all of it was written (a large write
/// whose caller timed out while the socket was full) never runs: the rest of it is not sent
/// later, by the check of the connection's next checkout or as the connection closes.
/// Before, the check sent the rest, and the write its caller had given up on ran then, after
/// whatever the caller had done since.
#[tokio::test]
async fn a_seaorm_statement_dropped_half_written_never_runs_later() {
    let (_pg, connector, admin) = setup("halfwritten").await;
    let db = connector.seaorm().await.unwrap();
    // Larger than what the sockets of both sides hold while the backend is stopped.
    let large = format!(
        "INSERT INTO acks SELECT 1 WHERE length('{}') > 0",
        "x".repeat(32 << 20)
    );
    for retired in [false, true] {
        // Stopped within the pool's window of 0.5 s, so that the next statement goes out with
        // no check first (a check would wait on the stopped server in its place).
        let (pid, stopped) = loop {
            let pid = tests::seaorm_backend_pid(&db).await;
            let back = std::time::Instant::now();
            let stopped = Stopped::new(pid);
            if back.elapsed() < Duration::from_millis(100) {
                break (pid, stopped);
            }
        };
        let written =
            tokio::time::timeout(Duration::from_millis(500), db.execute_unprepared(&large)).await;
        assert!(written.is_err(), "written whole: {written:?}");
        drop(stopped);
        if retired {
            connector.shutdown().await;
        } else {
            db.execute_unprepared("SELECT 1").await.unwrap();
        }
        // Until it ran, or its backend is gone (whatever it was sent has run).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let ran = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "its backend still there after a minute"
            );
            let gone = admin
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_none();
            let ran: i64 = admin
                .query_one("SELECT count(*) FROM acks", &[])
                .await
                .unwrap()
                .get(0);
            if ran > 0 || gone {
                break ran;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(ran, 0, "the write given up on ran (retired: {retired})");
    }
}

/// Whether a checkout of `pool`'s one connection, whose backend is `pid` and whose last
/// statement was [`LAST`], hands it out within the pool's 0.5 s window without running a
/// statement first; each try runs `LAST` again, prepared once (tokio-postgres closes a
/// statement it prepared for one query with a request of its own, answered later). A few tries: on a busy machine one may come
/// after the window, or before the connection task has read all the last statement left.
/// The statements seen otherwise.
async fn goes_out_unchecked(
    pool: &dal::PgClientPool,
    admin: &tokio_postgres::Client,
    pid: i32,
) -> Result<(), Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..10 {
        tokio::task::yield_now().await;
        let client = pool.get().await.unwrap();
        let query: String = admin
            .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0);
        let last = client.prepare_cached(LAST).await.unwrap();
        let again: i32 = client.query_one(&last, &[]).await.unwrap().get(0);
        assert_eq!(again, pid, "another connection");
        if query == LAST {
            return Ok(());
        }
        seen.push(query);
    }
    Err(seen)
}

/// A copy the server refuses before it reads the rows, here into a table that is not there
/// (refused at `Execute`) and into a view (refused after `CopyInResponse`): tokio-postgres
/// writes a `Sync` with the copy's `Execute` and another after the rows, and the server, out
/// of copy-in mode when it reads the first, answers each with a `ReadyForQuery` of its own.
/// tokio-postgres hands the second to the next request in line, and every reply after it to
/// the request after its own: the second of three queries sent after the copy got the rows
/// of the first. The pool's connection is closed instead: the requests in line fail (the
/// server may have run them, as after any lost connection), none gets another's rows, and
/// the next checkout gets a sound connection.
#[tokio::test]
async fn a_copy_refused_before_its_rows_hands_no_request_another_ones_reply() {
    let name = "copy_refused";
    let (_pg, connector, admin) = setup(name).await;
    admin
        .batch_execute(&format!(
            "CREATE VIEW acks_view AS SELECT id FROM acks; ALTER VIEW acks_view OWNER TO {name}"
        ))
        .await
        .unwrap();
    let raw = connector.postgres_pool().await.unwrap();
    for (what, copy) in [
        ("a table that is not there", "COPY missing (id) FROM STDIN"),
        ("a view", "COPY acks_view (id) FROM STDIN"),
    ] {
        let client = raw.get().await.unwrap();
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let echo = client.prepare("SELECT $1::int").await.unwrap();
        // A utility statement is parsed, not analysed: the table is looked up at `Execute`.
        let copy = client.prepare(copy).await.unwrap();
        // Three queries in line behind the copy, before it ends (the one refused at
        // `Execute` ends at once).
        let answers = {
            let queries = futures_util::future::join_all((1..=3).map(|i| {
                let (client, echo) = (&client, &echo);
                async move {
                    client
                        .query_one(echo, &[&i])
                        .await
                        .map(|row| row.get::<_, i32>(0))
                }
            }));
            futures_util::pin_mut!(queries);
            let copied = async {
                let sink = client.copy_in::<_, bytes::Bytes>(&copy).await?;
                futures_util::pin_mut!(sink);
                assert!(futures_util::FutureExt::now_or_never(queries.as_mut()).is_none());
                sink.finish().await
            };
            assert!(copied.await.is_err(), "{what}: the copy went through");
            queries.await
        };
        for (i, answer) in (1..=3).zip(&answers) {
            if let Ok(got) = answer {
                assert_eq!(
                    *got, i,
                    "{what}: a request got another's reply: {answers:?}"
                );
            }
        }
        assert!(
            answers.iter().all(Result::is_err),
            "{what}: a request in line behind the unasked answer was answered: {answers:?}"
        );
        assert!(client.is_closed(), "{what}: the connection stayed open");
        drop(client);
        let client = raw.get().await.unwrap();
        let next: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: the next checkout: {e}"))
            .get(0);
        assert_ne!(
            next, pid,
            "{what}: the connection out of step was handed out again"
        );
        for i in 1..=3 {
            let got: i32 = client
                .query_one("SELECT $1::int", &[&i])
                .await
                .unwrap_or_else(|e| panic!("{what}: the next checkout: {e}"))
                .get(0);
            assert_eq!(got, i, "{what}: the next checkout got another's reply");
        }
    }
}

/// The statement [`goes_out_unchecked`] looks for.
const LAST: &str = "SELECT pg_backend_pid()";

/// A tokio-postgres connection that copied rows in (`COPY ... FROM STDIN`) goes out again with
/// no round trip, as after any other statement. tokio-postgres writes a `Sync` with the copy's
/// `Execute`, which the server reads in copy-in mode and ignores: the pool counted it as a
/// request never answered, for the rest of the connection's life, and checked the connection
/// before every later checkout. After a copy that failed on a row, whose ignored `Sync` the
/// wire counts as answered only once the next reply begins, the first checkout checks, and
/// none after it. The server's record of each session's last statement
/// (`pg_stat_activity.query`) tells whether a checkout ran the check.
#[tokio::test]
async fn a_connection_that_copied_rows_in_goes_out_again_with_no_round_trip() {
    use futures_util::SinkExt;
    let (_pg, connector, admin) = setup("copied").await;
    let raw = connector.postgres_pool().await.unwrap();
    let client = raw.get().await.unwrap();
    let last = client.prepare_cached(LAST).await.unwrap();
    let pid: i32 = client.query_one(&last, &[]).await.unwrap().get(0);
    drop(client);
    goes_out_unchecked(&raw, &admin, pid)
        .await
        .expect("a connection that ran a query went out checked");
    let client = raw.get().await.unwrap();
    let copy = client
        .prepare_cached("COPY acks (id) FROM STDIN")
        .await
        .unwrap();
    let sink = client.copy_in::<_, bytes::Bytes>(&copy).await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send("1\n".into()).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    client.query_one(&last, &[]).await.unwrap();
    drop(client);
    if let Err(seen) = goes_out_unchecked(&raw, &admin, pid).await {
        panic!("every checkout after the copy ran a statement first: {seen:?}");
    }
    // A copy that fails on a row (a key already there): one `ReadyForQuery` answers both
    // `Sync`s, which the wire knows only when the next reply begins with something else; the
    // next checkout checks, and the check's reply tells it.
    let client = raw.get().await.unwrap();
    let sink = client.copy_in::<_, bytes::Bytes>(&copy).await.unwrap();
    futures_util::pin_mut!(sink);
    // The server's error may come while the row is still being sent.
    let sent = sink.send("1\n".into()).await;
    assert!(sent.is_err() || sink.finish().await.is_err(), "a key twice");
    client.query_one(&last, &[]).await.unwrap();
    drop(client);
    if let Err(seen) = goes_out_unchecked(&raw, &admin, pid).await {
        panic!("every checkout after a failed copy ran a statement first: {seen:?}");
    }
}
