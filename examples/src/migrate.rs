//! Migrating the sample schema up before a program uses it, with the migrator the target
//! needs (Aurora DSQL takes one DDL statement per transaction).

use anyhow::Context as _;
use dal::sea_orm::ConnectionTrait;
use dal::{Connector, PoolSettings, Target};
use migration::MigratorTrait;

/// Applies the pending migrations of the sample schema through `connector` (a pool of one
/// connection, closed before returning; the token is the connector's own, so a program's
/// summary counts every fetch). Returns how many migrations it applied.
pub async fn up(connector: &Connector) -> anyhow::Result<usize> {
    // Another program may be migrating the same database: it finishes first (on DSQL, which
    // has no lock to take, the DSQL migrator goes on after its statements).
    let lock = migration::MigrationLock::acquire(connector).await?;
    let one = PoolSettings::builder().max_size(1).build()?;
    // sea-orm-migration takes SeaORM's own connection: one over a plain sqlx pool.
    let db = dal::sea_orm::DatabaseConnection::from(connector.sqlx_pool_with(&one).await?);
    let result = async {
        // sea-orm-migration creates its table with IF NOT EXISTS on every run: the server's
        // notice that it exists says nothing.
        db.execute_unprepared("SET client_min_messages = warning")
            .await?;
        let applied = if connector.target() == Target::Dsql {
            let pending = migration::DsqlMigrator::get_pending_migrations(&db)
                .await?
                .len();
            migration::DsqlMigrator::up(&db, None).await?;
            pending
        } else {
            let pending = migration::Migrator::get_pending_migrations(&db)
                .await?
                .len();
            migration::Migrator::up(&db, None).await?;
            pending
        };
        anyhow::Ok(applied)
    }
    .await
    .context("migrating the sample schema");
    let _ = db.close().await;
    drop(lock);
    result
}

/// What [`up`] did, in words: `up to date`, or `applied N`.
pub fn describe(applied: usize) -> String {
    match applied {
        0 => "up to date".to_owned(),
        1 => "applied 1 migration".to_owned(),
        n => format!("applied {n} migrations"),
    }
}
