//! Diesel transactions: retried with a [`TxMode`], and savepoints.

use diesel_async::{
    AnsiTransactionManager, AsyncPgConnection, SimpleAsyncConnection, TransactionManager,
};
use futures_util::future::BoxFuture;
use tracing::Instrument;

use super::transactions::{Failure, Transactions, TxMode, committed, rolled_back};
use crate::error::{Error, Result};
use crate::pool::DieselPool;
use crate::pool::diesel::{
    ended_idle_in_transaction, is_lost_connection, may_have_aborted, requests_sent,
    rolled_back_at_commit, savepoint_left_unfinished, sqlstate_of, went_stale,
};

impl Transactions {
    /// Runs `work` in a Diesel transaction of `mode` on a connection of `pool`, retried as
    /// the [type's docs](Self) say. `work` must be idempotent (see there).
    ///
    /// ```no_run
    /// # async fn demo(connector: &dal::Connector, pool: &dal::DieselPool) -> dal::Result<()> {
    /// use dal::diesel_async::RunQueryDsl;
    /// let mode = dal::TxMode::new().isolation(dal::Isolation::Serializable);
    /// let n = connector
    ///     .transactions()
    ///     .diesel(pool, mode, |conn| Box::pin(async move {
    ///         Ok(dal::diesel::sql_query("UPDATE accounts SET balance = balance + 1").execute(conn).await?)
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn diesel<T, F>(&self, pool: &DieselPool, mode: TxMode, mut work: F) -> Result<T>
    where
        F: for<'c> FnMut(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<T>> + Send,
        T: Send,
    {
        let (mut attempt, started) = (1, std::time::Instant::now());
        loop {
            let span = tracing::debug_span!("dal.transaction", orm = "diesel", attempt);
            let outcome = diesel_once(pool, mode, &mut work).instrument(span).await;
            match outcome {
                Ok(value) => return Ok(value),
                Err(failure) => self.after("diesel", attempt, started, failure).await?,
            }
            attempt += 1;
        }
    }

    /// Runs `work` in a savepoint of the Diesel transaction open on `conn`: when it fails,
    /// what it did is rolled back and the outer transaction goes on. Fails when no
    /// transaction is open, and on an Aurora DSQL target with
    /// [`Error::SavepointUnsupported`], before anything is sent.
    ///
    /// Dropped before its end (a timeout around it), the savepoint's state on the server is
    /// unknown: the transaction around it can then no longer commit. Through
    /// [`diesel`](Self::diesel) it fails with [`Error::Aborted`] and is rolled back, its
    /// connection closed; in a transaction of diesel-async's own, whose `COMMIT` would be the
    /// savepoint's `RELEASE`, do not let it be dropped.
    pub async fn diesel_savepoint<T, F>(&self, conn: &mut AsyncPgConnection, work: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<T>>,
    {
        self.refuse_savepoint()?;
        let depth = AnsiTransactionManager::transaction_manager_status_mut(conn)
            .transaction_depth()
            .map_err(Error::Diesel)?;
        if depth.is_none() {
            return Err(Error::Diesel(diesel::result::Error::NotInTransaction));
        }
        // diesel-async notes its `SAVEPOINT` to dal's instrumentation before this future can
        // first yield: a drop from then on is seen by `savepoint_left_unfinished`.
        AnsiTransactionManager::begin_transaction(conn).await?;
        match work(conn).await {
            Ok(value) => {
                AnsiTransactionManager::commit_transaction(conn).await?;
                Ok(value)
            }
            Err(e) => {
                AnsiTransactionManager::rollback_transaction(conn).await?;
                Err(e)
            }
        }
    }
}

async fn diesel_once<T, F>(
    pool: &DieselPool,
    mode: TxMode,
    work: &mut F,
) -> std::result::Result<T, Failure>
where
    F: for<'c> FnMut(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<T>> + Send,
{
    let mut conn = pool.get().await.map_err(Failure::Begin)?;
    let conn: &mut AsyncPgConnection = &mut conn;
    let sql = match mode.characteristics() {
        Some(characteristics) => format!("BEGIN TRANSACTION {characteristics}"),
        None => "BEGIN TRANSACTION".to_owned(),
    };
    AnsiTransactionManager::begin_transaction_sql(conn, &sql)
        .await
        .map_err(|e| Failure::Begin(Error::Diesel(e)))?;
    tracing::debug!("transaction begun");
    let done = work(conn).await;
    if savepoint_left_unfinished(conn) {
        // Neither committed nor rolled back here: diesel-async's `COMMIT` would be the
        // savepoint's `RELEASE`. The pool closes the connection as it comes back, which
        // rolls the transaction back on the server.
        rolled_back("diesel");
        return Err(Failure::Work(Error::abort(
            "a savepoint's future was dropped before its end (a timeout or select! around \
             diesel_savepoint, or around a transaction diesel-async nests in the work?), \
             leaving its state on the server unknown: the transaction is rolled back",
        )));
    }
    let done = match done {
        // PostgreSQL would answer COMMIT with a ROLLBACK, and no error, if a statement failed
        // and aborted the transaction: a `SELECT 1` fails then (SQLSTATE 25P02), and that
        // failure is the attempt's.
        Ok(value) if may_have_aborted(conn) => match conn.batch_execute("SELECT 1").await {
            Ok(()) => Ok(value),
            Err(aborted) => Err(Error::Diesel(aborted)),
        },
        done => done,
    };
    match done {
        Ok(value) => {
            let sent = requests_sent(conn);
            if let Err(e) = AnsiTransactionManager::commit_transaction(conn).await {
                // After a failed COMMIT, diesel-async rolls back when a conflict was met in
                // the transaction (one a savepoint caught); when that fails too, the COMMIT's
                // own answer is the one that tells what was committed.
                let e = Error::Diesel(match e {
                    diesel::result::Error::RollbackErrorOnCommit {
                        commit_error,
                        rollback_error,
                    } => {
                        tracing::debug!(error = %rollback_error, "rollback after the failed commit failed too");
                        *commit_error
                    }
                    e => e,
                });
                // The server ended the session before the COMMIT (it ends only an idle one
                // with 25P03), or the COMMIT never left (the driver had closed the
                // connection): nothing can have been committed.
                let failed = if ended_idle_in_transaction(conn) {
                    Error::IdleInTransactionTimeout {
                        source: Box::new(e),
                    }
                } else if sent.is_some() && requests_sent(conn) == sent {
                    e
                } else {
                    return Err(Failure::Commit(e));
                };
                rolled_back("diesel");
                return Err(Failure::Work(failed));
            }
            if let Some(e) = rolled_back_at_commit(conn) {
                rolled_back("diesel");
                return Err(Failure::Work(e));
            }
            committed("diesel");
            Ok(value)
        }
        Err(e) => {
            // Diesel's driver drops the server's error that ended the session, and its next
            // statement meets only a closed connection.
            let e = if is_lost_connection(&e) && ended_idle_in_transaction(conn) {
                Error::IdleInTransactionTimeout {
                    source: Box::new(e),
                }
            } else {
                e
            };
            let conflict = matches!(sqlstate_of(conn, &e).as_deref(), Some("40001" | "40P01"));
            let again = conflict || went_stale(conn);
            if let Err(rollback) = AnsiTransactionManager::rollback_transaction(conn).await {
                tracing::debug!(error = %rollback, "rollback failed; the connection is dropped");
            }
            rolled_back("diesel");
            Err(if again {
                Failure::Again(e)
            } else {
                Failure::Work(e)
            })
        }
    }
}
