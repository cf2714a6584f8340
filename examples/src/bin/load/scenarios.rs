//! The runs that are not a throughput cell: logins under connection churn, a cold storm of
//! connects, and the memory of idle pools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dal::local::{LocalLakebase, LocalLakebaseConfig, LocalPostgres};
use dal::{Connector, PoolSettings, TokenStrategy};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::storage::AtomicBucket;
use serde::Serialize;

use crate::measure::{self, Sample};
use crate::stacks::{Kind, Server, Stack};

/// Steady state against connections renewed every second, with 5 s tokens.
#[derive(Debug, Serialize)]
pub struct Churn {
    pub stack: Kind,
    /// Whole requests (checkout and query).
    pub steady: Sample,
    pub churn: Sample,
    /// Checkouts alone: what a login on the request path would lengthen.
    pub steady_checkout: Waits,
    pub churn_checkout: Waits,
    /// Logins with churn, whether ahead of a lifetime or by the pool.
    pub churn_logins: Waits,
    /// Connections opened in the background ahead of their predecessor's end, over all
    /// rounds with churn.
    pub renewed: u64,
    /// Connections the pool opened itself over all rounds with churn: a replacement that was
    /// not ready in time, so a request may have waited for its login.
    pub opened_by_pool: u64,
}

/// The local Lakebase service, its role allowed to read the benchmark tables.
pub async fn lakebase(pg: &LocalPostgres, server: &Server) -> anyhow::Result<LocalLakebase> {
    let config = LocalLakebaseConfig::new().with_token_ttl(Duration::from_secs(5));
    let lb = LocalLakebase::start(pg, config).await?;
    let role = &lb.config().role;
    pg.admin(&server.database)
        .await?
        .batch_execute(&format!(
            "GRANT SELECT ON pgbench_accounts TO \"{role}\"; \
             GRANT CONNECT ON DATABASE \"{}\" TO \"{role}\"",
            server.database
        ))
        .await?;
    Ok(lb)
}

/// The connection lifetime under churn.
const LIFETIME: Duration = Duration::from_secs(1);

/// Durations of one kind over a run, in microseconds: how many in all rounds, the 99th
/// percentile and the maximum, each the median over rounds (the goals are set on medians of
/// rounds), and the worst of all rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Waits {
    pub count: u64,
    pub p99_us: f64,
    pub max_us: f64,
    pub worst_us: f64,
    /// Each round's maximum, in the order run.
    pub round_max_us: Vec<f64>,
}

impl Waits {
    fn of(mut us: Vec<f64>) -> Self {
        us.sort_by(f64::total_cmp);
        let max_us = us.last().copied().unwrap_or_default();
        Self {
            count: us.len() as u64,
            p99_us: measure::percentile(&us, 0.99).unwrap_or_default(),
            max_us,
            worst_us: max_us,
            round_max_us: vec![max_us],
        }
    }

    fn over_rounds(rounds: &[Waits]) -> Self {
        let mid =
            |pick: fn(&Waits) -> f64| middle(rounds.iter().map(pick).collect()).unwrap_or_default();
        Self {
            count: rounds.iter().map(|w| w.count).sum(),
            p99_us: mid(|w| w.p99_us),
            max_us: mid(|w| w.max_us),
            worst_us: rounds.iter().map(|w| w.worst_us).fold(0.0, f64::max),
            round_max_us: rounds.iter().map(|w| w.max_us).collect(),
        }
    }
}

/// The checkout waits and logins dal records in its own histograms
/// ([`POOL_ACQUIRE_SECONDS`](dal::telemetry::POOL_ACQUIRE_SECONDS),
/// [`POOL_CONNECT_SECONDS`](dal::telemetry::POOL_CONNECT_SECONDS)), read through a recorder
/// installed for this process. SeaORM checks a connection out inside each statement, so the
/// benchmark cannot time its checkouts itself.
///
/// The recorder keeps those two histograms only, each in a lock-free bucket, and hands out
/// no-op handles for every other metric. `metrics-util`'s `DebuggingRecorder` notes every
/// metric call in one map under a mutex that all threads share: with it, SeaORM's requests
/// with connections kept took 5 to 7 ms at the 99th percentile, against 2 to 2.5 ms with no
/// recorder or with this one.
struct PoolTimes {
    acquire: Arc<AtomicBucket<f64>>,
    connect: Arc<AtomicBucket<f64>>,
}

impl PoolTimes {
    fn install() -> anyhow::Result<Arc<Self>> {
        let times = Arc::new(Self {
            acquire: Arc::default(),
            connect: Arc::default(),
        });
        metrics::set_global_recorder(Arc::clone(&times))
            .map_err(|_| anyhow::anyhow!("another metrics recorder is installed"))?;
        Ok(times)
    }

    /// The checkout waits and the logins recorded since the last call.
    fn take(&self) -> [Waits; 2] {
        [&self.acquire, &self.connect].map(|bucket| {
            let mut us = Vec::new();
            bucket.clear_with(|seconds| us.extend(seconds.iter().map(|s| s * 1e6)));
            Waits::of(us)
        })
    }
}

impl metrics::Recorder for PoolTimes {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match key.name() {
            dal::telemetry::POOL_ACQUIRE_SECONDS => Histogram::from_arc(Arc::clone(&self.acquire)),
            dal::telemetry::POOL_CONNECT_SECONDS => Histogram::from_arc(Arc::clone(&self.connect)),
            _ => Histogram::noop(),
        }
    }
}

/// For each dal stack, `rounds` interleaved runs of eight callers with connections kept and
/// with connections renewed every second (5 s tokens, so new ones log in with new tokens):
/// the medians of each.
pub async fn churn(
    pg: &LocalPostgres,
    lb: &LocalLakebase,
    server: &Server,
    rounds: usize,
    period: Duration,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Churn>> {
    let config = lb.client_config(pg, &server.database)?;
    let steady = Connector::new(config.clone()).await?;
    let short_lived = PoolSettings::builder()
        .max_lifetime(Some(LIFETIME))
        .build()?;
    let churning = Connector::new(config.pool(short_lived)).await?;
    let times = PoolTimes::install()?;
    let mut out = Vec::new();
    for kind in [Kind::SeaOrmDal, Kind::DieselDal, Kind::PgDal] {
        let stacks = [
            Arc::new(Stack::build(kind, server, Some(&steady), 8).await?),
            Arc::new(Stack::build(kind, server, Some(&churning), 8).await?),
        ];
        let mut samples: [Vec<Sample>; 2] = Default::default();
        let mut checkouts: [Vec<Waits>; 2] = Default::default();
        let mut logins = Vec::new();
        let (mut renewed, mut opened_by_pool) = (0, 0);
        for _ in 0..rounds {
            for (i, stack) in stacks.iter().enumerate() {
                progress.set_message(format!(
                    "{} with {} connections",
                    kind.name(),
                    ["kept", "renewed every second"][i]
                ));
                // Load first, so the run measures a pool under load, not one coming back
                // from idle. The renewed pool needs three lifetimes: the connections that
                // expired while the other stack ran are replaced all at once, so their ends
                // come together too; a few generations of replacements spread them, as in a
                // service that has run for a while. The kept pool gets as long, for the
                // renewed pool's last connections, which expire and close as it starts, to
                // be gone before it is measured.
                measure::run(stack, 8, LIFETIME * 3).await?;
                let before = (churning.connections_opened(), stack.opened_by_pool());
                times.take();
                samples[i].push(measure::run(stack, 8, period).await?);
                let [waits, logged_in] = times.take();
                checkouts[i].push(waits);
                if i == 1 {
                    logins.push(logged_in);
                }
                if i == 1 {
                    let by_pool = stack.opened_by_pool().zip(before.1).map(|(a, b)| a - b);
                    opened_by_pool += by_pool.unwrap_or(0);
                    renewed += (churning.connections_opened() - before.0)
                        .saturating_sub(by_pool.unwrap_or(0));
                }
                progress.inc(1);
            }
        }
        let [steady, churn] = samples.map(|s| median(&s));
        let [steady_checkout, churn_checkout] = checkouts.map(|w| Waits::over_rounds(&w));
        out.push(Churn {
            stack: kind,
            steady,
            churn,
            steady_checkout,
            churn_checkout,
            churn_logins: Waits::over_rounds(&logins),
            renewed,
            opened_by_pool,
        });
    }
    steady.shutdown().await;
    churning.shutdown().await;
    Ok(out)
}

/// The middle value of `v` (the upper of the two middle ones for an even count); `None` if
/// empty.
fn middle<T: PartialOrd + Copy>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v.get(v.len() / 2).copied()
}

/// The median of each figure over rounds (the maximum for `max_us`).
pub fn median(samples: &[Sample]) -> Sample {
    Sample {
        throughput: middle(samples.iter().map(|s| s.throughput).collect()).unwrap_or_default(),
        p50_us: middle(samples.iter().filter_map(|s| s.p50_us).collect()),
        p99_us: middle(samples.iter().filter_map(|s| s.p99_us).collect()),
        max_us: samples.iter().filter_map(|s| s.max_us).max(),
        requests: samples.iter().map(|s| s.requests).sum(),
        errors: samples.iter().map(|s| s.errors).sum(),
        cpu: {
            let cpu: Vec<_> = samples.iter().filter_map(|s| s.cpu).collect();
            middle(cpu.iter().map(|c| c.client_us).collect())
                .zip(middle(cpu.iter().map(|c| c.rest_us).collect()))
                .map(|(client_us, rest_us)| measure::CpuPerRequest { client_us, rest_us })
        },
    }
}

/// 200 connects at once through a connector that has no token yet.
#[derive(Debug, Serialize)]
pub struct Storm {
    pub connects: usize,
    pub oauth_requests: usize,
    pub credential_requests: usize,
    /// From the first connect started to the last one answering a query.
    pub all_connected_ms: u128,
}

pub async fn cold_storm(
    pg: &LocalPostgres,
    lb: &LocalLakebase,
    server: &Server,
) -> anyhow::Result<Storm> {
    const CONNECTS: usize = 200;
    let (oauth, credentials) = (lb.oauth_requests(), lb.credential_requests());
    let mut config = lb
        .client_config(pg, &server.database)?
        .strategy(TokenStrategy::Lazy);
    // Two hundred TLS logins at once on a small machine: what counts is fetches.
    config.connect_timeout = Duration::from_secs(300);
    let connector = Connector::new(config).await?;
    let started = Instant::now();
    let connects: Vec<_> = (0..CONNECTS)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move {
                let (client, connection) = connector.connect().await?;
                let session = tokio::spawn(connection);
                client.simple_query("SELECT 1").await?;
                anyhow::Ok((client, session))
            })
        })
        .collect();
    let mut sessions = Vec::new();
    for connect in connects {
        sessions.push(connect.await??);
    }
    let all_connected_ms = started.elapsed().as_millis();
    drop(sessions);
    connector.shutdown().await;
    Ok(Storm {
        connects: CONNECTS,
        oauth_requests: lb.oauth_requests() - oauth,
        credential_requests: lb.credential_requests() - credentials,
        all_connected_ms,
    })
}

/// Resident memory of a process holding a SeaORM and a Diesel pool of ten open connections
/// each: through dal, and built plain. The whole (`VmRSS`) and its anonymous part
/// (`RssAnon`: heap, stacks, buffers); the rest is mapped from files, mostly the pages of
/// the program's code that have run (the kernel maps code in blocks of up to 64 KiB around
/// each page first run, so it counts how widely the code that ran is spread).
#[derive(Debug, Serialize)]
pub struct Rss {
    pub dal_kib: u64,
    pub plain_kib: u64,
    pub dal_anon_kib: u64,
    pub plain_anon_kib: u64,
}

/// The variable that tells a child process to measure its memory instead of benchmarking.
pub const PROBE_VAR: &str = "DAL_LOAD_RSS_PROBE";

/// Runs the memory probe `rounds` times for each side, alternating, in fresh processes of
/// this program; the medians.
pub async fn rss(server: &Server, rounds: usize) -> anyhow::Result<Rss> {
    let me = std::env::current_exe()?;
    let mut sides: [Vec<[u64; 2]>; 2] = Default::default();
    for _ in 0..rounds {
        for (i, side) in ["dal", "plain"].into_iter().enumerate() {
            let out = tokio::process::Command::new(&me)
                .env(PROBE_VAR, side)
                .env("DAL_LOAD_HOST", &server.host)
                .env("DAL_LOAD_PORT", server.port.to_string())
                .env("DAL_LOAD_DATABASE", &server.database)
                .env("DAL_LOAD_USER", &server.user)
                .env("DAL_LOAD_PASSWORD", &server.password)
                .env("DAL_LOAD_CA", &server.ca)
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                out.status.success(),
                "the memory probe failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let kib: Vec<u64> = text
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("the probe's answer")?;
            let [whole, anon] = kib[..] else {
                anyhow::bail!("the probe answered {text:?}, not two sizes");
            };
            sides[i].push([whole, anon]);
        }
    }
    let median = |side: &[[u64; 2]], part: usize| {
        middle(side.iter().map(|kib| kib[part]).collect()).unwrap_or_default()
    };
    let [dal, plain] = &sides;
    Ok(Rss {
        dal_kib: median(dal, 0),
        plain_kib: median(plain, 0),
        dal_anon_kib: median(dal, 1),
        plain_anon_kib: median(plain, 1),
    })
}

/// The child's side of [`rss`]: builds the pools, waits for them to settle, prints VmRSS and
/// RssAnon in KiB.
pub async fn rss_probe(side: &str) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let server = Server {
        host: var("DAL_LOAD_HOST")?,
        port: var("DAL_LOAD_PORT")?.parse()?,
        database: var("DAL_LOAD_DATABASE")?,
        user: var("DAL_LOAD_USER")?,
        password: var("DAL_LOAD_PASSWORD")?,
        ca: var("DAL_LOAD_CA")?.into(),
    };
    let mut stacks = Vec::new();
    if side == "dal" {
        let connector = Connector::new(server.dal_config()).await?;
        for kind in [Kind::SeaOrmDal, Kind::DieselDal] {
            stacks.push(Stack::build(kind, &server, Some(&connector), 10).await?);
        }
    } else {
        for kind in [Kind::SeaOrmPlain, Kind::DieselPlainLike] {
            stacks.push(Stack::build(kind, &server, None, 10).await?);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .with_context(|| format!("no {field} in /proc/self/status"))
    };
    println!("{} {}", kib("VmRSS")?, kib("RssAnon")?);
    Ok(())
}
