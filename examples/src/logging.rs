//! Structured logs on stderr, so that stdout carries only what a program reports.

use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset: dal's own events (such as `token fetched`) at info,
/// the drivers' statement logs off.
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn";

/// Installs the log subscriber: `RUST_LOG` when set and valid, else dal's events at info and
/// the drivers' statement logs off.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
