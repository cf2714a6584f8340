//! The load benchmark: dal's pools against the pools a user would build without it, and
//! against `pgbench`, on a PostgreSQL it starts itself.
//!
//! ```text
//! cargo run --release -p examples --bin load -- [--quick] [--clients 1,8,32] [--json FILE] [--svg FILE]
//! ```
//!
//! At 1, 8 and 32 clients, in interleaved rounds (every stack once per round, in an order
//! drawn at random for each round, so that a machine growing busier slows all of them alike
//! and no stack always follows the same one), each client sends
//! pgbench's select-only query back to back through one checkout per request (the drivers
//! with no pool, the references, through a connection of its own). dal's Diesel and
//! tokio-postgres pools run on the clients' runtime, and again as pgbench's threads do: a
//! single-threaded runtime and a pool per core, each with its share of the clients. Then:
//! requests with connections renewed every second and 5 s tokens against connections kept (five
//! interleaved rounds per stack), 200 connects at once on a cold token cache, and the resident
//! memory of idle pools. It prints a table of throughput, latency percentiles and ratios
//! against the baselines, and writes the same as JSON (`--json`, default `target/load.json`)
//! and an SVG plot (`--svg`, default `target/load.svg`). `--quick` runs shorter rounds, one
//! churn round per stack and no reference without a goal (the drivers alone, pgbench with
//! one thread, plain Diesel with bb8's defaults; under two minutes in all); `--clients`
//! chooses the client counts.
//!
//! Absolute numbers depend on the machine; the ratios are what the project tracks.

mod measure;
mod report;
mod scenarios;
mod stacks;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dal::Connector;
use dal::local::LocalPostgres;

use crate::report::{Cell, Report};
use crate::stacks::{Kind, Server, Stack};

struct Args {
    quick: bool,
    clients: Vec<usize>,
    json: PathBuf,
    svg: PathBuf,
}

const USAGE: &str = "usage: load [--quick] [--clients 1,8,32] [--json FILE] [--svg FILE]";

/// What `--help` prints after [`USAGE`].
const HELP: &str = "\
Runs pgbench's select-only query through dal's pools, the pools a user would build without
dal, the drivers alone and pgbench, on a PostgreSQL it starts itself; then connection churn,
200 cold connects and the memory of idle pools. Prints a table with the ratios against the
baselines and their goals; exits 0 when the run completes, met or missed.

  --quick        0.75 s rounds, one churn round, no reference without a goal (under 2 min)
  --clients L    the client counts, a comma-separated list of 1 to 64 (default 1,8,32);
                 the goals are judged at 8
  --json FILE    the report as JSON (default target/load.json, from the current folder)
  --svg FILE     throughput and p99 against clients (default target/load.svg)";

/// The most clients a cell may have: the benchmark's PostgreSQL takes 300 connections, and
/// pgbench and the drivers without a pool open one per client besides the pools' own.
const MAX_CLIENTS: usize = 64;

fn args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        clients: vec![1, 8, 32],
        json: PathBuf::from("target/load.json"),
        svg: PathBuf::from("target/load.svg"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--clients" => {
                let list = it
                    .next()
                    .ok_or_else(|| format!("--clients needs a list such as 1,8,32\n{USAGE}"))?;
                args.clients = list
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse()
                            .ok()
                            .filter(|n| (1..=MAX_CLIENTS).contains(n))
                    })
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| {
                        format!(
                            "--clients takes counts from 1 to {MAX_CLIENTS} such as 1,8,32, not {list:?}\n{USAGE}"
                        )
                    })?;
                args.clients.sort_unstable();
                args.clients.dedup();
            }
            "--json" | "--svg" => {
                let file = it
                    .next()
                    .ok_or_else(|| format!("{arg} needs a file name\n{USAGE}"))?;
                if arg == "--json" {
                    args.json = file.into();
                } else {
                    args.svg = file.into();
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}\n\n{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if args.json == args.svg {
        return Err(format!(
            "--json and --svg name the same file, {}\n{USAGE}",
            args.json.display()
        ));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = match std::env::var(scenarios::PROBE_VAR) {
        Ok(side) => scenarios::rss_probe(&side).await,
        Err(_) => match args() {
            Ok(args) => run(args).await,
            Err(message) => {
                eprintln!("{message}");
                return ExitCode::from(2);
            }
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Opened before anything runs: a path that cannot be written fails now, not after the
    // whole run with its results lost.
    let mut json = output("--json", &args.json)?;
    let mut svg = output("--svg", &args.svg)?;
    let clients = args.clients.clone();
    let rounds = 3;
    // A quick run's cells last 750 ms, so that it finishes in under two minutes with every
    // stack that has a goal; its churn rounds last a second, a whole connection lifetime.
    let (period, churn_period) = if args.quick {
        (Duration::from_millis(750), Duration::from_secs(1))
    } else {
        (Duration::from_secs(4), Duration::from_secs(4))
    };
    // Each churn round loads the renewed pool for three lifetimes before it measures: a
    // quick run measures churn once per stack, to finish in under two minutes. A full run
    // measures it five times: a round's worst checkout is its noisiest figure (with
    // connections kept, one run's rounds had 0.38 to 3.9 ms), and the median of three swung
    // across the goal of 2x from run to run.
    let churn_rounds = if args.quick { 1 } else { 5 };
    // The references without a goal (the drivers alone, pgbench with one thread, plain
    // Diesel with bb8's defaults): a quick run leaves them out.
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|kind| !(args.quick && kind.reference()))
        .collect();
    let cells_total = clients.len() * rounds * kinds.len() + 3 * 2 * churn_rounds;
    let progress = indicatif::ProgressBar::new(cells_total as u64).with_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} {wide_bar} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    progress.set_message("starting PostgreSQL");

    let server_side = ServerSide::new()?;
    let pg = server_side
        .run(LocalPostgres::start())
        .context("start PostgreSQL for the benchmark")?;
    let password = uuid::Uuid::new_v4().simple().to_string();
    pg.create_role("bench", &password, None).await?;
    pg.create_database("bench", Some("bench")).await?;
    let server = Server {
        host: pg.host().to_owned(),
        port: pg.port(),
        database: "bench".to_owned(),
        user: "bench".to_owned(),
        password,
        ca: pg.ca_cert_path(),
    };
    progress.set_message("pgbench -i -s 1");
    measure::pgbench_init(&server).await?;

    let connector = Connector::new(server.dal_config()).await?;
    let max_clients = clients.iter().copied().max().unwrap_or(1);
    let mut stacks = Vec::new();
    for kind in kinds.iter().copied().filter(|k| !k.is_pgbench()) {
        progress.set_message(format!("opening {}", kind.name()));
        let warm = if kind.driver_alone() {
            max_clients
        } else {
            max_clients.min(connector.pool_settings().max_size() as usize)
        };
        let stack = Stack::build(kind, &server, Some(&connector), warm)
            .await
            .with_context(|| format!("build {}", kind.name()))?;
        stacks.push((kind, Arc::new(stack)));
    }

    let ticks = measure::cpu_ticks();
    let mut cells = Vec::new();
    for &n in &clients {
        let mut samples: Vec<Vec<measure::Sample>> = vec![Vec::new(); kinds.len()];
        for round in 0..rounds {
            // An order of its own for each round: in a fixed rotation each stack always
            // followed the same one, and met whatever that one left behind (pgbench's
            // server processes exiting, say).
            let mut order: Vec<usize> = (0..kinds.len()).collect();
            fastrand::shuffle(&mut order);
            for i in order {
                let kind = kinds[i];
                progress.set_message(format!(
                    "{} at {n} clients, round {}",
                    kind.name(),
                    round + 1
                ));
                let before = measure::CpuClock::read();
                let mut sample = match stacks.iter().find(|(k, _)| *k == kind) {
                    Some((_, stack)) => measure::run(stack, n, period).await?,
                    None => {
                        let threads = kind.pgbench_threads(n).context("a stack or pgbench")?;
                        measure::pgbench(&server, n, threads, period).await?
                    }
                };
                sample.cpu = measure::CpuClock::read()
                    .zip(before)
                    .and_then(|(after, before)| after.per_request_since(before, sample.requests));
                samples[i].push(sample);
                progress.inc(1);
            }
        }
        for (i, rounds) in samples.into_iter().enumerate() {
            cells.push(Cell {
                stack: kinds[i],
                clients: n,
                median: scenarios::median(&rounds),
                rounds,
            });
        }
    }
    for (_, stack) in stacks {
        if let Ok(stack) = Arc::try_unwrap(stack) {
            stack.close().await;
        }
    }
    connector.shutdown().await;

    let lb = server_side.run(scenarios::lakebase(&pg, &server))?;
    let churn = scenarios::churn(&pg, &lb, &server, churn_rounds, churn_period, &progress).await?;
    progress.set_message("200 cold connects");
    let storm = scenarios::cold_storm(&pg, &lb, &server).await?;
    let stolen_percent = measure::stolen_percent(ticks, measure::cpu_ticks());
    progress.set_message("idle memory");
    // The medians of three probes per side moved by up to 460 KiB from run to run: one quick
    // run had +1,176 KiB where nine probes per side had +728 KiB. A full run takes seven.
    let probes = if args.quick { rounds } else { 7 };
    let rss = scenarios::rss(&server, probes).await?;
    progress.finish_and_clear();

    let report = Report {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        stolen_percent,
        autogroup: measure::autogroup(),
        ratios: report::ratios(&cells, &clients),
        clients,
        rounds,
        churn_rounds,
        seconds_per_round: period.as_secs_f64(),
        cells,
        churn,
        storm,
        rss,
    };
    print!("{}", report::text(&report));
    json.write_all(serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("--json {}: write", args.json.display()))?;
    svg.write_all(report::svg(&report)?.as_bytes())
        .with_context(|| format!("--svg {}: write", args.svg.display()))?;
    println!("\nwrote {} and {}", args.json.display(), args.svg.display());
    lb.shutdown().await;
    Ok(())
}

/// The file `flag` names, created (with its folder) to be written at the end of the run.
fn output(flag: &str, path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{flag} {}: create its folder", path.display()))?;
    }
    std::fs::File::create(path).with_context(|| {
        format!(
            "{flag} {}: cannot be written; choose another file",
            path.display()
        )
    })
}

/// The database side's services (the LDAP service that checks tokens as PostgreSQL logs them
/// in, the Lakebase credential service) on a runtime of their own, one thread, as they would
/// run on other machines: a login then does not wait behind the clients' tasks, and the
/// clients' latencies are their own.
struct ServerSide(Option<tokio::runtime::Runtime>);

impl ServerSide {
    fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("server-side")
            .enable_all()
            .build()
            .context("start the server side's runtime")?;
        Ok(Self(Some(runtime)))
    }

    /// Runs `start` on the server side's runtime (from a thread of its own, since this one
    /// is a worker of the clients' runtime): the tasks it spawns stay there.
    fn run<T: Send>(&self, start: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.0.as_ref().expect("running until dropped");
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(start))
                .join()
                .expect("the server side started")
        })
    }
}

impl Drop for ServerSide {
    fn drop(&mut self) {
        // Dropped on a worker of the clients' runtime, where a runtime cannot block to stop.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
