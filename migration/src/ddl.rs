//! The few schema changes whose SQL differs between PostgreSQL and Aurora DSQL.
//!
//! Migrations send every statement through [`Ddl`], one statement at a time, so that a DSQL
//! target can run them outside a transaction and swap in what DSQL supports.

use std::time::Duration;

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
};

use crate::lock::IN_TRANSACTION;

/// The kind of server the migrations are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// PostgreSQL or Lakebase: transactional DDL, foreign keys, plain `CREATE INDEX`.
    Postgres,
    /// Aurora DSQL: one DDL per transaction, no foreign keys, `CREATE INDEX ASYNC`.
    Dsql,
}

impl Flavor {
    /// What a migration returns from `MigrationTrait::use_transaction`.
    pub(crate) fn use_transaction(self) -> Option<bool> {
        match self {
            Flavor::Postgres => None,
            Flavor::Dsql => Some(false),
        }
    }
}

/// Runs schema statements one by one, in the dialect of `flavor`.
pub(crate) struct Ddl<'a, 'm> {
    manager: &'a SchemaManager<'m>,
    flavor: Flavor,
}

/// How long a migration's statement waits for a lock before the migration gives up
/// (SQLSTATE `55P03`, "canceling statement due to lock timeout"). A DDL statement that waits
/// for a lock holds up every later statement that needs a conflicting one: run under a
/// service, a migration waiting on a long transaction would stall the service's writes to
/// that table for as long as the transaction stays open. Giving up bounds that stall: the
/// migration is rolled back, and [`Migrator::up`](crate::Migrator) tries it again after each
/// of the [`LOCK_RETRY_PAUSES`]; after the last, the run fails with that error, and run
/// again once the transaction has ended, it completes. Shorter, a quarter of the connector's
/// `statement_timeout` (`DAL_STATEMENT_TIMEOUT_MS`) when that is under four times this: the
/// service's statements queued behind the migration's wait end at their own timeout
/// (SQLSTATE `57014`), the same when the service shares the migration's settings.
pub const LOCK_TIMEOUT: &str = "2s";

/// [`LOCK_TIMEOUT`] in milliseconds.
const LOCK_MS: u64 = 2000;

/// How long a migration's transaction may sit idle between its statements before the server
/// ends it (`idle_in_transaction_session_timeout`, SQLSTATE `25P03`), releasing its locks: a
/// migration whose client stops answering midway (a frozen container, a debugger, a network
/// cut without a reset) would otherwise hold the service's tables for as long as the client
/// stays away. A migration's statements follow each other at once, so it never waits this
/// long on its own.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// How often the server checks, while a migration's statement runs, that the client is still
/// there (`client_connection_check_interval`, PostgreSQL 14 and later, where the system tells
/// of a closed socket: Linux; from 15 also macOS, illumos and the BSDs): PostgreSQL
/// reads a client's socket only between statements, so a migration whose process died
/// during a long statement (killed, out of memory, a deployment's timeout) would hold the
/// service's tables until the statement ended, an index build on a large table for as long
/// as it takes. With it the server ends the statement and its transaction once it finds the
/// client gone. Left as it is on a server without it (older), or one that refuses the value
/// (a platform that cannot tell, which takes 0 only; a service that fixes the setting).
pub const CLIENT_CONNECTION_CHECK_INTERVAL: &str = "1s";

/// The values in a transaction of the settings [`Ddl::begin`] sets for it, to put back once
/// migrations ran in a caller's transaction: it goes on as it was, its own `SET LOCAL`
/// values included.
pub(crate) struct Settings(Vec<sea_orm_migration::sea_orm::Value>);

impl Settings {
    const NAMES: [&str; 4] = [
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "statement_timeout",
        "client_connection_check_interval",
    ];

    /// The values in `tx`, now.
    pub(crate) async fn of(tx: &DatabaseTransaction) -> Result<Self, DbErr> {
        let mut values = Vec::with_capacity(Self::NAMES.len());
        for name in Self::NAMES {
            let row = tx
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    // `NULL` for a setting the server does not have.
                    format!("SELECT current_setting('{name}', true) AS value"),
                ))
                .await?
                .ok_or_else(|| DbErr::Custom(format!("no value of {name}")))?;
            values.push(row.try_get::<Option<String>>("", "value")?.into());
        }
        Ok(Self(values))
    }

    /// Sets them again in `tx`, for the rest of the transaction.
    pub(crate) async fn put_back(self, tx: &DatabaseTransaction) -> Result<(), DbErr> {
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config(name, value, true) FROM (VALUES \
             ('lock_timeout', $1::text), ('idle_in_transaction_session_timeout', $2::text), \
             ('statement_timeout', $3::text), ('client_connection_check_interval', $4::text)) \
             AS s (name, value) WHERE value IS NOT NULL",
            self.0,
        ))
        .await
        .map(drop)
    }
}

/// The pauses before each new try of a migration that gave up on a lock ([`LOCK_TIMEOUT`]):
/// four more tries over 15 s, during which the transaction in the way may end; each is
/// moved at random by up to half. Between tries the migration holds no lock, so the writes
/// queued behind it go on; each try stalls them for [`LOCK_TIMEOUT`] at most. A failure with
/// fewer migrations pending than at the one before starts them over.
pub const LOCK_RETRY_PAUSES: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// PostgreSQL's `lock_not_available`: a statement gave up on a lock after `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// PostgreSQL's `no_active_sql_transaction`: a statement that needs a transaction block ran
/// outside one.
const NO_ACTIVE_SQL_TRANSACTION: &str = "25P01";

/// PostgreSQL's `deadlock_detected`: the transaction was rolled back to end a lock cycle.
const DEADLOCK_DETECTED: &str = "40P01";

/// Why a migration run is tried again: the SQLSTATEs, and what they mean for the log.
pub(crate) struct Retried {
    pub(crate) sqlstates: &'static [&'static str],
    pub(crate) reason: &'static str,
}

/// A migration gave up on a lock another transaction holds ([`LOCK_TIMEOUT`]), or was rolled
/// back to end a deadlock with one: PostgreSQL's `deadlock_timeout` (1 s by default) is
/// under [`LOCK_TIMEOUT`] (unless a short statement timeout shortened the lock's), so a
/// migration in a lock cycle often meets that first.
pub(crate) const LOCK_CONFLICT: Retried = Retried {
    sqlstates: &[LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED],
    reason: "a migration gave up on a lock another transaction holds (LOCK_TIMEOUT), \
             or was rolled back to end a deadlock",
};

/// Another run changed the schema at the same time (Aurora DSQL has no lock to take first):
/// a conflict (`40001`, DSQL's `OC001`), or the other's row in `seaql_migrations`, or its
/// table, there first. PostgreSQL raises any of three for two `CREATE TABLE IF NOT EXISTS`
/// at once, by where the second meets the first: the table (`42P07`), its row type
/// (`42710`), or the catalog's unique index (`23505`, as for a row).
pub(crate) const RAN_AT_ONCE: Retried = Retried {
    sqlstates: &["40001", "23505", "42P07", "42710"],
    reason: "another migration run changed the schema at the same time",
};

/// Creates the table of applied migrations (`table`, sea-orm-migration's `seaql_migrations`)
/// when it is missing, as sea-orm-migration's own `install` does, for runs that take no lock
/// first (Aurora DSQL has none). Of two runs that create it at once, the one that loses gets
/// one of [`RAN_AT_ONCE`]'s errors with the table in place, and a second try finds it. The
/// first error is returned when the second try fails too (on a transaction, which the first
/// error aborts).
pub(crate) async fn install_beside_others<C: ConnectionTrait>(
    db: &C,
    table: DynIden,
) -> Result<(), DbErr> {
    let mut create = sea_orm_migration::sea_orm::Schema::new(db.get_database_backend())
        .create_table_from_entity(sea_orm_migration::seaql_migrations::Entity);
    create.table(table).if_not_exists();
    match db.execute(&create).await {
        Err(e) if sqlstate(&e).is_some_and(|code| RAN_AT_ONCE.sqlstates.contains(&&*code)) => {
            db.execute(&create).await.map(drop).map_err(|_| e)
        }
        created => created.map(drop),
    }
}

/// Applies `M`'s pending migrations on `db` (all, or `steps` of them), reading what is still
/// pending and trying again, after each of the [`LOCK_RETRY_PAUSES`], when a migration
/// failed for a reason in `retried`. A failure with fewer migrations pending than at the one
/// before (this run or another applied some in between) starts the pauses over: a run that
/// loses a race at every migration (replicas starting together, each ahead on one migration
/// and behind on the next) goes on while the schema moves forward. Each
/// pause is moved at random by up to half, so that runs that lost together do not all try
/// again together. The migrations applied before it stay applied, and count against
/// `steps`.
pub(crate) async fn up_retrying<M: MigratorTrait>(
    db: &DatabaseConnection,
    steps: Option<u32>,
    retried: &Retried,
) -> Result<(), DbErr> {
    // What was pending before this run's first try, when it applies a number of steps: read
    // in the try itself, whose failure is tried again (runs that start together race to
    // create `seaql_migrations` in that read).
    let mut pending_before = None;
    // What was pending at the last failure.
    let mut pending = None;
    let mut pauses = LOCK_RETRY_PAUSES.iter().enumerate();
    loop {
        let tried = async {
            let left = match steps {
                None => None,
                Some(steps) => {
                    let now = M::get_pending_migrations(db).await?.len();
                    let applied = pending_before.get_or_insert(now).saturating_sub(now);
                    Some(steps.saturating_sub(applied as u32))
                }
            };
            M::up(db, left).await
        };
        let e = match tried.await {
            Err(e) if sqlstate(&e).is_some_and(|code| retried.sqlstates.contains(&&*code)) => e,
            done => return done,
        };
        let pending_now = M::get_pending_migrations(db).await.ok().map(|p| p.len());
        if let (Some(before), Some(now)) = (pending, pending_now)
            && now < before
        {
            pauses = LOCK_RETRY_PAUSES.iter().enumerate();
        }
        pending = pending_now.or(pending);
        let Some((tried, pause)) = pauses.next() else {
            return Err(e);
        };
        let pause = pause.mul_f64(0.5 + fastrand::f64());
        // In sea-orm-migration's target, the one its command line shows.
        tracing::warn!(
            target: "sea_orm_migration",
            error = %e,
            "{}; trying again in {pause:.1?} (try {} of {})",
            retried.reason,
            tried + 2,
            LOCK_RETRY_PAUSES.len() + 1
        );
        tokio::time::sleep(pause).await;
    }
}

impl<'a, 'm> Ddl<'a, 'm> {
    /// Starts a migration's statements: on PostgreSQL, whose migrations each run in a
    /// transaction, bounds their lock waits by [`LOCK_TIMEOUT`] (or a quarter of the
    /// connector's `statement_timeout`, if shorter) and the time the transaction
    /// may sit idle by [`IDLE_IN_TRANSACTION_TIMEOUT`], and lifts the connector's
    /// `statement_timeout` (`DAL_STATEMENT_TIMEOUT_MS`, the service's bound for its queries:
    /// it ended lock waits before [`LOCK_TIMEOUT`] could, with SQLSTATE `57014`, which is not
    /// tried again, and it would end an index build on a large table every time), and has the
    /// server check for a vanished client every [`CLIENT_CONNECTION_CHECK_INTERVAL`]; all with
    /// `SET LOCAL`, for this migration's transaction alone; and holds an advisory lock until
    /// the transaction ends, which [`MigrationLock`](crate::MigrationLock) waits for before
    /// it is handed on. Aurora DSQL takes no locks: it
    /// aborts conflicting transactions at commit instead.
    pub(crate) async fn begin(
        manager: &'a SchemaManager<'m>,
        flavor: Flavor,
    ) -> Result<Self, DbErr> {
        if flavor == Flavor::Postgres {
            // A quarter of the statement timeout, when that is shorter: the service's
            // statements queued behind the lock the migration waits for have their own
            // timeout, the same when the service and the migration share their settings, and
            // would each end with 57014 while the migration waited; the rest of it is theirs.
            // The session's own when an earlier migration in the same transaction of the
            // caller's lifted it (`SET LOCAL` outlives the savepoint it ran in).
            let db = manager.get_connection();
            db.execute_unprepared(&format!(
                "SELECT set_config('lock_timeout', CASE WHEN s > 0 AND s / 4 < {LOCK_MS} \
                 THEN greatest(s / 4, 1) || 'ms' ELSE '{LOCK_TIMEOUT}' END, true) \
                 FROM (SELECT coalesce(nullif(setting::bigint, 0), reset_val::bigint) \
                 AS s FROM pg_settings WHERE name = 'statement_timeout') AS t; \
                 SET LOCAL idle_in_transaction_session_timeout = \
                 '{IDLE_IN_TRANSACTION_TIMEOUT}'; SET LOCAL statement_timeout = 0"
            ))
            .await?;
            // Before the wait for the advisory lock, which the check covers too. In a
            // savepoint, undone when the server refuses the value (a platform that cannot
            // tell, a service that fixes the setting): the migration goes on without it. A
            // migration run outside a transaction (`use_transaction` false: `CREATE INDEX
            // CONCURRENTLY`, say) has no savepoint, and no `SET LOCAL` either (`25P01`).
            let checked = db
                .execute_unprepared(&format!(
                    "SAVEPOINT client_check; SELECT set_config(name, \
                     '{CLIENT_CONNECTION_CHECK_INTERVAL}', true) FROM pg_settings \
                     WHERE name = 'client_connection_check_interval'; \
                     RELEASE SAVEPOINT client_check"
                ))
                .await;
            if let Err(e) = checked
                && sqlstate(&e).as_deref() != Some(NO_ACTIVE_SQL_TRANSACTION)
            {
                tracing::debug!(error = %e, "the server keeps its client_connection_check_interval");
                db.execute_unprepared(
                    "ROLLBACK TO SAVEPOINT client_check; RELEASE SAVEPOINT client_check",
                )
                .await?;
            }
            db.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({IN_TRANSACTION})"))
                .await?;
        }
        Ok(Self { manager, flavor })
    }

    pub(crate) async fn create_table(&self, stmt: TableCreateStatement) -> Result<(), DbErr> {
        self.manager.create_table(stmt).await
    }

    pub(crate) async fn drop_table(&self, stmt: TableDropStatement) -> Result<(), DbErr> {
        self.manager.drop_table(stmt).await
    }

    /// Creates an index; on DSQL it is built in the background with `CREATE INDEX ASYNC`.
    ///
    /// A server that rejects `ASYNC` as a syntax error (SQLSTATE `42601`) is PostgreSQL, such
    /// as the local DSQL flavour of the embedded default: there the index is built at once.
    pub(crate) async fn create_index(&self, stmt: IndexCreateStatement) -> Result<(), DbErr> {
        match self.flavor {
            Flavor::Postgres => self.manager.create_index(stmt).await,
            Flavor::Dsql => {
                let db = self.manager.get_connection();
                let sql = stmt.to_string(PostgresQueryBuilder);
                let asynchronous = sql.replacen("CREATE INDEX", "CREATE INDEX ASYNC", 1);
                match db.execute_unprepared(&asynchronous).await {
                    Err(e) if sqlstate(&e).as_deref() == Some("42601") => {
                        tracing::info!(
                            "the server has no CREATE INDEX ASYNC; building the index now"
                        );
                        db.execute_unprepared(&sql).await.map(|_| ())
                    }
                    other => other.map(|_| ()),
                }
            }
        }
    }

    /// Adds a foreign key; DSQL has none, so there it is skipped.
    pub(crate) async fn add_foreign_key(
        &self,
        stmt: ForeignKeyCreateStatement,
    ) -> Result<(), DbErr> {
        match self.flavor {
            Flavor::Postgres => self.manager.create_foreign_key(stmt).await,
            Flavor::Dsql => Ok(()),
        }
    }
}

/// The SQLSTATE of a database error.
fn sqlstate(e: &DbErr) -> Option<String> {
    match e {
        DbErr::Exec(sea_orm_migration::sea_orm::RuntimeErr::SqlxError(e))
        | DbErr::Query(sea_orm_migration::sea_orm::RuntimeErr::SqlxError(e)) => {
            e.as_database_error()?.code().map(|c| c.into_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsql_index_statement_is_async() {
        let stmt = Index::create()
            .if_not_exists()
            .name("idx_t_c")
            .table("t")
            .col("c")
            .to_owned();
        let sql =
            stmt.to_string(PostgresQueryBuilder)
                .replacen("CREATE INDEX", "CREATE INDEX ASYNC", 1);
        assert_eq!(
            sql,
            r#"CREATE INDEX ASYNC IF NOT EXISTS "idx_t_c" ON "t" ("c")"#
        );
    }
}
