//! One migration run at a time on a database.

use dal::{Connector, Error, Target};

/// The key of the advisory lock migration runs take: any 64-bit number, the same in every
/// run (PostgreSQL keeps advisory locks per database). "dal_migr" in ASCII.
const KEY: i64 = 0x6461_6c5f_6d69_6772;

/// The key of the advisory lock each migration's transaction holds until it ends
/// ([`Ddl::begin`](crate::ddl::Ddl)), which a run waits for once it has the migration lock:
/// "dal_mtx" in ASCII.
pub(crate) const IN_TRANSACTION: i64 = 0x0064_616c_5f6d_7478;

/// PostgreSQL's session advisory lock on migrations, held on a connection of its own until
/// dropped (or until the process ends, when the server releases it with the session).
///
/// sea-orm-migration reads the pending migrations, then applies them one by one: two runs
/// at once (two replicas migrating as they start, two deploys) both read the same list, and
/// the second fails halfway (`relation "customers" already exists`). Taken before that read,
/// the lock makes the second wait for the first, then find nothing pending, as Rails,
/// Flyway and sqlx's migrations do.
#[derive(Debug)]
pub struct MigrationLock {
    _session: dal::tokio_postgres::Client,
}

impl MigrationLock {
    /// Takes the lock through `connector`, waiting while another run holds it (logged at
    /// info level), for as long as that run takes. The lock's session has no
    /// `statement_timeout` (the connector's, `DAL_STATEMENT_TIMEOUT_MS`, ended the wait with
    /// SQLSTATE `57014` while the other run still migrated), no `lock_timeout` (a role's
    /// ended it with `55P03`), and no `idle_session_timeout` or
    /// `idle_in_transaction_session_timeout` (a role's ended the idle session that holds the
    /// lock, and let the next run in while this one still migrated), nor PostgreSQL 17's
    /// `transaction_timeout` (a role's would end the wait, a transaction of its own);
    /// PostgreSQL before 14 has no `idle_session_timeout`, before 17 no
    /// `transaction_timeout`, and nothing to lift. A run cut off while a migration's
    /// transaction was still open on the server (its process killed or its future dropped
    /// during a long statement or a `COMMIT`) gave up the lock with its session at once,
    /// before the server had ended that transaction: the lock is handed on once it has
    /// ended, so that the next run reads what is pending after it (for migrations that start
    /// with `Ddl::begin`, as the sample's do). `None` on Aurora DSQL, which has
    /// no advisory locks: there [`DsqlMigrator::up`](crate::DsqlMigrator) goes on after the
    /// statements of a run at the same time.
    ///
    /// # Errors
    ///
    /// The connection's.
    pub async fn acquire(connector: &Connector) -> dal::Result<Option<Self>> {
        if connector.target() == Target::Dsql {
            return Ok(None);
        }
        let (session, connection) = connector.connect().await?;
        tokio::spawn(connection);
        session
            .batch_execute(
                "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN \
                 ('statement_timeout', 'lock_timeout', 'idle_session_timeout', \
                 'idle_in_transaction_session_timeout', 'transaction_timeout')",
            )
            .await
            .map_err(Error::Database)?;
        take(
            &session,
            "advisory_lock",
            KEY,
            "another migration run holds the migration lock; waiting for it",
        )
        .await?;
        // Taken and given back at once: a wait for the migration still in a transaction.
        take(
            &session,
            "advisory_xact_lock",
            IN_TRANSACTION,
            "a migration of the run before is still in a transaction on the server; waiting \
             for it to end",
        )
        .await?;
        Ok(Some(Self { _session: session }))
    }
}

/// Takes the advisory lock `key` with PostgreSQL's `pg_{function}`, after one try with
/// `pg_try_{function}`; when that fails, logs `waiting` at info level, in sea-orm-migration's
/// target (the one its command line shows), and waits.
async fn take(
    session: &dal::tokio_postgres::Client,
    function: &str,
    key: i64,
    waiting: &str,
) -> dal::Result<()> {
    let taken: bool = session
        .query_one(&format!("SELECT pg_try_{function}($1)"), &[&key])
        .await
        .map_err(Error::Database)?
        .get(0);
    if !taken {
        tracing::info!(target: "sea_orm_migration", "{waiting}");
        session
            .execute(&format!("SELECT pg_{function}($1)"), &[&key])
            .await
            .map_err(Error::Database)?;
    }
    Ok(())
}
