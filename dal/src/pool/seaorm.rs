//! SeaORM over dal's own pool: SeaORM's statements run on sqlx connections held in a bb8 pool
//! of dal ([`SeaOrmPool`]), each opened with a fresh cached token like every other pool's.
//!
//! A `sea_orm::DatabaseConnection` rests on sqlx's pool, which pings every connection that
//! comes back (one round trip per statement, since SeaORM checks a connection out for each)
//! and, with its defaults, every connection it hands out. This pool knows what each
//! connection did: one that came back moments ago with every statement answered goes out
//! without a round trip (see [`reset`](super::reset)); one idle longer, one whose
//! statement's future was dropped before the answer, or one that ran a statement that may
//! begin or end a transaction block, is checked first (alive, outside any transaction). A
//! transaction dropped before its end is rolled back at once, in a task of its own, so that
//! it holds no lock while its connection waits in the pool.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sea_orm::sea_query::Values;
use sea_orm::sqlx::postgres::PgConnection;
use sea_orm::sqlx::{self, AssertSqlSafe, Connection as _, Executor as _};
use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DbBackend, DbErr, ExecResult, QueryResult, RuntimeErr,
    Statement, TransactionError, TransactionOptions, TransactionSession, TransactionTrait,
};
use sea_query_sqlx::SqlxValues;
use tokio::sync::Mutex;

use super::bb8_pool::{Kind, Lifespan, Manager, Pool};
use super::registry::LoggingOut;
use super::reset::{LOG_OUT, OUTSIDE_TRANSACTION, ROLLBACK, keeps_transaction};
use crate::error::{CheckoutFailure, Error, ErrorChain, Result};
use crate::telemetry::{self, PoolHealth};

/// SeaORM connections in a bb8 pool.
pub(crate) const KIND: Kind<Conn> = Kind {
    name: "seaorm",
    is_settled,
    is_valid,
    has_broken,
    lifespan: Some(|conn| Some(&mut conn.lifespan)),
};

/// One physical connection of the SeaORM pool, and what the pool knows of it.
pub(crate) struct Conn {
    /// Present until the connection is dropped (see its `Drop`).
    raw: Option<PgConnection>,
    /// Statements sent and not yet answered: above zero when a future was dropped before its
    /// answer (a cancelled `BEGIN`, say).
    open: u32,
    /// A statement of the user's own may have begun or ended a transaction block (`BEGIN`
    /// through `execute_unprepared`, say; see [`keeps_transaction`]): sqlx keeps the status
    /// the server reported to itself, so the next checkout checks.
    unsure: bool,
    /// A prepared statement went stale after a schema change: forget them all before the
    /// next use, instead of failing each of them once.
    stale: bool,
    /// The connection failed in a way that leaves it unusable (I/O, protocol, the server
    /// ending the session).
    broken: bool,
    /// Transactions open: 0 outside one, 1 in one, more in savepoints.
    depth: u32,
    /// The server refused a statement since the transaction began, which aborts it (unless
    /// a savepoint rolled back over it): its `COMMIT` is checked first (see
    /// [`end_level`](Self::end_level)).
    failed: bool,
    /// The numbers of the savepoints open, outermost first (the one at depth `d` is at
    /// `d - 2`), each named `dal_{number}`: a handle whose savepoint ended with the one
    /// around it finds its number gone.
    savepoints: Vec<u64>,
    /// What the pool notes of it: when it came back, when it retires.
    lifespan: Lifespan,
    times: telemetry::QueryTimes,
}

impl Conn {
    /// A freshly opened connection.
    pub(crate) fn new(raw: PgConnection) -> Self {
        Self {
            raw: Some(raw),
            open: 0,
            unsure: false,
            stale: false,
            broken: false,
            depth: 0,
            failed: false,
            savepoints: Vec::new(),
            // Checked at its first checkout: sqlx reads the socket only when asked to, so
            // unlike the other kinds it cannot tell that the server closed a connection that
            // has not been used yet.
            lifespan: Lifespan::default(),
            times: telemetry::QueryTimes::new("seaorm"),
        }
    }

    fn raw(&mut self) -> &mut PgConnection {
        self.raw.as_mut().expect("taken only when dropped")
    }

    fn start(&mut self) -> Instant {
        self.open += 1;
        Instant::now()
    }

    /// [`start`](Self::start) for a user's statement `sql`.
    fn start_user(&mut self, sql: &str) -> Instant {
        self.unsure |= !keeps_transaction(sql);
        self.start()
    }

    /// Counts a statement's answer, times it, and notes what its error says of the connection.
    fn finish<T>(
        &mut self,
        started: Instant,
        done: std::result::Result<T, sqlx::Error>,
    ) -> std::result::Result<T, sqlx::Error> {
        self.open -= 1;
        self.times.record(started.elapsed(), done.is_err());
        if let Err(e) = &done {
            self.note(e);
        }
        done
    }

    fn note(&mut self, e: &sqlx::Error) {
        self.failed |= self.depth > 0 && matches!(e, sqlx::Error::Database(_));
        match e {
            // The server ended the session: any error of severity FATAL or PANIC (which the
            // server does not translate), such as 57P01 (terminated) or 25P03 (idle in a
            // transaction too long), read as the answer to whatever was sent next.
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some_and(|db| {
                        matches!(
                            db.severity(),
                            sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                        )
                    }) =>
            {
                self.broken = true;
            }
            // Any other error of the server's leaves the session as it was: an ERROR of
            // class 08 too (08P01 for a NUL byte in a statement's text).
            sqlx::Error::Database(db) if crate::error::is_stale_sqlx(&**db) => {
                tracing::debug!(
                    "a prepared statement is stale after a schema change; the connection will forget its statements"
                );
                self.stale = true;
            }
            // A statement refused before it was sent leaves the connection as it was.
            e if crate::error::is_unsendable_sqlx(e) => {}
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => self.broken = true,
            _ => {}
        }
    }

    /// Runs `sql` with the simple query protocol (no statement is prepared).
    async fn simple(&mut self, sql: &str) -> std::result::Result<(), sqlx::Error> {
        let started = self.start();
        let done = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(self.raw())
            .await
            .map(drop);
        self.finish(started, done)
    }

    /// Ends the innermost transaction: `COMMIT` or `ROLLBACK`, or their savepoint forms.
    ///
    /// PostgreSQL answers the `COMMIT` of an aborted transaction (a statement in it failed,
    /// SQLSTATE `25P02` for every statement after) with a `ROLLBACK` and no error, which
    /// sqlx reports as a success. So after a refused statement, a `SELECT 1` goes first: in
    /// an aborted transaction it fails with `25P02`, the transaction is rolled back, and
    /// that error is the commit's; or, when a statement whose future was dropped failed,
    /// that statement's error (a serialization failure that a retry mends, say), which no
    /// caller has read.
    async fn end_level(&mut self, commit: bool) -> std::result::Result<(), sqlx::Error> {
        let unread = self.drain().await?;
        let depth = self.depth;
        let commits = commit && depth == 1;
        let (aborted, unread) = match unread {
            Some(e) if commits => (Some(e), None),
            None if commits && self.failed => (self.simple("SELECT 1").await.err(), None),
            unread => (None, unread),
        };
        let savepoint = (depth > 1).then(|| self.savepoints[depth as usize - 2]);
        let sql = match (commit && aborted.is_none(), savepoint) {
            (true, None) => "COMMIT".to_owned(),
            (false, None) => ROLLBACK.to_owned(),
            (true, Some(n)) => format!("RELEASE SAVEPOINT dal_{n}"),
            (false, Some(n)) => format!("ROLLBACK TO SAVEPOINT dal_{n}; RELEASE SAVEPOINT dal_{n}"),
        };
        let done = match (self.simple(&sql).await, savepoint) {
            // A savepoint a failed statement aborted cannot be released, and stays open: it
            // is rolled back instead, which lets the transaction around it go on.
            (Err(e @ sqlx::Error::Database(_)), Some(n)) if commit => self
                .simple(&format!(
                    "ROLLBACK TO SAVEPOINT dal_{n}; RELEASE SAVEPOINT dal_{n}"
                ))
                .await
                .and(Err(e)),
            (done, _) => done,
        };
        // A statement the server answered with an error still ends its level (a failed COMMIT
        // rolls back, a failed RELEASE is rolled back); after any other error the connection
        // is broken anyway.
        if matches!(&done, Ok(()) | Err(sqlx::Error::Database(_))) {
            self.depth = depth - 1;
            self.failed &= self.depth > 0;
            self.savepoints
                .truncate(self.depth.saturating_sub(1) as usize);
        }
        match (aborted, done, unread) {
            (Some(aborted), _, _) => Err(aborted),
            // A savepoint that the unread error aborted: that error says why.
            (None, Err(sqlx::Error::Database(_)), Some(unread)) if commit => Err(unread),
            (None, done, _) => done,
        }
    }

    /// Ends the transaction or savepoint at depth `level`, and those inside it.
    fn end_at(
        &mut self,
        level: u32,
        commit: bool,
    ) -> BoxFuture<'_, std::result::Result<(), DbErr>> {
        Box::pin(async move {
            self.unwind_to(level).await.map_err(exec_err)?;
            self.end_level(commit).await.map_err(exec_err)
        })
    }

    /// Reads the answers still owed to statements whose futures were dropped, and returns the
    /// first error the server answered one with: sqlx hands such a statement's error to the
    /// next statement, which it then does not send, and a savepoint's end must be sent.
    async fn drain(&mut self) -> std::result::Result<Option<sqlx::Error>, sqlx::Error> {
        let (mut owed, mut unread) = (self.open, None);
        while owed > 0 {
            match self.raw().ping().await {
                Ok(()) => break,
                Err(e) => {
                    self.note(&e);
                    if !matches!(e, sqlx::Error::Database(_)) {
                        return Err(e);
                    }
                    unread.get_or_insert(e);
                }
            }
            owed -= 1;
        }
        self.open = 0;
        Ok(unread)
    }

    /// What stops the transaction at `level` from committing, found before any COMMIT is
    /// sent: a connection already lost, the levels inside it are rolled back, the answers
    /// owed to statements whose futures were dropped are read (the first error among them
    /// fails it), and an aborted transaction fails with `25P02`.
    async fn ready_to_commit(&mut self, level: u32) -> std::result::Result<(), sqlx::Error> {
        // Lost already (a statement met a closed socket, or the server ended the session):
        // a COMMIT written now could not reach a server, and its failure would read as one
        // that may have committed.
        if self.broken {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the connection was lost in the transaction, before its COMMIT: nothing was \
                 committed",
            )));
        }
        self.unwind_to(level).await?;
        if let Some(unread) = self.drain().await? {
            return Err(unread);
        }
        if self.depth == 1 && self.failed {
            // Not aborted (a savepoint rolled back what failed): the commit need not ask again.
            self.simple("SELECT 1").await?;
            self.failed = false;
        }
        Ok(())
    }

    /// Rolls back the transactions deeper than `depth`.
    async fn unwind_to(&mut self, depth: u32) -> std::result::Result<(), sqlx::Error> {
        while self.depth > depth {
            self.end_level(false).await?;
        }
        Ok(())
    }

    async fn execute(&mut self, stmt: &Statement) -> std::result::Result<ExecResult, DbErr> {
        let started = self.start_user(&stmt.sql);
        let done = sqlx::query_with(AssertSqlSafe(stmt.sql.as_str()), values(stmt))
            .execute(self.raw())
            .await;
        self.finish(started, done)
            .map(ExecResult::from)
            .map_err(exec_err)
    }

    async fn execute_unprepared(&mut self, sql: &str) -> std::result::Result<ExecResult, DbErr> {
        let started = self.start_user(sql);
        let done = self.raw().execute(AssertSqlSafe(sql.to_owned())).await;
        self.finish(started, done)
            .map(ExecResult::from)
            .map_err(exec_err)
    }

    async fn query_one(
        &mut self,
        stmt: &Statement,
    ) -> std::result::Result<Option<QueryResult>, DbErr> {
        let started = self.start_user(&stmt.sql);
        let done = sqlx::query_with(AssertSqlSafe(stmt.sql.as_str()), values(stmt))
            .fetch_optional(self.raw())
            .await;
        self.finish(started, done)
            .map(|row| row.map(QueryResult::from))
            .map_err(query_err)
    }

    async fn query_all(
        &mut self,
        stmt: &Statement,
    ) -> std::result::Result<Vec<QueryResult>, DbErr> {
        let started = self.start_user(&stmt.sql);
        let done = sqlx::query_with(AssertSqlSafe(stmt.sql.as_str()), values(stmt))
            .fetch_all(self.raw())
            .await;
        self.finish(started, done)
            .map(|rows| rows.into_iter().map(QueryResult::from).collect())
            .map_err(query_err)
    }
}

impl Drop for Conn {
    /// Logs out of the session as libpq's `PQfinish` does, with the protocol's `Terminate`
    /// and then TLS's `close_notify`, on a task of its own: sqlx closes a dropped
    /// connection's socket without them, which PostgreSQL logs over TLS as an error ("could
    /// not receive data from client: Connection reset by peer") at every connection the pool
    /// retires. A broken connection, or one dropped outside a runtime, is closed as it is.
    /// So is one with a statement unanswered ([`has_broken`]): the rest of it, if it was not
    /// written whole, would go out before the `Terminate`.
    fn drop(&mut self) {
        let Some(raw) = self.raw.take().filter(|_| !self.broken && self.open == 0) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let logging_out = LoggingOut::start();
            drop(runtime.spawn(async move {
                let _ = tokio::time::timeout(LOG_OUT, raw.close()).await;
                drop(logging_out);
            }));
        }
    }
}

fn values(stmt: &Statement) -> SqlxValues {
    SqlxValues(stmt.values.clone().unwrap_or(Values(Vec::new())))
}

fn exec_err(e: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))
}

fn query_err(e: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)))
}

/// Handed out without a check: came back within
/// [`RECENTLY_USED`](super::reset::RECENTLY_USED) with every statement answered, none that
/// may have begun or ended a transaction block, and no statement found stale since. Any
/// other (idle longer, a `BEGIN` of the user's own) is checked. (One that came back with a
/// statement unanswered is closed: [`has_broken`].)
fn is_settled(conn: &mut Conn) -> bool {
    !conn.stale && !conn.unsure && conn.lifespan.recently_back()
}

/// Checks a connection before it is handed out again: alive, and outside any transaction;
/// after the check, everything it had in flight is answered. Drops the cached statements
/// of one that found a statement stale.
fn is_valid(conn: &mut Conn) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let sqlx_err = |e| Error::SeaOrm(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
        if conn.stale {
            conn.raw()
                .clear_cached_statements()
                .await
                .map_err(sqlx_err)?;
            conn.stale = false;
        }
        // Counted in flight until the check and its `ROLLBACK` are answered: a check whose
        // future is dropped (a cancelled checkout) leaves the connection unsettled, and the
        // pool closes it as it comes back.
        conn.open += 1;
        let checked = sqlx::raw_sql(OUTSIDE_TRANSACTION).execute(conn.raw()).await;
        if checked.is_err() {
            tracing::debug!(
                pool = "seaorm",
                "a connection came back inside a transaction; rolling back"
            );
            sqlx::raw_sql(ROLLBACK)
                .execute(conn.raw())
                .await
                .map_err(sqlx_err)?;
        }
        conn.open = 0;
        conn.unsure = false;
        Ok(())
    })
}

/// Broken: failed for good, or still inside a transaction that nothing can end (its owner
/// could not be reached when it was dropped): the server rolls it back as the connection
/// closes. Called as the connection comes back to the pool (the pool notes when, in its
/// `Lifespan`).
/// Broken as well: one that comes back with a statement unanswered, whose future was dropped.
/// It may not have been written whole (a large write on a full socket): sqlx keeps the rest
/// in its buffer, and over TLS rustls keeps up to 64 KiB more that sqlx counts as sent; either
/// goes out before anything else, the check of its next checkout or the `Terminate` of its
/// close, and so ran a write its caller had given up on, after whatever the caller did since.
/// Closed without it, the server discards the part it has.
fn has_broken(conn: &mut Conn) -> bool {
    conn.broken |= conn.open > 0;
    std::thread::panicking() || conn.broken || conn.depth > 0
}

type Checkout = bb8::PooledConnection<'static, Manager<Conn>>;

/// SeaORM's [`ConnectionTrait`] and [`TransactionTrait`] over a pool of dal: what
/// [`Connector::seaorm`](crate::Connector::seaorm) returns. Cheap to clone.
///
/// Every SeaORM query, insert and transaction takes it where it takes a
/// `sea_orm::DatabaseConnection` (`Entity::find().all(&db)`, `model.insert(&db)`,
/// `db.begin()`, `db.transaction(..)`); streams are not offered. Each statement runs with
/// the prepared-statement cache of its connection, as SeaORM's own pool does. Errors are
/// SeaORM's: [`DbErr::ConnectionAcquire`] when no connection is free within the acquire
/// timeout (every one in use) or after shutdown, [`DbErr::Conn`] with the cause when none
/// can be opened (SQLx's error with its SQLSTATE for a refused login), or none opened
/// within the acquire timeout ([`Error::PoolTimeout`] with its cause, which
/// `dal::Error::from` gives back).
#[derive(Clone)]
pub struct SeaOrmPool {
    pool: Pool<Conn>,
    /// The server has savepoints (not Aurora DSQL), which nested transactions are.
    savepoints: bool,
}

impl std::fmt::Debug for SeaOrmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeaOrmPool").field(&self.pool).finish()
    }
}

impl SeaOrmPool {
    /// A pool of `pool`'s connections, to a server that has savepoints or not.
    pub(crate) fn new(pool: Pool<Conn>, savepoints: bool) -> Self {
        Self { pool, savepoints }
    }

    /// This pool's state, as [`Connector::health`](crate::Connector::health) reports it.
    pub fn health(&self) -> PoolHealth {
        self.pool.health()
    }

    /// bb8's state of the pool: open and idle connections, and its statistics.
    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }

    /// Runs `op` on a connection of the pool. Owned and boxed: the compiler cannot prove the
    /// futures of `async_trait` methods `Send` when they hold a pooled connection themselves.
    fn run<T, F>(&self, op: F) -> BoxFuture<'static, std::result::Result<T, DbErr>>
    where
        F: for<'c> FnOnce(&'c mut Conn) -> BoxFuture<'c, std::result::Result<T, DbErr>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut conn = pool.get_owned().await.map_err(acquire_err)?;
            op(&mut conn).await
        })
    }

    /// A transaction that begins with `BEGIN {modes}`: PostgreSQL's transaction modes
    /// (`ISOLATION LEVEL ...`, `READ ONLY`, `DEFERRABLE`), in the `BEGIN` itself.
    pub(crate) fn begin_as(
        &self,
        modes: Option<&str>,
    ) -> BoxFuture<'static, std::result::Result<SeaOrmTransaction, DbErr>> {
        let (pool, savepoints) = (self.pool.clone(), self.savepoints);
        let sql = modes.map_or_else(|| "BEGIN".to_owned(), |m| format!("BEGIN {m}"));
        Box::pin(async move {
            let mut checkout = pool.get_owned().await.map_err(acquire_err)?;
            checkout.simple(&sql).await.map_err(exec_err)?;
            checkout.depth = 1;
            checkout.failed = false;
            checkout.savepoints.clear();
            Ok(SeaOrmTransaction {
                shared: Arc::new(Shared {
                    conn: Arc::new(Mutex::new(Some(checkout))),
                    dropped: std::sync::Mutex::new(Vec::new()),
                    begun: AtomicU64::new(0),
                    savepoints,
                }),
                number: 0,
                open: true,
                unwind_within: pool.check_timeout(),
            })
        })
    }
}

/// The error SeaORM gives for a connection its pool could not hand out.
pub(crate) fn acquire_err(e: Error) -> DbErr {
    match e {
        Error::PoolTimeout {
            opening: 0,
            last_failure: None,
            ..
        } => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        // Timed out while the pool could not open a connection: the cause goes with it.
        timed_out @ Error::PoolTimeout { .. } => carried(Arc::new(timed_out)),
        Error::Connect { source } => match &*source {
            Error::SeaOrm(DbErr::Conn(RuntimeErr::SqlxError(e))) => {
                DbErr::Conn(RuntimeErr::SqlxError(Arc::clone(e)))
            }
            // A server out of reach, a login past the connect timeout, a credential service's
            // answer.
            _ => carried(source),
        },
        other => DbErr::Conn(RuntimeErr::Internal(ErrorChain(&other).to_string())),
    }
}

/// `cause` as an I/O error, as sqlx gives for a connection it could not open, which gives
/// the cause back whole as dal's error.
fn carried(cause: Arc<Error>) -> DbErr {
    DbErr::Conn(RuntimeErr::SqlxError(Arc::new(sea_orm::sqlx::Error::Io(
        std::io::Error::other(CheckoutFailure(cause)),
    ))))
}

/// The transaction modes of `options`, as `BEGIN` takes them.
fn modes(options: &TransactionOptions) -> Option<String> {
    let mut modes = String::new();
    if let Some(level) = options.isolation_level {
        let _ = write!(modes, "ISOLATION LEVEL {level}");
    }
    if let Some(mode) = options.access_mode {
        let _ = write!(modes, "{}{mode}", if modes.is_empty() { "" } else { ", " });
    }
    Some(modes).filter(|m| !m.is_empty())
}

/// SeaORM's [`ConnectionTrait`] for a type whose `run` runs an operation on its connection.
macro_rules! connection_trait {
    ($type:ty) => {
        #[async_trait::async_trait]
        impl ConnectionTrait for $type {
            fn get_database_backend(&self) -> DbBackend {
                DbBackend::Postgres
            }

            async fn execute_raw(&self, stmt: Statement) -> std::result::Result<ExecResult, DbErr> {
                self.run(move |c| Box::pin(async move { c.execute(&stmt).await }))
                    .await
            }

            async fn execute_unprepared(
                &self,
                sql: &str,
            ) -> std::result::Result<ExecResult, DbErr> {
                let sql = sql.to_owned();
                self.run(move |c| Box::pin(async move { c.execute_unprepared(&sql).await }))
                    .await
            }

            async fn query_one_raw(
                &self,
                stmt: Statement,
            ) -> std::result::Result<Option<QueryResult>, DbErr> {
                self.run(move |c| Box::pin(async move { c.query_one(&stmt).await }))
                    .await
            }

            async fn query_all_raw(
                &self,
                stmt: Statement,
            ) -> std::result::Result<Vec<QueryResult>, DbErr> {
                self.run(move |c| Box::pin(async move { c.query_all(&stmt).await }))
                    .await
            }
        }
    };
}

connection_trait!(SeaOrmPool);
connection_trait!(SeaOrmTransaction);

/// What [`TransactionTrait::transaction`] runs.
type Callback<'c, T, E> = Pin<Box<dyn Future<Output = std::result::Result<T, E>> + Send + 'c>>;

#[async_trait::async_trait]
impl TransactionTrait for SeaOrmPool {
    type Transaction = SeaOrmTransaction;

    async fn begin(&self) -> std::result::Result<SeaOrmTransaction, DbErr> {
        self.begin_as(None).await
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<sea_orm::IsolationLevel>,
        access_mode: Option<sea_orm::AccessMode>,
    ) -> std::result::Result<SeaOrmTransaction, DbErr> {
        self.begin_with_options(TransactionOptions {
            isolation_level,
            access_mode,
            sqlite_transaction_mode: None,
        })
        .await
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> std::result::Result<SeaOrmTransaction, DbErr> {
        self.begin_as(modes(&options).as_deref()).await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self.begin().await.map_err(TransactionError::Connection)?;
        txn.run_callback(callback).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<sea_orm::IsolationLevel>,
        access_mode: Option<sea_orm::AccessMode>,
    ) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self
            .begin_with_config(isolation_level, access_mode)
            .await
            .map_err(TransactionError::Connection)?;
        txn.run_callback(callback).await
    }
}

/// A transaction of a [`SeaOrmPool`], or a savepoint in one: SeaORM's [`ConnectionTrait`]
/// on the connection it holds until its end.
///
/// [`commit`](Self::commit) or [`rollback`](Self::rollback) ends it. Dropped before its end
/// (a cancelled future, an early return), it is rolled back: a transaction at once in a task
/// of its own (its connection returns to the pool after), a savepoint before the next
/// statement of the transaction around it. Outside a Tokio runtime the connection is closed
/// instead, which rolls back on the server.
pub struct SeaOrmTransaction {
    shared: Arc<Shared>,
    /// A savepoint's number in its transaction (see [`Conn::savepoints`]); 0 for the
    /// transaction.
    number: u64,
    /// Not yet committed or rolled back.
    open: bool,
    /// How long the `ROLLBACK` of a transaction dropped while open may take before its
    /// connection is closed instead ([`Pool::check_timeout`]).
    unwind_within: Duration,
}

impl std::fmt::Debug for SeaOrmTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeaOrmTransaction")
            .field("savepoint", &self.number)
            .field("open", &self.open)
            .finish()
    }
}

fn ended() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(
        "the transaction around this savepoint has ended".to_owned(),
    ))
}

/// What the handles of one transaction and its savepoints share.
struct Shared {
    /// The connection, until the transaction ends.
    conn: Arc<Mutex<Option<Checkout>>>,
    /// The numbers of savepoints whose handles were dropped before their end: each open is
    /// rolled back before the transaction's next statement (one not open yet is not opened).
    /// Kept apart from the connection, so that a handle dropped while a statement holds it
    /// still says so.
    dropped: std::sync::Mutex<Vec<u64>>,
    /// The number of the last savepoint begun.
    begun: AtomicU64,
    /// See [`SeaOrmPool::savepoints`].
    savepoints: bool,
}

impl Shared {
    fn dropped(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.dropped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the savepoint of a dropped handle is open on `conn`; forgets those that are
    /// not (ended, or never opened: the task that opens one holds the connection from
    /// before its handle can be dropped unnoticed).
    fn to_settle(&self, conn: &Conn) -> bool {
        let mut dropped = self.dropped();
        dropped.retain(|n| conn.savepoints.contains(n));
        !dropped.is_empty()
    }

    /// Rolls back the savepoints whose handles were dropped, and those inside them.
    async fn settle(&self, conn: &mut Conn) -> std::result::Result<(), DbErr> {
        let outermost = {
            let dropped = self.dropped();
            conn.savepoints.iter().position(|n| dropped.contains(n))
        };
        if let Some(i) = outermost {
            // The savepoint at `savepoints[i]` is at depth `i + 2`.
            conn.unwind_to(i as u32 + 1).await.map_err(exec_err)?;
        }
        Ok(())
    }
}

/// Runs `op` to its end on a task of its own, whatever becomes of the caller that waits.
async fn to_the_end<T: Send + 'static>(
    op: BoxFuture<'static, std::result::Result<T, DbErr>>,
) -> std::result::Result<T, DbErr> {
    match tokio::spawn(op).await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(DbErr::Conn(RuntimeErr::Internal(
            "the runtime shut down during a savepoint's statement".to_owned(),
        ))),
    }
}

impl SeaOrmTransaction {
    /// The depth of this transaction (1) or savepoint (2 and more) on `conn`, if it is still
    /// open there. A savepoint ends with the one around it (`RELEASE` and `ROLLBACK TO` end
    /// those inside), and its handle may live on: it must then neither run statements in
    /// the transaction around it nor end that one.
    fn level(number: u64, conn: &Conn) -> Option<u32> {
        match number {
            0 => Some(1),
            n => conn
                .savepoints
                .iter()
                .position(|&open| open == n)
                .map(|i| i as u32 + 2),
        }
    }

    /// Runs `op` on the transaction's connection, once the savepoints of dropped handles
    /// are rolled back (owned and boxed, as the pool's own `run`).
    fn run<T, F>(&self, op: F) -> BoxFuture<'static, std::result::Result<T, DbErr>>
    where
        F: for<'c> FnOnce(&'c mut Conn) -> BoxFuture<'c, std::result::Result<T, DbErr>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        self.run_at(move |conn, _| op(conn))
    }

    /// [`run`](Self::run), given this handle's depth.
    fn run_at<T, F>(&self, op: F) -> BoxFuture<'static, std::result::Result<T, DbErr>>
    where
        F: for<'c> FnOnce(&'c mut Conn, u32) -> BoxFuture<'c, std::result::Result<T, DbErr>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let (shared, number) = (Arc::clone(&self.shared), self.number);
        Box::pin(async move {
            let mut guard = Arc::clone(&shared.conn).lock_owned().await;
            if guard.as_ref().is_some_and(|conn| shared.to_settle(conn)) {
                // On a task of its own, as a savepoint's own statements: cancelled midway, the
                // rollback would leave the savepoint ended on the server and open here.
                let settling = Arc::clone(&shared);
                let (back, settled) = to_the_end(Box::pin(async move {
                    let settled = match guard.as_mut() {
                        Some(conn) => settling.settle(conn).await,
                        None => Ok(()),
                    };
                    Ok((guard, settled))
                }))
                .await?;
                settled?;
                guard = back;
            }
            let conn = guard.as_mut().ok_or_else(ended)?;
            let level = Self::level(number, conn).ok_or_else(ended)?;
            op(conn, level).await
        })
    }

    /// [`run_at`](Self::run_at), with `op` run to its end on a task of its own once the
    /// connection is this caller's (taken first, so that no later statement of the
    /// transaction goes before it): a caller that stops waiting cannot leave a `SAVEPOINT`,
    /// `RELEASE` or `ROLLBACK TO` sent but unaccounted for, which would make the connection's
    /// savepoints differ from the server's.
    fn run_at_to_the_end<T, F>(&self, op: F) -> BoxFuture<'static, std::result::Result<T, DbErr>>
    where
        F: for<'c> FnOnce(&'c mut Conn, u32) -> BoxFuture<'c, std::result::Result<T, DbErr>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let (shared, number) = (Arc::clone(&self.shared), self.number);
        Box::pin(async move {
            let mut guard = Arc::clone(&shared.conn).lock_owned().await;
            to_the_end(Box::pin(async move {
                let conn = guard.as_mut().ok_or_else(ended)?;
                shared.settle(conn).await?;
                let level = Self::level(number, conn).ok_or_else(ended)?;
                op(conn, level).await
            }))
            .await
        })
    }

    /// Fails with what would stop [`commit`](Self::commit), with no COMMIT sent: an error the
    /// server gave a statement whose future was dropped, an aborted transaction (`25P02`), a
    /// connection lost. The transaction stays open for a rollback.
    pub(crate) async fn ready_to_commit(&self) -> std::result::Result<(), DbErr> {
        self.run_at(|conn, level| {
            Box::pin(async move { conn.ready_to_commit(level).await.map_err(exec_err) })
        })
        .await
    }

    /// Commits the transaction, or releases the savepoint.
    ///
    /// # Errors
    ///
    /// The server's refusal (such as SQLSTATE `40001` for a serializable transaction that
    /// must be retried); the transaction is over either way.
    pub async fn commit(mut self) -> std::result::Result<(), DbErr> {
        self.end(true).await
    }

    /// Rolls the transaction back, or rolls back to the savepoint and releases it.
    ///
    /// # Errors
    ///
    /// When the connection fails; it is then closed, which ends the transaction.
    pub async fn rollback(mut self) -> std::result::Result<(), DbErr> {
        self.end(false).await
    }

    async fn end(&mut self, commit: bool) -> std::result::Result<(), DbErr> {
        if self.number > 0 {
            let done = self
                .run_at_to_the_end(move |conn, level| Conn::end_at(conn, level, commit))
                .await;
            self.open = false;
            return done;
        }
        let done = self
            .run_at(move |conn, level| Conn::end_at(conn, level, commit))
            .await;
        self.open = false;
        // Back to the pool now (closed if the transaction could not be ended).
        self.shared.conn.lock().await.take();
        done
    }

    async fn run_callback<F, T, E>(self, callback: F) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        match callback(&self).await {
            Ok(value) => {
                self.commit().await.map_err(TransactionError::Connection)?;
                Ok(value)
            }
            Err(e) => {
                self.rollback()
                    .await
                    .map_err(TransactionError::Connection)?;
                Err(TransactionError::Transaction(e))
            }
        }
    }
}

impl Drop for SeaOrmTransaction {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if self.number > 0 {
            self.shared.dropped().push(self.number);
            return;
        }
        let within = self.unwind_within;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Closed instead, which rolls back on the server.
            if let Ok(mut guard) = self.shared.conn.try_lock()
                && let Some(conn) = guard.as_mut()
            {
                conn.broken = true;
            }
            return;
        };
        match self.shared.conn.try_lock() {
            Ok(mut guard) => {
                if let Some(conn) = guard.take() {
                    runtime.spawn(roll_back(conn, within));
                }
            }
            // Held by a statement in progress (a savepoint's, on a task of its own): the
            // rollback follows it, if it ends in time (twice the bound in all); otherwise the
            // connection is closed as it comes back, inside its transaction.
            Err(_) => {
                let conn = Arc::clone(&self.shared.conn);
                runtime.spawn(async move {
                    let taken = match tokio::time::timeout(within, conn.lock()).await {
                        Ok(mut guard) => guard.take(),
                        Err(_) => None,
                    };
                    if let Some(conn) = taken {
                        roll_back(conn, within).await;
                    }
                });
            }
        }
    }
}

/// Rolls back the transaction of a dropped handle, within `within`: the connection holds its
/// place in the pool until it comes back, and a server that stopped answering would otherwise
/// keep that place taken for as long as it does not answer.
async fn roll_back(mut conn: Checkout, within: Duration) {
    if tokio::time::timeout(within, conn.unwind_to(0))
        .await
        .is_err()
    {
        conn.broken = true;
        tracing::debug!(
            pool = KIND.name,
            "the rollback of a dropped transaction had no answer in time; its connection is closed"
        );
    }
}

#[async_trait::async_trait]
impl TransactionSession for SeaOrmTransaction {
    async fn commit(self) -> std::result::Result<(), DbErr> {
        SeaOrmTransaction::commit(self).await
    }

    async fn rollback(self) -> std::result::Result<(), DbErr> {
        SeaOrmTransaction::rollback(self).await
    }
}

#[async_trait::async_trait]
impl TransactionTrait for SeaOrmTransaction {
    type Transaction = SeaOrmTransaction;

    /// A savepoint, inside the innermost one open; on Aurora DSQL, which has none, an error
    /// (that of [`Error::SavepointUnsupported`]), with nothing sent.
    async fn begin(&self) -> std::result::Result<SeaOrmTransaction, DbErr> {
        if !self.shared.savepoints {
            return Err(DbErr::Custom(Error::SavepointUnsupported.to_string()));
        }
        // The handle comes first: dropped with the future that waits for its `SAVEPOINT`, it
        // is noted, and its savepoint is not opened, or rolled back before the next statement.
        let number = self.shared.begun.fetch_add(1, Ordering::Relaxed) + 1;
        let savepoint = Self {
            shared: Arc::clone(&self.shared),
            number,
            open: true,
            unwind_within: self.unwind_within,
        };
        let shared = Arc::clone(&self.shared);
        self.run_at_to_the_end(move |conn, _| {
            Box::pin(async move {
                if shared.dropped().contains(&number) {
                    return Ok(());
                }
                conn.simple(&format!("SAVEPOINT dal_{number}"))
                    .await
                    .map_err(exec_err)?;
                conn.depth += 1;
                conn.savepoints.push(number);
                Ok(())
            })
        })
        .await?;
        Ok(savepoint)
    }

    /// A savepoint: PostgreSQL sets isolation and access for whole transactions only.
    async fn begin_with_config(
        &self,
        _isolation_level: Option<sea_orm::IsolationLevel>,
        _access_mode: Option<sea_orm::AccessMode>,
    ) -> std::result::Result<SeaOrmTransaction, DbErr> {
        self.begin().await
    }

    /// A savepoint: PostgreSQL sets isolation and access for whole transactions only.
    async fn begin_with_options(
        &self,
        _options: TransactionOptions,
    ) -> std::result::Result<SeaOrmTransaction, DbErr> {
        self.begin().await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self.begin().await.map_err(TransactionError::Connection)?;
        txn.run_callback(callback).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        _isolation_level: Option<sea_orm::IsolationLevel>,
        _access_mode: Option<sea_orm::AccessMode>,
    ) -> std::result::Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.transaction(callback).await
    }
}
