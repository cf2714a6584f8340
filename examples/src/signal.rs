//! Stopping a program from outside: Ctrl-C or `kill`.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Listens for SIGINT and SIGTERM from the call on (a signal that arrives before the future
/// is first awaited is not lost, nor does it end the program); the future resolves at the
/// first of them.
pub fn stopped() -> impl std::future::Future<Output = ()> {
    let interrupt = signal(SignalKind::interrupt()).ok();
    let terminate = signal(SignalKind::terminate()).ok();
    async move {
        tokio::select! {
            () = next(interrupt) => {}
            () = next(terminate) => {}
        }
    }
}

/// The next delivery of `signal`; never, when it could not be listened for.
async fn next(signal: Option<Signal>) {
    match signal {
        Some(mut signal) => drop(signal.recv().await),
        None => std::future::pending().await,
    }
}
