//! Diesel's `AsyncPgConnection` over a connection the connector opened, checked as
//! diesel-async's own bb8 manager checks it, and timed for telemetry.

use std::sync::Arc;

use diesel::result::Error::DatabaseError;
use diesel_async::pooled_connection::PoolableConnection;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::future::BoxFuture;
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{Client, Connection, Socket};

use super::bb8_pool::{Kind, Lifespan, Pool};
use super::reset::{OUTSIDE_TRANSACTION, ROLLBACK};
// diesel-async keeps the message but not the code of errors it has no kind for.
use super::wire::Wire;
use crate::error::{Error, Result, STALE_PLAN, STALE_TYPE};
use crate::telemetry;

/// A pool of Diesel connections.
///
/// Each connection carries dal's own [instrumentation](diesel::connection::Instrumentation),
/// which times its queries (the `query` event of `tracing`, at debug level, and the
/// [`QUERY_SECONDS`](telemetry::QUERY_SECONDS) histogram) and holds what the pool knows of it
/// (its lifetime, its queries in flight, a schema change that made its statements stale). A
/// connection whose instrumentation is replaced with `set_instrumentation` is closed as it
/// comes back, and another opened in its place.
pub type DieselPool = Pool<AsyncPgConnection>;

/// Diesel connections in a bb8 pool.
pub(crate) const KIND: Kind<AsyncPgConnection> = Kind {
    name: "diesel",
    is_settled,
    is_valid,
    has_broken,
    lifespan: Some(|conn| timer(conn).map(|timer| &mut timer.lifespan)),
};

/// Handed out without a check: came back within
/// [`RECENTLY_USED`](super::reset::RECENTLY_USED) with every query it started answered, no
/// transaction open in diesel-async, the server's last `ReadyForQuery` saying idle (so no
/// transaction either that a statement of the user's own opened: `BEGIN` through
/// `batch_execute`, say) and its socket open. Any other (idle longer, a query whose future
/// was dropped before its answer: a cancelled `BEGIN`, say, or one without TLS, whose wire
/// is not followed) is checked.
fn is_settled(conn: &mut AsyncPgConnection) -> bool {
    timer(conn).is_some_and(|timer| timer.settled()) && !PoolableConnection::is_broken(conn)
}

/// Checks a connection before it is handed out again: alive, and outside any transaction
/// (see [`reset`](super::reset)).
fn is_valid(conn: &mut AsyncPgConnection) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let checked = conn.batch_execute(OUTSIDE_TRANSACTION).await;
        if let Some(timer) = timer(conn) {
            // Whatever was in flight has been answered before the check was.
            timer.open = 0;
        }
        if checked.is_err() {
            tracing::debug!(
                pool = "diesel",
                "a connection came back inside a transaction; rolling back"
            );
            conn.batch_execute(ROLLBACK).await.map_err(Error::Diesel)?;
        }
        Ok(())
    })
}

/// Broken: diesel-async's own test (a transaction left half done), a prepared statement
/// the server no longer accepts after a schema change (see [`QueryTimer::stale`]), or a
/// connection whose instrumentation its user replaced (`set_instrumentation`): the pool's
/// record of it went with the [`QueryTimer`], and without it the connection would serve
/// past its lifetime and keep its stale statements. Called as the connection comes back to
/// the pool (the pool notes when, in its `Lifespan`).
fn has_broken(conn: &mut AsyncPgConnection) -> bool {
    let tracked_and_current = timer(conn).is_some_and(|timer| !timer.went_stale());
    std::thread::panicking() || !tracked_and_current || PoolableConnection::is_broken(conn)
}

/// Whether a statement on `conn` failed on a stale prepared statement: as the wire tells, by
/// the error's routine whatever the language of the server's messages, or, on a connection
/// whose wire is not followed (no TLS), by the server's English message.
pub(crate) fn went_stale(conn: &mut AsyncPgConnection) -> bool {
    timer(conn).is_some_and(|timer| timer.went_stale())
}

/// The SQLSTATE of `e`, the server's answer to a statement on `conn`, as the wire saw it
/// (diesel-async keeps it for serialization failures only); `None` for any other error, or
/// when the wire is not followed (no TLS).
pub(crate) fn sqlstate_of(conn: &mut AsyncPgConnection, e: &Error) -> Option<String> {
    use diesel::result::DatabaseErrorKind::{ClosedConnection, UnableToSendCommand};
    // diesel-async gives every error the server did not answer with (a lost connection, a
    // statement the driver refused to send) one of these kinds: the wire's last error is an
    // older statement's then.
    match e {
        Error::Diesel(DatabaseError(UnableToSendCommand | ClosedConnection, _)) => None,
        Error::Diesel(DatabaseError(..)) => timer(conn)?.wire.as_ref()?.last_error(),
        _ => None,
    }
}

/// Whether a savepoint begun on `conn` inside the transaction [`Transactions`] opened was left
/// unfinished: dal's own, or one diesel-async nests (`conn.transaction(..)` inside the work),
/// its future dropped (a timeout or `select!` around it). Its `SAVEPOINT`, `RELEASE` or
/// `ROLLBACK TO` may have been sent or not, and diesel-async counts it as open (its `COMMIT`
/// would then be the savepoint's `RELEASE`), or marks its transaction manager broken (and
/// asserts, in a debug build, that no transaction statement follows), so the transaction
/// around it cannot be ended as it stands.
///
/// [`Transactions`]: crate::Transactions
pub(crate) fn savepoint_left_unfinished(conn: &mut AsyncPgConnection) -> bool {
    use diesel_async::{AnsiTransactionManager, TransactionManager};
    let depth = AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth();
    !matches!(depth, Ok(Some(depth)) if depth.get() == 1)
        || timer(conn).is_some_and(|timer| timer.ending.is_some())
}

/// Whether the transaction open on `conn` may be aborted and its commit cannot be checked
/// afterwards: a statement failed in it, or the pool does not follow the wire (no TLS, or
/// its record of `conn` is gone), where a statement may have failed after the rows its
/// caller read. PostgreSQL answers the `COMMIT` of an aborted transaction with a `ROLLBACK`
/// and no error, so such a commit is checked first.
pub(crate) fn may_have_aborted(conn: &mut AsyncPgConnection) -> bool {
    timer(conn).is_none_or(|timer| timer.failed || timer.wire.is_none())
}

/// The error for the `COMMIT` that just returned on `conn`, if the server answered it with
/// `ROLLBACK` (see [`Wire::rolled_back`]).
pub(crate) fn rolled_back_at_commit(conn: &mut AsyncPgConnection) -> Option<Error> {
    let wire = timer(conn)?.wire.as_ref()?;
    wire.rolled_back().then(|| Error::RolledBackAtCommit {
        sqlstate: wire.last_error(),
    })
}

/// Whether the server ended the session on `conn` for sitting idle in its transaction
/// (a `FATAL` error with SQLSTATE `25P03`), as the wire saw: before any COMMIT reached it.
pub(crate) fn ended_idle_in_transaction(conn: &mut AsyncPgConnection) -> bool {
    timer(conn)
        .and_then(|timer| timer.wire.as_ref())
        .is_some_and(|wire| wire.ended_by().as_deref() == Some("25P03"))
}

/// Whether `e` is Diesel's driver's own error for a connection it lost (no answer from the
/// server comes with it).
pub(crate) fn is_lost_connection(e: &Error) -> bool {
    use diesel::result::DatabaseErrorKind::{ClosedConnection, UnableToSendCommand};
    match e {
        Error::Diesel(DatabaseError(ClosedConnection, _)) => true,
        Error::Diesel(DatabaseError(UnableToSendCommand, info)) => {
            !crate::error::is_unsendable_diesel(&**info)
        }
        _ => false,
    }
}

/// How many requests `conn` has written whole, when its wire is followed (over TLS):
/// unchanged across a statement that failed, that statement never left.
pub(crate) fn requests_sent(conn: &mut AsyncPgConnection) -> Option<u64> {
    Some(timer(conn)?.wire.as_ref()?.requests_sent())
}

fn timer(conn: &mut AsyncPgConnection) -> Option<&mut QueryTimer> {
    AsyncConnection::instrumentation(conn).downcast_mut::<QueryTimer>()
}

/// Wraps a freshly opened connection for Diesel, with query timing; `wire` is the session's,
/// followed when TLS carried it.
pub(crate) async fn from_parts<S>(
    client: Client,
    connection: Connection<Socket, S>,
    wire: Arc<Wire>,
) -> Result<AsyncPgConnection>
where
    S: TlsStream + Unpin + Send + 'static,
{
    let wire = wire.attached().then_some(wire);
    let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection)
        .await
        .map_err(Error::DieselSetup)?;
    AsyncConnection::set_instrumentation(
        &mut conn,
        QueryTimer {
            started: None,
            open: 0,
            wire,
            stale: false,
            failed: false,
            ending: None,
            // Just opened: as good as one that came back now.
            lifespan: Lifespan::returned_now(),
            times: telemetry::QueryTimes::new("diesel"),
        },
    );
    Ok(conn)
}

/// Diesel's instrumentation: times each query for a `tracing` event and the
/// [`QUERY_SECONDS`](telemetry::QUERY_SECONDS) histogram. The SQL is left out: it can hold
/// literals that must not reach a log.
struct QueryTimer {
    started: Option<std::time::Instant>,
    /// Queries started and not yet answered: more than zero when a query's future was
    /// dropped before its answer came (a cancelled request is still sent and answered).
    open: u32,
    /// The session's wire, when TLS carries it.
    wire: Option<Arc<Wire>>,
    /// A query failed because a cached prepared statement's result type changed (SQLSTATE
    /// `0A000` after `ALTER TABLE`): every statement this connection prepared may be stale, and
    /// diesel-async cannot forget them, so the pool drops the connection when it comes back.
    stale: bool,
    /// The server refused a statement since the last top-level `BEGIN`, which aborts the
    /// transaction (unless a savepoint rolled back over it): see [`may_have_aborted`].
    failed: bool,
    /// What the pool notes of it: when it came back, when it retires.
    lifespan: Lifespan,
    /// A statement of diesel-async's transaction manager (`BEGIN`, `SAVEPOINT`, `COMMIT`,
    /// `RELEASE`, `ROLLBACK`...) began and has not finished: the number of queries
    /// [`open`](Self::open) before it. diesel-async then counts its transaction manager as
    /// broken.
    ending: Option<u32>,
    times: telemetry::QueryTimes,
}

impl QueryTimer {
    /// See [`went_stale`].
    fn went_stale(&self) -> bool {
        self.stale || self.wire.as_ref().is_some_and(|wire| wire.stale())
    }

    /// Back to the pool moments ago, with nothing in flight and outside any transaction.
    fn settled(&self) -> bool {
        self.open == 0
            && self.wire.as_ref().is_some_and(|wire| wire.answered_idle())
            && self.lifespan.recently_back()
    }
}

impl diesel::connection::Instrumentation for QueryTimer {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent as Event;
        match event {
            Event::StartQuery { .. } => {
                self.open += 1;
                self.started = Some(std::time::Instant::now());
            }
            Event::FinishQuery { error, .. } => {
                self.open = self.open.saturating_sub(1);
                if self.ending == Some(self.open) {
                    self.ending = None;
                }

                let elapsed = self.started.take().map(|t| t.elapsed()).unwrap_or_default();
                self.times.record(elapsed, error.is_some());
                self.failed |= matches!(error, Some(diesel::result::Error::DatabaseError(..)));
                if let Some(diesel::result::Error::DatabaseError(_, info)) = error
                    && (info.message() == STALE_PLAN || info.message().starts_with(STALE_TYPE))
                {
                    tracing::debug!(
                        "a prepared statement is stale after a schema change; the connection will be replaced"
                    );
                    self.stale = true;
                }
            }
            // Each comes right before its statement's `StartQuery`.
            Event::BeginTransaction { depth, .. } => {
                self.failed &= depth.get() > 1;
                self.ending = Some(self.open);
                tracing::trace!(orm = "diesel", depth = depth.get(), "begin")
            }
            Event::CommitTransaction { depth, .. } => {
                self.ending = Some(self.open);
                tracing::trace!(orm = "diesel", depth = depth.get(), "commit")
            }
            Event::RollbackTransaction { depth, .. } => {
                self.ending = Some(self.open);
                tracing::trace!(orm = "diesel", depth = depth.get(), "rollback")
            }
            _ => {}
        }
    }
}
