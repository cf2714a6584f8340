//! The shared driver layer: one validated configuration, one token cache, TLS, and the
//! per-connection settings, from which every pool is built.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::ExposeSecret;
use tokio::time::Instant;
use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;

#[cfg(feature = "diesel")]
use diesel_async::AsyncPgConnection;
#[cfg(feature = "seaorm")]
use sea_orm::sqlx::postgres::{PgConnectOptions, PgPool};

use crate::config::{Config, ConnectionRate, Credentials, LONGEST_LIMIT, PoolSettings};
use crate::credentials::{CredentialSource, StaticPassword, Token};
use crate::error::{Error, ErrorChain, Result, Setting, refuses_certificate, rustls_error};
#[cfg(feature = "diesel")]
use crate::pool::DieselPool;
#[cfg(feature = "seaorm")]
use crate::pool::SeaOrmPool;
use crate::pool::{self, Open, PgClientPool, Registry};
use crate::rate_limit::ConnectLimiter;
use crate::retry::Backoff;
use crate::target::Target;
use crate::telemetry::{self, Health};
use crate::tls::{CloseNotify, SslMode, Tls};
use crate::token_cache::TokenCache;

/// Pauses before trying a connection again that the server refused for a limit (`53300`,
/// `53400`): from 20 ms, doubling to 1 s, with 25 % jitter, within the connect timeout. At
/// Aurora DSQL's refill of 100 connections per second, a place frees every 10 ms.
const SERVER_LIMIT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(20), Duration::from_secs(1), 0.25);

/// The half of a tokio-postgres connection that talks to the server, over dal's TLS: spawn
/// it (`tokio::spawn(connection)`) next to its [`Client`](tokio_postgres::Client). Returned
/// by [`Connector::connect`].
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        tokio_postgres::Socket,
    >>::Stream,
>;

/// Opens database connections with a fresh token each, and builds the pools.
///
/// Cheap to clone: clones share the token cache. Build one per database and keep it for the
/// life of the program; [`shutdown`](Self::shutdown) stops its background work.
///
/// ```no_run
/// # async fn demo() -> dal::Result<()> {
/// let connector = dal::Connector::new(dal::Config::from_env()?).await?;
/// # #[cfg(feature = "seaorm")]
/// let db = connector.seaorm().await?;          // dal::SeaOrmPool, for SeaORM
/// # #[cfg(feature = "diesel")] {
/// let diesel = connector.diesel_pool().await?; // bb8 pool of diesel-async connections
/// let mut conn = diesel.get().await?;
/// # }
/// let raw = connector.postgres_pool().await?;  // bb8 pool of tokio-postgres clients
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connector {
    shared: Arc<Shared>,
}

struct Shared {
    target: Target,
    host: String,
    hostaddr: Option<std::net::IpAddr>,
    port: u16,
    database: String,
    user: String,
    tls: Tls,
    application_name: String,
    search_path: Option<String>,
    statement_timeout: Option<Duration>,
    connect_timeout: Duration,
    /// The process-wide limit on new connections to this endpoint, if any.
    limiter: Option<ConnectLimiter>,
    pool: PoolSettings,
    cache: TokenCache,
    pools: Registry,
    opened: AtomicU64,
    /// A recent refusal of a connect for the server's limit (`53300`, `53400`), and when,
    /// while connects wait to try again: what holds up a pool's openings (see
    /// [`Error::PoolTimeout`]). A connect that was refused again notes the refusal before
    /// its last, which it keeps to return. Cleared when a connection opens.
    limited: std::sync::Mutex<Option<(Instant, Arc<Error>)>>,
    shut_down: AtomicBool,
    /// The other endpoints of the database ([`Config::failover`]), each a connector of its
    /// own (without peers).
    peers: Vec<Connector>,
    /// The endpoint new connections go to first: 0 for this one, `i` for `peers[i - 1]`.
    active: Arc<AtomicUsize>,
    /// The sqlx pools built here, which follow the active endpoint (see
    /// [`Connector::sqlx_pools`]).
    #[cfg(feature = "seaorm")]
    sqlx_pools: std::sync::Mutex<Vec<PgPool>>,
    /// sqlx's options for this endpoint, once built (see [`Connector::sqlx_options`]).
    #[cfg(feature = "seaorm")]
    sqlx_options: std::sync::OnceLock<PgConnectOptions>,
    /// The host of the read-only endpoint ([`Config::read_only_host`]).
    read_only_host: Option<String>,
    /// Whether every session is read-only (`default_transaction_read_only`).
    read_only: bool,
    /// The read-only connector, once asked for.
    replica: std::sync::OnceLock<Connector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.shared;
        f.debug_struct("Connector")
            .field("target", &s.target)
            .field("host", &s.host)
            .field("port", &s.port)
            .field("database", &s.database)
            .field("user", &s.user)
            .field("ssl_mode", &s.tls.mode)
            .field("application_name", &s.application_name)
            .field("search_path", &s.search_path)
            .field("cache", &s.cache)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Validates `config`, builds the credential source and cache, and starts the cache (the
    /// eager strategy fetches its first token now, so a bad credential fails here).
    ///
    /// A configuration without a host takes the one its credential source looks up
    /// ([`CredentialSource::database_host`]: a Lakebase endpoint's or instance's); one
    /// without a user, the user its source looks up ([`CredentialSource::database_user`]:
    /// the Databricks user a workspace token belongs to).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the setting that is missing, out of range or contradicts
    /// another: on Aurora DSQL, which ends every connection after 60 minutes, a pool lifetime
    /// of none or over 3570 s, say. The source's errors when the eager strategy's first fetch
    /// fails.
    pub async fn new(mut config: Config) -> Result<Self> {
        if config.host.trim().is_empty()
            && let Some(Credentials::Source(source)) = &config.credentials
            && let Some(host) = source.database_host().await?
        {
            tracing::info!(%host, source = source.kind(), "database host looked up");
            config.host = host;
        }
        if config.user.trim().is_empty()
            && let Some(Credentials::Source(source)) = &config.credentials
            && let Some(user) = source.database_user().await?
        {
            tracing::info!(%user, source = source.kind(), "database user looked up");
            config.user = user;
        }
        let connector = Self::build(config)?;
        connector.shared.cache.start().await?;
        for peer in &connector.shared.peers {
            peer.shared.cache.start().await?;
        }
        Ok(connector)
    }

    pub(crate) fn build(mut config: Config) -> Result<Self> {
        let peers = std::mem::take(&mut config.failover)
            .into_iter()
            .map(|mut peer| {
                if !peer.failover.is_empty() {
                    return Err(Error::config(
                        Setting::Failover,
                        "a failover endpoint has failover endpoints of its own: list every \
                         endpoint once, on the first",
                    ));
                }
                take_shared_settings(&mut peer, &config);
                Self::build(peer)
            })
            .collect::<Result<Vec<_>>>()?;
        if config.host.trim().is_empty() {
            return Err(Error::config(
                Setting::Host,
                "the database host is required",
            ));
        }
        check_host(Setting::Host, &config.host)?;
        if let Some(host) = config.read_only_host.as_deref().map(str::trim)
            && !host.is_empty()
        {
            check_host(Setting::ReadOnlyHost, host)?;
        }
        if config.user.trim().is_empty() {
            return Err(Error::config(
                Setting::User,
                "the database user is required",
            ));
        }
        if config.database.trim().is_empty() {
            return Err(Error::config(
                Setting::Database,
                "the database name is required",
            ));
        }
        if config.connect_timeout.is_zero() || config.connect_timeout > LONGEST_LIMIT {
            return Err(Error::config(
                Setting::ConnectTimeout,
                "must be more than zero and at most 365 days, such as 10 s",
            ));
        }
        let target = config.resolved_target()?;
        if target == Target::Dsql && config.read_only_host.is_some() {
            return Err(Error::config(
                Setting::ReadOnlyHost,
                "is set for Aurora DSQL, whose IAM tokens are signed for the cluster endpoint's \
                 host and would be sent to the read-only one: DSQL has no read-only endpoint; \
                 unset it, and give another cluster's endpoint as a failover endpoint \
                 (Config::failover) with credentials of its own",
            ));
        }
        let source: Arc<dyn CredentialSource> = match config.credentials {
            Some(Credentials::Password(p)) => {
                check_password(p.expose_secret())?;
                Arc::new(StaticPassword::new(p.expose_secret()))
            }
            Some(Credentials::Source(s)) => s,
            None => {
                return Err(Error::config(
                    Setting::Credentials,
                    "no password or token source: set PGPASSWORD or DATABASE_URL, Lakebase \
                     (DATABRICKS_HOST with LAKEBASE_ENDPOINT or LAKEBASE_INSTANCE) or DSQL \
                     (DSQL_ENDPOINT) settings",
                ));
            }
        };
        // libpq's `sslrootcert=system`: the public roots, from which anyone can get a
        // certificate for a name they hold, so only `verify-full` (the default it brings) may
        // use them (libpq: "weak sslmode may not be used with sslrootcert=system").
        let system = config
            .ssl_root_cert
            .as_deref()
            .is_some_and(|path| path.as_os_str() == "system");
        let ssl_mode = config.ssl_mode.unwrap_or(match target {
            _ if system => SslMode::VerifyFull,
            Target::Postgres => SslMode::Prefer,
            Target::Lakebase | Target::Dsql => SslMode::VerifyFull,
        });
        // Lakebase and Aurora DSQL take TLS alone (the Databricks and AWS connection
        // documentation): a mode that can go on without it sends the secret to whoever answers
        // in plain text. Not so over loopback, to a proxy on this machine that carries the
        // connection on over TLS.
        let loopback = match config.hostaddr {
            Some(addr) => addr.is_loopback(),
            None => {
                config.host.eq_ignore_ascii_case("localhost")
                    || config
                        .host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|addr| addr.is_loopback())
            }
        };
        if target != Target::Postgres
            && !loopback
            && matches!(ssl_mode, SslMode::Disable | SslMode::Prefer)
        {
            return Err(Error::config(
                Setting::SslMode,
                format!(
                    "{ssl_mode} may not be used with {target}, which takes TLS alone: {ssl_mode} \
                     can send the token or password without TLS to whoever answers; leave \
                     sslmode unset (it defaults to verify-full there), or set verify-full \
                     (a proxy on this machine may be reached without TLS over loopback)"
                ),
            ));
        }
        if system && ssl_mode != SslMode::VerifyFull {
            return Err(Error::config(
                Setting::SslMode,
                format!(
                    "{ssl_mode} may not be used with sslrootcert=system: anyone can get a \
                     publicly trusted certificate for a name they hold, so only verify-full \
                     verifies the server against the public roots; use verify-full, or set \
                     sslrootcert to the CA that signed the server's certificate"
                ),
            ));
        }
        let root_cert = config.ssl_root_cert.as_deref().filter(|_| !system);
        let tls = Tls::new(ssl_mode, root_cert)?;
        // A DSQL role's own schema: quoted, since the server folds an unquoted name to lower
        // case (role `AppUser` owns schema "AppUser", not appuser).
        let search_path = config.search_path.or_else(|| {
            (target == Target::Dsql && config.user != "admin").then(|| quote_ident(&config.user))
        });
        let mut application_name = config.application_name;
        if let Some(product) = &config.product {
            crate::telemetry::check_product(product)?;
            if application_name == crate::config::DEFAULT_APPLICATION_NAME {
                application_name = product.clone();
            }
        }
        if config.port == 0 {
            return Err(Error::config(
                Setting::Port,
                "is 0: a port is a number from 1 to 65535",
            ));
        }
        // PostgreSQL takes whole milliseconds up to i32::MAX, and 0 turns the timeout off.
        if let Some(timeout) = config.statement_timeout
            && !(Duration::from_millis(1)..=Duration::from_millis(i32::MAX as u64))
                .contains(&timeout)
        {
            return Err(Error::config(
                Setting::StatementTimeout,
                "must be from 1 ms to 2147483647 ms (about 24.8 days), such as 30000",
            ));
        }
        for (setting, value) in [
            (Setting::User, Some(&config.user)),
            (Setting::Database, Some(&config.database)),
            (Setting::ApplicationName, Some(&application_name)),
            (Setting::SearchPath, search_path.as_ref()),
        ] {
            if let Some(value) = value {
                check_startup_value(setting, value)?;
            }
        }
        let pool = if config.pool == PoolSettings::default() {
            PoolSettings::for_target(target)
        } else {
            config.pool
        };
        check_pool_lifetime(target, &pool)?;
        let cache = TokenCache::new(source, config.strategy, config.cache);
        let rate = config
            .connection_rate
            .or((target == Target::Dsql).then_some(ConnectionRate::DSQL));
        let limiter = rate.map(|rate| ConnectLimiter::shared(&config.host, config.port, rate));
        Ok(Self {
            shared: Arc::new(Shared {
                target,
                host: config.host,
                hostaddr: config.hostaddr,
                port: config.port,
                database: config.database,
                user: config.user,
                tls,
                application_name,
                search_path,
                statement_timeout: config.statement_timeout,
                connect_timeout: config.connect_timeout,
                limiter,
                pool,
                cache,
                pools: Registry::default(),
                opened: AtomicU64::new(0),
                limited: std::sync::Mutex::new(None),
                shut_down: AtomicBool::new(false),
                peers,
                active: Arc::new(AtomicUsize::new(0)),
                #[cfg(feature = "seaorm")]
                sqlx_pools: std::sync::Mutex::new(Vec::new()),
                #[cfg(feature = "seaorm")]
                sqlx_options: std::sync::OnceLock::new(),
                read_only_host: config.read_only_host,
                read_only: false,
                replica: std::sync::OnceLock::new(),
            }),
        })
    }

    /// A connector for the [read-only endpoint](Config::read_only_host), built once: the
    /// same port, database, user, TLS, settings and token cache (no token of its own), and
    /// every session read-only (`default_transaction_read_only`), so that a write through
    /// its pools fails at once with SQLSTATE `25006` ([`Error::is_read_only`]) even where the
    /// endpoint would take it. [`shutdown`](Self::shutdown) of this connector shuts it down too.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::ReadOnlyHost`] when none is configured.
    pub fn read_only(&self) -> Result<Connector> {
        let s = &self.shared;
        let host = match s.read_only_host.as_deref().map(str::trim) {
            Some(host) if !host.is_empty() => host,
            _ => {
                return Err(Error::config(
                    Setting::ReadOnlyHost,
                    "no read-only endpoint is configured: set DAL_READ_ONLY_HOST \
                     (Config::read_only_host) to the replica's host",
                ));
            }
        };
        let replica = s.replica.get_or_init(|| Connector {
            shared: Arc::new(Shared {
                target: s.target,
                host: host.to_owned(),
                hostaddr: None,
                port: s.port,
                database: s.database.clone(),
                user: s.user.clone(),
                tls: s.tls.clone(),
                application_name: s.application_name.clone(),
                search_path: s.search_path.clone(),
                statement_timeout: s.statement_timeout,
                connect_timeout: s.connect_timeout,
                limiter: s.limiter.clone(),
                pool: s.pool.clone(),
                cache: s.cache.clone(),
                pools: Registry::default(),
                opened: AtomicU64::new(0),
                limited: std::sync::Mutex::new(None),
                // Asked for after a shutdown, it is shut down too.
                shut_down: AtomicBool::new(self.is_shut_down()),
                peers: Vec::new(),
                active: Arc::new(AtomicUsize::new(0)),
                #[cfg(feature = "seaorm")]
                sqlx_pools: std::sync::Mutex::new(Vec::new()),
                #[cfg(feature = "seaorm")]
                sqlx_options: std::sync::OnceLock::new(),
                read_only_host: None,
                read_only: true,
                replica: std::sync::OnceLock::new(),
            }),
        });
        // Made as this connector shut down (its shutdown found none): shut down too.
        if self.shared.shut_down.load(Ordering::SeqCst) {
            replica.shared.shut_down.store(true, Ordering::SeqCst);
        }
        Ok(replica.clone())
    }

    /// Endpoint `i`: 0 for this one, `i` for the `i`-th of [`Config::failover`].
    fn endpoint(&self, i: usize) -> &Connector {
        match i {
            0 => self,
            i => &self.shared.peers[i - 1],
        }
    }

    /// Whether the server is Databricks Lakebase, told as the Lakebase partner guide tells it:
    /// by the host name ([`Target::of_host`]), else by one connection's
    /// `SHOW shared_preload_libraries` ([`Target::is_lakebase_preload`]), which plain
    /// PostgreSQL hides from unprivileged roles (taken as not Lakebase).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect), when the host name does not tell.
    pub async fn is_lakebase(&self) -> Result<bool> {
        if let Some(target) = Target::of_host(&self.shared.host) {
            return Ok(target == Target::Lakebase);
        }
        let (client, connection) = self.connect().await?;
        let session = tokio::spawn(connection);
        // Plain PostgreSQL shows the setting to privileged roles only (SQLSTATE 42501 for
        // others); Lakebase shows it to every role.
        let preload = match client.query_one("SHOW shared_preload_libraries", &[]).await {
            Ok(row) => row.get::<_, String>(0),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                String::new()
            }
            Err(e) => return Err(e.into()),
        };
        drop(client);
        let _ = session.await;
        Ok(Target::is_lakebase_preload(&preload))
    }

    /// Whether there are [failover](Config::failover) endpoints.
    #[cfg(feature = "seaorm")]
    pub(crate) fn has_failover(&self) -> bool {
        !self.shared.peers.is_empty()
    }

    /// The endpoint new connections go to first, as `host:port`: this connector's, or the
    /// [failover](Config::failover) endpoint it moved to after this one could not be reached.
    pub fn active_endpoint(&self) -> String {
        let active = self.endpoint(self.shared.active.load(Ordering::Relaxed));
        format!("{}:{}", active.shared.host, active.shared.port)
    }

    /// The token cache in front of the credential source.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
    }

    /// The kind of server.
    pub fn target(&self) -> Target {
        self.shared.target
    }

    /// The TLS mode in effect: the configured one or the target's default, with `require`
    /// given a CA read as `verify-ca`, as libpq reads it (see [`SslMode::Require`]).
    pub fn ssl_mode(&self) -> SslMode {
        self.shared.tls.mode
    }

    /// The database user.
    pub fn user(&self) -> &str {
        &self.shared.user
    }

    /// The pool settings of the pools built without their own.
    pub fn pool_settings(&self) -> &PoolSettings {
        &self.shared.pool
    }

    /// How many connections this connector opened itself (for [`connect`](Self::connect) and
    /// the SeaORM, Diesel and tokio-postgres pools); the plain sqlx pool opens its own.
    pub fn connections_opened(&self) -> u64 {
        self.shared.opened.load(Ordering::Relaxed)
    }

    /// Options for one tokio-postgres connection logging in with `token`.
    fn pg_config(&self, token: &Token) -> tokio_postgres::Config {
        let s = &self.shared;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&s.host)
            .port(s.port)
            .user(&s.user)
            .password(token.expose())
            .dbname(&s.database)
            .application_name(&s.application_name)
            .ssl_mode(s.tls.mode.for_tokio_postgres())
            .connect_timeout(s.connect_timeout);
        if let Some(addr) = s.hostaddr {
            config.hostaddr(addr);
        }
        let options = self.startup_options();
        if !options.is_empty() {
            let line: Vec<String> = options
                .iter()
                .map(|(k, v)| format!("-c {k}={}", escape_option(v)))
                .collect();
            config.options(line.join(" "));
        }
        config
    }

    /// Run-time parameters sent in the startup packet of every connection.
    fn startup_options(&self) -> Vec<(&'static str, String)> {
        let s = &self.shared;
        let mut options = Vec::new();
        if let Some(path) = &s.search_path {
            options.push(("search_path", path.clone()));
        }
        if let Some(t) = s.statement_timeout {
            options.push(("statement_timeout", t.as_millis().to_string()));
        }
        if s.read_only {
            options.push(("default_transaction_read_only", "on".to_owned()));
        }
        options
    }

    /// Options for sqlx, without the password (the token cache supplies it), built once per
    /// endpoint and cloned for each connection: sqlx builds its TLS configuration (the root
    /// store) once per set of options, and the clones share it, as the Diesel and
    /// tokio-postgres pools share theirs. It trusts the CA read when the connector was built.
    /// sqlx connects to `hostaddr` and verifies the server as the host, as libpq does.
    #[cfg(feature = "seaorm")]
    fn sqlx_options(&self) -> Result<PgConnectOptions> {
        let s = &self.shared;
        if let Some(options) = s.sqlx_options.get() {
            return Ok(options.clone());
        }
        if s.tls.mode == SslMode::VerifyCa {
            return Err(Error::config(
                Setting::SslMode,
                "verify-ca checks a certificate's chain but no name (and so does require with \
                 sslrootcert, which libpq verifies as verify-ca), and sqlx (the SeaORM and sqlx \
                 pools, and migrations) trusts the public (Mozilla) roots besides sslrootcert, \
                 so a certificate any public CA issued for any name would pass: use \
                 verify-full, or require without sslrootcert (TLS unverified); the Diesel and \
                 tokio-postgres pools, which trust sslrootcert alone, keep verify-ca",
            ));
        }
        let hostaddr = sqlx_environment(s.hostaddr, s.tls.mode, &s.host, &|name| {
            std::env::var(name).ok()
        })?;
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&s.host)
            .port(s.port)
            .username(&s.user)
            .database(&s.database)
            .application_name(&s.application_name)
            .ssl_mode(s.tls.mode.for_sqlx());
        if let Some(addr) = hostaddr {
            options = options.hostaddr(addr);
        }
        if s.tls.mode.verifies() {
            // In place of any PGSSLROOTCERT, which sqlx reads on its own: the CA read at build,
            // or none, so that sqlx adds nothing to the Mozilla roots it always trusts.
            options = options.ssl_root_cert_from_pem(s.tls.root_pem.clone().unwrap_or_default());
        }
        let startup = self.startup_options();
        if !startup.is_empty() {
            options = options.options(startup);
        }
        Ok(s.sqlx_options.get_or_init(|| options).clone())
    }

    /// Opens one connection with a cached token. When the server refuses the token, the
    /// cache forgets it and one fresh token is tried before giving up with
    /// [`Error::AuthFailed`]. Each attempt first waits for its place under the
    /// [connection rate](Config::connection_rate). A connection the server refuses for a limit
    /// (SQLSTATE `53300` too many connections, `53400` Aurora DSQL's connection rate) is tried
    /// again with backoff for up to the connect timeout, then fails with the server's error.
    ///
    /// ```no_run
    /// # async fn demo(connector: &dal::Connector) -> dal::Result<()> {
    /// let (client, connection): (dal::tokio_postgres::Client, dal::Connection) =
    ///     connector.connect().await?;
    /// tokio::spawn(connection);
    /// client.simple_query("SELECT 1").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// With [failover](Config::failover) endpoints, a connection the active endpoint cannot
    /// open (a [connection failure](Error::is_connection_failure), not a refused login nor a
    /// refusal for a limit, `53300` or `53400`, which say the endpoint answers) is opened at
    /// the next endpoint where one opens, which becomes the active one for every pool.
    pub async fn connect(&self) -> Result<(tokio_postgres::Client, Connection)> {
        self.connect_by(Self::open_postgres).await
    }

    /// [`connect`](Self::connect)'s way through endpoints, limits and refused tokens, for a
    /// physical connection that `open` opens with a token at one endpoint.
    pub(crate) async fn connect_by<T>(&self, open: OpenWith<T>) -> Result<T> {
        let count = 1 + self.shared.peers.len();
        let start = self.shared.active.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for k in 0..count {
            let i = (start + k) % count;
            let endpoint = self.endpoint(i);
            match endpoint.connect_here(open).await {
                Ok(conn) => {
                    if i != start {
                        self.fail_over(start, i);
                    }
                    return Ok(conn);
                }
                // Once the active endpoint is out of reach, whatever a peer answers passes
                // the search on: the next one may open.
                Err(e) if count > 1 && (k > 0 || e.is_unreachable()) => {
                    tracing::warn!(
                        endpoint = %format!("{}:{}", endpoint.shared.host, endpoint.shared.port),
                        error = %ErrorChain(&e),
                        "cannot open a connection; trying the next endpoint"
                    );
                    failures.push(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::AllEndpointsFailed { failures })
    }

    /// Makes endpoint `to` the active one, if `from` still is, and points the sqlx pools at it.
    fn fail_over(&self, from: usize, to: usize) {
        let s = &self.shared;
        if s.active
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let (old, new) = (self.endpoint(from), self.endpoint(to));
        tracing::warn!(
            from = %format!("{}:{}", old.shared.host, old.shared.port),
            to = %format!("{}:{}", new.shared.host, new.shared.port),
            "failed over to another endpoint"
        );
        metrics::counter!(telemetry::FAILOVERS).increment(1);
        #[cfg(feature = "seaorm")]
        if let (Ok(options), Some(token)) = (new.sqlx_options(), new.shared.cache.current()) {
            for pool in self.sqlx_pools().iter() {
                pool.set_connect_options(options.clone().password(token.expose()));
            }
        }
    }

    /// One connection to this endpoint: limits and a refused token handled, no failover. The
    /// connect timeout bounds all of it (the wait for this process's own
    /// [connection rate](Config::connection_rate) aside): the token, each login, the pauses
    /// after a server's limit.
    async fn connect_here<T>(&self, open: OpenWith<T>) -> Result<T> {
        let mut deadline = Instant::now() + self.shared.connect_timeout;
        let mut attempt = 0;
        // The server's last refusal for a limit: the answer when the timeout cuts a later
        // try short, since it says why.
        let mut limited = None;
        // The token of the last try, which a limit says nothing against: the next try logs
        // in with it (uncached, each would fetch one).
        let mut token = None;
        loop {
            match self.connect_once(open, &mut deadline, &mut token).await {
                Err(e) if matches!(e.sqlstate(), Some("53300" | "53400")) => {
                    attempt += 1;
                    let delay = SERVER_LIMIT_BACKOFF.delay(attempt);
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    let sqlstate = e.sqlstate().unwrap_or_default().to_owned();
                    tracing::debug!(%sqlstate, attempt, "the server refused a connection for a limit; trying again");
                    metrics::counter!(telemetry::CONNECTS_LIMITED, "sqlstate" => sqlstate)
                        .increment(1);
                    // The refusal before this one is noted for the pools: this one stays the
                    // answer should the timeout cut the next try short.
                    if let Some(earlier) = limited.replace(e) {
                        *self.limited() = Some((Instant::now(), Arc::new(earlier)));
                    }
                    tokio::time::sleep(delay).await;
                }
                // The timeout after a limit's refusal: the refusal says why (a login slowed by
                // a busy machine would otherwise read as a server out of reach). One that went
                // silent after it is failed over from at the next connect, which meets no
                // refusal first.
                Err(e @ Error::ConnectTimeout { .. }) => return Err(limited.unwrap_or(e)),
                other => {
                    if other.is_ok() {
                        *self.limited() = None;
                    }
                    return other;
                }
            }
        }
    }

    /// [`Shared::limited`], poison or not.
    fn limited(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Error>)>> {
        self.shared
            .limited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The server's limit refusal that holds up connects to this endpoint, if one came no
    /// earlier than the longest pause before trying again ahead of `since`.
    fn limit_holding_up(&self, since: Instant) -> Option<Arc<Error>> {
        let limited = self.limited();
        let (at, refusal) = limited.as_ref()?;
        let longest = SERVER_LIMIT_BACKOFF
            .max
            .mul_f64(1.0 + SERVER_LIMIT_BACKOFF.jitter);
        (*at + longest >= since).then(|| Arc::clone(refusal))
    }

    /// One connection by `deadline`: a refused token is replaced once (unless the source
    /// gives the same one again, as a static password does), nothing else is retried; when
    /// the deadline comes first, the refusal is the answer. Logs in with the cache's token
    /// when it has one at hand, else with the token `kept` while it is unexpired, else with
    /// a new one, and keeps there the last it logged in with, unless the server refused it.
    async fn connect_once<T>(
        &self,
        open: OpenWith<T>,
        deadline: &mut Instant,
        kept: &mut Option<Arc<Token>>,
    ) -> Result<T> {
        let cache = &self.shared.cache;
        // The cache's own when it has one at hand (refreshed, or replaced after another
        // connect's refusal, meanwhile); else the kept one, uncached.
        let at_hand = cache
            .try_token()
            .or_else(|| kept.take().filter(|t| cache.unexpired(t)));
        let token = match at_hand {
            Some(token) => token,
            None => self.token_by(*deadline).await?,
        };
        *kept = Some(Arc::clone(&token));
        let opened = self.connect_with(&token, open, deadline).await;
        if opened.is_ok() {
            cache.accepted();
        }
        match opened {
            Err(e) if e.is_auth_failure() => {
                *kept = None;
                cache.invalidate(&token);
                let again = async {
                    let fresh = self.token_by(*deadline).await?;
                    if fresh.expose() == token.expose() {
                        return Ok(None);
                    }
                    tracing::warn!(
                        source = cache.source_kind(),
                        user = %self.shared.user,
                        "the server refused the token; logging in with a fresh one"
                    );
                    *kept = Some(Arc::clone(&fresh));
                    self.connect_with(&fresh, open, deadline).await.map(Some)
                };
                match again.await {
                    // The same secret again: the refusal is the answer.
                    Ok(None) => Err(e),
                    // Out of time after a refusal: the refusal is the answer. A timeout would
                    // read as an unreachable server, to retry or fail over from.
                    Err(Error::ConnectTimeout { .. }) => Err(e),
                    Ok(Some(opened)) => {
                        cache.accepted();
                        Ok(opened)
                    }
                    Err(other) => Err(other),
                }
            }
            other => other,
        }
    }

    /// The certificate chain the server presents, leaf first, each DER-encoded, checked as
    /// this connector's connections check it (`sslmode`): for diagnostics such as showing the
    /// certificate's subject. Nothing is sent after the handshake. `None` under
    /// `sslmode=disable`, or when the server does not offer TLS.
    ///
    /// # Errors
    ///
    /// [`Error::ConnectTimeout`] past the connect timeout; [`Error::Config`] for
    /// [`Setting::SslRootCert`] when no trusted CA signed the certificate; [`Error::Tls`]
    /// otherwise.
    pub async fn server_certificates(&self) -> Result<Option<Vec<Vec<u8>>>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// PostgreSQL's SSLRequest: length 8, code 80877103.
        const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];
        let s = &self.shared;
        if s.tls.mode == crate::SslMode::Disable {
            return Ok(None);
        }
        let address = s.hostaddr.map_or_else(|| s.host.clone(), |a| a.to_string());
        let handshake = async {
            let mut tcp = tokio::net::TcpStream::connect((address.as_str(), s.port)).await?;
            tcp.write_all(&SSL_REQUEST).await?;
            if tcp.read_u8().await? != b'S' {
                return Ok(None);
            }
            let name = rustls::pki_types::ServerName::try_from(s.host.clone())
                .map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&s.tls.config))
                .connect(name, tcp)
                .await?;
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            std::io::Result::Ok(Some(chain.iter().map(|c| c.to_vec()).collect()))
        };
        let endpoint = format!("{}:{}", s.host, s.port);
        match tokio::time::timeout(s.connect_timeout, handshake).await {
            Err(_) => Err(Error::ConnectTimeout {
                endpoint,
                timeout: s.connect_timeout,
                last_answer: None,
            }),
            Ok(Ok(chain)) => Ok(chain),
            Ok(Err(e)) if is_unknown_issuer(&e) => Err(self.unknown_issuer()),
            Ok(Err(source)) => Err(Error::Tls { endpoint, source }),
        }
    }

    /// The error for a connection that failed before the server answered, TLS aside (its
    /// errors say what to fix themselves): `source` says why.
    fn unreachable(&self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Unreachable {
            endpoint: format!("{}:{}", self.shared.host, self.shared.port),
            source: Box::new(source),
        }
    }

    /// The error for a certificate refused for another reason than its CA (told apart first,
    /// for its own advice: [`unknown_issuer`](Self::unknown_issuer)): a TLS failure, not
    /// retried, since nothing but a setting or a new certificate mends it.
    fn refused_certificate(&self, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Tls {
            endpoint: format!("{}:{}", self.shared.host, self.shared.port),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }
    }

    /// The error for a certificate no trusted CA signed, naming the setting that fixes it.
    fn unknown_issuer(&self) -> Error {
        Error::config(
            Setting::SslRootCert,
            format!(
                "the certificate of {}:{} is signed by a CA this program does not trust \
                 (UnknownIssuer): set PGSSLROOTCERT (sslrootcert in DATABASE_URL) to the PEM \
                 file of the CA that signed it",
                self.shared.host, self.shared.port
            ),
        )
    }

    /// The cached token, waiting for a fetch (one at a time, with its retries) no later than
    /// `deadline`: a slow credential service fails this connection with
    /// [`Error::ConnectTimeout`] instead of holding it without bound, with the source's
    /// failed answer as its cause when that answer (or the pause it asked for) held the
    /// fetch up.
    async fn token_by(&self, deadline: Instant) -> Result<std::sync::Arc<Token>> {
        let cache = &self.shared.cache;
        let since = tokio::time::Instant::now();
        tokio::time::timeout_at(deadline, cache.token())
            .await
            .map_err(|_| Error::ConnectTimeout {
                endpoint: format!("the {} credential source", cache.source_kind()),
                timeout: self.shared.connect_timeout,
                // The service's last answer, when it gave one, says why.
                last_answer: cache.failure_holding_up(since).map(Box::new),
            })?
    }

    /// One connection opened by `open`, after its place under the connection rate, by
    /// `deadline`, which moves on by the wait for that place.
    async fn connect_with<T>(
        &self,
        token: &Token,
        open: OpenWith<T>,
        deadline: &mut Instant,
    ) -> Result<T> {
        if let Some(limiter) = &self.shared.limiter {
            let waiting = Instant::now();
            limiter.until_ready().await;
            *deadline += waiting.elapsed();
        }
        let timeout = self.shared.connect_timeout;
        let conn = tokio::time::timeout_at(*deadline, open(self, token))
            .await
            .map_err(|_| Error::ConnectTimeout {
                endpoint: format!("{}:{}", self.shared.host, self.shared.port),
                timeout,
                last_answer: None,
            })??;
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CONNECTIONS_OPENED).increment(1);
        tracing::debug!(host = %self.shared.host, user = %self.shared.user, "connection opened");
        Ok(conn)
    }

    /// A tokio-postgres connection to this endpoint with `token`.
    fn open_postgres<'a>(
        &'a self,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<(tokio_postgres::Client, Connection)>> {
        Box::pin(self.open_postgres_over(token, self.shared.tls.connector()))
    }

    /// A client of the tokio-postgres pool, whose session's wire the pool follows.
    fn open_pg_client<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<pool::PgClient>> {
        Box::pin(async move {
            let (tls, wire) = pool::wire::TrackedTls::new(CloseNotify(self.shared.tls.connector()));
            let (client, connection) = self.open_postgres_over(token, tls).await?;
            Ok(pool::postgres::from_parts(client, connection, wire))
        })
    }

    /// A Diesel connection to this endpoint with `token`, whose TLS session ends with
    /// `close_notify` when diesel-async drops it, and whose wire the pool follows.
    #[cfg(feature = "diesel")]
    fn open_diesel<'a>(&'a self, token: &'a Token) -> BoxFuture<'a, Result<AsyncPgConnection>> {
        Box::pin(async move {
            let (tls, wire) = pool::wire::TrackedTls::new(CloseNotify(self.shared.tls.connector()));
            let (client, connection) = self.open_postgres_over(token, tls).await?;
            pool::diesel::from_parts(client, connection, wire).await
        })
    }

    /// A tokio-postgres connection to this endpoint with `token`, over `tls`.
    async fn open_postgres_over<T: MakeTlsConnect<Socket>>(
        &self,
        token: &Token,
        tls: T,
    ) -> Result<(
        tokio_postgres::Client,
        tokio_postgres::Connection<Socket, T::Stream>,
    )> {
        match self.pg_config(token).connect(tls).await {
            Ok(pair) => Ok(pair),
            Err(e) if is_refused_login(&e) => {
                let sqlstate = e.code().map(|c| c.code().to_owned());
                Err(self.refused(sqlstate.as_deref(), |user| Error::AuthFailed {
                    user,
                    source: e,
                }))
            }
            Err(e) if is_unknown_issuer(&e) => Err(self.unknown_issuer()),
            Err(e) if refuses_certificate(&e) => Err(self.refused_certificate(e)),
            Err(e) if is_socket_failure(&e) => Err(self.unreachable(e)),
            Err(e) => Err(Error::Database(e)),
        }
    }

    /// A sqlx connection to this endpoint with `token`, for the SeaORM pool.
    #[cfg(feature = "seaorm")]
    fn open_sqlx<'a>(
        &'a self,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<sea_orm::sqlx::PgConnection>> {
        use sea_orm::sqlx::Connection as _;
        Box::pin(async move {
            let options = self.sqlx_options()?.password(token.expose());
            match sea_orm::sqlx::PgConnection::connect_with(&options).await {
                Ok(conn) => Ok(conn),
                Err(e) if is_unknown_issuer(&e) => Err(self.unknown_issuer()),
                Err(e) if refuses_certificate(&e) => Err(self.refused_certificate(e)),
                Err(e @ sea_orm::sqlx::Error::Io(_)) if rustls_error(&e).is_none() => {
                    Err(self.unreachable(e))
                }
                Err(e) => {
                    let e = Error::SeaOrm(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
                        Arc::new(e),
                    )));
                    if e.is_auth_failure() {
                        let sqlstate = e.sqlstate().map(str::to_owned);
                        return Err(self.refused(sqlstate.as_deref(), |_| e));
                    }
                    Err(e)
                }
            }
        })
    }

    /// Counts and logs a login the server refused, and makes its error for this user.
    fn refused(&self, sqlstate: Option<&str>, error: impl FnOnce(String) -> Error) -> Error {
        metrics::counter!(telemetry::AUTH_FAILURES).increment(1);
        tracing::debug!(user = %self.shared.user, sqlstate, "login refused");
        error(self.shared.user.clone())
    }

    /// A sqlx pool whose connections log in with the cached token. sqlx cannot ask for a
    /// password when it opens a connection, so from now on the cache keeps the token fresh
    /// ahead of expiry and pushes each new one into the pool before the refresh returns.
    /// The pool's `connect_options()` hold that token, and sqlx's `Debug` of them shows it:
    /// do not log them. sqlx opens its connections itself, outside this connector: they
    /// follow no [connection rate](crate::Config::connection_rate), and a login refused with
    /// SQLSTATE `53400` (Aurora DSQL's rate) fails at once (sqlx tries `53300` again).
    /// The SeaORM pool ([`seaorm`](Self::seaorm)) opens its connections through the connector.
    ///
    /// The pool lives until it is closed (`PgPool::close`) or the connector
    /// [shuts down](Self::shutdown), not until its last clone is dropped as sqlx's own do:
    /// the token cache holds it to push each new token in, and sqlx has no weak handle to a
    /// pool. Close each one you are done with; it then leaves the connector's
    /// [`health`](Self::health) report and the cache's listeners.
    #[cfg(feature = "seaorm")]
    pub async fn sqlx_pool(&self) -> Result<PgPool> {
        self.sqlx_pool_with(&self.shared.pool).await
    }

    /// Like [`sqlx_pool`](Self::sqlx_pool), with its own sizes and lifetimes: on Aurora DSQL, a
    /// lifetime of at most 3570 s ([`Error::Config`] for [`Setting::PoolMaxLifetime`]).
    ///
    /// sqlx returns a connection to its pool with no bound on its round trips: one that comes
    /// back while its server does not answer holds its place until the server does (sqlx
    /// issue #4349). [`seaorm`](Self::seaorm) bounds them.
    ///
    /// sqlx opens its connections itself, so this pool does not fail over on its own: with
    /// [several endpoints](crate::Config::failover), it moves to the next endpoint when
    /// another of this connector's pools or [`connect`](Self::connect) fails over. A program
    /// whose only pool is this one does not move.
    ///
    /// sqlx tells nothing of a refused login: with a source whose tokens stop working before
    /// the expiry they claim (a revoked token, a skewed clock), its new connections fail until
    /// a fresh token is pushed: at the next refresh, or as soon as another pool of this
    /// connector meets the refusal. Lakebase and DSQL keep every token valid until it expires.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when this process's environment holds what sqlx would take and the
    /// other pools do not: [`Setting::HostAddr`] where the configuration names no address,
    /// [`Setting::PgOptions`], [`Setting::SslCert`]
    /// (see [`Config::hostaddr`](crate::Config::hostaddr)); [`Setting::SslMode`] under
    /// `verify-ca`, or `require` with a CA (verified as `verify-ca`), which sqlx cannot keep
    /// (see [`SslMode::VerifyCa`]).
    #[cfg(feature = "seaorm")]
    pub async fn sqlx_pool_with(&self, settings: &PoolSettings) -> Result<PgPool> {
        self.refuse_if_shut_down()?;
        self.check_pool_settings(settings)?;
        let s = &self.shared;
        let endpoints = (0..=s.peers.len())
            .map(|i| {
                let endpoint = self.endpoint(i);
                Ok((endpoint.shared.cache.clone(), endpoint.sqlx_options()?))
            })
            .collect::<Result<Vec<_>>>()?;
        let pool = pool::sqlx::build(&endpoints, Arc::clone(&s.active), settings, &s.pools).await?;
        self.sqlx_pools().push(pool.clone());
        Ok(pool)
    }

    /// The sqlx pools built by this connector that are still open.
    #[cfg(feature = "seaorm")]
    fn sqlx_pools(&self) -> std::sync::MutexGuard<'_, Vec<PgPool>> {
        let mut pools = self
            .shared
            .sqlx_pools
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pools.retain(|pool| !pool.is_closed());
        pools
    }

    /// SeaORM over a pool of this connector: each new physical connection (sqlx's) opens with
    /// a token from the cache, TLS and the startup parameters of this connector, as the Diesel
    /// pool's do. See [`SeaOrmPool`] for what it checks and when.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when this process's environment holds what sqlx would take and the
    /// other pools do not: [`Setting::HostAddr`] where the configuration names no address,
    /// [`Setting::PgOptions`], [`Setting::SslCert`]
    /// (see [`Config::hostaddr`](crate::Config::hostaddr)); [`Setting::SslMode`] under
    /// `verify-ca`, or `require` with a CA (verified as `verify-ca`), which sqlx cannot keep
    /// (see [`SslMode::VerifyCa`]).
    #[cfg(feature = "seaorm")]
    pub async fn seaorm(&self) -> Result<SeaOrmPool> {
        self.seaorm_with(&self.shared.pool).await
    }

    /// Like [`seaorm`](Self::seaorm), with its own pool sizes and lifetimes: on Aurora DSQL, a
    /// lifetime of at most 3570 s ([`Error::Config`] for [`Setting::PoolMaxLifetime`]).
    ///
    /// Each statement is timed for a `tracing` event and the
    /// [`QUERY_SECONDS`](telemetry::QUERY_SECONDS) histogram. A statement refused because a
    /// schema change altered a prepared statement's result type (SQLSTATE `0A000`, "cached
    /// plan must not change result type") makes its connection forget its prepared
    /// statements before its next use: such a change fails at most one statement per
    /// connection.
    #[cfg(feature = "seaorm")]
    pub async fn seaorm_with(&self, settings: &PoolSettings) -> Result<SeaOrmPool> {
        self.refuse_if_shut_down()?;
        self.check_pool_settings(settings)?;
        for i in 0..=self.shared.peers.len() {
            self.endpoint(i).sqlx_options()?;
        }
        let connector = self.clone();
        let open: Open<pool::seaorm::Conn> = Arc::new(move || {
            let connector = connector.clone();
            Box::pin(async move {
                let raw = connector.connect_by(Connector::open_sqlx).await?;
                Ok(pool::seaorm::Conn::new(raw))
            })
        });
        self.pool_of(pool::seaorm::KIND, open, settings)
            .map(|pool| SeaOrmPool::new(pool, self.shared.target != Target::Dsql))
    }

    /// A Diesel pool: each new physical connection opens with a token from the cache, TLS and
    /// the startup parameters of this connector.
    #[cfg(feature = "diesel")]
    pub async fn diesel_pool(&self) -> Result<DieselPool> {
        self.diesel_pool_with(self.pool_settings()).await
    }

    /// Like [`diesel_pool`](Self::diesel_pool), with its own sizes and lifetimes: on Aurora DSQL, a
    /// lifetime of at most 3570 s ([`Error::Config`] for [`Setting::PoolMaxLifetime`]).
    #[cfg(feature = "diesel")]
    pub async fn diesel_pool_with(&self, settings: &PoolSettings) -> Result<DieselPool> {
        self.refuse_if_shut_down()?;
        self.check_pool_settings(settings)?;
        let connector = self.clone();
        let open: Open<AsyncPgConnection> = Arc::new(move || {
            let connector = connector.clone();
            Box::pin(async move { connector.connect_by(Connector::open_diesel).await })
        });
        self.pool_of(pool::diesel::KIND, open, settings)
    }

    /// A pool of tokio-postgres clients for raw SQL ([`PgClient`](crate::PgClient), which
    /// dereferences to [`tokio_postgres::Client`]): each new physical connection opens with a
    /// token from the cache, TLS and the startup parameters of this connector. A client used
    /// moments ago with nothing in flight is handed out again without a round trip (over TLS,
    /// where the pool follows the session's wire); see [`PgClient`](crate::PgClient).
    pub async fn postgres_pool(&self) -> Result<PgClientPool> {
        self.postgres_pool_with(self.pool_settings()).await
    }

    /// Like [`postgres_pool`](Self::postgres_pool), with its own sizes and lifetimes: on Aurora DSQL, a
    /// lifetime of at most 3570 s ([`Error::Config`] for [`Setting::PoolMaxLifetime`]).
    pub async fn postgres_pool_with(&self, settings: &PoolSettings) -> Result<PgClientPool> {
        self.refuse_if_shut_down()?;
        self.check_pool_settings(settings)?;
        let connector = self.clone();
        let open: Open<pool::PgClient> = Arc::new(move || {
            let connector = connector.clone();
            Box::pin(async move { connector.connect_by(Connector::open_pg_client).await })
        });
        self.pool_of(pool::postgres::KIND, open, settings)
    }

    /// A pool of `kind` whose connections `open` opens, registered with this connector, and
    /// told what holds its connections up (see [`holding_up`](Self::holding_up)).
    fn pool_of<C: Send + 'static>(
        &self,
        kind: pool::Kind<C>,
        open: Open<C>,
        settings: &PoolSettings,
    ) -> Result<pool::Pool<C>> {
        pool::build(
            kind,
            open,
            settings,
            &self.shared.pools,
            self.shared.connect_timeout,
        )
        .map(|pool| pool.held_up_by(self.holding_up()))
    }

    /// What holds up a pool's connections at the active endpoint, the first they try: the
    /// server's refusal for a limit that its connects wait to try again after, or, with no
    /// valid token cached, its credential source's last failed answer (see
    /// [`Error::PoolTimeout`]). A failover endpoint's are left out: its source may fail
    /// while no connect waits on it.
    fn holding_up(&self) -> pool::HoldingUp {
        let connector = self.clone();
        Box::new(move |since| {
            let active = connector.shared.active.load(Ordering::Relaxed);
            let endpoint = connector.endpoint(active);
            let cache = &endpoint.shared.cache;
            endpoint
                .limit_holding_up(since)
                .or_else(|| cache.failure_holding_up_connects(since).map(Arc::new))
        })
    }

    /// Refuses a pool's own `settings` as [`Connector::new`] refuses the connector's.
    fn check_pool_settings(&self, settings: &PoolSettings) -> Result<()> {
        check_pool_lifetime(self.shared.target, settings)
    }

    fn refuse_if_shut_down(&self) -> Result<()> {
        if self.is_shut_down() {
            return Err(Error::PoolClosed);
        }
        Ok(())
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shut_down.load(Ordering::SeqCst)
    }

    /// Pool state and token expiry, never the token.
    pub fn health(&self) -> Health {
        let cache = self.cache();
        let expires = cache.expires_at();
        Health {
            target: self.target(),
            token_source: cache.source_kind(),
            token_expires_at: expires,
            token_remaining: expires
                .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok()),
            token_fetches: cache.fetches(),
            token_failures: cache.failures(),
            connections_opened: self.connections_opened(),
            pools: self.shared.pools.health(),
            shut_down: self.is_shut_down(),
        }
    }

    /// Stops the token refresher and closes every pool built by this connector: the plain
    /// sqlx pools at once (waiting for connections in use to come back, at most each pool's
    /// acquire timeout; the others close when they come back), the SeaORM, Diesel and
    /// tokio-postgres pools by closing their idle connections now and the others when they
    /// are returned. Pools refuse new checkouts afterwards, and no new pool can be built (one
    /// whose build was under way fails with [`Error::PoolClosed`]). Every pool is closed as
    /// this is first polled: dropped before it returns (a timeout around it), it has cut
    /// short only its waits.
    ///
    /// Every pool ends the sessions it closes so that the server logs no error for them: the
    /// SeaORM and tokio-postgres pools as libpq's `PQfinish` does (the protocol's
    /// `Terminate`, then TLS's `close_notify`), the Diesel pool, whose sessions diesel-async
    /// drops, with `close_notify`. This waits for the SeaORM pools' logouts of the
    /// connections closed so far (at most 5 s), which run on tasks of their own, so that a
    /// program may end its runtime as soon as this returns.
    ///
    /// A [read-only connector](Self::read_only) closes its own pools only: the token cache
    /// it shares stops with the connector that made it.
    pub async fn shutdown(&self) {
        self.shared.shut_down.store(true, Ordering::SeqCst);
        if !self.shared.read_only {
            self.shared.cache.shutdown();
        }
        for peer in &self.shared.peers {
            peer.shared.cache.shutdown();
        }
        let replica = self.shared.replica.get();
        if let Some(replica) = replica {
            replica.shared.shut_down.store(true, Ordering::SeqCst);
        }
        // Both at once: each closes all its pools before it waits for any.
        let replica_pools = replica.map(|replica| replica.shared.pools.close_all());
        futures_util::future::join(
            self.shared.pools.close_all(),
            futures_util::future::OptionFuture::from(replica_pools),
        )
        .await;
    }
}

/// The longest pool lifetime on Aurora DSQL, which ends every connection after 60 minutes
/// (AWS's documented connection limits): a connection whose replacement is still
/// logging in serves up to 30 s past its lifetime (see the pools' renewal).
const DSQL_LONGEST_LIFETIME: Duration = Duration::from_secs(3570);

/// Refuses a lifetime that would keep connections longer than `target` does.
fn check_pool_lifetime(target: Target, settings: &PoolSettings) -> Result<()> {
    if target == Target::Dsql
        && settings
            .max_lifetime()
            .is_none_or(|lifetime| lifetime > DSQL_LONGEST_LIFETIME)
    {
        return Err(Error::config(
            Setting::PoolMaxLifetime,
            "Aurora DSQL ends every connection after 60 minutes: set a lifetime of at most \
             3570 s (59.5 minutes; the default is 55 minutes, shortened at random by up to 5)",
        ));
    }
    Ok(())
}

/// Opens one physical connection at an endpoint with a token.
pub(crate) type OpenWith<T> = for<'a> fn(&'a Connector, &'a Token) -> BoxFuture<'a, Result<T>>;

/// Whether TLS failed because no trusted CA signed the server's certificate, anywhere in
/// `e`'s chain.
fn is_unknown_issuer(e: &(dyn std::error::Error + 'static)) -> bool {
    rustls_error(e).is_some_and(|e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        )
    })
}

/// Whether tokio-postgres failed to open the socket: the host name did not resolve, nothing
/// listened, the network failed. Its failures after the server answered (a method of
/// authentication it does not implement, a SCRAM exchange that went wrong, a connection
/// closed during login) are not. tokio-postgres tells them apart by a private error kind
/// (`Kind::Connect`), whose message is only "error connecting to server", the cause aside
/// (its `error/mod.rs`).
fn is_socket_failure(e: &tokio_postgres::Error) -> bool {
    e.to_string() == "error connecting to server"
}

/// Whether the server refused the login's credentials: SQLSTATE `28P01`, or `28000` from
/// PostgreSQL's external methods (LDAP, PAM, ...) that token services use (see
/// [`refuses_credentials`](crate::error::refuses_credentials)).
fn is_refused_login(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|e| crate::error::refuses_credentials(e.code().code(), e.routine()))
}

/// Refuses what no driver can send safely in the startup packet: NUL ends a value early, and
/// PostgreSQL splits the `options` parameter on every white-space character, which the
/// drivers escape only for the space (sqlx escapes space and backslash, nothing else). A tab
/// in `search_path` would otherwise set any other parameter (`-c work_mem=...`).
fn check_startup_value(setting: Setting, value: &str) -> Result<()> {
    match crate::config::unsendable(value, true) {
        Some(c) => Err(Error::config(
            setting,
            format!(
                "contains the control or white-space character {c:?}; only printable \
                 characters and spaces can be sent to the server"
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses a password with a control character in it, naming the character but never the
/// password: the server takes it as part of the password, and no password is meant to hold
/// one; the last newline of a secret read whole from a file is the usual one.
fn check_password(password: &str) -> Result<()> {
    match password.chars().find(|c| c.is_control()) {
        Some(c) => Err(Error::config(
            Setting::Password,
            format!(
                "contains the control character {c:?} (a secret read from a file keeps its \
                 last newline), which the server would take as part of the password: remove it \
                 from PGPASSWORD, or from the password in DATABASE_URL"
            ),
        )),
        None => Ok(()),
    }
}

/// `name` as an SQL identifier: as it is when the server would not fold or reject it
/// (lower case letters, digits, `_`, `$`, not starting with a digit or `$`), else quoted.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Escapes a value for the `options` startup parameter, where spaces separate arguments.
fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(' ', "\\ ")
}

/// What sqlx takes from this process's environment into every set of options it builds
/// (sqlx-postgres 0.9.1, `PgConnectOptions::new_without_pgpass`) and that dal cannot take back
/// through its options, checked against the endpoint's configuration: the address to connect
/// to (`PGHOSTADDR`), settings for every session (`PGOPTIONS`) and a client certificate
/// (`PGSSLCERT`, `PGSSLKEY`). The configuration's own address replaces the environment's
/// (and its CA, or none, the environment's `PGSSLROOTCERT`: see
/// [`sqlx_options`](Connector::sqlx_options)); anything else the environment holds is
/// refused, so that the SeaORM and sqlx pools connect as the Diesel and tokio-postgres pools
/// do or not at all. `env` reads a variable; sqlx reads no certificate under
/// `sslmode=disable`. Returns the address sqlx is to connect to.
#[cfg(feature = "seaorm")]
fn sqlx_environment(
    hostaddr: Option<std::net::IpAddr>,
    mode: SslMode,
    host: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<std::net::IpAddr>> {
    // The value is shown for an address or a path, never for session settings, which may
    // hold anything.
    let stray = |setting: Setting, name: &str, value: Option<&str>, what: &str, fix: &str| {
        let shown = value.map_or_else(String::new, |v| format!("={v:?}"));
        Error::config(
            setting,
            format!(
                "{name}{shown} is set in this process's environment but not in the \
                 configuration of {host}, and sqlx (the SeaORM and sqlx pools) would {what}, \
                 unlike the other pools: unset {name}{fix}"
            ),
        )
    };
    if hostaddr.is_none()
        && let Some(addr) = env("PGHOSTADDR").and_then(|v| v.parse::<std::net::IpAddr>().ok())
    {
        let what = format!("connect to {addr} instead of to {host}");
        return Err(stray(
            Setting::HostAddr,
            "PGHOSTADDR",
            Some(&addr.to_string()),
            &what,
            ", or set it through the configuration (Config::from_env reads it)",
        ));
    }
    if env("PGOPTIONS").is_some_and(|v| !v.trim().is_empty()) {
        let what = "pass its settings to the server at every login";
        let fix = ": dal takes no session settings from it; set them through the \
                   configuration (DAL_SEARCH_PATH, DAL_STATEMENT_TIMEOUT_MS), or with SET";
        return Err(stray(Setting::PgOptions, "PGOPTIONS", None, what, fix));
    }
    for name in ["PGSSLCERT", "PGSSLKEY"] {
        if mode != SslMode::Disable
            && let Some(path) = env(name)
        {
            let what = "present a client certificate";
            let fix = ": dal presents no client certificate (it logs in with the password or \
                       token)";
            return Err(stray(Setting::SslCert, name, Some(&path), what, fix));
        }
    }
    Ok(hostaddr)
}

/// Refuses a host that libpq reads as something other than one TCP host (a list, a Unix
/// socket), or that cannot be a host name at all: dal would only fail at connect, looking the
/// whole text up as a name.
fn check_host(setting: Setting, host: &str) -> Result<()> {
    if host.contains(',') {
        return Err(Error::config(
            setting,
            "names several hosts (libpq's comma-separated list); dal connects to one: give \
             one host, and the others as failover endpoints (Config::failover)",
        ));
    }
    if host.starts_with(['/', '@']) {
        return Err(Error::config(
            setting,
            "names a Unix socket directory; dal connects over TCP with TLS: give a host name \
             or IP address",
        ));
    }
    if crate::config::unsendable(host, false).is_some() {
        return Err(Error::config(
            setting,
            "contains white space or a control character, which no host name or IP address \
             has: give the host alone",
        ));
    }
    Ok(())
}

/// Gives a failover endpoint the settings of the first that it leaves at their defaults: all
/// but where it is and who logs in (host, address, port, user, credentials, target). It
/// serves the same database, and settings chained onto [`Config::dsql_multi_region`] reach
/// the first endpoint only.
fn take_shared_settings(peer: &mut Config, first: &Config) {
    let blank = Config::new("", "");
    if peer.database == blank.database {
        peer.database.clone_from(&first.database);
    }
    if peer.application_name == blank.application_name {
        peer.application_name.clone_from(&first.application_name);
    }
    if peer.connect_timeout == blank.connect_timeout {
        peer.connect_timeout = first.connect_timeout;
    }
    if peer.strategy == blank.strategy {
        peer.strategy = first.strategy;
    }
    if peer.cache == blank.cache {
        peer.cache = first.cache.clone();
    }
    peer.product = peer.product.take().or_else(|| first.product.clone());
    peer.search_path = peer
        .search_path
        .take()
        .or_else(|| first.search_path.clone());
    peer.statement_timeout = peer.statement_timeout.or(first.statement_timeout);
    peer.ssl_mode = peer.ssl_mode.or(first.ssl_mode);
    peer.ssl_root_cert = peer
        .ssl_root_cert
        .take()
        .or_else(|| first.ssl_root_cert.clone());
    peer.connection_rate = peer.connection_rate.or(first.connection_rate);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting_of(result: Result<Connector>) -> Setting {
        match result {
            Err(Error::Config { setting, .. }) => setting,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// A static password for a Lakebase or Aurora DSQL host (a Postgres role there, or a
    /// token pasted in, as the vendors' psql guides do) gets that target's defaults: it got
    /// plain PostgreSQL's, `sslmode=prefer`, which sends the password over TLS that checks
    /// no certificate, and none of DSQL's guards. An `sslmode` set stays as set.
    #[test]
    fn a_password_for_a_vendors_host_gets_the_vendors_defaults() {
        for (host, target) in [
            (
                "ep-a.database.us-east-1.cloud.databricks.com",
                Target::Lakebase,
            ),
            (
                "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws",
                Target::Dsql,
            ),
        ] {
            let connector = Connector::build(Config::new(host, "admin").password("t")).unwrap();
            assert_eq!(connector.target(), target, "{host}");
            assert_eq!(connector.ssl_mode(), SslMode::VerifyFull, "{host}");
            let chosen = Config::new(host, "admin")
                .password("t")
                .ssl_mode(SslMode::Require);
            assert_eq!(
                Connector::build(chosen).unwrap().ssl_mode(),
                SslMode::Require
            );
        }
        let elsewhere = Connector::build(Config::new("db.example.com", "u").password("t"));
        assert_eq!(elsewhere.unwrap().ssl_mode(), SslMode::Prefer);
    }

    /// Lakebase and Aurora DSQL take TLS alone (the Databricks and AWS connection
    /// documentation), and a mode that can go on without it (`disable`, or `prefer` when a
    /// server in the middle offers none) would send the token, or a password, to whoever
    /// answers in plain text: such a mode is refused for those targets, naming the setting
    /// and the fix. Over loopback (a proxy on this machine) it stands.
    #[test]
    fn a_mode_that_can_send_the_secret_without_tls_is_refused_for_a_vendors_target() {
        for host in [
            "ep-a.database.us-east-1.cloud.databricks.com",
            "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws",
        ] {
            for mode in [SslMode::Disable, SslMode::Prefer] {
                let refused =
                    Connector::build(Config::new(host, "admin").password("t").ssl_mode(mode));
                let shown = refused
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                assert!(
                    shown.contains("PGSSLMODE") && shown.contains("verify-full"),
                    "{host} {mode}: {shown}"
                );
                assert_eq!(setting_of(refused), Setting::SslMode);
            }
        }
        // Set in a URL, the mode is named as the URL spells it too.
        let url =
            "postgres://admin:t@ep-a.database.us-east-1.cloud.databricks.com/db?sslmode=prefer";
        let from_url = Config::from_lookup(|k| (k == "DATABASE_URL").then(|| url.to_owned()));
        let shown = Connector::build(from_url.unwrap())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            shown.contains("PGSSLMODE (or sslmode in DATABASE_URL)"),
            "{shown}"
        );
        let plain = Config::new("db.example.com", "u").password("t");
        assert!(Connector::build(plain.ssl_mode(SslMode::Disable)).is_ok());
        let dsql = || {
            Config::new("abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws", "admin")
                .password("t")
                .ssl_mode(SslMode::Disable)
        };
        let mut proxied = dsql();
        proxied.hostaddr = Some(std::net::Ipv4Addr::LOCALHOST.into());
        assert!(Connector::build(proxied).is_ok(), "a proxy on this machine");
        for host in ["127.0.0.1", "localhost", "::1"] {
            let local = Config::new(host, "admin")
                .password("t")
                .target(Target::Dsql)
                .ssl_mode(SslMode::Prefer);
            assert!(Connector::build(local).is_ok(), "{host}");
        }
        let mut remote = dsql();
        remote.hostaddr = Some(std::net::Ipv4Addr::new(192, 0, 2, 1).into());
        assert_eq!(setting_of(Connector::build(remote)), Setting::SslMode);
    }

    /// A password with a line break or another control character in it (a secret read whole
    /// from a file keeps its last newline) is refused where it is set, naming the character
    /// but not the password: it was sent as it was, and the server's refusal (28P01, "the
    /// token or password is wrong") sent its user to check a password that was right.
    #[test]
    fn a_password_with_a_control_character_is_refused_when_built() {
        for password in ["s3cret\n", "s3cret\r\n", "s3\0cret", "\ts3cret"] {
            let config = Config::new("db.example.com", "u").password(password);
            let err = Connector::build(config).map(drop).unwrap_err();
            let said = err.to_string();
            assert!(
                matches!(
                    err,
                    Error::Config {
                        setting: Setting::Password,
                        ..
                    }
                ),
                "{password:?}: {said}"
            );
            assert!(!said.contains("s3"), "{said}");
        }
        for password in ["s3 cret", "pässwört", "\"'%;"] {
            Connector::build(Config::new("db.example.com", "u").password(password)).unwrap();
        }
    }

    /// A failover endpoint serves the same database: the settings it leaves at their
    /// defaults are the first endpoint's (a setter chained on `Config::dsql_multi_region`
    /// reaches the first only), and those it sets are its own.
    #[test]
    fn failover_endpoints_take_the_settings_they_leave_unset() {
        let first = || {
            Config::new("a.example.com", "u")
                .password("p")
                .database("shop")
                .search_path("shop")
                .statement_timeout(Duration::from_secs(30))
                .product("acme_orders/2.1")
                .connect_timeout(Duration::from_secs(3))
                .ssl_mode(SslMode::VerifyFull)
                .strategy(crate::TokenStrategy::Lazy)
        };
        let peer = || Config::new("b.example.com", "u").password("q");
        let token = Token::new("t", None);
        let c = Connector::build(first().failover(peer())).unwrap();
        let (one, two) = (
            c.endpoint(0).pg_config(&token),
            c.endpoint(1).pg_config(&token),
        );
        assert_eq!(
            two.get_hosts(),
            [tokio_postgres::config::Host::Tcp("b.example.com".into())]
        );
        assert_eq!(two.get_dbname(), Some("shop"));
        assert_eq!(two.get_options(), one.get_options());
        assert!(
            two.get_options()
                .is_some_and(|o| o.contains("search_path=shop"))
        );
        assert_eq!(two.get_application_name(), Some("acme_orders/2.1"));
        assert_eq!(two.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(c.endpoint(1).shared.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            c.endpoint(1).shared.cache.strategy(),
            crate::TokenStrategy::Lazy
        );
        let own = peer().database("shop_eu").search_path("eu");
        let c = Connector::build(first().failover(own)).unwrap();
        let two = c.endpoint(1).pg_config(&token);
        assert_eq!(two.get_dbname(), Some("shop_eu"));
        assert!(
            two.get_options()
                .is_some_and(|o| o.contains("search_path=eu"))
        );
    }

    /// A connect timeout too long to count from now ("wait forever") is refused when built,
    /// as the pool's limits are, not met as a panic at the first connect.
    #[test]
    fn a_connect_timeout_past_a_year_is_refused() {
        let config = |timeout| {
            Config::new("db.example.com", "u")
                .password("p")
                .connect_timeout(timeout)
        };
        for timeout in [Duration::MAX, Duration::from_secs(366 * 24 * 3600)] {
            assert_eq!(
                setting_of(Connector::build(config(timeout))),
                Setting::ConnectTimeout
            );
        }
        assert!(Connector::build(config(Duration::from_secs(365 * 24 * 3600))).is_ok());
    }

    /// libpq's `sslrootcert=system`: the public roots, under `verify-full` only (the default
    /// it brings); a weaker mode is refused with libpq's reason.
    #[test]
    fn sslrootcert_system_means_the_public_roots_and_verify_full() {
        let config = || {
            Config::new("db.example.com", "u")
                .password("p")
                .ssl_root_cert("system")
        };
        let connector = Connector::build(config()).unwrap();
        assert_eq!(connector.shared.tls.mode, SslMode::VerifyFull);
        assert_eq!(connector.shared.tls.root_cert, None);
        for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::Prefer] {
            let refused = Connector::build(config().ssl_mode(mode));
            let shown = format!("{:?}", refused.as_ref().err());
            assert!(shown.contains("sslrootcert=system"), "{shown}");
            assert_eq!(setting_of(refused), Setting::SslMode);
        }
    }

    /// The product is the default application name; one set explicitly wins.
    #[test]
    fn the_product_names_the_connections() {
        let config = || {
            Config::new("db.example.com", "u")
                .password("p")
                .product("acme_orders/2.1")
        };
        let named = |c: Config| Connector::build(c).unwrap().shared.application_name.clone();
        assert_eq!(named(config()), "acme_orders/2.1");
        let mut explicit = config();
        explicit.application_name = "reporting".into();
        assert_eq!(named(explicit), "reporting");
    }

    #[test]
    fn the_connector_refuses_what_no_builder_checked() {
        let config = || Config::new("db.example.com", "u").password("p");
        assert_eq!(
            setting_of(Connector::build(Config::new("", "u").password("p"))),
            Setting::Host
        );
        for host in [
            "db1.example.com,db2.example.com",
            "/var/run/postgresql",
            "@abstract",
        ] {
            assert_eq!(
                setting_of(Connector::build(Config::new(host, "u").password("p"))),
                Setting::Host,
                "{host}"
            );
        }
        let several = Connector::build(Config::new("a,b", "u").password("p")).map(drop);
        assert!(
            several
                .unwrap_err()
                .to_string()
                .contains("give one host, and the others as failover endpoints"),
        );
        assert_eq!(
            setting_of(Connector::build(Config::new("db", "u"))),
            Setting::Credentials
        );
        assert_eq!(
            setting_of(Connector::build(config().connect_timeout(Duration::ZERO))),
            Setting::ConnectTimeout
        );
        assert_eq!(
            setting_of(Connector::build(config().product("acme orders"))),
            Setting::Product
        );
        assert_eq!(
            setting_of(Connector::build(
                config().failover(config().failover(config()))
            )),
            Setting::Failover
        );
        struct LakebaseTokens;
        impl CredentialSource for LakebaseTokens {
            fn fetch(&self) -> crate::credentials::BoxFuture<'_, Result<Token>> {
                Box::pin(async { Ok(Token::new("t", None)) })
            }
            fn target(&self) -> Option<Target> {
                Some(Target::Lakebase)
            }
        }
        let lakebase = config().credentials(Credentials::source(LakebaseTokens));
        let connector = Connector::build(lakebase.clone()).unwrap();
        assert_eq!(connector.target(), Target::Lakebase);
        assert_eq!(connector.shared.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            setting_of(Connector::build(lakebase.target(Target::Postgres))),
            Setting::Target
        );
    }

    /// The read-only endpoint's host is checked as the main one is, when the connector is
    /// built; white space in either is no host name; and a DSQL token, signed for the
    /// cluster's endpoint, is never sent to another host.
    #[test]
    fn hosts_are_one_tcp_host_each_and_dsql_tokens_stay_on_theirs() {
        let config = || Config::new("db.example.com", "u").password("p");
        for host in [
            "/tmp",
            "@abstract",
            "r1,r2",
            "replica .example.com",
            "rep\nlica",
        ] {
            assert_eq!(
                setting_of(Connector::build(config().read_only_host(host))),
                Setting::ReadOnlyHost,
                "{host:?}"
            );
        }
        for host in [" db.example.com", "db.example.com\t", "db\u{0}x"] {
            assert_eq!(
                setting_of(Connector::build(Config::new(host, "u").password("p"))),
                Setting::Host,
                "{host:?}"
            );
        }
        assert!(Connector::build(config().read_only_host("replica.example.com")).is_ok());
        let dsql = config()
            .target(Target::Dsql)
            .read_only_host("replica.example.com");
        let refused = Connector::build(dsql).map(drop).unwrap_err();
        assert!(refused.to_string().contains("signed for"), "{refused}");
        assert_eq!(setting_of(Err(refused)), Setting::ReadOnlyHost);
    }

    /// Aurora DSQL ends every connection after 60 minutes: a pool lifetime that would keep
    /// one longer (none, or over 59.5 minutes, since a connection whose replacement is still
    /// logging in serves up to 30 s past its lifetime) is named at once, for the connector
    /// and for each pool built with settings of its own.
    #[tokio::test]
    async fn a_dsql_pool_lifetime_beyond_the_servers_hour_is_named() {
        let dsql = || {
            Config::new("db.example.com", "u")
                .password("p")
                .target(Target::Dsql)
        };
        let lifetime = |lifetime| {
            PoolSettings::builder()
                .max_lifetime(lifetime)
                .build()
                .unwrap()
        };
        for too_long in [
            None,
            Some(Duration::from_secs(3600)),
            Some(Duration::from_secs(3571)),
        ] {
            let refused = Connector::build(dsql().pool(lifetime(too_long)));
            assert_eq!(
                setting_of(refused),
                Setting::PoolMaxLifetime,
                "{too_long:?}"
            );
            let connector = Connector::build(dsql()).unwrap();
            let refused = connector.postgres_pool_with(&lifetime(too_long)).await;
            assert!(
                matches!(
                    &refused,
                    Err(Error::Config {
                        setting: Setting::PoolMaxLifetime,
                        ..
                    })
                ),
                "{too_long:?}: {:?}",
                refused.map(drop)
            );
        }
        let kept = lifetime(Some(Duration::from_secs(3570)));
        Connector::build(dsql().pool(kept.clone())).unwrap();
        let postgres = Config::new("db.example.com", "u").password("p");
        Connector::build(postgres.pool(lifetime(None))).unwrap();
    }

    /// A credential service slower than the connect timeout fails the connection at the
    /// timeout, however long the fetch (and its retries) would go on.
    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_token_is_bounded_by_the_connect_timeout() {
        let slow = Credentials::source(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::io::Error>(Token::new("t", None))
        });
        let config = Config::new("db.example.com", "u")
            .credentials(slow)
            .strategy(crate::TokenStrategy::Lazy)
            .connect_timeout(Duration::from_secs(2));
        let connector = Connector::build(config).unwrap();
        let started = Instant::now();
        let err = connector.connect().await.map(drop).unwrap_err();
        assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    /// The error of a connection of each kind to the server on loopback at `port`.
    async fn errors_of_each_kind(port: u16) -> Vec<Error> {
        errors_of_each_kind_with(Config::new("127.0.0.1", "u").port(port).password("p")).await
    }

    /// The errors of each kind of connection opened with `config`.
    async fn errors_of_each_kind_with(config: Config) -> Vec<Error> {
        let connector = Connector::build(config).unwrap();
        #[cfg_attr(not(any(feature = "seaorm", feature = "diesel")), allow(unused_mut))]
        let mut errors = vec![connector.connect().await.map(drop).unwrap_err()];
        #[cfg(feature = "seaorm")]
        errors.push(
            connector
                .connect_by(Connector::open_sqlx)
                .await
                .map(drop)
                .unwrap_err(),
        );
        #[cfg(feature = "diesel")]
        errors.push(
            connector
                .connect_by(Connector::open_diesel)
                .await
                .map(drop)
                .unwrap_err(),
        );
        errors
    }

    /// A server that offers no TLS to connections that require it fails each kind of
    /// connection alike: neither a connection failure nor retryable, since every new
    /// connection meets it again. The SeaORM pool's (sqlx's) was retried as a lost connection
    /// until the retries ran out, and failed over as an endpoint out of reach.
    #[tokio::test]
    async fn a_server_without_tls_fails_each_kind_alike_when_tls_is_required() {
        let port = answering_logins(|_| None).await;
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Require);
        for err in errors_of_each_kind_with(config).await {
            assert!(
                !err.is_connection_failure() && !err.is_retryable(),
                "{err:?}"
            );
            assert!(ErrorChain(&err).to_string().contains("TLS"), "{err}");
        }
    }

    /// A server nothing answers for (no listener at the port) is named, with the settings
    /// that name it, by each kind of connection. The tokio-postgres connections said
    /// "database error", naming neither the host nor the port.
    #[tokio::test]
    async fn an_unreachable_server_is_named_with_its_settings() {
        // Bound, never listening: connections are refused, and nothing else takes the port.
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let port = closed.local_addr().unwrap().port();
        for err in errors_of_each_kind(port).await {
            assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
            let said = err.to_string();
            assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
            assert!(said.contains("PGHOST and PGPORT"), "{said}");
            // The host may come from the other settings that name one too.
            assert!(said.contains("DSQL_ENDPOINT"), "{said}");
            assert!(err.is_connection_failure() && err.is_retryable());
        }
    }

    /// A server that speaks just enough of the protocol to answer logins, on a port it
    /// returns: no TLS, then for the login of its connection `n` (from 0) an ErrorResponse
    /// with the fields `answer(n)` gives, or none at all (the login waits until the client
    /// goes).
    async fn answering_logins(answer: fn(usize) -> Option<&'static [u8]>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn login(
            mut socket: tokio::net::TcpStream,
            fields: Option<&'static [u8]>,
        ) -> std::io::Result<()> {
            loop {
                let mut length = [0; 4];
                socket.read_exact(&mut length).await?;
                let mut body = vec![0; u32::from_be_bytes(length) as usize - 4];
                socket.read_exact(&mut body).await?;
                // SSLRequest (80877103): no TLS here.
                if body[..4] == 80_877_103u32.to_be_bytes() {
                    socket.write_all(b"N").await?;
                    continue;
                }
                let Some(fields) = fields else {
                    let mut rest = Vec::new();
                    socket.read_to_end(&mut rest).await?;
                    return Ok(());
                };
                let mut message = vec![b'E'];
                message.extend((fields.len() as u32 + 4).to_be_bytes());
                message.extend(fields);
                return socket.write_all(&message).await;
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(login(socket, answer(n)));
                n += 1;
            }
        });
        port
    }

    /// A credential source whose service answers every fetch with HTTP 429 and a
    /// `Retry-After` of 30 s.
    fn throttled() -> Credentials {
        Credentials::source(|| async {
            Err::<Token, _>(Error::Http {
                endpoint: "https://example.cloud.databricks.com/oidc/v1/token".to_owned(),
                status: 429,
                code: "TOO_MANY_REQUESTS".to_owned(),
                message: "slow down".to_owned(),
                retry_after: Some(Duration::from_secs(30)),
            })
        })
    }

    /// A connect that ran out of time waiting for a token carries what the credential
    /// service last answered, when it answered: a 429 whose `Retry-After` outlasts the
    /// connect timeout read as a service that never answered ("no connection to the lakebase
    /// credential source"), neither its status nor its pause in the error. It stays a
    /// timeout, a connection failure that another endpoint may not meet.
    #[tokio::test(start_paused = true)]
    async fn a_connect_out_of_time_for_a_token_carries_the_services_last_answer() {
        let config = Config::new("db.example.com", "u")
            .credentials(throttled())
            .strategy(crate::TokenStrategy::Lazy)
            .connect_timeout(Duration::from_secs(2));
        let connector = Connector::build(config).unwrap();
        let err = connector.connect().await.map(drop).unwrap_err();
        assert!(
            ErrorChain(&err).to_string().contains("HTTP 429"),
            "{}",
            ErrorChain(&err)
        );
        assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
        assert!(err.is_connection_failure() && err.is_retryable(), "{err:?}");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    }

    /// A checkout that times out while the pool's connection waits for a token carries what
    /// the credential service last answered: with the acquire timeout shorter than the
    /// connect timeout (or equal, the defaults, and a little earlier), the caller was told only
    /// that the pool "was still opening 1", the 429 that held it up nowhere.
    #[tokio::test(start_paused = true)]
    async fn a_checkout_out_of_time_while_the_token_is_held_up_carries_the_services_answer() {
        let config = Config::new("db.example.com", "u")
            .credentials(throttled())
            .strategy(crate::TokenStrategy::Lazy);
        let connector = Connector::build(config).unwrap();
        let settings = PoolSettings::builder()
            .acquire_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let pool = connector.postgres_pool_with(&settings).await.unwrap();
        let err = pool.get().await.map(drop).unwrap_err();
        let chain = ErrorChain(&err).to_string();
        assert!(matches!(err, Error::PoolTimeout { .. }), "{chain}");
        assert!(
            chain.contains("still opening 1") && chain.contains("HTTP 429"),
            "{chain}"
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)), "{chain}");
    }

    /// A connect that runs out of time names the setting that bounds it: a port where
    /// something else listens and never answers as PostgreSQL does (an HTTP server waiting
    /// for a request line) said only "no connection to 127.0.0.1:3001 within 10s".
    #[tokio::test]
    async fn a_connect_out_of_time_names_the_connect_timeout() {
        let port = answering_logins(|_| None).await;
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Disable)
            .connect_timeout(Duration::from_millis(300));
        let connector = Connector::build(config).unwrap();
        let err = connector.connect().await.map(drop).unwrap_err();
        assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
        assert!(err.to_string().contains("PGCONNECT_TIMEOUT"), "{err}");
    }

    /// A refused password that the source gives again unchanged (a static one) is not sent
    /// again: each connect logged in twice with it, doubling the refusals a server's
    /// directory may count towards locking the account out, under a warning that a fresh
    /// token was being fetched.
    #[tokio::test]
    async fn a_refused_password_the_source_gives_again_is_sent_once() {
        static LOGINS: AtomicUsize = AtomicUsize::new(0);
        let port = answering_logins(|_| {
            LOGINS.fetch_add(1, Ordering::SeqCst);
            Some(b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"u\"\0\0")
        })
        .await;
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Disable);
        let connector = Connector::build(config).unwrap();
        for connects in 1..=2 {
            let err = connector.connect().await.map(drop).unwrap_err();
            assert!(err.is_auth_failure(), "{err:?}");
            assert_eq!(LOGINS.load(Ordering::SeqCst), connects, "logins");
        }
    }

    /// What moves connections to a failover endpoint: an endpoint out of reach or not taking
    /// connections now, by each kind of connection; not one that refused for a limit
    /// (busy, but answering), nor a pool that timed out full, unless what it last met says
    /// out of reach.
    #[tokio::test]
    async fn a_limit_or_a_full_pool_is_not_out_of_reach() {
        let limited = answering_logins(|_| {
            Some(b"SFATAL\0VFATAL\0C53300\0Mtoo many connections for role \"u\"\0\0")
        })
        .await;
        let config = Config::new("127.0.0.1", "u")
            .port(limited)
            .password("p")
            .connect_timeout(Duration::from_millis(300));
        for err in errors_of_each_kind_with(config).await {
            assert_eq!(err.sqlstate(), Some("53300"), "{err:?}");
            assert!(
                err.is_connection_failure() && !err.is_unreachable(),
                "{err:?}"
            );
        }
        let starting = answering_logins(|_| {
            Some(b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0")
        })
        .await;
        let mut out_of_reach = errors_of_each_kind(starting).await;
        assert!(
            out_of_reach.iter().all(Error::is_unreachable),
            "{out_of_reach:?}"
        );
        let timed_out = |opening, last_failure| Error::PoolTimeout {
            timeout: Duration::from_secs(1),
            opening,
            last_failure,
        };
        assert!(!timed_out(0, None).is_unreachable());
        assert!(timed_out(1, None).is_unreachable(), "still opening");
        let silent = Arc::new(Error::Pool("no answer to its check".to_owned()));
        assert!(timed_out(0, Some(silent)).is_unreachable());
        let gone = Arc::new(out_of_reach.pop().unwrap());
        assert!(timed_out(0, Some(gone)).is_unreachable());
    }

    /// A server starting up, shutting down or in recovery refuses each login with SQLSTATE
    /// `57P03` (cannot_connect_now): a connection failure, retried and failed over as an
    /// unreachable server is, not a database error, by each kind of connection.
    #[tokio::test]
    async fn a_server_that_cannot_take_connections_now_is_a_connection_failure() {
        let port = answering_logins(|_| {
            Some(b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0")
        })
        .await;
        for err in errors_of_each_kind(port).await {
            assert_eq!(err.sqlstate(), Some("57P03"), "{err:?}");
            assert!(err.is_connection_failure() && err.is_retryable(), "{err:?}");
            assert!(!err.is_auth_failure(), "{err:?}");
        }
    }

    /// A connection that no endpoint of a failover list can open says why each failed, as
    /// libpq lists each host's error: only the first endpoint's failure came back, and a
    /// peer that answered "starting up" (`57P03`) showed in a warning alone.
    #[tokio::test]
    async fn a_connection_no_endpoint_can_open_names_each_ones_failure() {
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let port = closed.local_addr().unwrap().port();
        let starting = answering_logins(|_| {
            Some(b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0")
        })
        .await;
        let endpoint = |port| Config::new("127.0.0.1", "u").port(port).password("p");
        let connector = Connector::build(endpoint(port).failover(endpoint(starting))).unwrap();
        let err = connector.connect().await.map(drop).unwrap_err();
        let said = ErrorChain(&err).to_string();
        assert!(
            said.contains(&format!("127.0.0.1:{port}")) && said.contains("starting up"),
            "{said}"
        );
        assert!(err.is_connection_failure() && err.is_retryable(), "{err:?}");
        assert!(!err.is_auth_failure(), "{err:?}");
    }

    /// A checkout that times out while its connection is refused for a server's limit, and
    /// tried again within the connect timeout, carries the server's refusal: with the
    /// acquire timeout shorter (PGCONNECT_TIMEOUT raised for a server that wakes up slowly),
    /// it was told only that the pool was "still opening 1", guessing at a server out of
    /// reach or a slow login.
    #[tokio::test]
    async fn a_checkout_out_of_time_while_a_limit_refuses_its_connect_carries_the_refusal() {
        let port = answering_logins(|_| {
            Some(b"SFATAL\0VFATAL\0C53300\0Mtoo many connections for role \"u\"\0\0".as_slice())
        })
        .await;
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Disable)
            .connect_timeout(Duration::from_secs(30));
        let connector = Connector::build(config).unwrap();
        let settings = PoolSettings::builder()
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let pool = connector.postgres_pool_with(&settings).await.unwrap();
        let err = pool.get().await.map(drop).unwrap_err();
        let chain = ErrorChain(&err).to_string();
        assert!(matches!(err, Error::PoolTimeout { .. }), "{chain}");
        assert!(chain.contains("too many connections"), "{chain}");
    }

    /// A connection the server refused for a limit (`53300`) and whose next try the connect
    /// timeout cut short fails with the server's refusal, which says why, not with the
    /// timeout. Before, a login slowed by a busy machine on the last try turned the answer
    /// into `ConnectTimeout`. Here the server refuses the first login and never answers the
    /// next.
    #[tokio::test]
    async fn a_limit_whose_last_try_the_timeout_cut_short_fails_with_the_limit() {
        let port = answering_logins(|n| {
            (n == 0).then_some(
                b"SFATAL\0VFATAL\0C53300\0Mtoo many connections for role \"u\"\0\0".as_slice(),
            )
        })
        .await;
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Disable)
            .connect_timeout(Duration::from_secs(3));
        let connector = Connector::build(config).unwrap();
        let err = connector.connect().await.map(drop).unwrap_err();
        assert_eq!(err.sqlstate(), Some("53300"), "{err:?}");
    }

    /// A fetch slower than the connect timeout goes on after the connect that started it
    /// gave up: its token serves the next connect, which asks the service nothing more.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_outlives_the_connect_that_stopped_waiting_for_it() {
        let fetches = Arc::new(AtomicU64::new(0));
        let (answer, answered) = tokio::sync::watch::channel(false);
        let slow = Credentials::source({
            let fetches = Arc::clone(&fetches);
            move || {
                fetches.fetch_add(1, Ordering::Relaxed);
                let mut answered = answered.clone();
                async move {
                    answered.wait_for(|&now| now).await?;
                    Ok::<_, tokio::sync::watch::error::RecvError>(Token::new("t", None))
                }
            }
        });
        let config = Config::new("db.example.com", "u")
            .credentials(slow)
            .strategy(crate::TokenStrategy::Lazy)
            .connect_timeout(Duration::from_secs(2));
        let connector = Connector::build(config).unwrap();
        let err = connector.connect().await.map(drop).unwrap_err();
        assert!(matches!(err, Error::ConnectTimeout { .. }), "{err:?}");
        answer.send(true).unwrap();
        let token = connector.cache().token().await.unwrap();
        assert_eq!(token.expose(), "t");
        assert_eq!(fetches.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn startup_values_cannot_carry_another_setting() {
        let config = || Config::new("db.example.com", "u").password("p");
        for (bad, setting) in [
            (
                config().search_path("public\t-c\twork_mem=7777kB"),
                Setting::SearchPath,
            ),
            (
                config().search_path("public\n-c work_mem=1"),
                Setting::SearchPath,
            ),
            (config().search_path("a\u{0}b"), Setting::SearchPath),
            (
                config().application_name("app\r-c x=1"),
                Setting::ApplicationName,
            ),
            (config().database("db\u{b}x"), Setting::Database),
            (Config::new("h", "u\tv").password("p"), Setting::User),
        ] {
            assert_eq!(setting_of(Connector::build(bad)), setting);
        }
        // Spaces and backslashes are escaped, not refused.
        let spaced = Connector::build(config().search_path("\"my schema\", public")).unwrap();
        let options = spaced
            .pg_config(&Token::new("t", None))
            .get_options()
            .map(str::to_owned);
        assert_eq!(
            options.as_deref(),
            Some("-c search_path=\"my\\ schema\",\\ public")
        );
    }

    /// Values out of PostgreSQL's range are refused when the connector is built, not met at
    /// every login (or, for a statement timeout under a millisecond, sent as 0: none).
    #[test]
    fn settings_out_of_range_are_refused() {
        let config = || Config::new("db.example.com", "u").password("p");
        for (bad, setting) in [
            (config().port(0), Setting::Port),
            (
                config().statement_timeout(Duration::from_micros(500)),
                Setting::StatementTimeout,
            ),
            (
                config().statement_timeout(Duration::from_millis(i32::MAX as u64 + 1)),
                Setting::StatementTimeout,
            ),
        ] {
            assert_eq!(setting_of(Connector::build(bad)), setting);
        }
    }

    #[test]
    fn a_dsql_roles_own_schema_is_quoted_when_it_must_be() {
        for (user, expected) in [
            ("app", "app"),
            ("AppUser", "\"AppUser\""),
            ("a\"b", "\"a\"\"b\""),
        ] {
            let config = Config::new("db", user).password("p").target(Target::Dsql);
            let connector = Connector::build(config).unwrap();
            assert_eq!(connector.shared.search_path.as_deref(), Some(expected));
        }
    }

    #[cfg(feature = "seaorm")]
    #[test]
    fn sqlx_connects_to_hostaddr_in_every_mode_it_keeps() {
        let addr = std::net::IpAddr::from([192, 0, 2, 7]);
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyFull,
        ] {
            let config = Config::new("db.example.com", "u")
                .password("p")
                .hostaddr(addr)
                .ssl_mode(mode);
            let options = Connector::build(config).unwrap().sqlx_options().unwrap();
            assert_eq!(options.get_host(), "db.example.com", "{mode:?}");
            let shown = format!("{options:?}");
            assert!(shown.contains("hostaddr: Some(192.0.2.7)"), "{shown}");
        }
    }

    /// sqlx trusts what `PGSSLROOTCERT` names on its own; dal gives it the CA read at build
    /// instead, or, with none configured (or libpq's `system`), an empty one: the Mozilla
    /// roots alone, as the other pools.
    #[cfg(feature = "seaorm")]
    #[test]
    fn sqlx_trusts_no_ca_but_the_configured_one() {
        for root in [None, Some("system")] {
            let mut config = Config::new("db.example.com", "u")
                .password("p")
                .ssl_mode(SslMode::VerifyFull);
            config.ssl_root_cert = root.map(Into::into);
            let options = Connector::build(config).unwrap().sqlx_options().unwrap();
            let shown = format!("{options:?}");
            assert!(shown.contains("ssl_root_cert: Some(Inline([]))"), "{shown}");
        }
    }

    /// With a CA configured, sqlx gets the CA's PEM as read when the connector was built.
    #[cfg(all(feature = "seaorm", feature = "local"))]
    #[test]
    fn sqlx_trusts_the_configured_ca_as_read_at_build() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let pem = crate::local::certs::generate().unwrap().ca_pem;
        std::fs::write(&path, &pem).unwrap();
        let config = Config::new("db.example.com", "u")
            .password("p")
            .ssl_mode(SslMode::VerifyFull)
            .ssl_root_cert(&path);
        let connector = Connector::build(config).unwrap();
        // Replaced after the build: what sqlx trusts does not change with it.
        std::fs::write(&path, "not a certificate").unwrap();
        let shown = format!("{:?}", connector.sqlx_options().unwrap());
        let read = format!("ssl_root_cert: Some(Inline({:?}))", pem.as_bytes());
        assert!(shown.contains(&read), "{shown}");
    }

    /// What the environment holds for sqlx: the configuration's address replaces the
    /// environment's; anything else it holds for sqlx alone is refused, naming the variable.
    #[cfg(feature = "seaorm")]
    #[test]
    fn sqlx_takes_nothing_from_the_environment_that_the_other_pools_do_not() {
        let configured = std::net::IpAddr::from([192, 0, 2, 7]);
        let only = |name: &'static str, value: &'static str| {
            move |n: &str| (n == name).then(|| value.to_owned())
        };
        let check = |hostaddr, mode, env: &dyn Fn(&str) -> Option<String>| {
            sqlx_environment(hostaddr, mode, "db.example.com", env)
        };
        let refused = |result: Result<Option<std::net::IpAddr>>, setting, name: &str| match result {
            Err(Error::Config { setting: s, reason }) => {
                assert_eq!(s, setting, "{reason}");
                assert!(reason.contains(name), "{reason}");
                assert!(reason.contains("db.example.com"), "{reason}");
            }
            other => panic!("expected {name} to be refused, got {other:?}"),
        };
        let nothing = |_: &str| None;
        assert_eq!(check(None, SslMode::VerifyFull, &nothing).unwrap(), None);
        assert_eq!(
            check(Some(configured), SslMode::VerifyFull, &nothing).unwrap(),
            Some(configured)
        );

        let addr = only("PGHOSTADDR", "198.51.100.9");
        assert_eq!(
            check(Some(configured), SslMode::VerifyFull, &addr).unwrap(),
            Some(configured)
        );
        refused(
            check(None, SslMode::VerifyFull, &addr),
            Setting::HostAddr,
            "198.51.100.9",
        );
        // sqlx ignores what does not parse as an address.
        let name = only("PGHOSTADDR", "db2");
        assert_eq!(check(None, SslMode::VerifyFull, &name).unwrap(), None);

        let options = only("PGOPTIONS", "-c app.secret=s3cr3t");
        match check(None, SslMode::VerifyFull, &options) {
            Err(e) => assert!(!e.to_string().contains("s3cr3t"), "{e}"),
            Ok(_) => panic!("PGOPTIONS was not refused"),
        }
        refused(
            check(None, SslMode::VerifyFull, &options),
            Setting::PgOptions,
            "PGOPTIONS",
        );
        // The fix offered is one dal has: it takes no session settings from PGOPTIONS, and
        // presents no client certificate.
        refused(
            check(None, SslMode::VerifyFull, &options),
            Setting::PgOptions,
            "DAL_SEARCH_PATH",
        );
        let blank = only("PGOPTIONS", " ");
        assert_eq!(check(None, SslMode::VerifyFull, &blank).unwrap(), None);

        for name in ["PGSSLCERT", "PGSSLKEY"] {
            let cert = only(name, "/home/me/.postgresql/postgresql.crt");
            refused(check(None, SslMode::Require, &cert), Setting::SslCert, name);
            refused(
                check(None, SslMode::Require, &cert),
                Setting::SslCert,
                "no client certificate",
            );
            assert_eq!(check(None, SslMode::Disable, &cert).unwrap(), None);
        }
    }

    /// A pool whose build waits for a token while the connector shuts down is refused, and
    /// leaves the token cache as the shutdown left it: no listener, so nothing pushes tokens
    /// into a pool nobody closes.
    #[cfg(feature = "seaorm")]
    #[tokio::test]
    async fn a_pool_built_while_the_connector_shuts_down_is_refused() {
        let (asked, mut was_asked) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Notify::new());
        let source = Credentials::source({
            let gate = Arc::clone(&gate);
            move || {
                let (gate, asked) = (Arc::clone(&gate), asked.clone());
                async move {
                    asked.send(()).ok();
                    gate.notified().await;
                    Ok::<_, std::io::Error>(Token::new("t", None))
                }
            }
        });
        let config = Config::new("db.example.com", "u")
            .credentials(source)
            .strategy(crate::TokenStrategy::Lazy);
        let connector = Connector::build(config).unwrap();
        let building = tokio::spawn({
            let connector = connector.clone();
            async move { connector.sqlx_pool().await }
        });
        was_asked.recv().await.unwrap();
        connector.shutdown().await;
        gate.notify_one();
        let built = building.await.unwrap();
        assert!(matches!(built, Err(Error::PoolClosed)), "{built:?}");
        assert_eq!(connector.cache().listeners(), 0);
    }

    /// The read-only endpoint of a connector already shut down builds no pool either.
    #[tokio::test]
    async fn a_read_only_endpoint_asked_for_after_shutdown_builds_no_pool() {
        let config = Config::new("db.example.com", "u")
            .password("p")
            .read_only_host("replica.example.com");
        let connector = Connector::build(config).unwrap();
        connector.shutdown().await;
        let replica = connector.read_only().unwrap();
        assert!(replica.is_shut_down());
        let built = replica.postgres_pool().await.map(drop);
        assert!(matches!(built, Err(Error::PoolClosed)), "{built:?}");
    }

    /// A sqlx pool its user closed leaves the connector: a program that builds one per job
    /// (a migration run, say) and closes it kept every such pool in its health report, in
    /// the list failover reaches and among the token cache's listeners, for as long as it ran.
    #[cfg(feature = "seaorm")]
    #[tokio::test]
    async fn sqlx_pools_closed_by_their_user_leave_the_connector() {
        let connector = Connector::build(Config::new("db.example.com", "u").password("p")).unwrap();
        let kept = connector.sqlx_pool().await.unwrap();
        for _ in 0..20 {
            connector.sqlx_pool().await.unwrap().close().await;
        }
        let last = connector.sqlx_pool().await.unwrap();
        last.close().await;
        assert_eq!(connector.health().pools.len(), 1, "pools in the report");
        assert_eq!(connector.cache().listeners(), 1, "listeners");
        let reached = connector.sqlx_pools().len();
        assert_eq!(reached, 1, "pools failover reaches");
        assert!(!kept.is_closed());
    }

    /// A shutdown dropped at its first wait (a timeout around it) has closed every pool all
    /// the same: a sqlx pool closes at once and then waits for its connections in use, and
    /// the pools after one that waits were left open, and out of reach of the next shutdown.
    #[cfg(feature = "seaorm")]
    #[tokio::test]
    async fn a_shutdown_dropped_at_its_first_wait_has_closed_every_pool() {
        use futures_util::FutureExt;
        // A server that takes connections and never answers: a connect holds its pool's
        // permit until the acquire times out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, mut was_accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                accepted.send(()).ok();
            }
        });
        let config = Config::new("127.0.0.1", "u")
            .port(port)
            .password("p")
            .ssl_mode(SslMode::Disable);
        let connector = Connector::build(config).unwrap();
        let first = connector.sqlx_pool().await.unwrap();
        let second = connector.sqlx_pool().await.unwrap();
        let connecting = tokio::spawn({
            let first = first.clone();
            async move { drop(first.acquire().await) }
        });
        was_accepted.recv().await.unwrap();
        assert!(connector.shutdown().now_or_never().is_none());
        assert!(first.is_closed());
        assert!(second.is_closed());
        connecting.abort();
    }
}
