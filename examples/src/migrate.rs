//! Migrating the sample schema up before a program uses it, with the migrator the target
//! needs (Aurora DSQL takes one DDL statement per transaction).

use anyhow::Context as _;
use dal::{Config, PoolSettings, Target, TokenStrategy};
use migration::MigratorTrait;

/// Applies the pending migrations of the sample schema to `config`'s database.
///
/// Uses a connector of its own with one connection, shut down before returning, so that the
/// program's connector counts only its own tokens and connections.
pub async fn up(config: &Config) -> anyhow::Result<()> {
    let config = config
        .clone()
        .strategy(TokenStrategy::Lazy)
        .pool(PoolSettings::builder().max_size(1).build()?);
    let dsql = config.resolved_target()? == Target::Dsql;
    let connector = crate::target::connector(config.clone()).await?;
    let result = async {
        // Fail here with the cause, rather than with a pool timeout inside a migration.
        crate::target::check(&connector, &config).await?;
        let db = connector.seaorm().await?;
        if dsql {
            migration::DsqlMigrator::up(&db, None).await
        } else {
            migration::Migrator::up(&db, None).await
        }
        .context("migrating the sample schema")
    }
    .await;
    connector.shutdown().await;
    result
}
