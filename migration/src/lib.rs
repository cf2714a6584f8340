//! Migrations of the sample schema, for plain PostgreSQL, Lakebase and Aurora DSQL.
//!
//! [`Migrator`] runs each migration in a transaction, as usual on PostgreSQL. [`DsqlMigrator`]
//! runs the same migrations the way Aurora DSQL needs: outside a transaction, one DDL statement
//! at a time, indexes built with `CREATE INDEX ASYNC`, and no foreign keys (DSQL has none).
//! Runs that may overlap (replicas that migrate as they start) take a [`MigrationLock`] first:
//! without it, two runs read the same pending migrations and the second fails on the first's
//! tables.
//!
//! ```no_run
//! use migration::{DsqlMigrator, MigrationLock, Migrator, MigratorTrait};
//! # async fn run(connector: &dal::Connector) -> Result<(), Box<dyn std::error::Error>> {
//! // Held until dropped; `None` on Aurora DSQL, which has no advisory locks.
//! let lock = MigrationLock::acquire(connector).await?;
//! // sea-orm-migration takes SeaORM's own connection: one over a plain sqlx pool.
//! let db = dal::sea_orm::DatabaseConnection::from(connector.sqlx_pool().await?);
//! if connector.target() == dal::Target::Dsql {
//!     DsqlMigrator::up(&db, None).await?;
//! } else {
//!     Migrator::up(&db, None).await?;
//! }
//! drop(lock);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub use sea_orm_migration::prelude::*;

mod ddl;
pub mod env_file;
mod lock;
mod m20260101_000001_create_customers;
mod m20260101_000002_create_orders;
mod m20260101_000003_create_order_items;

pub use ddl::{
    CLIENT_CONNECTION_CHECK_INTERVAL, Flavor, IDLE_IN_TRANSACTION_TIMEOUT, LOCK_RETRY_PAUSES,
    LOCK_TIMEOUT,
};
pub use lock::MigrationLock;

/// Every migration, oldest first, written for `flavor`.
fn migrations_for(flavor: Flavor) -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20260101_000001_create_customers::Migration { flavor }),
        Box::new(m20260101_000002_create_orders::Migration { flavor }),
        Box::new(m20260101_000003_create_order_items::Migration { flavor }),
    ]
}

/// The migrator for PostgreSQL and Lakebase: each migration runs in its own transaction,
/// and one that gave up on a lock ([`LOCK_TIMEOUT`]), or ended a deadlock, is tried again (see
/// [`up`](MigratorTrait::up)).
#[derive(Debug, Clone, Copy)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations_for(Flavor::Postgres)
    }

    /// Applies the pending migrations (all, or `steps` of them), each in its own transaction.
    /// A migration that gave up on a lock (SQLSTATE `55P03` after [`LOCK_TIMEOUT`]), or was
    /// rolled back to end a deadlock (`40P01`), is rolled back and tried again after each of
    /// the [`LOCK_RETRY_PAUSES`] (logged at warn level);
    /// after the last, the run fails with that error. Given a transaction
    /// (`&DatabaseTransaction`), which that error aborts, each migration is tried once, and
    /// the transaction's `lock_timeout`, `statement_timeout`,
    /// `idle_in_transaction_session_timeout` and `client_connection_check_interval` are as
    /// they were before when it returns `Ok`.
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server; `55P03` or `40P01` after the last try.
    async fn up<'c, C>(db: C, steps: Option<u32>) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        match db.into_database_executor() {
            sea_orm::DatabaseExecutor::Connection(db) => {
                ddl::up_retrying::<OneTry>(db, steps, &ddl::LOCK_CONFLICT).await
            }
            db => keeping_settings(db, |db| OneTry::up(db, steps)).await,
        }
    }

    /// Rolls back the applied migrations (all, or the last `steps`); given a transaction, its
    /// settings are as they were before when it returns `Ok` (see [`up`](Self::up)).
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server.
    async fn down<'c, C>(db: C, steps: Option<u32>) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        keeping_settings(db.into_database_executor(), |db| OneTry::down(db, steps)).await
    }

    /// Drops every table, then applies every migration; given a transaction, its settings are
    /// as they were before when it returns `Ok` (see [`up`](Self::up)).
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server.
    async fn fresh<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        keeping_settings(db.into_database_executor(), OneTry::fresh).await
    }

    /// Rolls back every applied migration, then applies every migration; given a
    /// transaction, its settings are as they were before when it returns `Ok` (see
    /// [`up`](Self::up)).
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server.
    async fn refresh<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        keeping_settings(db.into_database_executor(), OneTry::refresh).await
    }

    /// Rolls back every applied migration and drops the migrations' table; given a
    /// transaction, its settings are as they were before when it returns `Ok` (see
    /// [`up`](Self::up)).
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server.
    async fn reset<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        keeping_settings(db.into_database_executor(), OneTry::reset).await
    }
}

/// Runs `migrations` on `db`; on a caller's transaction, then puts back the settings each
/// migration set for its transaction (see [`ddl::Settings`]): the caller's goes on as it was.
async fn keeping_settings<'c, F>(
    db: sea_orm::DatabaseExecutor<'c>,
    migrations: impl FnOnce(sea_orm::DatabaseExecutor<'c>) -> F,
) -> Result<(), DbErr>
where
    F: std::future::Future<Output = Result<(), DbErr>> + Send,
{
    let sea_orm::DatabaseExecutor::Transaction(tx) = db else {
        return migrations(db).await;
    };
    let settings = ddl::Settings::of(tx).await?;
    migrations(db).await?;
    settings.put_back(tx).await
}

/// [`Migrator`]'s migrations, each tried once: what its `up` runs, and runs again.
struct OneTry;

#[async_trait::async_trait]
impl MigratorTrait for OneTry {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        Migrator::migrations()
    }
}

/// [`DsqlMigrator`]'s migrations, each tried once: what its `up` runs, and runs again.
struct DsqlOneTry;

#[async_trait::async_trait]
impl MigratorTrait for DsqlOneTry {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        DsqlMigrator::migrations()
    }

    async fn install<C>(db: &C) -> Result<(), DbErr>
    where
        C: sea_orm::ConnectionTrait,
    {
        DsqlMigrator::install(db).await
    }
}

/// The migrator for Aurora DSQL: no transaction around a migration, one DDL per statement,
/// `CREATE INDEX ASYNC`, no foreign keys.
///
/// It changes the schema through a connection (`&DatabaseConnection`), never a transaction:
/// DSQL allows one DDL statement per transaction, and no DDL with other statements (AWS's
/// list of unsupported PostgreSQL features), so every such run fails inside one. Given a
/// transaction, `up`, `down`, `fresh`, `refresh`, `reset` and `uninstall` fail with
/// [`DbErr::Custom`] before anything is sent, and the transaction goes on as it was.
#[derive(Debug, Clone, Copy)]
pub struct DsqlMigrator;

/// The connection `db` is; for a transaction, the error that names the fix (see
/// [`DsqlMigrator`]).
fn outside_a_transaction<'c>(
    db: sea_orm::DatabaseExecutor<'c>,
    method: &str,
) -> Result<&'c sea_orm::DatabaseConnection, DbErr> {
    match db {
        sea_orm::DatabaseExecutor::Connection(db) => Ok(db),
        _ => Err(DbErr::Custom(format!(
            "DsqlMigrator::{method} was given a transaction: Aurora DSQL allows one DDL \
             statement per transaction and no DDL with other statements, so its migrations \
             run outside one; give it the connection (a DatabaseConnection)"
        ))),
    }
}

#[async_trait::async_trait]
impl MigratorTrait for DsqlMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations_for(Flavor::Dsql)
    }

    /// Creates `seaql_migrations` when it is missing. DSQL has no lock to take first: of two
    /// runs that create it at once (replicas migrating, or reading what is pending, as they
    /// start), the one that loses (SQLSTATE `40001`, `23505`, `42P07` or `42710`) finds it in
    /// place at a second try. Every read of what is applied or pending does this first.
    ///
    /// # Errors
    ///
    /// The server's first error, when the second try fails too.
    async fn install<C>(db: &C) -> Result<(), DbErr>
    where
        C: sea_orm::ConnectionTrait,
    {
        ddl::install_beside_others(db, Self::migration_table_name()).await
    }

    /// Applies the pending migrations (all, or `steps` of them), one statement at a time.
    /// DSQL has no advisory lock for a [`MigrationLock`]: two runs at once (two replicas
    /// migrating as they start) race on the same statements, and the one that loses (a
    /// conflict, SQLSTATE `40001`; the other's table or row in `seaql_migrations` first,
    /// `23505`, `42P07` or `42710`) reads what is still pending and goes on, after each of the
    /// [`LOCK_RETRY_PAUSES`]: every statement is `IF NOT EXISTS`, so one run again changes
    /// nothing.
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server; the race's after the last try.
    /// Given a transaction, [`DbErr::Custom`] before anything is sent (see [`DsqlMigrator`]).
    async fn up<'c, C>(db: C, steps: Option<u32>) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        let db = outside_a_transaction(db.into_database_executor(), "up")?;
        ddl::up_retrying::<DsqlOneTry>(db, steps, &ddl::RAN_AT_ONCE).await
    }

    /// Rolls back the applied migrations (all, or the last `steps`), one statement at a time,
    /// each one's record deleted first: DSQL commits each statement on its own, and a run cut
    /// off midway (the process killed, the connection lost) then leaves the migration pending,
    /// for [`up`](MigratorTrait::up) to run again (every statement is `IF NOT EXISTS`), where
    /// sea-orm-migration's order, its statements before its record, left it recorded as
    /// applied with its tables gone.
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server. Given a transaction,
    /// [`DbErr::Custom`] before anything is sent (see [`DsqlMigrator`]).
    async fn down<'c, C>(db: C, steps: Option<u32>) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        roll_back(
            outside_a_transaction(db.into_database_executor(), "down")?,
            steps,
        )
        .await
    }

    /// Rolls back every applied migration, as [`down`](MigratorTrait::down) does, then
    /// applies every migration.
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server. Given a transaction,
    /// [`DbErr::Custom`] before anything is sent (see [`DsqlMigrator`]).
    async fn refresh<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        let db = outside_a_transaction(db.into_database_executor(), "refresh")?;
        roll_back(db, None).await?;
        Self::up(db, None).await
    }

    /// Rolls back every applied migration, as [`down`](MigratorTrait::down) does, and drops
    /// the migrations' table.
    ///
    /// # Errors
    ///
    /// The first error of a migration or of the server. Given a transaction,
    /// [`DbErr::Custom`] before anything is sent (see [`DsqlMigrator`]).
    async fn reset<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        let db = outside_a_transaction(db.into_database_executor(), "reset")?;
        roll_back(db, None).await?;
        DsqlOneTry::uninstall(db).await
    }

    /// Drops the migrations' table alone.
    ///
    /// # Errors
    ///
    /// The server's error. Given a transaction, [`DbErr::Custom`] before anything is sent
    /// (see [`DsqlMigrator`]).
    async fn uninstall<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        DsqlOneTry::uninstall(outside_a_transaction(
            db.into_database_executor(),
            "uninstall",
        )?)
        .await
    }

    /// Drops every table of the current schema, each in a transaction of its own (DSQL runs
    /// one DDL statement per transaction, where sea-orm-migration drops them all in one), the
    /// migrations' table first (cut off midway, no record stays of a table dropped), then
    /// applies every migration.
    ///
    /// # Errors
    ///
    /// The first error of the server, or of a migration. Given a transaction,
    /// [`DbErr::Custom`] before anything is sent (see [`DsqlMigrator`]).
    async fn fresh<'c, C>(db: C) -> Result<(), DbErr>
    where
        C: IntoSchemaManagerConnection<'c>,
    {
        let db = outside_a_transaction(db.into_database_executor(), "fresh")?;
        let tables = db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            ))
            .await?;
        let records = Self::migration_table_name().to_string();
        let mut tables = tables
            .iter()
            .map(|row| row.try_get::<String>("", "table_name"))
            .collect::<Result<Vec<_>, _>>()?;
        tables.sort_by_key(|table| *table != records);
        for table in tables {
            let drop = Table::drop()
                .table(Alias::new(table))
                .if_exists()
                .to_owned();
            db.execute(&drop).await?;
        }
        Self::up(db, None).await
    }
}

/// Rolls back the applied migrations on DSQL (all, or the last `steps`), each one's record
/// deleted before its statements run (see [`DsqlMigrator::down`](MigratorTrait::down)).
async fn roll_back(db: &sea_orm::DatabaseConnection, steps: Option<u32>) -> Result<(), DbErr> {
    let applied = DsqlOneTry::get_applied_migrations(db).await?;
    let migrations = DsqlOneTry::migrations();
    let manager = SchemaManager::new(db);
    let steps = steps.map_or(usize::MAX, |n| n as usize);
    for name in applied.iter().rev().take(steps).map(|m| m.name()) {
        let Some(migration) = migrations.iter().find(|m| m.name() == name) else {
            return Err(DbErr::Custom(format!("no migration {name} to roll back")));
        };
        tracing::info!(target: "sea_orm_migration", "Rolling back migration '{name}'");
        let record = Query::delete()
            .from_table(DsqlOneTry::migration_table_name())
            .and_where(Expr::col(Alias::new("version")).eq(name))
            .to_owned();
        db.execute(&record).await?;
        migration.down(&manager).await?;
        tracing::info!(target: "sea_orm_migration", "Migration '{name}' has been rolled back");
    }
    Ok(())
}
