//! The settings themselves: plain data with documented defaults.

use std::fmt;
use std::num::NonZeroU32;
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
///
/// ```
/// use dal::credentials::Token;
/// // A fixed password:
/// let fixed = dal::Credentials::Password("secret".to_owned().into());
/// // Any source: a built-in one (Lakebase, DSQL) or an async closure.
/// let mine = dal::Credentials::source(|| async { Ok::<_, std::io::Error>(Token::new("t", None)) });
/// # let _ = (fixed, mine);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum Credentials {
    /// A fixed password (a PostgreSQL role's own, or Lakebase's native-role fallback).
    Password(SecretString),
    /// Any source: [`Lakebase`](crate::credentials::Lakebase),
    /// [`Dsql`](crate::credentials::Dsql), or an async closure. A source that names its
    /// [`target`](CredentialSource::target) sets the connector's.
    Source(Arc<dyn CredentialSource>),
}

impl Credentials {
    /// Credentials from any [`CredentialSource`], such as an async closure or
    /// [`Lakebase`](crate::credentials::Lakebase).
    pub fn source(source: impl CredentialSource) -> Self {
        Self::Source(Arc::new(source))
    }

    /// The kind of server these credentials are for, if only one kind accepts them.
    fn target(&self) -> Option<Target> {
        match self {
            Credentials::Password(_) => None,
            Credentials::Source(s) => s.target(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Password(_) => f.write_str("Password(** redacted **)"),
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
    /// Fetch a fresh token for every new connection (the JavaScript examples' `none`),
    /// except through the pause after a fresh token was refused too (see
    /// [`TokenCache::invalidate`](crate::TokenCache::invalidate)), when the connections get
    /// that token, and the server's refusal, at once. Cheap for Aurora DSQL, whose tokens
    /// are signed locally. The fetches run one at a
    /// time, as all of a cache's do: with a credential service over the network (Lakebase),
    /// connections opened together wait for each other's fetches.
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

/// Timing of refreshes and retries of the token cache.
///
/// Built by [`CacheSettings::builder`], which checks every value, or [`Default`]; so a
/// `CacheSettings` is always valid.
///
/// ```
/// use std::time::Duration;
/// let cache = dal::CacheSettings::builder()
///     .refresh_margin(Duration::from_secs(60))
///     .retries(5, Duration::from_millis(100), Duration::from_secs(5))
///     .build()?;
/// assert_eq!(cache.attempts(), 5);
///
/// let err = dal::CacheSettings::builder().jitter(0.9).build().unwrap_err();
/// assert_eq!(err.to_string(), "invalid setting cache jitter: must be a fraction between 0 and 0.5, such as 0.05");
/// # Ok::<(), dal::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub(crate) refresh_margin: Option<Duration>,
    pub(crate) jitter: f64,
    pub(crate) attempts: u32,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
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
    /// A builder starting from the defaults.
    pub fn builder() -> CacheSettingsBuilder {
        CacheSettingsBuilder(Self::default())
    }

    /// Refresh this long before expiry. `None` (the default): five minutes or a fifth of the
    /// token's life, whichever is shorter (a one-hour Lakebase credential is refreshed after
    /// 55 minutes, a 15-minute DSQL token after 12). A margin (with the jitter) as long as
    /// the token's life or longer is shortened to three quarters of it: a token is used for a
    /// quarter of its life at least.
    pub fn refresh_margin(&self) -> Option<Duration> {
        self.refresh_margin
    }

    /// Refresh up to this fraction of the token's life earlier still, at random, so that
    /// replicas started together do not refresh together. Defaults to 0.05.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Attempts per refresh before it is reported as failed. Defaults to 3.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// First pause between attempts, doubled after each failure. Defaults to 200 ms.
    pub fn min_backoff(&self) -> Duration {
        self.min_backoff
    }

    /// Longest pause between attempts, and between background refreshes after a failure.
    /// Defaults to 10 s.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }
}

/// Builds [`CacheSettings`]; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct CacheSettingsBuilder(CacheSettings);

impl CacheSettingsBuilder {
    /// Sets [`refresh_margin`](CacheSettings::refresh_margin), at most 365 days.
    #[must_use]
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.0.refresh_margin = Some(margin);
        self
    }

    /// Sets [`jitter`](CacheSettings::jitter), a fraction from 0 to 0.5.
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.0.jitter = fraction;
        self
    }

    /// Sets [`attempts`](CacheSettings::attempts) (at least 1),
    /// [`min_backoff`](CacheSettings::min_backoff) (more than zero) and
    /// [`max_backoff`](CacheSettings::max_backoff) (not below `min_backoff`, at most 365
    /// days).
    #[must_use]
    pub fn retries(mut self, attempts: u32, min_backoff: Duration, max_backoff: Duration) -> Self {
        self.0.attempts = attempts;
        self.0.min_backoff = min_backoff;
        self.0.max_backoff = max_backoff;
        self
    }

    /// The settings, or an [`Error::Config`] naming the first one out of range.
    pub fn build(self) -> Result<CacheSettings> {
        let s = self.0;
        if !(0.0..=0.5).contains(&s.jitter) {
            return Err(Error::config(
                Setting::CacheJitter,
                "must be a fraction between 0 and 0.5, such as 0.05",
            ));
        }
        if s.attempts == 0 {
            return Err(Error::config(Setting::CacheAttempts, "must be at least 1"));
        }
        if s.refresh_margin
            .is_some_and(|margin| margin > LONGEST_LIMIT)
        {
            return Err(Error::config(
                Setting::CacheRefreshMargin,
                "must be at most 365 days, such as 5 minutes",
            ));
        }
        if s.min_backoff.is_zero() || s.max_backoff > LONGEST_LIMIT {
            return Err(Error::config(
                Setting::CacheBackoff,
                "min_backoff must be more than zero (a failing service would be asked again at \
                 once, without end) and max_backoff at most 365 days, such as 200 ms and 10 s",
            ));
        }
        if s.min_backoff > s.max_backoff {
            return Err(Error::config(
                Setting::CacheBackoff,
                "min_backoff must not exceed max_backoff",
            ));
        }
        Ok(s)
    }
}

/// New connections per second, and how many may open at once above that rate (a token
/// bucket of `burst` tokens refilled at `per_second`).
///
/// ```
/// let rate = dal::ConnectionRate::new(100, 1000)?;
/// assert_eq!((rate.per_second(), rate.burst()), (100, 1000));
/// assert_eq!(rate, dal::ConnectionRate::DSQL);
///
/// let err = dal::ConnectionRate::new(0, 10).unwrap_err();
/// assert_eq!(err.to_string(), "invalid setting connection rate: the rate and the burst must be more than zero, such as 100 per second with bursts of 1000");
/// # Ok::<(), dal::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionRate {
    pub(crate) per_second: NonZeroU32,
    pub(crate) burst: NonZeroU32,
}

impl ConnectionRate {
    /// Aurora DSQL's documented limits per cluster: 100 new connections per second, bursts of
    /// 1,000 (Aurora DSQL user guide, "Cluster quotas and database limits"). Connections
    /// beyond them are refused with SQLSTATE `53400`.
    pub const DSQL: Self = Self {
        per_second: NonZeroU32::new(100).unwrap(),
        burst: NonZeroU32::new(1000).unwrap(),
    };

    /// `per_second` new connections per second, with bursts of `burst`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::ConnectionRate`] when either is zero.
    pub fn new(per_second: u32, burst: u32) -> Result<Self> {
        match (NonZeroU32::new(per_second), NonZeroU32::new(burst)) {
            (Some(per_second), Some(burst)) => Ok(Self { per_second, burst }),
            _ => Err(Error::config(
                Setting::ConnectionRate,
                "the rate and the burst must be more than zero, such as 100 per second with \
                 bursts of 1000",
            )),
        }
    }

    /// New connections per second.
    pub fn per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// Connections that may open at once above the rate.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }
}

/// Pool sizes and lifetimes.
///
/// Built by [`PoolSettings::builder`], which checks every value, or [`Default`]; so a
/// `PoolSettings` is always valid.
///
/// ```
/// use std::time::Duration;
/// let pool = dal::PoolSettings::builder()
///     .max_size(16)
///     .max_lifetime(Some(Duration::from_secs(600)))
///     .lifetime_jitter(0.2)
///     .build()?;
/// assert_eq!(pool.max_size(), 16);
///
/// let err = dal::PoolSettings::builder().max_size(2).min_idle(3).build().unwrap_err();
/// assert_eq!(err.to_string(), "invalid setting DAL_POOL_MIN_IDLE: must not exceed max_size (2)");
/// # Ok::<(), dal::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub(crate) max_size: u32,
    pub(crate) min_idle: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) lifetime_jitter: f64,
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
    /// The defaults for `target`. Aurora DSQL ends every connection after 60 minutes: its
    /// connections live 55 minutes, shortened by up to 5 at random (lifetime jitter 1/11) so
    /// they do not all end together, and close after 10 minutes idle, as the vendor's
    /// connectors do. Every other target gets [`PoolSettings::default`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let dsql = dal::PoolSettings::for_target(dal::Target::Dsql);
    /// assert_eq!(dsql.max_lifetime(), Some(Duration::from_secs(55 * 60)));
    /// assert_eq!(dsql.idle_timeout(), Some(Duration::from_secs(10 * 60)));
    /// ```
    pub fn for_target(target: Target) -> Self {
        match target {
            Target::Dsql => Self {
                max_lifetime: Some(Duration::from_secs(55 * 60)),
                lifetime_jitter: 1.0 / 11.0,
                idle_timeout: Some(Duration::from_secs(10 * 60)),
                ..Self::default()
            },
            Target::Postgres | Target::Lakebase => Self::default(),
        }
    }

    /// A builder starting from the defaults.
    pub fn builder() -> PoolSettingsBuilder {
        PoolSettingsBuilder(Self::default())
    }

    /// A builder starting from these settings.
    pub fn to_builder(&self) -> PoolSettingsBuilder {
        PoolSettingsBuilder(self.clone())
    }

    /// Most connections in the pool at once, from 1 to 262143 (the most sessions a
    /// PostgreSQL server can hold). Defaults to 10.
    ///
    /// A connection near its [`max_lifetime`](Self::max_lifetime) has its replacement opened
    /// ahead, beside it: while connections are renewed, the server sees more sessions of the
    /// pool, up to about twice as many (the README's "Logins off the request path").
    pub fn max_size(&self) -> u32 {
        self.max_size
    }

    /// Connections kept open while idle. Defaults to 0, so that Lakebase can scale to zero.
    pub fn min_idle(&self) -> u32 {
        self.min_idle
    }

    /// How long to wait for a connection before failing. Defaults to 10 s. In dal's bb8
    /// pools (SeaORM, Diesel, tokio-postgres), half of it bounds each round trip the pool
    /// makes for itself (the check of a connection at checkout, the `ROLLBACK` of a SeaORM
    /// transaction dropped while open): a connection with no answer by then is closed, and
    /// the other half is left for the login of another.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// Close connections idle this long. Defaults to 270 s, below Lakebase's 300 s
    /// scale-to-zero window (as its JavaScript examples do).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Close connections this old. Defaults to 25 min (55 min for Aurora DSQL, see
    /// [`for_target`](Self::for_target)). dal's bb8 pools open each connection's replacement
    /// in the background ahead of its end (a quarter of the lifetime, at most 30 s, or three
    /// times the slowest recent login if that is longer, up to half the lifetime) and swap it
    /// in as the old one comes back or goes out, so that no request waits for a login. No
    /// pool hands out a connection past its lifetime, except that one whose replacement is
    /// still logging in serves on until it arrives, for at most the lifetime again (so that
    /// a login slower than a short lifetime stays off the request path too) and at most 30 s:
    /// keep the lesser of twice the lifetime and the lifetime plus 30 s below any limit the
    /// server enforces. A connection that reaches its end idle is closed in the background
    /// within a tenth of the shorter of this and [`idle_timeout`](Self::idle_timeout) (at
    /// most 30 s); the connections that keep [`min_idle`](Self::min_idle) log in ahead of the
    /// ends of those they follow.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
    }

    /// Shorten `max_lifetime` by up to this fraction, at random per connection (per pool for
    /// the plain sqlx pool), so that connections opened together do not reconnect together.
    /// Defaults to 0.1.
    pub fn lifetime_jitter(&self) -> f64 {
        self.lifetime_jitter
    }

    /// The lifetime of one pool's connections, jitter applied.
    pub(crate) fn jittered_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
            .map(|l| l.mul_f64(1.0 - self.lifetime_jitter * fastrand::f64()))
    }
}

/// The longest `max_lifetime`, `idle_timeout` and `connect_timeout`: a year, far past any
/// server's limit, and near enough that an instant that far ahead can always be counted.
pub(crate) const LONGEST_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Builds [`PoolSettings`]; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct PoolSettingsBuilder(PoolSettings);

/// The most sessions a PostgreSQL server can hold (its `MAX_BACKENDS`, in
/// `src/include/postmaster/postmaster.h`): a pool larger than that can never fill, and sqlx's
/// pool takes memory for every connection it may hold when built.
const MAX_BACKENDS: u32 = 0x3FFFF;

impl PoolSettingsBuilder {
    /// Sets [`max_size`](PoolSettings::max_size), from 1 to 262143.
    #[must_use]
    pub fn max_size(mut self, n: u32) -> Self {
        self.0.max_size = n;
        self
    }

    /// Sets [`min_idle`](PoolSettings::min_idle), at most `max_size`.
    #[must_use]
    pub fn min_idle(mut self, n: u32) -> Self {
        self.0.min_idle = n;
        self
    }

    /// Sets [`acquire_timeout`](PoolSettings::acquire_timeout), more than zero and at most 365
    /// days.
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.0.acquire_timeout = timeout;
        self
    }

    /// Sets [`idle_timeout`](PoolSettings::idle_timeout), more than zero and at most 365
    /// days; `None` keeps idle connections.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.0.idle_timeout = timeout;
        self
    }

    /// Sets [`max_lifetime`](PoolSettings::max_lifetime), more than zero and at most 365
    /// days; `None` keeps connections forever. Aurora DSQL ends every connection after 60
    /// minutes: its connectors refuse a lifetime of none or over 3570 s.
    #[must_use]
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.0.max_lifetime = lifetime;
        self
    }

    /// Sets [`lifetime_jitter`](PoolSettings::lifetime_jitter), a fraction from 0 up to
    /// (not including) 1.
    #[must_use]
    pub fn lifetime_jitter(mut self, fraction: f64) -> Self {
        self.0.lifetime_jitter = fraction;
        self
    }

    /// The settings, or an [`Error::Config`] naming the first one out of range.
    pub fn build(self) -> Result<PoolSettings> {
        let s = self.0;
        if s.max_size == 0 || s.max_size > MAX_BACKENDS {
            return Err(Error::config(
                Setting::PoolMaxSize,
                format!(
                    "must be from 1 to {MAX_BACKENDS}, the most sessions a PostgreSQL server \
                     can hold, such as 10"
                ),
            ));
        }
        if s.min_idle > s.max_size {
            return Err(Error::config(
                Setting::PoolMinIdle,
                format!("must not exceed max_size ({})", s.max_size),
            ));
        }
        if s.acquire_timeout.is_zero() || s.acquire_timeout > LONGEST_LIMIT {
            return Err(Error::config(
                Setting::PoolAcquireTimeout,
                "must be more than zero and at most 365 days, such as 10 s",
            ));
        }
        for (setting, limit) in [
            (Setting::PoolMaxLifetime, s.max_lifetime),
            (Setting::PoolIdleTimeout, s.idle_timeout),
        ] {
            if limit.is_some_and(|d| d.is_zero() || d > LONGEST_LIMIT) {
                return Err(Error::config(
                    setting,
                    "must be more than zero and at most 365 days, or none (0 in the \
                     environment) to keep connections",
                ));
            }
        }
        if !(0.0..1.0).contains(&s.lifetime_jitter) {
            return Err(Error::config(
                Setting::PoolLifetimeJitter,
                "must be a fraction from 0 up to (not including) 1, such as 0.1",
            ));
        }
        Ok(s)
    }
}

/// Everything a [`Connector`](crate::Connector) needs. Set fields directly or with the
/// `#[must_use]` setters; [`Config::from_env`] reads the usual environment variables.
///
/// Its parts are checked where they are built: [`PoolSettings`] and [`CacheSettings`] by
/// their builders, the rest (required values, a target that contradicts the credentials, the
/// CA file) by [`Connector::new`](crate::Connector::new), which is this builder's `build`.
///
/// ```
/// use std::time::Duration;
/// let config = dal::Config::new("db.internal.example.com", "app")
///     .password("secret")
///     // Connect to this address; verify the certificate as db.internal.example.com.
///     .hostaddr([10, 0, 0, 7].into())
///     .connect_timeout(Duration::from_secs(5))
///     .pool(dal::PoolSettings::builder().max_size(20).lifetime_jitter(0.2).build()?);
/// assert_eq!(config.connect_timeout, Duration::from_secs(5));
/// # Ok::<(), dal::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The server's host name. Required.
    pub host: String,
    /// Connect to this address instead of resolving `host`, which still names the server for
    /// TLS verification (libpq's `hostaddr`), by every pool. sqlx (the SeaORM and plain sqlx
    /// pools) also reads `PGHOSTADDR` from the environment: with none configured here, a
    /// `PGHOSTADDR` in the environment makes those pools fail to build rather than connect
    /// elsewhere than the others (so does any `PGOPTIONS`, and with TLS on any `PGSSLCERT`
    /// or `PGSSLKEY`; a
    /// `PGSSLROOTCERT` gives way to the configured CA, or to none). Defaults to none.
    pub hostaddr: Option<std::net::IpAddr>,
    /// The server's port, from 1 to 65535 (the connector refuses 0). Defaults to 5432.
    pub port: u16,
    /// The database. Defaults to `postgres`.
    pub database: String,
    /// The user (role). Required.
    pub user: String,
    /// Where passwords come from. Required.
    pub credentials: Option<Credentials>,
    /// The kind of server. Defaults to `None`: the target of the credentials (Lakebase
    /// credentials mean [`Target::Lakebase`], DSQL tokens [`Target::Dsql`]), else the host
    /// name's ([`Target::of_host`]), otherwise [`Target::Postgres`]. A target that
    /// contradicts the credentials is refused.
    pub target: Option<Target>,
    /// TLS use. Defaults to `verify-full` for Lakebase and DSQL, and with `sslrootcert=system`
    /// (see [`ssl_root_cert`](Self::ssl_root_cert)); `prefer` otherwise. Lakebase and DSQL
    /// refuse `disable` and `prefer` but over loopback ([`Error::Config`](crate::Error::Config)
    /// for [`Setting::SslMode`](crate::Setting::SslMode)).
    pub ssl_mode: Option<SslMode>,
    /// CA certificates (PEM) to verify the server with. Defaults to the Mozilla roots, which
    /// only `verify-full` may use (see [`SslMode::VerifyCa`]); libpq's `system` names them
    /// too, and makes `verify-full` the default mode, as in libpq. Two differences from
    /// libpq: `system` means the Mozilla roots built into dal, not the operating system's
    /// store (a CA installed there alone is not trusted: name its PEM file), and libpq's
    /// default file `~/.postgresql/root.crt` is not read.
    pub ssl_root_cert: Option<PathBuf>,
    /// Sent in the startup packet. Defaults to the [product](Self::product) when there is
    /// one, else [`DEFAULT_APPLICATION_NAME`].
    pub application_name: String,
    /// The product this program is, as the Lakebase partner guide asks each integration to
    /// name itself: `<isv-name_product-name>/<product-version>`, such as `acme_orders/2.1`
    /// (`DAL_PRODUCT`). It becomes the default `application_name`; give it to the Lakebase
    /// credential source too ([`Lakebase::with_product`](crate::credentials::Lakebase::with_product),
    /// done for you by [`Config::from_env`]) so that its HTTP `User-Agent` names it. Defaults to
    /// none.
    pub product: Option<String>,
    /// The schema search path of every connection, sent in the startup packet. Defaults to
    /// none (the server's), except for non-admin DSQL roles: their own schema.
    pub search_path: Option<String>,
    /// Statement timeout of every connection, from 1 ms to `i32::MAX` ms (PostgreSQL's
    /// range; the connector refuses others). Defaults to none (the server's).
    pub statement_timeout: Option<Duration>,
    /// Time allowed to open one connection at one endpoint: its token, TLS and login, and a
    /// second login after a refused token or a server's connection limit, all included (the
    /// wait for the [`connection_rate`](Self::connection_rate) aside). With
    /// [failover](Self::failover), each endpoint tried has as long. More than zero and at
    /// most 365 days (the connector refuses others). Defaults to 10 s.
    pub connect_timeout: Duration,
    /// How fast this process opens new connections to this host and port, across every
    /// connector and pool: each connection waits for its place. Defaults to `None`: no limit,
    /// except for [`Target::Dsql`], whose documented limit is [`ConnectionRate::DSQL`].
    pub connection_rate: Option<ConnectionRate>,
    /// When tokens are fetched. Defaults to [`TokenStrategy::Eager`].
    pub strategy: TokenStrategy,
    /// Refresh and retry timing of the token cache.
    pub cache: CacheSettings,
    /// The host of a read-only endpoint beside this one (a Lakebase read replica, a PostgreSQL
    /// standby): [`Connector::read_only`](crate::Connector::read_only) connects there, with
    /// the same port, database, user, TLS and token cache (`DAL_READ_ONLY_HOST`). Defaults to
    /// none. Refused for [`Target::Dsql`], whose tokens are signed for the cluster endpoint's
    /// host and which has no read-only endpoint.
    pub read_only_host: Option<String>,
    /// Other endpoints of the same database, such as the peers of an Aurora DSQL
    /// multi-region cluster ([`Config::dsql_multi_region`]): when this endpoint cannot be
    /// reached, each new connection tries them in order, and the first where one opens
    /// becomes the endpoint of every pool (SeaORM's included) until it fails in turn. An
    /// active endpoint that refuses a login, or refuses a connection for a limit (`53300`,
    /// `53400`: busy, but answering), is no reason to move: its refusal is the connection's
    /// answer (a peer's refusal, met once the active endpoint is out of reach, passes the
    /// search on to the next). Each has its own
    /// host, port, user and credentials (a DSQL token is signed for one endpoint and its
    /// region); their own `failover` must be empty. Every other setting each leaves at its
    /// default (the database, the session's settings, TLS, the token cache's, the connection
    /// rate) is this one's. When none opens one, the connection fails with
    /// [`Error::AllEndpointsFailed`](crate::Error::AllEndpointsFailed), each one's failure in
    /// it. Defaults to none.
    pub failover: Vec<Config>,
    /// Pool sizes and lifetimes. Defaults to [`PoolSettings::for_target`] of the
    /// [target](Self::resolved_target): a `pool` equal to [`PoolSettings::default`] as a
    /// whole is replaced by the target's; any other is used as it is. To change one setting
    /// of a target's, start from them:
    /// `PoolSettings::for_target(Target::Dsql).to_builder().max_size(20).build()?`.
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
            target: None,
            ssl_mode: None,
            ssl_root_cert: None,
            application_name: DEFAULT_APPLICATION_NAME.into(),
            product: None,
            search_path: None,
            statement_timeout: None,
            connect_timeout: Duration::from_secs(10),
            connection_rate: None,
            failover: Vec::new(),
            read_only_host: None,
            strategy: TokenStrategy::default(),
            cache: CacheSettings::default(),
            pool: PoolSettings::default(),
        }
    }

    /// A configuration for `user` on an Aurora DSQL cluster, with IAM tokens signed by the
    /// standard AWS credential chain. `endpoint` is the cluster endpoint
    /// (`{cluster-id}.dsql.{region}.on.aws`) or the bare 26-character cluster id, which is
    /// expanded with the region from `AWS_REGION` (or `AWS_DEFAULT_REGION`). User `admin` signs
    /// `DbConnectAdmin` tokens and works in schema `public`; any other role signs `DbConnect`
    /// and works in its own schema. The target's defaults follow: `verify-full`, DSQL's
    /// [pool lifetimes](PoolSettings::for_target) and [connection rate](ConnectionRate::DSQL).
    ///
    /// ```
    /// let config = dal::Config::dsql("abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws", "admin")?;
    /// assert_eq!(config.host, "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws");
    /// assert_eq!(config.resolved_target()?, dal::Target::Dsql);
    /// # Ok::<(), dal::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`Dsql::new`](crate::credentials::Dsql::new): an empty or
    /// malformed endpoint or user, or no region for a bare cluster id.
    #[cfg(feature = "dsql")]
    pub fn dsql(endpoint: &str, user: &str) -> Result<Self> {
        let source = crate::credentials::Dsql::new(endpoint, user, None)?;
        Ok(Self::new(source.host(), user).credentials(Credentials::source(source)))
    }

    /// A configuration for `user` on an Aurora DSQL multi-region cluster: the endpoints of its
    /// peered clusters, each as [`Config::dsql`] takes it. The nearest comes first (the one
    /// in `AWS_REGION`, else the first given) and the others become its
    /// [`failover`](Self::failover), each with tokens signed for its own endpoint and region.
    ///
    /// ```
    /// let config = dal::Config::dsql_multi_region(
    ///     &["aaaaaaaaaaaaaaaaaaaaaaaaaa.dsql.us-east-1.on.aws", "bbbbbbbbbbbbbbbbbbbbbbbbbb.dsql.us-east-2.on.aws"],
    ///     "admin",
    /// )?;
    /// assert_eq!(config.failover.len(), 1);
    /// # Ok::<(), dal::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Config::dsql`] for each endpoint; [`Error::Config`] for [`Setting::Failover`]
    /// when `endpoints` is empty.
    #[cfg(feature = "dsql")]
    pub fn dsql_multi_region(endpoints: &[&str], user: &str) -> Result<Self> {
        let here = std::env::var("AWS_REGION").ok();
        let mut peers = Vec::new();
        for endpoint in endpoints {
            let source = crate::credentials::Dsql::new(endpoint, user, None)?;
            let near = here.as_deref() == Some(source.region());
            peers.push((
                near,
                Self::new(source.host(), user).credentials(Credentials::source(source)),
            ));
        }
        // Stable: the nearest first, the others in the order given.
        peers.sort_by_key(|(near, _)| !near);
        let mut peers = peers.into_iter().map(|(_, config)| config);
        let first = peers.next().ok_or_else(|| {
            Error::config(
                Setting::Failover,
                "no endpoint: give the endpoints of the cluster's peers, nearest first",
            )
        })?;
        Ok(peers.fold(first, Self::failover))
    }

    /// The kind of server: [`target`](Self::target) if set, else the credentials' own
    /// ([`CredentialSource::target`]), else the host's ([`Target::of_host`]: a static
    /// password for a Lakebase or Aurora DSQL host, a Postgres role there or a token pasted
    /// in), else [`Target::Postgres`]. The target brings its defaults: `verify-full` TLS
    /// on Lakebase and DSQL, and DSQL's guards.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::Target`] when `target` contradicts the credentials,
    /// such as [`Target::Postgres`] with Lakebase credentials.
    ///
    /// ```
    /// use dal::{Config, Credentials, Target, credentials::Token};
    /// # #[derive(Clone)] struct Dsqlish;
    /// # impl dal::credentials::CredentialSource for Dsqlish {
    /// #     fn fetch(&self) -> dal::credentials::BoxFuture<'_, dal::Result<Token>> { Box::pin(async { Ok(Token::new("t", None)) }) }
    /// #     fn target(&self) -> Option<Target> { Some(Target::Dsql) }
    /// # }
    /// let config = Config::new("db.example.com", "admin").credentials(Credentials::source(Dsqlish));
    /// assert_eq!(config.resolved_target()?, Target::Dsql);
    ///
    /// let contradiction = config.target(Target::Lakebase).resolved_target().unwrap_err();
    /// assert!(contradiction.to_string().starts_with("invalid setting target: Databricks Lakebase"));
    ///
    /// let pasted = Config::new("ep-a.database.us-east-1.cloud.databricks.com", "me").password("t");
    /// assert_eq!(pasted.resolved_target()?, Target::Lakebase);
    /// # Ok::<(), dal::Error>(())
    /// ```
    pub fn resolved_target(&self) -> Result<Target> {
        let implied = self.credentials.as_ref().and_then(Credentials::target);
        match (self.target, implied) {
            (Some(set), Some(implied)) if set != implied => Err(Error::config(
                Setting::Target,
                format!(
                    "{set} contradicts the credentials, which are for {implied}: remove the \
                     target setting or set it to {implied}"
                ),
            )),
            (Some(set), _) => Ok(set),
            (None, implied) => Ok(implied
                .or_else(|| Target::of_host(&self.host))
                .unwrap_or(Target::Postgres)),
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
        self.target = Some(target);
        self
    }

    /// Sets [`hostaddr`](Self::hostaddr): connect to `addr`, and verify the server as `host`.
    #[must_use]
    pub fn hostaddr(mut self, addr: std::net::IpAddr) -> Self {
        self.hostaddr = Some(addr);
        self
    }

    /// Sets [`read_only_host`](Self::read_only_host).
    #[must_use]
    pub fn read_only_host(mut self, host: impl Into<String>) -> Self {
        self.read_only_host = Some(host.into());
        self
    }

    /// Adds `peer` to [`failover`](Self::failover).
    #[must_use]
    pub fn failover(mut self, peer: Config) -> Self {
        self.failover.push(peer);
        self
    }

    /// Sets [`product`](Self::product), checked by [`Connector::new`](crate::Connector::new).
    #[must_use]
    pub fn product(mut self, product: impl Into<String>) -> Self {
        self.product = Some(product.into());
        self
    }

    /// Sets [`connection_rate`](Self::connection_rate).
    #[must_use]
    pub fn connection_rate(mut self, rate: ConnectionRate) -> Self {
        self.connection_rate = Some(rate);
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout); [`Connector::new`](crate::Connector::new)
    /// refuses zero.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
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

#[cfg(test)]
impl Config {
    /// Host, port, user and database, for a test to compare at once.
    pub(crate) fn address(&self) -> (&str, u16, &str, &str) {
        (&self.host, self.port, &self.user, &self.database)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{BoxFuture, Token};

    /// A source whose tokens only one kind of server takes.
    struct For(Target);

    impl CredentialSource for For {
        fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
            Box::pin(async { Ok(Token::new("t", None)) })
        }

        fn target(&self) -> Option<Target> {
            Some(self.0)
        }
    }

    fn setting_of(result: Result<impl fmt::Debug>) -> Setting {
        match result {
            Err(Error::Config { setting, .. }) => setting,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn the_target_comes_from_the_credentials_unless_set() {
        let base = Config::new("db", "u");
        assert_eq!(
            base.clone().password("p").resolved_target().unwrap(),
            Target::Postgres
        );
        let lakebase = base
            .clone()
            .credentials(Credentials::source(For(Target::Lakebase)));
        assert_eq!(lakebase.resolved_target().unwrap(), Target::Lakebase);
        let agreed = lakebase.clone().target(Target::Lakebase);
        assert_eq!(agreed.resolved_target().unwrap(), Target::Lakebase);
        // A password works with any target it is told.
        let told = base.password("p").target(Target::Dsql);
        assert_eq!(told.resolved_target().unwrap(), Target::Dsql);
    }

    #[test]
    fn a_target_that_contradicts_the_credentials_is_refused_not_replaced() {
        let config = Config::new("db", "u")
            .credentials(Credentials::source(For(Target::Dsql)))
            .target(Target::Postgres);
        let err = config.resolved_target().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting target: PostgreSQL contradicts the credentials, which are for \
             Aurora DSQL: remove the target setting or set it to Aurora DSQL"
        );
    }

    #[test]
    fn pool_settings_are_checked_when_built() {
        let b = PoolSettings::builder;
        assert_eq!(setting_of(b().max_size(0).build()), Setting::PoolMaxSize);
        // sqlx's pool takes a slot for each at once: 4294967295 asked for about 200 GB.
        let huge = b().max_size(u32::MAX).build().unwrap_err().to_string();
        assert!(
            huge.contains("DAL_POOL_MAX_SIZE") && huge.contains("262143"),
            "{huge}"
        );
        assert_eq!(b().max_size(262_143).build().unwrap().max_size(), 262_143);
        assert_eq!(
            setting_of(b().max_size(2).min_idle(3).build()),
            Setting::PoolMinIdle
        );
        // Duration::MAX, "wait forever", overflowed the deadline at the first checkout.
        for timeout in [Duration::ZERO, Duration::MAX] {
            assert_eq!(
                setting_of(b().acquire_timeout(timeout).build()),
                Setting::PoolAcquireTimeout
            );
        }
        for jitter in [-0.1, 1.0, f64::NAN] {
            assert_eq!(
                setting_of(b().lifetime_jitter(jitter).build()),
                Setting::PoolLifetimeJitter
            );
        }
        // bb8 panics on a zero idle timeout, and a lifetime past what an `Instant` can count
        // panicked as the first connection opened.
        for wrong in [
            Duration::ZERO,
            Duration::from_secs(366 * 24 * 3600),
            Duration::MAX,
        ] {
            assert_eq!(
                setting_of(b().idle_timeout(Some(wrong)).build()),
                Setting::PoolIdleTimeout
            );
            assert_eq!(
                setting_of(b().max_lifetime(Some(wrong)).build()),
                Setting::PoolMaxLifetime
            );
        }
        let err = b().max_lifetime(Some(Duration::ZERO)).build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting DAL_POOL_MAX_LIFETIME_SECS: must be more than zero and at most 365 \
             days, or none (0 in the environment) to keep connections"
        );
        let built = b()
            .max_size(4)
            .min_idle(4)
            .lifetime_jitter(0.0)
            .max_lifetime(Some(Duration::from_secs(60)))
            .build()
            .unwrap();
        assert_eq!((built.max_size(), built.min_idle()), (4, 4));
        assert_eq!(built.jittered_lifetime(), Some(Duration::from_secs(60)));
        let again = built.to_builder().max_size(8).build().unwrap();
        assert_eq!((again.max_size(), again.min_idle()), (8, 4));
    }

    #[test]
    fn the_defaults_are_what_the_builders_give() {
        let pool = PoolSettings::builder().build().unwrap();
        assert_eq!(
            format!("{pool:?}"),
            format!("{:?}", PoolSettings::default())
        );
        let cache = CacheSettings::builder().build().unwrap();
        assert_eq!(
            format!("{cache:?}"),
            format!("{:?}", CacheSettings::default())
        );
    }

    #[test]
    fn every_connection_setting_has_a_setter() {
        let addr = std::net::IpAddr::from([127, 0, 0, 1]);
        let config = Config::new("db.example.com", "u")
            .hostaddr(addr)
            .connect_timeout(Duration::from_secs(3));
        assert_eq!(config.hostaddr, Some(addr));
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
    }
}
