//! SeaORM transactions: retried with a [`TxMode`], and savepoints.

use futures_util::future::BoxFuture;
use sea_orm::TransactionTrait;
use tracing::Instrument;

use super::transactions::{Failure, Transactions, TxMode, committed, rolled_back};
use crate::error::{Error, Result};
use crate::pool::{SeaOrmPool, SeaOrmTransaction};

impl Transactions {
    /// Runs `work` in a SeaORM transaction of `mode` on `db`, retried as the
    /// [type's docs](Self) say. `work` must be idempotent (see there).
    ///
    /// The mode is the `BEGIN` statement's own (`BEGIN ISOLATION LEVEL ..., DEFERRABLE`).
    ///
    /// ```no_run
    /// # async fn demo(connector: &dal::Connector, db: &dal::SeaOrmPool) -> dal::Result<()> {
    /// use sea_orm::ConnectionTrait;
    /// let mode = dal::TxMode::new().isolation(dal::Isolation::Serializable);
    /// connector
    ///     .transactions()
    ///     .seaorm(db, mode, |txn| Box::pin(async move {
    ///         txn.execute_unprepared("UPDATE accounts SET balance = balance - 1 WHERE id = 1").await?;
    ///         txn.execute_unprepared("UPDATE accounts SET balance = balance + 1 WHERE id = 2").await?;
    ///         Ok(())
    ///     }))
    ///     .await
    /// # }
    /// ```
    pub async fn seaorm<T, F>(&self, db: &SeaOrmPool, mode: TxMode, mut work: F) -> Result<T>
    where
        F: for<'c> FnMut(&'c SeaOrmTransaction) -> BoxFuture<'c, Result<T>> + Send,
        T: Send,
    {
        let (mut attempt, started) = (1, std::time::Instant::now());
        loop {
            let span = tracing::debug_span!("dal.transaction", orm = "seaorm", attempt);
            let outcome = seaorm_once(db, mode, &mut work).instrument(span).await;
            match outcome {
                Ok(value) => return Ok(value),
                Err(failure) => {
                    self.follow_failover(&failure).await;
                    self.after("seaorm", attempt, started, failure).await?;
                }
            }
            attempt += 1;
        }
    }

    /// Runs `work` in a savepoint of the SeaORM transaction `txn`: when it fails, what it
    /// did is rolled back and the outer transaction goes on. On an Aurora DSQL target it
    /// fails with [`Error::SavepointUnsupported`] before anything is sent.
    pub async fn seaorm_savepoint<T, F>(&self, txn: &SeaOrmTransaction, work: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c SeaOrmTransaction) -> BoxFuture<'c, Result<T>>,
    {
        self.refuse_savepoint()?;
        let nested = txn.begin().await?;
        match work(&nested).await {
            Ok(value) => {
                nested.commit().await?;
                Ok(value)
            }
            Err(e) => {
                nested.rollback().await?;
                Err(e)
            }
        }
    }
}

async fn seaorm_once<T, F>(
    db: &SeaOrmPool,
    mode: TxMode,
    work: &mut F,
) -> std::result::Result<T, Failure>
where
    F: for<'c> FnMut(&'c SeaOrmTransaction) -> BoxFuture<'c, Result<T>> + Send,
{
    let begin = |e: sea_orm::DbErr| Failure::Begin(Error::from(e));
    let txn = db
        .begin_as(mode.characteristics().as_deref())
        .await
        .map_err(begin)?;
    tracing::debug!("transaction begun");
    let done = match work(&txn).await {
        // What stops the commit, found before COMMIT is sent, fails the work: nothing can have
        // been committed.
        Ok(value) => txn
            .ready_to_commit()
            .await
            .map(|()| value)
            .map_err(Error::from),
        failed => failed,
    };
    match done {
        Ok(value) => {
            txn.commit()
                .await
                .map_err(|e| Failure::Commit(Error::from(e)))?;
            committed("seaorm");
            Ok(value)
        }
        Err(e) => {
            if let Err(rollback) = txn.rollback().await {
                tracing::debug!(error = %rollback, "rollback failed; the connection is dropped");
            }
            rolled_back("seaorm");
            Err(Failure::Work(e))
        }
    }
}
