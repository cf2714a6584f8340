//! What the layer tells operators: the names of the metrics it records through the
//! [`metrics`] facade, and the [`Health`] that
//! [`Connector::health`](crate::Connector::health) reports.
//!
//! Nothing is recorded until the program installs a recorder (such as a Prometheus
//! exporter). Install it before building pools: a pool takes the handles of its gauges and
//! histograms from the recorder when it is built, and each connection those of its query
//! times when it opens, so that a checkout or a query records without looking its metric
//! up (a pool built before the recorder records none of them). No metric, label, span or
//! event carries a token, password or SQL text.
//! Labels: `source` (credential source kind: `static`, `lakebase`, `dsql`, `custom`),
//! `pool` (`seaorm`, `diesel`, `postgres`), `orm` (`seaorm`, `diesel`).

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result, Setting};
use crate::target::Target;

/// Checks a product name, which names the program to operators in `application_name` and
/// in the `User-Agent` of Lakebase's APIs: `<name>/<version>`, the name of letters, digits,
/// `_`, `.` and `-` (the Lakebase partner guide's `<isv-name_product-name>`), the version of
/// those and `+`.
///
/// # Errors
///
/// [`Error::Config`] for [`Setting::Product`] naming the expected shape.
pub(crate) fn check_product(product: &str) -> Result<()> {
    let word = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(&c))
    };
    match product.split_once('/') {
        Some((name, version)) if word(name, &[]) && word(version, &['+']) => Ok(()),
        _ => Err(Error::config(
            Setting::Product,
            format!(
                "{product:?} is not <isv-name_product-name>/<version>, such as acme_orders/2.1 \
                 (letters, digits, '_', '.' and '-')"
            ),
        )),
    }
}

/// Counter: tokens fetched from the credential source. Label `source`.
pub const TOKEN_REFRESHES: &str = "dal_token_refreshes_total";
/// Counter: token refreshes that failed after their retries. Label `source`.
pub const TOKEN_REFRESH_FAILURES: &str = "dal_token_refresh_failures_total";
/// Gauge: seconds until the newest token expires, set when it is fetched. Label `source`.
pub const TOKEN_REMAINING_SECONDS: &str = "dal_token_remaining_seconds";
/// Counter: physical connections opened by the connector (SeaORM, Diesel and tokio-postgres
/// pools).
pub const CONNECTIONS_OPENED: &str = "dal_connections_opened_total";
/// Counter: connections replaced ahead of their lifetime by one opened in the background.
/// Label `pool`.
pub const CONNECTIONS_RENEWED: &str = "dal_connections_renewed_total";
/// Counter: connections the server refused for a limit and the connector tried again: SQLSTATE
/// `53300` (too many connections) or `53400` (Aurora DSQL: connection rate exceeded). Label
/// `sqlstate`.
pub const CONNECTS_LIMITED: &str = "dal_connects_limited_total";
/// Counter: moves to another endpoint of the database after the active one could not be
/// reached (`Config::failover`).
pub const FAILOVERS: &str = "dal_failovers_total";
/// Counter: logins the server refused (SQLSTATE `28P01`, or `28000` from an external login
/// method such as LDAP or PAM, which is how the local services refuse a token).
pub const AUTH_FAILURES: &str = "dal_auth_failures_total";
/// Gauge: connections of a pool, open and idle, after each checkout. Label `pool`.
pub const POOL_CONNECTIONS: &str = "dal_pool_connections";
/// Gauge: idle connections of a pool, after each checkout. Label `pool`.
pub const POOL_IDLE: &str = "dal_pool_idle_connections";
/// Gauge: callers waiting for a connection of a pool. Label `pool`.
pub const POOL_WAITING: &str = "dal_pool_waiting";
/// Histogram: seconds spent waiting for a connection of a pool. Label `pool`.
pub const POOL_ACQUIRE_SECONDS: &str = "dal_pool_acquire_seconds";
/// Histogram: seconds a pool took to open a connection (credential, TLS and login), whether
/// a caller waited for it or it replaced one ahead of its lifetime. Label `pool`.
pub const POOL_CONNECT_SECONDS: &str = "dal_pool_connect_seconds";
/// Counter: transactions run again after a conflict or connection failure. Labels `orm`
/// (`seaorm`, `diesel`, `idempotent`) and `reason` (`OC000`, `OC001`, the SQLSTATE, or
/// `connection`).
pub const TX_RETRIES: &str = "dal_tx_retries_total";
/// Counter: transactions committed. Label `orm`.
pub const TX_COMMITS: &str = "dal_tx_commits_total";
/// Counter: transactions rolled back. Label `orm`.
pub const TX_ROLLBACKS: &str = "dal_tx_rollbacks_total";
/// Histogram: seconds per query. Labels `orm`, `failed` (`true`, `false`).
pub const QUERY_SECONDS: &str = "dal_query_seconds";

/// A snapshot of a connector's state, for health checks and dashboards. Holds no secret.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Health {
    /// The kind of server.
    pub target: Target,
    /// The kind of credential source, such as `lakebase`.
    pub token_source: &'static str,
    /// When the current token expires; `None` when there is none yet or it never expires.
    pub token_expires_at: Option<SystemTime>,
    /// How long the current token stays valid; `None` as for `token_expires_at`.
    pub token_remaining: Option<Duration>,
    /// Tokens fetched so far.
    pub token_fetches: u64,
    /// Token refreshes that failed so far.
    pub token_failures: u64,
    /// Connections the connector opened itself.
    pub connections_opened: u64,
    /// Every pool the connector built that is still in use.
    pub pools: Vec<PoolHealth>,
    /// Whether [`Connector::shutdown`](crate::Connector::shutdown) was called.
    pub shut_down: bool,
}

/// The state of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolHealth {
    /// `seaorm`, `diesel`, `postgres`, or `sqlx` (a plain sqlx pool).
    pub kind: &'static str,
    /// Most connections open at once.
    pub max_size: u32,
    /// Connections open now, idle or in use.
    pub connections: u32,
    /// Idle connections now.
    pub idle: u32,
    /// Callers waiting for a connection now (bb8 pools; 0 for sqlx, which does not tell).
    pub waiting: u64,
}

impl Health {
    /// Whether the connector is usable: not shut down, and its token (if it expires) still
    /// valid.
    pub fn is_healthy(&self) -> bool {
        !self.shut_down
            && self
                .token_expires_at
                .is_none_or(|_| self.token_remaining.is_some())
    }
}

/// The [`QUERY_SECONDS`] histograms of one ORM's connection, taken from the recorder once,
/// when the connection opens: a query then records its time without a registry lookup.
#[cfg(any(feature = "seaorm", feature = "diesel"))]
pub(crate) struct QueryTimes {
    orm: &'static str,
    answered: metrics::Histogram,
    failed: metrics::Histogram,
}

#[cfg(any(feature = "seaorm", feature = "diesel"))]
impl QueryTimes {
    pub(crate) fn new(orm: &'static str) -> Self {
        let histogram =
            |failed| metrics::histogram!(QUERY_SECONDS, "orm" => orm, "failed" => failed);
        Self {
            orm,
            answered: histogram("false"),
            failed: histogram("true"),
        }
    }

    /// Records one finished query.
    pub(crate) fn record(&self, elapsed: Duration, failed: bool) {
        tracing::debug!(
            orm = self.orm,
            elapsed_ms = elapsed.as_millis() as u64,
            failed,
            "query"
        );
        let histogram = if failed { &self.failed } else { &self.answered };
        histogram.record(elapsed.as_secs_f64());
    }
}
