//! What a run prints and writes: the table, the ratios against the baselines and their goals,
//! JSON, and an SVG plot.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::Sample;
use crate::scenarios::{Churn, Rss, Storm};
use crate::stacks::Kind;

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub cores: usize,
    /// CPU time the hypervisor gave to other guests while the stacks ran (throughput, churn
    /// and the storm), in percent of all: a figure above a few percent marks a run whose
    /// numbers the machine's neighbours moved. `None` off Linux.
    pub stolen_percent: Option<f64>,
    /// Whether the kernel's autogroups were on ([`crate::measure::autogroup`]); `None` where
    /// the kernel has no such setting.
    pub autogroup: Option<bool>,
    pub clients: Vec<usize>,
    pub rounds: usize,
    /// Rounds of each churn measurement (one in a quick run).
    pub churn_rounds: usize,
    pub seconds_per_round: f64,
    pub cells: Vec<Cell>,
    pub ratios: Vec<Ratio>,
    pub churn: Vec<Churn>,
    pub storm: Storm,
    pub rss: Rss,
}

/// One stack at one client count: the median over rounds, and each round.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub stack: Kind,
    pub clients: usize,
    pub median: Sample,
    pub rounds: Vec<Sample>,
}

/// Throughput of one stack over another's at one client count.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub clients: usize,
    pub of: Kind,
    pub over: Kind,
    pub value: f64,
    /// The least value the project aims for (at 8 clients).
    pub goal: Option<f64>,
}

/// The ratios reported, with their goals at 8 clients.
const RATIOS: [(Kind, Kind, Option<f64>); 19] = [
    (Kind::SeaOrmDal, Kind::SeaOrmPlain, Some(1.5)),
    (Kind::SeaOrmDal, Kind::DieselDal, Some(0.9)),
    (Kind::DieselDal, Kind::DieselPlainLike, Some(0.97)),
    (Kind::DieselDal, Kind::DieselPlainDefaults, None),
    (Kind::PgDal, Kind::PgPlain, Some(0.97)),
    // pgbench's threads each keep their own connections: dal's pools in the same
    // arrangement, a runtime and pool per core, against pgbench with as many threads.
    (Kind::DieselDalPerCore, Kind::Pgbench, Some(0.9)),
    (Kind::PgDalPerCore, Kind::Pgbench, Some(0.9)),
    // The drivers alone in that arrangement: how near pgbench the driver itself comes, and
    // what the pool costs over it.
    (Kind::DieselNoPoolPerCore, Kind::Pgbench, None),
    (Kind::PgNoPoolPerCore, Kind::Pgbench, None),
    (Kind::DieselDalPerCore, Kind::DieselNoPoolPerCore, None),
    (Kind::PgDalPerCore, Kind::PgNoPoolPerCore, None),
    // The same pools on one runtime for all cores (tokio's default, work-stealing), and the
    // drivers alone on it: what the runtime's arrangement costs, pool or none.
    (Kind::DieselDal, Kind::Pgbench, None),
    (Kind::PgDal, Kind::Pgbench, None),
    (Kind::DieselNoPool, Kind::Pgbench, None),
    (Kind::PgNoPool, Kind::Pgbench, None),
    // What the pools cost over their drivers alone.
    (Kind::DieselDal, Kind::DieselNoPool, None),
    (Kind::PgDal, Kind::PgNoPool, None),
    // pgbench as its default runs it, on one thread.
    (Kind::DieselDal, Kind::PgbenchOneThread, None),
    (Kind::PgDal, Kind::PgbenchOneThread, None),
];

/// The client count the goals are set at.
const GOAL_CLIENTS: usize = 8;

pub fn ratios(cells: &[Cell], clients: &[usize]) -> Vec<Ratio> {
    let throughput = |kind, n| {
        cells
            .iter()
            .find(|c| c.stack == kind && c.clients == n)
            .map(|c| c.median.throughput)
    };
    let mut out = Vec::new();
    for &n in clients {
        for (of, over, goal) in RATIOS {
            if let (Some(a), Some(b)) = (throughput(of, n), throughput(over, n))
                && b > 0.0
            {
                out.push(Ratio {
                    clients: n,
                    of,
                    over,
                    value: a / b,
                    goal: goal.filter(|_| n == GOAL_CLIENTS),
                });
            }
        }
    }
    out
}

fn us(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The report as text, for the terminal and the README.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} cores{}{}; median of {} interleaved rounds of {} s per cell\n",
        r.cores,
        r.stolen_percent.map_or_else(String::new, |p| format!(
            ", {p:.1} % of CPU time stolen by the hypervisor"
        )),
        r.autogroup.map_or_else(String::new, |on| format!(
            ", kernel.sched_autogroup_enabled = {}",
            u8::from(on)
        )),
        r.rounds,
        r.seconds_per_round
    );
    let _ = writeln!(
        s,
        "| Stack | Clients | Requests/s | p50 µs | p99 µs | max µs | Errors | CPU µs per request: client / rest of machine |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in &r.cells {
        let m = &c.median;
        let cpu = m.cpu.map_or_else(String::new, |cpu| {
            format!("{:.1} / {:.1}", cpu.client_us, cpu.rest_us)
        });
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {cpu} |",
            c.stack.name(),
            c.clients,
            m.throughput,
            us(m.p50_us),
            us(m.p99_us),
            us(m.max_us),
            m.errors
        );
    }
    let _ = writeln!(s, "\n| Ratio (throughput) | Clients | Value | Goal |");
    let _ = writeln!(s, "|---|---:|---:|---|");
    for x in &r.ratios {
        let goal = x.goal.map_or_else(String::new, |g| {
            format!(">= {g:.2}: {}", verdict(x.value >= g))
        });
        let _ = writeln!(
            s,
            "| {} / {} | {} | {:.2}x | {goal} |",
            x.of.name(),
            x.over.name(),
            x.clients,
            x.value
        );
    }
    let churn_rounds = match r.churn_rounds {
        1 => "1 round".to_owned(),
        n => format!("median of {n} rounds"),
    };
    let _ = writeln!(
        s,
        "\n| Connections renewed every 1 s (5 s tokens), 8 clients, {churn_rounds} | Checkout wait p99 µs kept / renewed | Checkout wait max µs kept / renewed (worst round) | Goal | Request p99 µs kept / renewed | Request max µs kept / renewed | Opened ahead / by the pool | Login p99 / max ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for c in &r.churn {
        let (steady, churn) = (&c.steady_checkout, &c.churn_checkout);
        let (p99, max) = (
            (steady.p99_us > 0.0).then(|| churn.p99_us / steady.p99_us),
            (steady.max_us > 0.0).then(|| churn.max_us / steady.max_us),
        );
        let ok = p99.is_some_and(|v| v <= 1.1) && max.is_some_and(|v| v <= 2.0);
        let _ = writeln!(
            s,
            "| {} | {:.1} / {:.1} ({}) | {:.0} / {:.0} ({}) ({:.0} / {:.0}) | p99 <= 1.1x, max <= 2x: {} | {} / {} ({}) | {} / {} ({}) | {} / {} | {:.0} / {:.0} |",
            c.stack.name(),
            steady.p99_us,
            churn.p99_us,
            times(p99),
            steady.max_us,
            churn.max_us,
            times(max),
            steady.worst_us,
            churn.worst_us,
            verdict(ok),
            us(c.steady.p99_us),
            us(c.churn.p99_us),
            times(ratio(c.churn.p99_us, c.steady.p99_us)),
            us(c.steady.max_us),
            us(c.churn.max_us),
            times(ratio(c.churn.max_us, c.steady.max_us)),
            c.renewed,
            c.opened_by_pool,
            c.churn_logins.p99_us / 1e3,
            c.churn_logins.worst_us / 1e3,
        );
    }
    let st = &r.storm;
    let _ = writeln!(
        s,
        "\nCold storm: {} connects at once: {} OAuth and {} credential requests (goal 1 and 1: {}), all connected in {} ms",
        st.connects,
        st.oauth_requests,
        st.credential_requests,
        verdict(st.oauth_requests == 1 && st.credential_requests == 1),
        st.all_connected_ms
    );
    let extra = r.rss.dal_kib as i64 - r.rss.plain_kib as i64;
    let anon = r.rss.dal_anon_kib as i64 - r.rss.plain_anon_kib as i64;
    let _ = writeln!(
        s,
        "Idle RSS, SeaORM + Diesel pools of 10 connections each: dal {} KiB, plain {} KiB ({extra:+} KiB; goal <= +1024: {}); of which anonymous (heap, stacks): dal {} KiB, plain {} KiB ({anon:+} KiB), the rest mapped from files (code that ran)",
        r.rss.dal_kib,
        r.rss.plain_kib,
        verdict(extra <= 1024),
        r.rss.dal_anon_kib,
        r.rss.plain_anon_kib,
    );
    s
}

fn ratio(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
        _ => None,
    }
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"))
}

/// Throughput and p99 against clients, one line per stack, side by side: an SVG document.
pub fn svg(r: &Report) -> anyhow::Result<String> {
    let mut out = String::new();
    draw(r, &mut out)?;
    Ok(out)
}

fn draw(r: &Report, out: &mut String) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::with_string(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let max_clients = r.clients.iter().copied().max().unwrap_or(1).max(2) as f64;
    let x_range = (1f64..max_clients).log_scale();
    let series = |kind: Kind, pick: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        r.cells
            .iter()
            .filter(|c| c.stack == kind)
            .filter_map(|c| pick(&c.median).map(|y| (c.clients as f64, y)))
            .collect()
    };
    type Pick = fn(&Sample) -> Option<f64>;
    let panels: [(&DrawingArea<SVGBackend, _>, &str, Pick); 2] = [
        (&left, "Throughput (requests/s)", |s| Some(s.throughput)),
        (&right, "p99 latency (ms)", |s| {
            s.p99_us.map(|v| v as f64 / 1000.0)
        }),
    ];
    for (area, title, pick) in panels {
        let top = Kind::ALL
            .iter()
            .flat_map(|&k| series(k, &pick))
            .map(|(_, y)| y)
            .fold(0.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0f64..top.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("clients")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (i, &kind) in Kind::ALL.iter().enumerate() {
            let points = series(kind, &pick);
            if points.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(kind.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
