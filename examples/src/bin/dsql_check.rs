//! Checks the project's migrations against Aurora DSQL's rules without a cloud account: starts
//! a scratch PostgreSQL with the local DSQL endpoint in front of it, makes its database
//! report what DSQL refuses ([`dal::local::DSQL_UNSUPPORTED`]), migrates it as the `admin`
//! role with an IAM token, and lists every incompatibility it met. Exit code 1 if any, 2 if
//! it could not run (the error on stderr), so that CI can run it.
//!
//! ```text
//! cargo run -p examples --bin dsql_check            # migration::DsqlMigrator
//! cargo run -p examples --bin dsql_check -- --plain # migration::Migrator, for comparison
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::process::ExitCode;

use anyhow::Context;
use dal::local::{DSQL_FINDINGS_SQL, DsqlChecks, LocalDsqlEndpoint, LocalPostgres};
use dal::sea_orm::{ConnectionTrait, DbBackend, Statement};
use dal::{Connector, PoolSettings};
use migration::MigratorTrait;

#[tokio::main]
async fn main() -> ExitCode {
    examples::logging::init();
    match run().await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Migrates a scratch database and prints what DSQL would refuse: how many findings.
async fn run() -> anyhow::Result<usize> {
    let plain = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--plain") => true,
        Some(other) => anyhow::bail!("unknown argument {other:?}: use --plain or nothing"),
    };
    let pg = LocalPostgres::start()
        .await
        .context("cannot start the scratch PostgreSQL")?;
    pg.create_token_role("admin").await?;
    pg.create_database("scratch", Some("admin")).await?;
    pg.enable_dsql_checks("scratch", DsqlChecks::Report).await?;
    let endpoint = LocalDsqlEndpoint::start(&pg).await?;

    // One connection, so that every statement runs in the session that keeps the findings.
    let config = endpoint
        .config(&pg, "admin", "scratch")?
        .pool(PoolSettings::builder().max_size(1).build()?);
    let connector = Connector::new(config).await?;
    let db = dal::sea_orm::DatabaseConnection::from(connector.sqlx_pool().await?);
    let (name, migrated) = if plain {
        (
            "migration::Migrator",
            migration::Migrator::up(&db, None).await,
        )
    } else {
        (
            "migration::DsqlMigrator",
            migration::DsqlMigrator::up(&db, None).await,
        )
    };
    migrated.with_context(|| format!("{name} failed on the local DSQL endpoint"))?;
    let found: String = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            DSQL_FINDINGS_SQL,
        ))
        .await?
        .context("no findings row")?
        .try_get("", "found")?;
    connector.shutdown().await;

    let findings = dal::local::dsql_findings(&found);
    if findings.is_empty() {
        println!("{name}: the schema migrated with nothing Aurora DSQL refuses");
    } else {
        println!("{name}: {} thing(s) Aurora DSQL refuses:", findings.len());
        for rule in &findings {
            println!("  - {}: {}", rule.feature, rule.instead);
        }
    }
    Ok(findings.len())
}
