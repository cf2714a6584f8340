//! Timing one cell: `clients` callers sending requests back to back for a period, each
//! request timed from its start to its answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::stacks::{ACCOUNTS, Server, Stack};

/// What one cell measured.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Requests answered per second.
    pub throughput: f64,
    /// Latency percentiles and maximum, in microseconds; `None` where the tool does not
    /// report them (pgbench gives the mean only).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub requests: u64,
    pub errors: u64,
    /// CPU time per request, when the cell could read it (see [`CpuClock`]).
    pub cpu: Option<CpuPerRequest>,
}

/// CPU time per request over a cell, in microseconds: the benchmark process's (the callers,
/// pools and drivers; for pgbench, pgbench's, a child it waited for) and the rest of the
/// machine's (PostgreSQL, the kernel's work not charged to this process). On two cores the
/// two share the same CPU, so the client's share is taken from the server's.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerRequest {
    pub client_us: f64,
    pub rest_us: f64,
}

/// CPU time read from `/proc` (Linux), in clock ticks (`USER_HZ`, 100 per second on Linux).
#[derive(Debug, Clone, Copy)]
pub struct CpuClock {
    /// This process's user and system time, with that of the children it waited for.
    process: u64,
    /// The machine's time neither idle, waiting for I/O nor stolen, over all cores.
    busy: u64,
}

impl CpuClock {
    const TICKS_PER_SECOND: f64 = 100.0;

    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command name in parentheses: utime, stime, cutime and cstime are the
        // 12th to 15th fields.
        let fields: Vec<&str> = stat
            .get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let process = fields
            .get(11..15)?
            .iter()
            .map(|t| t.parse::<u64>().ok())
            .sum::<Option<u64>>()?;
        let ticks = machine_ticks()?;
        // Less idle, I/O wait and the time stolen by the hypervisor.
        let busy = ticks.iter().sum::<u64>() - ticks[3] - ticks[4] - ticks[7];
        Some(Self { process, busy })
    }

    /// The CPU time per request since `before`, over `requests` requests.
    pub fn per_request_since(self, before: Self, requests: u64) -> Option<CpuPerRequest> {
        let us = |ticks: u64| ticks as f64 / Self::TICKS_PER_SECOND * 1e6 / requests as f64;
        let client = self.process.checked_sub(before.process)?;
        let busy = self.busy.checked_sub(before.busy)?;
        (requests > 0).then(|| CpuPerRequest {
            client_us: us(client),
            rest_us: us(busy.saturating_sub(client)),
        })
    }
}

/// Runs `clients` callers of `stack` for `period` (on the stack's own runtimes, spread evenly,
/// for a stack per core).
pub async fn run(stack: &Arc<Stack>, clients: usize, period: Duration) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let until = started + period;
    let outcomes = match &**stack {
        Stack::PerCore(cores) => {
            let n = cores.cores();
            // Each core's callers are numbered from 0, so that a driver alone gives each its
            // own of the core's connections.
            cores
                .on_each(move |core, stack| {
                    let here = (core..clients).step_by(n).count();
                    Box::pin(callers(stack, (0..here).collect(), until))
                })
                .await?
                .concat()
        }
        _ => callers(Arc::clone(stack), (0..clients).collect(), until).await,
    };
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for (l, e) in outcomes {
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Sample {
        throughput: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        max_us: latencies.last().copied(),
        requests: latencies.len() as u64,
        errors,
        cpu: None,
    })
}

/// The callers numbered `ids`, each a task on this runtime sending requests back to back
/// until `until`: for each, the latencies of the requests answered (microseconds), and the
/// failures.
async fn callers(stack: Arc<Stack>, ids: Vec<usize>, until: Instant) -> Vec<(Vec<u64>, u64)> {
    let callers: Vec<_> = ids
        .into_iter()
        .map(|caller| {
            let stack = Arc::clone(&stack);
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::with_capacity(65_536), 0u64);
                while Instant::now() < until {
                    let aid = fastrand::i32(1..=ACCOUNTS);
                    let begun = Instant::now();
                    match stack.request(caller, aid).await {
                        Ok(_) => latencies.push(begun.elapsed().as_micros() as u64),
                        Err(e) => {
                            if errors == 0 {
                                tracing::warn!(error = %e, "request failed");
                            }
                            errors += 1;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(callers.len());
    for caller in callers {
        outcomes.push(caller.await.expect("caller task"));
    }
    outcomes
}

/// The `q` quantile of sorted values (nearest rank).
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// `pgbench -S -M prepared` with `clients` connections on `threads` threads for `period`
/// (whole seconds, at least one) and one second more, over the same TLS the stacks use:
/// pgbench's `-T` counts the time its connections take to log in, its tps does not, and a run
/// whose logins took the whole of `-T` (32 TLS logins on a busy machine, in a 1 s quick round)
/// completes no transaction and prints no tps.
pub async fn pgbench(
    server: &Server,
    clients: usize,
    threads: usize,
    period: Duration,
) -> anyhow::Result<Sample> {
    let seconds = (period.as_secs().max(1) + 1).to_string();
    let clients_arg = clients.to_string();
    let threads = threads.to_string();
    let stdout = run_pgbench(
        server,
        &[
            "-n",
            "-S",
            "-M",
            "prepared",
            "-c",
            &clients_arg,
            "-j",
            &threads,
            "-T",
            &seconds,
        ],
    )
    .await?;
    let text = String::from_utf8_lossy(&stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let throughput =
        field("tps = ").with_context(|| format!("pgbench printed no tps:\n{}", text.trim()))?;
    let processed = field("number of transactions actually processed: ").unwrap_or(0.0);
    let failed = field("number of failed transactions: ").unwrap_or(0.0);
    Ok(Sample {
        throughput,
        p50_us: None,
        p99_us: None,
        max_us: None,
        requests: processed as u64,
        errors: failed as u64,
        cpu: None,
    })
}

/// Initialises pgbench's tables (scale 1: 100,000 accounts).
pub async fn pgbench_init(server: &Server) -> anyhow::Result<()> {
    run_pgbench(server, &["-i", "-q", "-s", "1"])
        .await
        .map(drop)
}

/// Runs pgbench with `args` against the benchmark database, over `verify-full` TLS; its
/// standard output.
async fn run_pgbench(server: &Server, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let program = dal::local::LocalPostgres::bin_dir()?.join("pgbench");
    let out = tokio::process::Command::new(&program)
        .args(args)
        .args(["-h", &server.host, "-p", &server.port.to_string()])
        .args(["-U", &server.user, &server.database])
        .env("PGPASSWORD", &server.password)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &server.ca)
        .output()
        .await
        .with_context(|| format!("run {}", program.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (Linux): ticks stolen
/// by the hypervisor for other guests, and all ticks; `None` where it cannot be read.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let ticks = machine_ticks()?;
    Some((ticks[7], ticks.iter().sum()))
}

/// The first eight figures of `/proc/stat`'s first line, summed over all cores: user, nice,
/// system, idle, I/O wait, IRQ, soft IRQ and steal ticks.
fn machine_ticks() -> Option<[u64; 8]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    ticks.try_into().ok()
}

/// `kernel.sched_autogroup_enabled`: whether Linux divides CPU time between sessions before
/// it divides it between processes. PostgreSQL gives each backend a session of its own
/// (`setsid` in `InitPostmasterChild`), so that with it on, each backend weighs as much as
/// this whole process, and a new backend's first statements waited for a core for up to a few
/// hundred milliseconds (see examples/load.md, "The kernel's autogroups"). `None` where the
/// kernel has no such setting.
pub fn autogroup() -> Option<bool> {
    let setting = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled").ok()?;
    Some(setting.trim() != "0")
}

/// The share of CPU time stolen between two [`cpu_ticks`] readings, in percent.
pub fn stolen_percent(from: Option<(u64, u64)>, to: Option<(u64, u64)>) -> Option<f64> {
    let ((steal0, total0), (steal1, total1)) = (from?, to?);
    let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
    Some(steal1.saturating_sub(steal0) as f64 * 100.0 / total as f64)
}
