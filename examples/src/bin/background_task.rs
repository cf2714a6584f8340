//! A long-running job on the lazy strategy: a pool of one connection, queries at random
//! intervals, and a token fetched only when a connection opens, never while the job idles.
//!
//! Each query prints how many tokens were fetched and connections opened so far: with
//! tokens shorter-lived than the idle gaps, the counts move together, whatever the time
//! spent idle. The pool closes its connection once it is older than the connection
//! lifetime, so the job reconnects (and fetches) from time to time. A turn that fails (the
//! credential service or the database is down) is reported on stderr, and the next turn tries
//! again.
//!
//! ```text
//! cargo run -p examples --bin background_task
//! BACKGROUND_QUERIES=5 BACKGROUND_IDLE_MS=500..3000 cargo run -p examples --bin background_task
//! ```
//!
//! - `BACKGROUND_QUERIES`: stop after this many queries. Defaults to running until SIGINT or
//!   SIGTERM.
//! - `BACKGROUND_IDLE_MS=<min>..<max>`: the random pause before each query. Defaults to
//!   `2000..40000`, around the embedded default's 30-second tokens.
//! - `BACKGROUND_CONNECTION_LIFETIME_SECS`: close a connection this old (up to a tenth
//!   sooner, at random); none older is handed out. Defaults to 60.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::ops::Range;
use std::time::{Duration, Instant};

use dal::diesel::prelude::QueryDsl;
use dal::diesel_async::RunQueryDsl;
use dal::{PoolSettings, TokenStrategy};
use entity::schema::orders;

#[tokio::main]
async fn main() {
    examples::logging::init();
    examples::exit::on_error(run().await);
}

/// The longest connection lifetime a pool takes: 365 days.
const LONGEST_LIFETIME_SECS: u64 = 365 * 24 * 3600;

/// The job's settings, from its environment variables.
struct Settings {
    queries: Option<u64>,
    idle: Range<u64>,
    /// One connection, closed at `BACKGROUND_CONNECTION_LIFETIME_SECS`.
    pool: PoolSettings,
}

/// `e`, named as the variable of this program that set the pool's lifetime.
fn named(e: dal::Error) -> anyhow::Error {
    match e {
        dal::Error::Config {
            setting: dal::Setting::PoolMaxLifetime,
            reason,
        } => anyhow::anyhow!("invalid setting BACKGROUND_CONNECTION_LIFETIME_SECS: {reason}"),
        e => e.into(),
    }
}

fn settings() -> anyhow::Result<Settings> {
    let var = |name| {
        std::env::var(name)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    let number = |name: &str, v: &str| {
        v.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                anyhow::anyhow!("invalid setting {name}: {v:?} is not a positive number")
            })
    };
    let queries = var("BACKGROUND_QUERIES")
        .map(|v| number("BACKGROUND_QUERIES", &v))
        .transpose()?;
    let idle = match var("BACKGROUND_IDLE_MS") {
        None => 2_000..40_000,
        Some(v) => {
            let bad = || {
                anyhow::anyhow!(
                    "invalid setting BACKGROUND_IDLE_MS: {v:?} is not <min>..<max> milliseconds \
                     with min below max, such as 500..3000"
                )
            };
            let (lo, hi) = v.split_once("..").ok_or_else(bad)?;
            let (lo, hi) = (
                lo.trim().parse().map_err(|_| bad())?,
                hi.trim().parse().map_err(|_| bad())?,
            );
            if lo >= hi {
                return Err(bad());
            }
            lo..hi
        }
    };
    let lifetime = var("BACKGROUND_CONNECTION_LIFETIME_SECS")
        .map(|v| number("BACKGROUND_CONNECTION_LIFETIME_SECS", &v))
        .transpose()?
        .unwrap_or(60);
    if lifetime > LONGEST_LIFETIME_SECS {
        anyhow::bail!(
            "invalid setting BACKGROUND_CONNECTION_LIFETIME_SECS: {lifetime} s is more than \
             {LONGEST_LIFETIME_SECS} s (365 days)"
        );
    }
    let pool = PoolSettings::builder()
        .max_size(1)
        .max_lifetime(Some(Duration::from_secs(lifetime)))
        .idle_timeout(None)
        .build()?;
    Ok(Settings {
        queries,
        idle,
        pool,
    })
}

async fn run() -> anyhow::Result<()> {
    let settings = settings()?;
    let database = examples::Database::from_env().await?;
    let result = work(&database, &settings).await;
    database.close().await;
    result
}

async fn work(database: &examples::Database, settings: &Settings) -> anyhow::Result<()> {
    let config = database.config();
    // Migrated through a connector of its own, so that the figures below count only the
    // task's own fetches and connections.
    let migrator = examples::target::connector(config.clone()).await?;
    let migrated = async {
        examples::target::check(&migrator, &config).await?;
        examples::migrate::up(&migrator).await
    }
    .await;
    migrator.shutdown().await;
    migrated?;
    let config = config.strategy(TokenStrategy::Lazy);
    let connector = examples::target::connector(config.clone()).await?;
    let result = async {
        let pool = connector
            .diesel_pool_with(&settings.pool)
            .await
            .map_err(named)?;
        println!(
            "background task: lazy tokens, one connection, pauses of {}..{} ms",
            settings.idle.start, settings.idle.end
        );
        let started = Instant::now();
        let mut idle_total = Duration::ZERO;
        let (mut n, mut failed) = (0, 0);
        let stop = examples::signal::stopped();
        tokio::pin!(stop);
        while settings.queries.is_none_or(|max| n < max) {
            let pause = Duration::from_millis(fastrand::u64(settings.idle.clone()));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = &mut stop => break,
            }
            idle_total += pause;
            n += 1;
            let (fetches, opened) = (connector.cache().fetches(), connector.connections_opened());
            // A long-running task outlives outages: a failed turn is logged, the next one
            // tries again.
            let counted: anyhow::Result<i64> = async {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| examples::target::explain(&config, e))?;
                Ok(orders::table.count().get_result(&mut *conn).await?)
            }
            .await;
            let count = match counted {
                Ok(count) => count,
                Err(e) => {
                    failed += 1;
                    eprintln!("query {n} failed; trying again at the next turn: {e:#}");
                    continue;
                }
            };
            let cache = connector.cache();
            println!(
                "query {n} after {:.2} s idle: {count} orders; tokens fetched {} (+{}), \
                 connections opened {} (+{})",
                pause.as_secs_f64(),
                cache.fetches(),
                cache.fetches() - fetches,
                connector.connections_opened(),
                connector.connections_opened() - opened,
            );
        }
        println!(
            "done: {n} queries ({failed} failed) in {:.1} s, {:.1} s of it idle; tokens fetched {}, connections opened {}",
            started.elapsed().as_secs_f64(),
            idle_total.as_secs_f64(),
            connector.cache().fetches(),
            connector.connections_opened()
        );
        anyhow::Ok(())
    }
    .await;
    connector.shutdown().await;
    result
}
