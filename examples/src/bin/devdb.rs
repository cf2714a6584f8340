//! Controls the local development PostgreSQL cluster kept under `target/dal-dev`.
//!
//! ```text
//! cargo run -p examples --bin devdb -- start    # start it (creating it on first use)
//! cargo run -p examples --bin devdb -- status   # say whether it runs, and where
//! cargo run -p examples --bin devdb -- stop     # stop it
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use anyhow::bail;
use dal::local::LocalPostgres;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let command = std::env::args().nth(1).unwrap_or_else(|| "status".into());
    match command.as_str() {
        "start" => describe(&LocalPostgres::dev().await?),
        "status" if LocalPostgres::dev_is_running()? => describe(&LocalPostgres::dev().await?),
        "status" => println!("not running"),
        "stop" if LocalPostgres::stop_dev()? => println!("stopped"),
        "stop" => println!("was not running"),
        other => bail!("unknown command {other:?}: use start, status or stop"),
    }
    Ok(())
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
