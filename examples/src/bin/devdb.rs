//! Controls the local development PostgreSQL cluster kept under `target/dal-dev`.
//!
//! ```text
//! cargo run -p examples --bin devdb -- start    # start it (creating it on first use)
//! cargo run -p examples --bin devdb -- status   # say whether it runs, and where
//! cargo run -p examples --bin devdb -- stop     # stop it
//! ```
//!
//! `status` exits with 3 when the cluster is not running, as `pg_ctl status` does.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use anyhow::bail;
use dal::local::LocalPostgres;

const USAGE: &str = "usage: devdb [start|status|stop]   (status when none is given)";

/// `pg_ctl status`'s exit status for a server that is not running.
const NOT_RUNNING: i32 = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    match run().await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the command; the exit status.
async fn run() -> anyhow::Result<i32> {
    let command = std::env::args().nth(1).unwrap_or_else(|| "status".into());
    match command.as_str() {
        "start" => describe(&LocalPostgres::dev().await?),
        "status" if LocalPostgres::dev_is_running()? => describe(&LocalPostgres::dev().await?),
        "status" => {
            println!("not running");
            return Ok(NOT_RUNNING);
        }
        "stop" if LocalPostgres::stop_dev()? => println!("stopped"),
        "stop" => println!("was not running"),
        "help" | "-h" | "--help" => println!("{USAGE}"),
        other => bail!("unknown command {other:?}: {USAGE}"),
    }
    Ok(0)
}

fn describe(pg: &LocalPostgres) {
    println!(
        "running on {}:{} as superuser {} (data in {}, CA {})",
        pg.host(),
        pg.port(),
        pg.superuser(),
        pg.root().display(),
        pg.ca_cert_path().display()
    );
}
