//! Tours of the two ORMs on the sample schema: create, read, update and delete, relations
//! and joins, pagination, an upsert, and a transaction with a nested savepoint.
//!
//! Each run tags its rows with a fresh suffix, so tours can run again and again on the same
//! database.

use anyhow::Context as _;
use dal::{Connector, Target, TokenStrategy};

pub mod diesel;
pub mod seaorm;

/// The ORMs a tour can visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orm {
    /// SeaORM, over a sqlx pool.
    SeaOrm,
    /// Diesel, over a bb8 pool of diesel-async connections.
    Diesel,
}

/// What one tour did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Rows inserted, updated or deleted.
    pub written: u64,
    /// Rows read.
    pub read: u64,
}

/// A short tag unique to one run, for e-mail addresses that must not collide.
pub(crate) fn run_tag() -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect::<String>()
        .to_lowercase()
}

/// Migrates the sample schema up, runs the tours of `orms` in order on one connector, then
/// prints a summary: rows in each table, tokens fetched, connections opened.
pub async fn run(orms: &[Orm]) -> anyhow::Result<()> {
    let database = crate::Database::from_env().await?;
    let result = run_on(&database, orms).await;
    database.close().await;
    result
}

async fn run_on(database: &crate::Database, orms: &[Orm]) -> anyhow::Result<()> {
    let config = database.config().strategy(TokenStrategy::Eager);
    let savepoints = config.resolved_target()? != Target::Dsql;
    let connector = crate::target::connector(config.clone()).await?;
    let result = async {
        crate::target::check(&connector, &config).await?;
        let applied = crate::migrate::up(&connector).await?;
        println!("migrations: {}", crate::migrate::describe(applied));
        let mut total = Stats::default();
        let mut seaorm_pool_size = 0;
        for orm in orms {
            let stats = match orm {
                Orm::SeaOrm => {
                    let db = connector.seaorm().await?;
                    let stats = seaorm::run(&db, savepoints).await?;
                    seaorm_pool_size = db.health().connections;
                    stats
                }
                Orm::Diesel => {
                    let pool = connector.diesel_pool().await?;
                    diesel::run(&pool, savepoints).await?
                }
            };
            total.written += stats.written;
            total.read += stats.read;
        }
        summary(&connector, total, seaorm_pool_size).await
    }
    .await;
    connector.shutdown().await;
    result
}

async fn summary(connector: &Connector, total: Stats, seaorm_pool_size: u32) -> anyhow::Result<()> {
    let (client, connection) = connector.connect().await?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM orders), \
             (SELECT count(*) FROM order_items)",
            &[],
        )
        .await
        .context("counting rows")?;
    drop(client);
    let _ = driver.await;
    let (customers, orders, items): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let cache = connector.cache();
    println!("summary:");
    println!("  rows written {}, read {}", total.written, total.read);
    println!("  rows now: customers {customers}, orders {orders}, order_items {items}");
    if cache.source_kind() == "static" {
        println!("  credentials: a static password");
    } else {
        println!(
            "  tokens fetched {} ({} source, {:?} strategy)",
            cache.fetches(),
            cache.source_kind(),
            cache.strategy()
        );
    }
    println!(
        "  connections opened {} by Diesel and tokio-postgres, {} held by the SeaORM pool",
        connector.connections_opened(),
        seaorm_pool_size
    );
    Ok(())
}
