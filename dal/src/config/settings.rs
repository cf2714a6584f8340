//! The settings themselves: plain data with documented defaults.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::credentials::CredentialSource;
use crate::error::{Error, Result, Setting};
use crate::target::Target;
use crate::tls::SslMode;

/// The default `application_name`: `dal/<version>`, in the `<product>/<version>` form the
/// Lakebase partner guide asks for.
pub const DEFAULT_APPLICATION_NAME: &str = concat!("dal/", env!("CARGO_PKG_VERSION"));

/// Where the password of each new connection comes from.
#[derive(Clone)]
#[non_exhaustive]
pub enum Credentials {
    /// A fixed password (a PostgreSQL role's own, or Lakebase's native-role fallback).
    Password(SecretString),
    /// Databricks Lakebase database credentials; the target becomes [`Target::Lakebase`].
    Lakebase(Arc<crate::credentials::Lakebase>),
    /// Aurora DSQL IAM tokens; the target becomes [`Target::Dsql`].
    #[cfg(feature = "dsql")]
    Dsql(Arc<crate::credentials::Dsql>),
    /// Any source, such as an async closure: `Credentials::source(|| async { ... })`.
    Source(Arc<dyn CredentialSource>),
}

impl Credentials {
    /// Credentials from any [`CredentialSource`], such as an async closure.
    pub fn source(source: impl CredentialSource) -> Self {
        Self::Source(Arc::new(source))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password(_) => f.write_str("Password(** redacted **)"),
            Credentials::Lakebase(l) => f.debug_tuple("Lakebase").field(l).finish(),
            #[cfg(feature = "dsql")]
            Credentials::Dsql(d) => f.debug_tuple("Dsql").field(d).finish(),
            Credentials::Source(s) => write!(f, "Source({})", s.kind()),
        }
    }
}

/// When the cache fetches tokens.
///
/// The names follow the Lakebase JavaScript examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TokenStrategy {
    /// Fetch at start, then refresh in the background ahead of expiry: connections never
    /// wait for a fetch. For servers. The default.
    #[default]
    Eager,
    /// Fetch on first use, and again on use once the token is near expiry: nothing is
    /// fetched while the program is idle. For background jobs.
    Lazy,
    /// Fetch a fresh token for every new connection (the JavaScript examples' `none`).
    /// Cheap for Aurora DSQL, whose tokens are signed locally.
    Uncached,
}

impl std::str::FromStr for TokenStrategy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "eager" => Ok(Self::Eager),
            "lazy" => Ok(Self::Lazy),
            "uncached" | "none" => Ok(Self::Uncached),
            _ => Err(format!("{s:?} is not one of eager, lazy, uncached")),
        }
    }
}

/// Timing of refreshes and retries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CacheSettings {
    /// Refresh this long before expiry. Defaults to `None`: five minutes or a fifth of the
    /// token's life, whichever is shorter (a one-hour Lakebase credential is refreshed after
    /// 55 minutes, a 15-minute DSQL token after 12).
    pub refresh_margin: Option<Duration>,
    /// Refresh up to this fraction of the token's life earlier still, at random, so that
    /// replicas started together do not refresh together. Defaults to 0.05.
    pub jitter: f64,
    /// Attempts per refresh before it is reported as failed. Defaults to 3.
    pub attempts: u32,
    /// First pause between attempts, doubled after each failure. Defaults to 200 ms.
    pub min_backoff: Duration,
    /// Longest pause between attempts, and between background refreshes after a failure.
    /// Defaults to 10 s.
    pub max_backoff: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            refresh_margin: None,
            jitter: 0.05,
            attempts: 3,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl CacheSettings {
    /// Sets [`refresh_margin`](Self::refresh_margin).
    #[must_use]
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = Some(margin);
        self
    }

    /// Sets [`jitter`](Self::jitter).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Sets [`attempts`](Self::attempts), [`min_backoff`](Self::min_backoff) and
    /// [`max_backoff`](Self::max_backoff).
    #[must_use]
    pub fn retries(mut self, attempts: u32, min_backoff: Duration, max_backoff: Duration) -> Self {
        self.attempts = attempts;
        self.min_backoff = min_backoff;
        self.max_backoff = max_backoff;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(0.0..=0.5).contains(&self.jitter) {
            return Err(Error::config(
                Setting::CacheJitter,
                "must be a fraction between 0 and 0.5, such as 0.05",
            ));
        }
        if self.attempts == 0 {
            return Err(Error::config(Setting::CacheAttempts, "must be at least 1"));
        }
        if self.min_backoff > self.max_backoff {
            return Err(Error::config(
                Setting::CacheBackoff,
                "min_backoff must not exceed max_backoff",
            ));
        }
        Ok(())
    }
}

/// Pool sizes and lifetimes, shared by every pool a connector builds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolSettings {
    /// Most connections open at once. Defaults to 10.
    pub max_size: u32,
    /// Connections kept open while idle. Defaults to 0, so that Lakebase can scale to zero.
    pub min_idle: u32,
    /// How long to wait for a connection before failing. Defaults to 10 s.
    pub acquire_timeout: Duration,
    /// Close connections idle this long. Defaults to 270 s, below Lakebase's 300 s
    /// scale-to-zero window (as its JavaScript examples do).
    pub idle_timeout: Option<Duration>,
    /// Close connections this old. Defaults to 25 min: the pools enforce it lazily (a
    /// connection may live up to about twice as long), which keeps it under Aurora DSQL's
    /// 60-minute cap.
    pub max_lifetime: Option<Duration>,
    /// Shorten `max_lifetime` by up to this fraction, at random per pool, so that pools
    /// started together do not reconnect together. Defaults to 0.1.
    pub lifetime_jitter: f64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: 10,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(270)),
            max_lifetime: Some(Duration::from_secs(25 * 60)),
            lifetime_jitter: 0.1,
        }
    }
}

impl PoolSettings {
    /// Sets [`max_size`](Self::max_size).
    #[must_use]
    pub fn max_size(mut self, n: u32) -> Self {
        self.max_size = n;
        self
    }

    /// Sets [`min_idle`](Self::min_idle).
    #[must_use]
    pub fn min_idle(mut self, n: u32) -> Self {
        self.min_idle = n;
        self
    }

    /// Sets [`acquire_timeout`](Self::acquire_timeout).
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets [`max_lifetime`](Self::max_lifetime).
    #[must_use]
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The lifetime of one pool's connections, jitter applied.
    pub(crate) fn jittered_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
            .map(|l| l.mul_f64(1.0 - self.lifetime_jitter * fastrand::f64()))
    }
}

/// Everything a [`Connector`](crate::Connector) needs. Plain data: set fields directly or
/// with the `#[must_use]` setters; [`Config::from_env`] reads the usual environment
/// variables. Nothing is checked until [`Connector::new`](crate::Connector::new).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The server's host name. Required.
    pub host: String,
    /// Connect to this address instead of resolving `host`, which still names the server for
    /// TLS verification (libpq's `hostaddr`). Used by the Diesel and tokio-postgres
    /// connections; sqlx resolves `host` itself. Defaults to none.
    pub hostaddr: Option<std::net::IpAddr>,
    /// The server's port. Defaults to 5432.
    pub port: u16,
    /// The database. Defaults to `postgres`.
    pub database: String,
    /// The user (role). Required.
    pub user: String,
    /// Where passwords come from. Required.
    pub credentials: Option<Credentials>,
    /// The kind of server. Defaults to [`Target::Postgres`].
    pub target: Target,
    /// TLS use. Defaults to `verify-full` for Lakebase and DSQL, `prefer` otherwise.
    pub ssl_mode: Option<SslMode>,
    /// CA certificates (PEM) to verify the server with. Defaults to the Mozilla roots.
    pub ssl_root_cert: Option<PathBuf>,
    /// Sent in the startup packet. Defaults to [`DEFAULT_APPLICATION_NAME`].
    pub application_name: String,
    /// The schema search path of every connection, sent in the startup packet. Defaults to
    /// none (the server's), except for non-admin DSQL roles: their own schema.
    pub search_path: Option<String>,
    /// Statement timeout of every connection. Defaults to none (the server's).
    pub statement_timeout: Option<Duration>,
    /// Time allowed to open one connection, TLS and login included. Defaults to 10 s.
    pub connect_timeout: Duration,
    /// When tokens are fetched. Defaults to [`TokenStrategy::Eager`].
    pub strategy: TokenStrategy,
    /// Refresh and retry timing of the token cache.
    pub cache: CacheSettings,
    /// Pool sizes and lifetimes.
    pub pool: PoolSettings,
}

impl Config {
    /// A configuration for `user` at `host` with every other setting at its default.
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            hostaddr: None,
            port: 5432,
            database: "postgres".into(),
            user: user.into(),
            credentials: None,
            target: Target::Postgres,
            ssl_mode: None,
            ssl_root_cert: None,
            application_name: DEFAULT_APPLICATION_NAME.into(),
            search_path: None,
            statement_timeout: None,
            connect_timeout: Duration::from_secs(10),
            strategy: TokenStrategy::default(),
            cache: CacheSettings::default(),
            pool: PoolSettings::default(),
        }
    }

    /// The kind of server, as the credentials imply it: Lakebase credentials mean
    /// [`Target::Lakebase`], DSQL tokens [`Target::Dsql`]; otherwise [`target`](Self::target).
    pub fn resolved_target(&self) -> Target {
        match &self.credentials {
            Some(Credentials::Lakebase(_)) => Target::Lakebase,
            #[cfg(feature = "dsql")]
            Some(Credentials::Dsql(_)) => Target::Dsql,
            _ => self.target,
        }
    }

    /// Sets [`port`](Self::port).
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets [`database`](Self::database).
    #[must_use]
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }

    /// Uses a fixed password.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::Password(SecretString::from(password.into())));
        self
    }

    /// Sets [`credentials`](Self::credentials).
    #[must_use]
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Sets [`target`](Self::target).
    #[must_use]
    pub fn target(mut self, target: Target) -> Self {
        self.target = target;
        self
    }

    /// Sets [`ssl_mode`](Self::ssl_mode).
    #[must_use]
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = Some(mode);
        self
    }

    /// Sets [`ssl_root_cert`](Self::ssl_root_cert).
    #[must_use]
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Sets [`application_name`](Self::application_name).
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Sets [`search_path`](Self::search_path).
    #[must_use]
    pub fn search_path(mut self, path: impl Into<String>) -> Self {
        self.search_path = Some(path.into());
        self
    }

    /// Sets [`statement_timeout`](Self::statement_timeout).
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Sets [`strategy`](Self::strategy).
    #[must_use]
    pub fn strategy(mut self, strategy: TokenStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets [`cache`](Self::cache).
    #[must_use]
    pub fn cache(mut self, cache: CacheSettings) -> Self {
        self.cache = cache;
        self
    }

    /// Sets [`pool`](Self::pool).
    #[must_use]
    pub fn pool(mut self, pool: PoolSettings) -> Self {
        self.pool = pool;
        self
    }
}
