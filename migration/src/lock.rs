//! One migration run at a time on a database.

use dal::{Connector, Error, Target};

/// The key of the advisory lock migration runs take: any 64-bit number, the same in every
/// run (PostgreSQL keeps advisory locks per database). "dal_migr" in ASCII.
const KEY: i64 = 0x6461_6c5f_6d69_6772;

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
    /// `transaction_timeout`, and nothing to lift. `None` on Aurora DSQL, which has
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
        let taken: bool = session
            .query_one("SELECT pg_try_advisory_lock($1)", &[&KEY])
            .await
            .map_err(Error::Database)?
            .get(0);
        if !taken {
            // In sea-orm-migration's target, the one its command line shows.
            tracing::info!(
                target: "sea_orm_migration",
                "another migration run holds the migration lock; waiting for it"
            );
            session
                .execute("SELECT pg_advisory_lock($1)", &[&KEY])
                .await
                .map_err(Error::Database)?;
        }
        Ok(Some(Self { _session: session }))
    }
}
