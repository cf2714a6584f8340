//! The migration command line: `cargo run -p migration -- up | down | status | fresh | refresh | reset`.
//!
//! Connects to the database named by `DATABASE_URL` (also read from a `.env` file). When it is
//! not set, starts the local development cluster (see `dal::local`) and migrates its `dal`
//! database.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sea_orm_migration::sea_orm::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sea_orm_migration::sea_orm::{DatabaseConnection, SqlxPostgresConnector};

/// The database the local development cluster keeps the sample schema in.
const DEV_DATABASE: &str = "dal";

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli_with_custom_connection(migration::Migrator, async || {
        match connect().await {
            Ok(db) => Ok(db),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    })
    .await;
}

async fn connect() -> anyhow::Result<DatabaseConnection> {
    let options = match std::env::var("DATABASE_URL") {
        Ok(url) => url.parse::<PgConnectOptions>().map_err(|e| {
            anyhow!(
                "DATABASE_URL is not a valid PostgreSQL URL ({e}); \
                 expected postgres://user:password@host:port/database"
            )
        })?,
        Err(std::env::VarError::NotPresent) => {
            let pg = dal::local::LocalPostgres::dev().await?;
            pg.create_database(DEV_DATABASE, None).await?;
            eprintln!(
                "DATABASE_URL is not set: using the local development cluster on {}:{} \
                 (database {DEV_DATABASE}, data in {})",
                pg.host(),
                pg.port(),
                pg.root().display()
            );
            pg.sqlx_options(DEV_DATABASE)
        }
        Err(std::env::VarError::NotUnicode(_)) => bail!("DATABASE_URL is not valid UTF-8"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to the database")?;
    Ok(SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
}
