//! How fast this process opens connections to one endpoint: one limiter per host, port and
//! rate, shared by every connector and pool of the process, as the server counts connections
//! per cluster, not per pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

use crate::config::ConnectionRate;

/// The limiter of one endpoint and rate, shared process-wide.
#[derive(Clone)]
pub(crate) struct ConnectLimiter(Arc<DefaultDirectRateLimiter>);

impl std::fmt::Debug for ConnectLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectLimiter")
    }
}

type Key = (String, u16, ConnectionRate);

impl ConnectLimiter {
    /// The limiter every connector of this process shares for `host:port` at `rate`.
    pub(crate) fn shared(host: &str, port: u16, rate: ConnectionRate) -> Self {
        static ALL: OnceLock<Mutex<HashMap<Key, ConnectLimiter>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.entry((host.to_ascii_lowercase(), port, rate))
            .or_insert_with(|| {
                let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
                Self(Arc::new(DefaultDirectRateLimiter::direct(quota)))
            })
            .clone()
    }

    /// Waits until one more connection may open, taking its place.
    pub(crate) async fn until_ready(&self) {
        while let Err(not_until) = self.0.check() {
            let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
            tokio::time::sleep(wait).await;
        }
    }
}
