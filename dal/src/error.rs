//! The one error type of the crate, the setting ids its configuration errors name, and a
//! display of an error with its causes for log lines.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Which setting an [`Error::Config`] is about. It displays as the environment variable that
/// sets it (`PGHOST`), or as the builder setting where no variable does (`cache jitter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// `DATABASE_URL`.
    DatabaseUrl,
    /// The server's host name, `PGHOST`.
    Host,
    /// The server's address, `PGHOSTADDR`.
    HostAddr,
    /// The server's port, `PGPORT`.
    Port,
    /// The database user, `PGUSER`.
    User,
    /// The database name, `PGDATABASE`.
    Database,
    /// A static password, `PGPASSWORD`.
    Password,
    /// `PGSSLMODE` (`sslmode`).
    SslMode,
    /// `PGSSLROOTCERT` (`sslrootcert`).
    SslRootCert,
    /// `PGAPPNAME` (`application_name`).
    ApplicationName,
    /// `DAL_SEARCH_PATH`.
    SearchPath,
    /// `DAL_STATEMENT_TIMEOUT_MS`.
    StatementTimeout,
    /// `DAL_TOKEN_STRATEGY`.
    TokenStrategy,
    /// `DAL_POOL_MAX_SIZE`.
    PoolMaxSize,
    /// `DAL_POOL_MIN_IDLE`.
    PoolMinIdle,
    /// The pool's `lifetime_jitter`.
    PoolLifetimeJitter,
    /// The pool's `acquire_timeout`.
    PoolAcquireTimeout,
    /// The pool's `max_lifetime`, `DAL_POOL_MAX_LIFETIME_SECS`.
    PoolMaxLifetime,
    /// The pool's `idle_timeout`, `DAL_POOL_IDLE_TIMEOUT_SECS`.
    PoolIdleTimeout,
    /// Time allowed to open one connection, `PGCONNECT_TIMEOUT`.
    ConnectTimeout,
    /// How fast new connections open: `Config::connection_rate`.
    ConnectionRate,
    /// Other endpoints of the same database: `Config::failover`.
    Failover,
    /// The product this program is, `DAL_PRODUCT`.
    Product,
    /// The life asked for Lakebase database credentials, `LAKEBASE_CREDENTIAL_TTL_SECS`.
    LakebaseCredentialTtl,
    /// The permissions asked for Lakebase database credentials: `Lakebase::with_claims`.
    LakebaseClaims,
    /// How to authenticate to the Databricks workspace, `DATABRICKS_AUTH_TYPE`.
    DatabricksAuthType,
    /// The workspace's number, sent with credential calls, `DATABRICKS_WORKSPACE_ID`.
    DatabricksWorkspaceId,
    /// The Databricks CLI, `DATABRICKS_CLI_PATH`.
    DatabricksCliPath,
    /// The OIDC ID token of workload identity federation, `DATABRICKS_OIDC_TOKEN` (or the
    /// variable `DATABRICKS_OIDC_TOKEN_ENV` names).
    DatabricksOidcToken,
    /// The file holding that ID token, `DATABRICKS_OIDC_TOKEN_FILEPATH`.
    DatabricksOidcTokenFilepath,
    /// The GitHub Actions ID token service, `ACTIONS_ID_TOKEN_REQUEST_URL`.
    ActionsIdTokenRequestUrl,
    /// Its bearer token, `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
    ActionsIdTokenRequestToken,
    /// Where a user login keeps its refresh token: `Lakebase::with_token_cache_dir`.
    DatabricksTokenCache,
    /// The Lakebase Data API's URL: `DataApi::new`.
    DataApiUrl,
    /// The longest a Lakebase HTTP call may take: `Lakebase::with_http_timeout`.
    LakebaseHttpTimeout,
    /// The host of a read-only endpoint beside the primary, `DAL_READ_ONLY_HOST`.
    ReadOnlyHost,
    /// The kind of server: `Config::target`.
    Target,
    /// Where passwords come from: `Config::credentials`.
    Credentials,
    /// The token cache's `refresh_margin`.
    CacheRefreshMargin,
    /// The token cache's `jitter`.
    CacheJitter,
    /// The token cache's `attempts`.
    CacheAttempts,
    /// The token cache's `min_backoff` and `max_backoff`.
    CacheBackoff,
    /// A retry policy's `attempts`.
    RetryAttempts,
    /// A retry policy's delays.
    RetryDelays,
    /// A retry policy's `jitter`.
    RetryJitter,
    /// The Databricks workspace URL, `DATABRICKS_HOST`.
    DatabricksHost,
    /// The workspace's OAuth token endpoint, `DATABRICKS_TOKEN_URL`.
    DatabricksTokenUrl,
    /// The workspace's OIDC discovery document, `DATABRICKS_DISCOVERY_URL`.
    DatabricksDiscoveryUrl,
    /// A service principal's id, `DATABRICKS_CLIENT_ID`.
    DatabricksClientId,
    /// A service principal's secret, `DATABRICKS_CLIENT_SECRET`.
    DatabricksClientSecret,
    /// A personal access token, `DATABRICKS_TOKEN`.
    DatabricksToken,
    /// A `~/.databrickscfg` profile, `DATABRICKS_CONFIG_PROFILE`.
    DatabricksConfigProfile,
    /// A Lakebase Autoscaling endpoint path, `LAKEBASE_ENDPOINT`.
    LakebaseEndpoint,
    /// A Lakebase Provisioned instance name, `LAKEBASE_INSTANCE`.
    LakebaseInstance,
    /// An Aurora DSQL cluster endpoint, `DSQL_ENDPOINT`.
    DsqlEndpoint,
    /// The AWS region of an Aurora DSQL cluster, `DSQL_REGION`; for a host without one (a bare
    /// cluster id), else `AWS_REGION` or `AWS_DEFAULT_REGION`.
    DsqlRegion,
    /// The life of an Aurora DSQL token, `DSQL_TOKEN_EXPIRES_IN`.
    DsqlTokenExpiresIn,
    /// libpq's settings for every session, `PGOPTIONS`, which dal does not take (it sets
    /// `search_path` and `statement_timeout` itself) and sqlx would.
    PgOptions,
    /// A client certificate, `PGSSLCERT` (and its key, `PGSSLKEY`), which dal does not
    /// present and sqlx would.
    SslCert,
}

impl Setting {
    /// The environment variable, or the builder setting, as the messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Setting::DatabaseUrl => "DATABASE_URL",
            Setting::Host => "PGHOST",
            Setting::HostAddr => "PGHOSTADDR",
            Setting::Port => "PGPORT",
            Setting::User => "PGUSER",
            Setting::Database => "PGDATABASE",
            Setting::Password => "PGPASSWORD",
            Setting::SslMode => "PGSSLMODE",
            Setting::SslRootCert => "PGSSLROOTCERT",
            Setting::ApplicationName => "PGAPPNAME",
            Setting::SearchPath => "DAL_SEARCH_PATH",
            Setting::StatementTimeout => "DAL_STATEMENT_TIMEOUT_MS",
            Setting::TokenStrategy => "DAL_TOKEN_STRATEGY",
            Setting::PoolMaxSize => "DAL_POOL_MAX_SIZE",
            Setting::PoolMinIdle => "DAL_POOL_MIN_IDLE",
            Setting::PoolLifetimeJitter => "pool lifetime_jitter",
            Setting::PoolAcquireTimeout => "pool acquire_timeout",
            Setting::PoolMaxLifetime => "DAL_POOL_MAX_LIFETIME_SECS",
            Setting::PoolIdleTimeout => "DAL_POOL_IDLE_TIMEOUT_SECS",
            Setting::ConnectTimeout => "PGCONNECT_TIMEOUT",
            Setting::ConnectionRate => "connection rate",
            Setting::Failover => "failover",
            Setting::Product => "DAL_PRODUCT",
            Setting::LakebaseCredentialTtl => "LAKEBASE_CREDENTIAL_TTL_SECS",
            Setting::LakebaseClaims => "Lakebase claims",
            Setting::DatabricksAuthType => "DATABRICKS_AUTH_TYPE",
            Setting::DatabricksWorkspaceId => "DATABRICKS_WORKSPACE_ID",
            Setting::DatabricksCliPath => "DATABRICKS_CLI_PATH",
            Setting::DatabricksOidcToken => "DATABRICKS_OIDC_TOKEN",
            Setting::DatabricksOidcTokenFilepath => "DATABRICKS_OIDC_TOKEN_FILEPATH",
            Setting::ActionsIdTokenRequestUrl => "ACTIONS_ID_TOKEN_REQUEST_URL",
            Setting::ActionsIdTokenRequestToken => "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
            Setting::DatabricksTokenCache => "the Databricks token cache file",
            Setting::DataApiUrl => "the Data API URL",
            Setting::LakebaseHttpTimeout => "Lakebase http_timeout",
            Setting::ReadOnlyHost => "DAL_READ_ONLY_HOST",
            Setting::Target => "target",
            Setting::Credentials => "credentials",
            Setting::CacheRefreshMargin => "cache refresh margin",
            Setting::CacheJitter => "cache jitter",
            Setting::CacheAttempts => "cache attempts",
            Setting::CacheBackoff => "cache backoff",
            Setting::RetryAttempts => "retry attempts",
            Setting::RetryDelays => "retry delays",
            Setting::RetryJitter => "retry jitter",
            Setting::DatabricksHost => "DATABRICKS_HOST",
            Setting::DatabricksTokenUrl => "DATABRICKS_TOKEN_URL",
            Setting::DatabricksDiscoveryUrl => "DATABRICKS_DISCOVERY_URL",
            Setting::DatabricksClientId => "DATABRICKS_CLIENT_ID",
            Setting::DatabricksClientSecret => "DATABRICKS_CLIENT_SECRET",
            Setting::DatabricksToken => "DATABRICKS_TOKEN",
            Setting::DatabricksConfigProfile => "DATABRICKS_CONFIG_PROFILE",
            Setting::LakebaseEndpoint => "LAKEBASE_ENDPOINT",
            Setting::LakebaseInstance => "LAKEBASE_INSTANCE",
            Setting::DsqlEndpoint => "DSQL_ENDPOINT",
            Setting::DsqlRegion => "DSQL_REGION",
            Setting::DsqlTokenExpiresIn => "DSQL_TOKEN_EXPIRES_IN",
            Setting::PgOptions => "PGOPTIONS",
            Setting::SslCert => "PGSSLCERT",
        }
    }
}

impl fmt::Display for Setting {
    /// The name, and for a TLS setting a URL may give too (and which is checked only when a
    /// pool is built, not where the URL is read), the URL's parameter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Setting::SslMode => f.write_str(" (or sslmode in DATABASE_URL)"),
            Setting::SslRootCert => f.write_str(" (or sslrootcert in DATABASE_URL)"),
            _ => Ok(()),
        }
    }
}

/// How many rows a query was expected to return (see [`expect`](crate::expect)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rows {
    /// Exactly one row.
    ExactlyOne,
    /// No row or one.
    AtMostOne,
    /// One row or more.
    AtLeastOne,
    /// No row.
    None,
}

impl fmt::Display for Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rows::ExactlyOne => "exactly one row",
            Rows::AtMostOne => "at most one row",
            Rows::AtLeastOne => "at least one row",
            Rows::None => "no row",
        })
    }
}

/// What went wrong in dal.
///
/// Each message describes this layer only; the underlying cause, if any, is the error's
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing, malformed or conflicts with another one.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The setting at fault.
        setting: Setting,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// A credential source failed to produce a token.
    #[error("the {source_kind} credential source failed")]
    Credential {
        /// Which kind of source: `static`, `lakebase`, `dsql` or `custom`.
        source_kind: &'static str,
        /// The underlying cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A credential source produced a token that had expired already: by this machine's
    /// clock, or by the source's own when its answer gives the time and the clocks disagree
    /// (the Lakebase credential API's HTTP `Date`). Not retried: fetching again cannot help.
    #[error(
        "the {source_kind} credential source returned a token that expired at {} (now is {}); \
         check the clocks of this machine and of the source",
        rfc3339(*expires_at),
        rfc3339(*now)
    )]
    TokenExpired {
        /// Which kind of source.
        source_kind: &'static str,
        /// When the token expired.
        expires_at: SystemTime,
        /// The time when it arrived: the source's when it gave it, else this machine's.
        now: SystemTime,
    },

    /// An HTTP call of a credential source failed or was refused.
    #[error("{endpoint} answered HTTP {status}: {code}: {message}")]
    Http {
        /// The URL called, without its query string, e.g.
        /// `https://my-workspace.cloud.databricks.com/oidc/v1/token`.
        endpoint: String,
        /// The HTTP status code.
        status: u16,
        /// The vendor's error code, e.g. `invalid_client` or `PERMISSION_DENIED`.
        code: String,
        /// The vendor's message.
        message: String,
        /// How long the service asked to wait before trying again (`Retry-After`, in seconds,
        /// on 429 and 503 answers).
        retry_after: Option<Duration>,
    },

    /// An HTTP call of a credential source did not complete: connection refused, timeout,
    /// malformed response.
    #[error("{endpoint}: {what}")]
    HttpTransport {
        /// The URL called, without its query string.
        endpoint: String,
        /// What went wrong.
        what: String,
        /// The underlying cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A connection could not be opened, before the server answered anything: the host name
    /// did not resolve, nothing listened at the port, the network failed (a failed TLS
    /// handshake is reported as the driver reports it). The endpoint comes from whichever
    /// setting named it: `PGHOST` and `PGPORT`, `DATABASE_URL`, `DSQL_ENDPOINT`,
    /// `LAKEBASE_ENDPOINT` (looked up), `DAL_READ_ONLY_HOST`, or the configuration built in
    /// code; the cause says what failed.
    #[error(
        "cannot open a connection to {endpoint}: check the host and port (PGHOST and PGPORT, \
         DATABASE_URL, DSQL_ENDPOINT, LAKEBASE_ENDPOINT or DAL_READ_ONLY_HOST, whichever \
         named it)"
    )]
    Unreachable {
        /// `host:port` of the server.
        endpoint: String,
        /// What failed, as the driver reported it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// No endpoint of a [failover](crate::Config::failover) list could open a connection:
    /// each one's failure, in the order tried (the active endpoint first), as libpq lists
    /// each host's. Always a [connection failure](Error::is_connection_failure), retryable
    /// when one of them is.
    #[error("no endpoint could open a connection: {}", each_failure(failures))]
    AllEndpointsFailed {
        /// Each endpoint's failure, in the order tried.
        failures: Vec<Error>,
    },

    /// A database connection was not open within the connect timeout (TCP, TLS and login),
    /// or its token was not there in time.
    #[error(
        "no connection to {endpoint} within {timeout:?} (the connect timeout: \
         PGCONNECT_TIMEOUT, or connect_timeout in DATABASE_URL)"
    )]
    ConnectTimeout {
        /// `host:port` of the server, or the credential source that had no token in time.
        endpoint: String,
        /// The connect timeout.
        timeout: Duration,
        /// What the credential source last answered, when the wait was for a token and it
        /// had answered with a failure (an HTTP 429 whose `Retry-After` outlasts the timeout,
        /// say): the cause, whose [`retry_after`](Error::retry_after) this error gives.
        #[source]
        last_answer: Option<Box<Error>>,
    },

    /// The server refused the password at login (SQLSTATE `28P01`, or `28000` from an
    /// external login method such as LDAP or PAM): for a token, it is wrong or expired. The cache was invalidated and one fresh token tried already.
    #[error(
        "the server refused the credentials of user {user} (SQLSTATE {}): the token or \
         password is wrong or has expired",
        source.code().map_or("28P01", |c| c.code())
    )]
    AuthFailed {
        /// The database user.
        user: String,
        /// The server's answer.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A TLS handshake with the server failed (see
    /// [`Connector::server_certificates`](crate::Connector::server_certificates)), or a
    /// connection refused the server's certificate for another reason than its CA (not
    /// issued for the host name, expired): neither a connection failure nor retryable.
    #[error("TLS with {endpoint} failed")]
    Tls {
        /// `host:port` of the server.
        endpoint: String,
        /// What failed: the connection, the handshake, or the certificate's check.
        #[source]
        source: std::io::Error,
    },

    /// A pool could not open a connection; the cause is the connection's own error.
    #[error("the pool could not open a connection")]
    Connect {
        /// Why the connection failed.
        #[source]
        source: Arc<Error>,
    },

    /// No connection became available within the pool's acquire timeout. The message says
    /// why, as far as the pool knows: its last attempt to open a connection failed (the
    /// source; HikariCP's timeout carries its last connection failure the same way), it was
    /// still opening connections (a server out of reach, or logins slower than the acquire
    /// timeout: the connect timeout bounds them; the source is then the server's refusal for
    /// a limit, `53300` or `53400`, that they wait to try again after, or the credential
    /// service's last failed answer, when one holds up the token they wait for), or neither
    /// (every connection in use). Retryable, and an [auth failure](Self::is_auth_failure),
    /// as its source is (a failed check of an idle connection aside, which leaves it
    /// retryable): refused credentials or a wrong setting make it not retryable, and
    /// [`Transactions`](crate::Transactions) do not try again after it.
    #[error("no connection became available within {timeout:?}; {}", timeout_reason(last_failure.is_some(), *opening))]
    PoolTimeout {
        /// The pool's acquire timeout.
        timeout: Duration,
        /// Connections the pool was opening when the caller gave up.
        opening: u32,
        /// Why the pool's last attempt to open a connection, or the check of an idle one
        /// before it went out, failed, if the pool has opened none since; else what holds up
        /// the connections it is opening (a server's limit, the credential service's last
        /// failed answer).
        #[source]
        last_failure: Option<Arc<Error>>,
    },

    /// A pooled connection failed the test it gets before it is handed out again (the server
    /// closed it, say); the pool drops it and tries another. bb8 reports it to its error sink;
    /// [`Pool::get`](crate::Pool::get) returns it only as the cause of an
    /// [`Error::PoolTimeout`].
    #[error("a pooled connection failed its checkout test: {0}")]
    Pool(String),

    /// The database answered with an error, or the connection to it failed.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),

    /// A SeaORM operation failed. Made from a `DbErr` with `From` (`?`), a
    /// [`SeaOrmPool`](crate::SeaOrmPool) checkout that could not open a connection for
    /// another reason than the driver's own error (a credential service's answer, a server
    /// out of reach, a timeout) comes back as the pool's [`Error::Connect`] with that cause,
    /// as the Diesel pool's does; made by hand, this variant's classifications read that
    /// cause all the same. A login the server refused stays the driver's error, here.
    #[cfg(feature = "seaorm")]
    #[error("SeaORM operation failed")]
    SeaOrm(#[source] sea_orm::DbErr),

    /// A Diesel operation failed.
    #[cfg(feature = "diesel")]
    #[error("Diesel operation failed")]
    Diesel(#[source] diesel::result::Error),

    /// Diesel could not set up a connection the connector had opened.
    #[cfg(feature = "diesel")]
    #[error("Diesel could not set up the connection")]
    DieselSetup(#[source] diesel::ConnectionError),

    /// A retried transaction failed on every attempt; the cause is the last attempt's error.
    #[error("the transaction failed after {attempts} attempt(s)")]
    RetriesExhausted {
        /// How many times the transaction ran.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<Error>,
    },

    /// The server ended the session while its transaction sat idle, past
    /// `idle_in_transaction_session_timeout` (SQLSTATE `25P03`): it ends only a session that
    /// waits for a command that way, so no COMMIT reached it, and the transaction was rolled
    /// back. Diesel's driver reports only a closed connection (the source); the pool reads
    /// the SQLSTATE off the session's wire (over TLS). SeaORM gives the server's own error,
    /// with the same SQLSTATE.
    #[error(
        "the server ended the session while its transaction sat idle (SQLSTATE 25P03, past \
         idle_in_transaction_session_timeout), so nothing was committed: shorten the work \
         between the transaction's statements, or raise the setting"
    )]
    IdleInTransactionTimeout {
        /// What the driver reported.
        #[source]
        source: Box<Error>,
    },

    /// The connection failed while COMMIT was in flight: the transaction may or may not have
    /// committed, so it was not retried. Check the data before running it again.
    #[error(
        "the connection failed during COMMIT: the transaction may or may not have committed, \
         so it was not retried"
    )]
    AmbiguousCommit {
        /// The failure seen while committing.
        #[source]
        source: Box<Error>,
    },

    /// The server answered COMMIT with ROLLBACK, as PostgreSQL does for a transaction a failed
    /// statement aborted: nothing was committed. The work saw no error: the failure came after
    /// the rows it read (Diesel's `get_result` takes a statement's first row and leaves the
    /// rest, an error among them, unread). Retried when `sqlstate` is a
    /// [conflict](Self::is_conflict)'s.
    #[error(
        "the server answered COMMIT with ROLLBACK: a statement failed in the transaction{}, \
         so nothing was committed",
        sqlstate.as_ref().map_or(String::new(), |code| format!(" (SQLSTATE {code})"))
    )]
    RolledBackAtCommit {
        /// The SQLSTATE of the failed statement, when the pool saw it.
        sqlstate: Option<String>,
    },

    /// A nested transaction was asked of an Aurora DSQL target. Nothing was sent.
    #[error("Aurora DSQL has no SAVEPOINT, so nested transactions are not supported")]
    SavepointUnsupported,

    /// A query returned a number of rows its caller ruled out.
    #[error("expected {expected}, but {actual} row(s) came back")]
    RowCount {
        /// What the caller expected.
        expected: Rows,
        /// How many rows came back.
        actual: usize,
    },

    /// The work of a transaction gave up with its own error, or dropped a
    /// [Diesel savepoint](crate::Transactions::diesel_savepoint) before its end (a timeout
    /// around it), leaving its state unknown; the transaction was rolled back and not retried.
    #[error("the transaction's work gave up")]
    Aborted(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The pool was shut down with [`Connector::shutdown`](crate::Connector::shutdown).
    #[error("the pool was shut down")]
    PoolClosed,
}

impl Error {
    /// The cause of a failed SeaORM pool checkout in an [`Error::SeaOrm`] made by hand (not
    /// through `From`), which every classification reads in its place.
    fn carried(&self) -> Option<&Error> {
        match self {
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => checkout_failure(e).map(|source| &**source),
            _ => None,
        }
    }

    /// The SQLSTATE code of a database error, such as `28P01` for a failed password.
    pub fn sqlstate(&self) -> Option<&str> {
        if let Some(cause) = self.carried() {
            return cause.sqlstate();
        }
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            Error::AuthFailed { source, .. } => source.code().map(|c| c.code()),
            Error::Connect { source } => source.sqlstate(),
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => sqlx_error(e).and_then(pg_database_error).map(|e| e.code()),
            #[cfg(feature = "diesel")]
            Error::Diesel(e) => diesel_sqlstate(e),
            Error::RetriesExhausted { last, .. } => last.sqlstate(),
            Error::RolledBackAtCommit { sqlstate } => sqlstate.as_deref(),
            Error::IdleInTransactionTimeout { .. } => Some("25P03"),
            _ => None,
        }
    }

    /// Why a retried error was retried, as a metric label: Aurora DSQL's `OC000` or `OC001`,
    /// else the SQLSTATE, else `connection`.
    #[cfg(any(feature = "seaorm", feature = "diesel"))]
    pub(crate) fn retry_reason(&self) -> String {
        let message = self.db_message().unwrap_or_default();
        ["OC000", "OC001"]
            .into_iter()
            .find(|code| message.contains(code))
            .or(self.sqlstate())
            .unwrap_or("connection")
            .to_owned()
    }

    /// The routine of the server's code that raised a database error, if the server named
    /// one (PostgreSQL does; its translations leave it as it is).
    fn routine(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.as_db_error().and_then(|e| e.routine()),
            Error::AuthFailed { source, .. } => source.as_db_error().and_then(|e| e.routine()),
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => sqlx_error(e)
                .and_then(pg_database_error)
                .and_then(|e| e.routine()),
            Error::Connect { source } => source.routine(),
            Error::RetriesExhausted { last, .. } => last.routine(),
            _ => None,
        }
    }

    /// Whether a database error ended the session (severity `FATAL` or `PANIC`, which the
    /// server does not translate); `None` when the driver does not say.
    fn ended_session(&self) -> Option<bool> {
        use tokio_postgres::error::Severity;
        // An error's own severities; any other is the driver's fill-in for one it could not
        // read, which says nothing.
        let pg = |e: &tokio_postgres::Error| match e.as_db_error()?.parsed_severity()? {
            Severity::Fatal | Severity::Panic => Some(true),
            Severity::Error => Some(false),
            _ => None,
        };
        match self {
            Error::Database(e) => pg(e),
            Error::AuthFailed { source, .. } => pg(source),
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => {
                use sea_orm::sqlx::postgres::PgSeverity;
                match sqlx_error(e).and_then(pg_database_error)?.severity() {
                    PgSeverity::Fatal | PgSeverity::Panic => Some(true),
                    PgSeverity::Error => Some(false),
                    _ => None,
                }
            }
            Error::Connect { source } => source.ended_session(),
            Error::RetriesExhausted { last, .. } => last.ended_session(),
            _ => None,
        }
    }

    /// The server's message of a database error, if there is one.
    fn db_message(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.as_db_error().map(|e| e.message()),
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => sqlx_error(e)
                .and_then(pg_database_error)
                .map(|e| e.message()),
            #[cfg(feature = "diesel")]
            Error::Diesel(diesel::result::Error::DatabaseError(_, info)) => Some(info.message()),
            Error::Connect { source } => source.db_message(),
            Error::RetriesExhausted { last, .. } => last.db_message(),
            _ => None,
        }
    }

    /// Whether the transaction lost a conflict and may succeed when run again: a
    /// serialization failure (SQLSTATE `40001`, which is also how Aurora DSQL reports its
    /// optimistic-concurrency conflicts `OC000` and `OC001`) or a deadlock (`40P01`).
    ///
    /// diesel-async keeps the SQLSTATE of serialization failures only, so a Diesel deadlock is
    /// recognised here by the server's (English) message; Diesel's
    /// [transactions](crate::Transactions) read its SQLSTATE off the wire as well.
    pub fn is_conflict(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_conflict();
        }
        match self {
            Error::RetriesExhausted { last, .. } => return last.is_conflict(),
            Error::Connect { source } => return source.is_conflict(),
            _ => {}
        }
        if matches!(self.sqlstate(), Some("40001" | "40P01")) {
            return true;
        }
        self.is_diesel()
            && self
                .db_message()
                .is_some_and(|m| m.starts_with("deadlock detected"))
    }

    fn is_diesel(&self) -> bool {
        #[cfg(feature = "diesel")]
        if matches!(self, Error::Diesel(_)) {
            return true;
        }
        false
    }

    /// How long the service asked to wait before trying again, if it did (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        if let Some(cause) = self.carried() {
            return cause.retry_after();
        }
        match self {
            Error::Http { retry_after, .. } => *retry_after,
            Error::Connect { source } => source.retry_after(),
            Error::PoolTimeout {
                last_failure: Some(cause),
                ..
            } => cause.retry_after(),
            Error::AllEndpointsFailed { failures } => {
                failures.iter().filter_map(Error::retry_after).min()
            }
            Error::ConnectTimeout {
                last_answer: Some(answer),
                ..
            } => answer.retry_after(),
            // A custom source that answers with dal's own error.
            Error::Credential { .. } => self.in_credential().and_then(Error::retry_after),
            _ => None,
        }
    }

    /// Whether a prepared statement went stale after a schema change: one whose result type
    /// changed (SQLSTATE `0A000`, "cached plan must not change result type"), or one that
    /// names a type that was dropped and created anew (`XX000`, [`STALE_TYPE`]). Running it
    /// again on a connection that prepares it anew succeeds; the pools replace such a
    /// connection. Told by the routine that raised it, which the server does not translate;
    /// a Diesel error keeps only the message, so Diesel's [transactions](crate::Transactions)
    /// ask the connection's wire.
    #[cfg(any(feature = "seaorm", feature = "diesel"))]
    pub(crate) fn is_stale_statement(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_stale_statement();
        }
        match self {
            Error::Database(e) => e.as_db_error().is_some_and(|e| {
                (e.code().code() == "0A000"
                    && (e.routine() == Some(STALE_PLAN_ROUTINE) || e.message() == STALE_PLAN))
                    || (e.code().code() == "XX000" && e.message().starts_with(STALE_TYPE))
            }),
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => sqlx_error(e)
                .and_then(sea_orm::sqlx::Error::as_database_error)
                .is_some_and(is_stale_sqlx),
            Error::Connect { source } => source.is_stale_statement(),
            Error::RetriesExhausted { last, .. } => last.is_stale_statement(),
            _ => self
                .db_message()
                .is_some_and(|m| m == STALE_PLAN || m.starts_with(STALE_TYPE)),
        }
    }

    /// Whether the endpoint a connection was opened at may be out of reach, which moves
    /// connections to a [failover](crate::Config::failover) endpoint: a
    /// [connection failure](Self::is_connection_failure), except a refused login, a
    /// server's refusal for a limit (`53300`, `53400`: busy, but answering), and a pool that
    /// timed out with every connection in use and none failing to open or to answer its
    /// check.
    pub(crate) fn is_unreachable(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_unreachable();
        }
        match self {
            // A connection that did not answer its check (`Error::Pool`) as well.
            Error::PoolTimeout {
                last_failure: Some(cause),
                ..
            } => matches!(**cause, Error::Pool(_)) || cause.is_unreachable(),
            Error::PoolTimeout {
                opening: 0,
                last_failure: None,
                ..
            } => false,
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(sea_orm::DbErr::ConnectionAcquire(
                sea_orm::error::ConnAcquireErr::Timeout,
            )) => false,
            _ => {
                self.is_connection_failure()
                    && !self.is_auth_failure()
                    && !matches!(self.sqlstate(), Some("53300" | "53400"))
            }
        }
    }

    /// Whether the connection failed or could not be opened (as opposed to the server
    /// answering with an error). A refused login is not a connection failure.
    pub fn is_connection_failure(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_connection_failure();
        }
        #[cfg(feature = "seaorm")]
        use sea_orm::sqlx::Error as Sqlx;
        // The server ended the session: `57P01` admin_shutdown (`pg_terminate_backend`, a fast
        // shutdown), `57P02` crash_shutdown, `57P05` idle_session_timeout. Or it refused a new
        // one for now, `57P03` cannot_connect_now (starting up, shutting down, in recovery),
        // or for a limit: `53300` too_many_connections, `53400` (Aurora DSQL: connection rate
        // exceeded).
        // A limit's code counts only on an error that ended the session (`FATAL`): a login's.
        // PostgreSQL raises `53400` for a statement too (past `temp_file_limit`, say), which
        // fails that statement alone and is no connection failure.
        match self.sqlstate() {
            Some("57P01" | "57P02" | "57P03" | "57P05") => return true,
            Some("53300" | "53400") if self.ended_session() != Some(false) => return true,
            _ => {}
        }
        // diesel-async gives no SQLSTATE for those (kind `Unknown`): PostgreSQL's messages
        // for them begin "terminating connection" (its `postgres.c`), as the SQLSTATE-less
        // conflicts above are told by theirs.
        if self.is_diesel()
            && self
                .db_message()
                .is_some_and(|m| m.starts_with("terminating connection"))
        {
            return true;
        }
        match self {
            Error::Database(e) => is_connection_lost(e),
            Error::HttpTransport { .. }
            | Error::PoolTimeout { .. }
            | Error::ConnectTimeout { .. }
            | Error::Unreachable { .. } => true,
            Error::Connect { source } => source.is_connection_failure(),
            Error::AllEndpointsFailed { .. } => true,
            // A pool shut down stays shut.
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(sea_orm::DbErr::ConnectionAcquire(reason)) => {
                !matches!(reason, sea_orm::error::ConnAcquireErr::ConnectionClosed)
            }
            // A certificate refused (a plain sqlx pool's, which the connector does not open):
            // no retry mends it.
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) if sqlx_error(e).is_some_and(|e| refuses_certificate(e)) => false,
            // A login that broke off on a message the driver cannot read (a method of
            // authentication it does not implement): every new connection meets it again.
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e)))
                if matches!(**e, Sqlx::Protocol(_)) =>
            {
                false
            }
            // A server that offers no TLS to a connection that requires it (sqlx's own
            // words): every new connection meets it again, as tokio-postgres's does.
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e)
                if sqlx_error(e).is_some_and(
                    |e| matches!(e, Sqlx::Tls(tls) if tls.to_string() == "server does not support TLS"),
                ) =>
            {
                false
            }
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(e) => sqlx_error(e).is_some_and(|e| {
                matches!(
                    e,
                    Sqlx::Io(_)
                        | Sqlx::Tls(_)
                        | Sqlx::Protocol(_)
                        | Sqlx::PoolTimedOut
                        | Sqlx::WorkerCrashed
                ) && !is_unsendable_sqlx(e)
            }),
            #[cfg(feature = "diesel")]
            Error::Diesel(diesel::result::Error::DatabaseError(kind, info)) => {
                matches!(kind, diesel::result::DatabaseErrorKind::UnableToSendCommand)
                    && !is_unsendable_diesel(&**info)
            }
            #[cfg(feature = "diesel")]
            Error::Diesel(diesel::result::Error::BrokenTransactionManager) => true,
            #[cfg(feature = "diesel")]
            Error::DieselSetup(_) => true,
            _ => false,
        }
    }

    /// Whether a write was refused because the session is read-only (SQLSTATE `25006`,
    /// `read_only_sql_transaction`), as on a [read-only connector](crate::Connector::read_only)
    /// or a replica.
    pub fn is_read_only(&self) -> bool {
        self.sqlstate() == Some("25006")
    }

    /// The rows-count of a [`RowCount`](Error::RowCount) error: how many rows came back.
    pub fn row_count(&self) -> Option<usize> {
        match self {
            Error::RowCount { actual, .. } => Some(*actual),
            _ => None,
        }
    }

    /// A transaction body's own reason to give up, as an [`Error::Aborted`].
    pub fn abort(reason: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Aborted(reason.into())
    }

    /// Whether the server refused the credentials, or the credential service refused ours
    /// (HTTP 401 or 403, also as a custom source's answer inside [`Error::Credential`]).
    ///
    /// A refused login carries SQLSTATE `28P01` (`invalid_password`: password and SCRAM
    /// logins) or `28000` (`invalid_authorization_specification`: PostgreSQL's external
    /// methods such as LDAP, and token services built on them); both count. PostgreSQL's
    /// other `28000` refusals do not, since a new token cannot mend them: no `pg_hba.conf`
    /// line for the connection (an `sslmode` the server does not accept, say), a role that
    /// does not exist or may not log in. They are told apart by the routine that raised them
    /// (`ClientAuthentication`, `InitializeSessionUserId`), which the server does not
    /// translate.
    pub fn is_auth_failure(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_auth_failure();
        }
        match self {
            Error::Http { status, .. } => matches!(status, 401 | 403),
            Error::Connect { source } => source.is_auth_failure(),
            Error::PoolTimeout {
                last_failure: Some(cause),
                ..
            } => cause.is_auth_failure(),
            Error::Credential { .. } => self.in_credential().is_some_and(Error::is_auth_failure),
            _ => self
                .sqlstate()
                .is_some_and(|code| refuses_credentials(code, self.routine())),
        }
    }

    /// Whether trying again may succeed: timeouts, connection failures, HTTP 408, 429 and
    /// 5xx, and database errors that are [conflicts](Self::is_conflict). Bad settings and
    /// refused credentials are not retryable, nor a pool timeout they caused. A credential source's failure is, unless it is
    /// dal's own error that is not (a custom source answering [`Error::Http`] 403, say). For
    /// callers with a retry library of their own.
    ///
    /// It cannot tell where an error happened: a connection lost under a `COMMIT`, or under
    /// a single write outside a transaction, is retryable here, yet the write may have been
    /// applied; retry such work only when it is idempotent. [`Transactions`](crate::Transactions)
    /// tells them apart: it tries again after a lost connection only when the transaction
    /// had not begun, and reports one under the `COMMIT` as [`Error::AmbiguousCommit`].
    pub fn is_retryable(&self) -> bool {
        if let Some(cause) = self.carried() {
            return cause.is_retryable();
        }
        match self {
            Error::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            // A custom source's failure is retried unless it says otherwise with dal's error,
            // or panicked.
            Error::Credential { source, .. } => match self.in_credential() {
                Some(e) => e.is_retryable(),
                None => !source.is::<Panicked>(),
            },
            // As its cause is; idle connections that failed their checks (a server gone
            // silent) may be followed by one that answers.
            Error::PoolTimeout {
                last_failure: Some(cause),
                ..
            } => matches!(**cause, Error::Pool(_)) || cause.is_retryable(),
            Error::HttpTransport { .. }
            | Error::PoolTimeout { .. }
            | Error::ConnectTimeout { .. }
            | Error::Unreachable { .. } => true,
            Error::Database(e) => {
                is_connection_lost(e) || self.is_connection_failure() || self.is_conflict()
            }
            Error::Connect { source } => source.is_retryable(),
            Error::AllEndpointsFailed { failures } => failures.iter().any(Error::is_retryable),
            Error::RolledBackAtCommit { .. } => self.is_conflict(),
            #[cfg(feature = "diesel")]
            Error::DieselSetup(_) => true,
            #[cfg(feature = "seaorm")]
            Error::SeaOrm(_) => self.is_orm_retryable(),
            #[cfg(feature = "diesel")]
            Error::Diesel(_) => self.is_orm_retryable(),
            _ => false,
        }
    }

    /// An ORM error is worth retrying when it is a conflict, or a lost connection that was
    /// not a refused login.
    #[cfg(any(feature = "seaorm", feature = "diesel"))]
    fn is_orm_retryable(&self) -> bool {
        self.is_conflict() || (self.is_connection_failure() && !self.is_auth_failure())
    }

    /// A copy of a credential source's failure, for the callers that waited on the fetch
    /// that met it: the same variant and fields, with causes that cannot be copied kept as
    /// their messages. A failure of another kind becomes an [`Error::Credential`] of
    /// `source_kind`.
    pub(crate) fn duplicate(&self, source_kind: &'static str) -> Error {
        let said =
            |e: &(dyn std::error::Error + 'static)| -> Box<dyn std::error::Error + Send + Sync> {
                ErrorChain(e).to_string().into()
            };
        match self {
            Error::Config { setting, reason } => Error::config(*setting, reason.clone()),
            Error::Credential {
                source_kind,
                source,
            } => Error::Credential {
                source_kind,
                source: match self.in_credential() {
                    // dal's own error of a kind copied as its words: those words, not another
                    // `Credential` around them.
                    Some(e @ Error::Credential { .. }) => Box::new(e.duplicate(source_kind)),
                    Some(e) => match e.duplicate(source_kind) {
                        Error::Credential { source, .. } => source,
                        copy => Box::new(copy),
                    },
                    None => said(&**source),
                },
            },
            Error::TokenExpired {
                source_kind,
                expires_at,
                now,
            } => Error::TokenExpired {
                source_kind,
                expires_at: *expires_at,
                now: *now,
            },
            Error::Http {
                endpoint,
                status,
                code,
                message,
                retry_after,
            } => Error::Http {
                endpoint: endpoint.clone(),
                status: *status,
                code: code.clone(),
                message: message.clone(),
                retry_after: *retry_after,
            },
            Error::HttpTransport {
                endpoint,
                what,
                source,
            } => Error::HttpTransport {
                endpoint: endpoint.clone(),
                what: what.clone(),
                source: source.as_ref().map(|e| said(&**e)),
            },
            other => Error::Credential {
                source_kind,
                source: said(other),
            },
        }
    }

    /// dal's own error inside an [`Error::Credential`]: a custom source's answer.
    fn in_credential(&self) -> Option<&Error> {
        match self {
            Error::Credential { source, .. } => source.downcast_ref::<Error>(),
            _ => None,
        }
    }

    /// A credential source's fetch that panicked with `payload`: its kind's
    /// [`Error::Credential`], not retried.
    pub(crate) fn source_panicked(
        source_kind: &'static str,
        payload: &(dyn std::any::Any + Send),
    ) -> Self {
        Error::Credential {
            source_kind,
            source: Box::new(Panicked(panic_message(payload))),
        }
    }

    pub(crate) fn config(setting: Setting, reason: impl Into<String>) -> Self {
        Error::Config {
            setting,
            reason: reason.into(),
        }
    }
}

/// Each failure of [`Error::AllEndpointsFailed`], with its causes, in the order tried.
fn each_failure(failures: &[Error]) -> String {
    let each: Vec<String> = failures.iter().map(|e| ErrorChain(e).to_string()).collect();
    each.join("; then ")
}

/// Why no connection became available (see [`Error::PoolTimeout`]).
fn timeout_reason(failed: bool, opening: u32) -> std::borrow::Cow<'static, str> {
    match (failed, opening) {
        (true, 0) => "the pool's last attempt to open or check one failed".into(),
        (true, n) => format!("the pool was still opening {n}, held up by its last failure").into(),
        (false, 0) => "the pool is exhausted or the database is slow".into(),
        (false, n) => format!(
            "the pool was still opening {n} (a server out of reach, a slow login or a slow \
             credential service; its error comes at the connect timeout)"
        )
        .into(),
    }
}

#[cfg(feature = "seaorm")]
impl From<sea_orm::DbErr> for Error {
    /// A checkout of the SeaORM pool that failed for another reason than the driver's own
    /// error gives back the pool's own error, as the Diesel pool's does: [`Error::Connect`]
    /// with its cause, or [`Error::PoolTimeout`] that has one.
    fn from(e: sea_orm::DbErr) -> Self {
        match checkout_failure(&e).map(|source| (&**source, source)) {
            Some((
                Error::PoolTimeout {
                    timeout,
                    opening,
                    last_failure,
                },
                _,
            )) => Error::PoolTimeout {
                timeout: *timeout,
                opening: *opening,
                last_failure: last_failure.clone(),
            },
            Some((_, source)) => Error::Connect {
                source: Arc::clone(source),
            },
            None => Error::SeaOrm(e),
        }
    }
}

/// The cause a failed checkout of the SeaORM pool carries in `e` (see [`CheckoutFailure`]).
#[cfg(feature = "seaorm")]
fn checkout_failure(e: &sea_orm::DbErr) -> Option<&Arc<Error>> {
    match sqlx_error(e)? {
        sea_orm::sqlx::Error::Io(io) => io
            .get_ref()?
            .downcast_ref::<CheckoutFailure>()
            .map(|CheckoutFailure(source)| source),
        _ => None,
    }
}

/// The cause of a SeaORM pool checkout that could not open a connection, carried through
/// SeaORM's error (inside sqlx's I/O error, the kind sqlx gives for a connection it could
/// not open) so that converting it back gives the cause whole: a credential service's
/// answer stays an auth failure, or retryable with its `Retry-After`. Shows the cause's chain.
#[cfg(feature = "seaorm")]
#[derive(Debug)]
pub(crate) struct CheckoutFailure(pub(crate) Arc<Error>);

#[cfg(feature = "seaorm")]
impl fmt::Display for CheckoutFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ErrorChain(&*self.0).fmt(f)
    }
}

#[cfg(feature = "seaorm")]
impl std::error::Error for CheckoutFailure {}

#[cfg(feature = "diesel")]
impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        Error::Diesel(e)
    }
}

#[cfg(feature = "seaorm")]
fn sqlx_error(e: &sea_orm::DbErr) -> Option<&sea_orm::sqlx::Error> {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e),
        _ => None,
    }
}

/// The rustls error anywhere in `e`'s chain, if TLS failed.
pub(crate) fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        // tokio-rustls wraps rustls' error in an io::Error, whose `source` skips it.
        let inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map_or(c, |inner| inner as &(dyn std::error::Error + 'static));
        if let Some(e) = inner.downcast_ref::<rustls::Error>() {
            return Some(e);
        }
        cause = c.source();
    }
    None
}

/// Whether the client refused the server's certificate (not issued for the host name,
/// expired, revoked, badly signed), as rustls says anywhere in `e`'s chain.
pub(crate) fn refuses_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    rustls_error(e).is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

/// PostgreSQL's message for SQLSTATE `0A000` on a stale prepared statement (a schema change
/// altered its result type), in English.
pub(crate) const STALE_PLAN: &str = "cached plan must not change result type";

/// The routine that raises it, the `R` field of the error, which the server does not
/// translate (`lc_messages`): `src/backend/utils/cache/plancache.c`.
pub(crate) const STALE_PLAN_ROUTINE: &str = "RevalidateCachedQuery";

/// The start of PostgreSQL's message for SQLSTATE `XX000` when a statement names a type that
/// is gone: a type recreated by a migration, where a statement prepared with the old one, or
/// Diesel's lookup of the type by name (kept for the connection's life), holds its id. An
/// internal error (`elog`, in `lsyscache.c` among others), never translated. A connection
/// that meets it is replaced, as one with a stale statement is.
pub(crate) const STALE_TYPE: &str = "cache lookup failed for type ";

/// The routines of PostgreSQL that refuse a login with SQLSTATE `28000` for another reason
/// than its credentials, which no new token mends: `ClientAuthentication` (`auth.c`: no
/// `pg_hba.conf` line for the connection, or one that rejects it) and
/// `InitializeSessionUserId` (`miscinit.c`: a role that does not exist or may not log in).
const NOT_CREDENTIAL_ROUTINES: [&str; 2] = ["ClientAuthentication", "InitializeSessionUserId"];

/// Whether a server's error with SQLSTATE `code`, raised by `routine`, refused the
/// credentials: `28P01`, or `28000` unless one of [`NOT_CREDENTIAL_ROUTINES`] raised it.
/// PostgreSQL's own refusal of credentials comes from `auth.c`'s `auth_failed`; a token
/// service may refuse from code of its own (an authentication hook), with a routine of
/// its own, and a server that is not PostgreSQL may name none: both count.
pub(crate) fn refuses_credentials(code: &str, routine: Option<&str>) -> bool {
    code == "28P01"
        || (code == "28000" && !routine.is_some_and(|r| NOT_CREDENTIAL_ROUTINES.contains(&r)))
}

/// Whether sqlx's database error `e` (SQLSTATE `0A000`) is a stale prepared statement's.
#[cfg(feature = "seaorm")]
fn is_stale_plan(e: &dyn sea_orm::sqlx::error::DatabaseError) -> bool {
    e.try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
        .is_some_and(|e| e.routine() == Some(STALE_PLAN_ROUTINE))
        || e.message() == STALE_PLAN
}

/// Whether sqlx's statement failed as stale: a prepared statement whose result type changed
/// (`0A000`, see [`is_stale_plan`]), or one that names a type dropped and created anew
/// (`XX000`, [`STALE_TYPE`]). Both run again on a connection that prepares them anew.
#[cfg(feature = "seaorm")]
pub(crate) fn is_stale_sqlx(e: &dyn sea_orm::sqlx::error::DatabaseError) -> bool {
    match e.code().as_deref() {
        Some("0A000") => is_stale_plan(e),
        Some("XX000") => e.message().starts_with(STALE_TYPE),
        _ => false,
    }
}

#[cfg(feature = "seaorm")]
fn pg_database_error(
    e: &sea_orm::sqlx::Error,
) -> Option<&sea_orm::sqlx::postgres::PgDatabaseError> {
    e.as_database_error()?.try_downcast_ref()
}

/// The message a panic was raised with (`panic!`'s text), from its payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// A credential source's fetch that panicked (a bug in the source, met again by a fetch at
/// once), with the panic's message.
#[derive(Debug)]
struct Panicked(String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the credential source panicked: {}", self.0)
    }
}

impl std::error::Error for Panicked {}

#[cfg(feature = "diesel")]
/// diesel-async maps the SQLSTATEs it knows to error kinds and drops the rest.
fn diesel_sqlstate(e: &diesel::result::Error) -> Option<&'static str> {
    use diesel::result::DatabaseErrorKind as Kind;
    match e {
        diesel::result::Error::DatabaseError(kind, _) => match kind {
            Kind::SerializationFailure => Some("40001"),
            Kind::UniqueViolation => Some("23505"),
            Kind::ForeignKeyViolation => Some("23503"),
            Kind::NotNullViolation => Some("23502"),
            Kind::CheckViolation => Some("23514"),
            Kind::RestrictViolation => Some("23001"),
            Kind::ExclusionViolation => Some("23P01"),
            Kind::ReadOnlyTransaction => Some("25006"),
            _ => None,
        },
        _ => None,
    }
}

/// Whether tokio-postgres lost the connection: it says the connection is closed, or an I/O or
/// TLS failure sits in the cause chain. A conversion error (`FromSql`) or a server error is not
/// a lost connection, though it carries no SQLSTATE either.
fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            // Its encoder's refusal to write a message (a NUL byte in a statement's text, too
            // many parameters), before anything was sent, is of kind `InvalidInput`.
            return io.kind() != std::io::ErrorKind::InvalidInput;
        }
        if c.is::<rustls::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// How tokio-postgres begins its error for a message it refuses to write (`Kind::Encode`: a
/// NUL byte in a statement's text, more than 65,535 parameters, a value over `i32::MAX`
/// bytes), before anything is sent; diesel-async keeps only that text. The connection is as
/// it was.
#[cfg(feature = "diesel")]
const UNSENDABLE: &str = "error encoding message to server";

/// Whether sqlx refused to send a statement of more than 65,535 parameters (its
/// `PgConnection::run`), before anything was sent.
#[cfg(feature = "seaorm")]
pub(crate) fn is_unsendable_sqlx(e: &sea_orm::sqlx::Error) -> bool {
    matches!(e, sea_orm::sqlx::Error::Protocol(m) if m.contains("too many arguments for query"))
}

/// Whether diesel-async's error is tokio-postgres's refusal to write a message (see
/// [`UNSENDABLE`]).
#[cfg(feature = "diesel")]
pub(crate) fn is_unsendable_diesel(info: &dyn diesel::result::DatabaseErrorInformation) -> bool {
    info.message().starts_with(UNSENDABLE)
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Database(e)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A time as RFC 3339, to the second, in UTC; one outside chrono's range (a custom source's
/// "never", say) as the seconds since the Unix epoch.
fn rfc3339(t: SystemTime) -> String {
    match utc(t) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => format!(
            "{:?} after the Unix epoch",
            t.duration_since(std::time::UNIX_EPOCH)
        ),
    }
}

/// `t` in UTC, if chrono can hold it (its `From<SystemTime>` panics on a time past the year
/// 262,143 or before 1970 minus as much).
pub(crate) fn utc(t: SystemTime) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, TimeDelta};
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => DateTime::UNIX_EPOCH.checked_add_signed(TimeDelta::from_std(after).ok()?),
        Err(e) => DateTime::UNIX_EPOCH.checked_sub_signed(TimeDelta::from_std(e.duration()).ok()?),
    }
}

/// Displays an error with its causes, for log lines.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A COMMIT the server answered with ROLLBACK after a conflict is retryable, as its docs
    /// and `is_conflict` say: `is_retryable` answered false, so a caller retrying with its
    /// own policy gave up on a serialization failure.
    #[test]
    fn a_commit_rolled_back_for_a_conflict_is_retryable() {
        let rolled_back = |code: &str| Error::RolledBackAtCommit {
            sqlstate: Some(code.to_owned()),
        };
        assert!(rolled_back("40001").is_conflict() && rolled_back("40001").is_retryable());
        assert!(!rolled_back("22012").is_retryable());
        assert!(!Error::RolledBackAtCommit { sqlstate: None }.is_retryable());
    }

    /// The copy of a custom source's failure that the callers waiting on its fetch get says
    /// what failed once: a dal error of a kind the copy keeps only as words came back as "the
    /// custom credential source failed: the custom credential source failed: ...".
    #[test]
    fn a_copied_failure_of_a_custom_source_names_it_once() {
        let failed = Error::Credential {
            source_kind: "custom",
            source: Box::new(Error::abort("the vault is sealed")),
        };
        let copy = ErrorChain(&failed.duplicate("custom")).to_string();
        assert_eq!(
            copy.matches("credential source failed").count(),
            1,
            "{copy}"
        );
        assert!(copy.contains("the vault is sealed"), "{copy}");
    }

    /// A certificate that a plain sqlx pool (or a migration) refused for its date or name
    /// is no connection failure, as the connector's own connections' is not: nothing a retry
    /// mends.
    #[cfg(feature = "seaorm")]
    #[test]
    fn a_certificate_sqlx_refused_is_no_connection_failure() {
        let refused = sea_orm::sqlx::Error::Tls(Box::new(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        )));
        let e = Error::SeaOrm(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
            Arc::new(refused),
        )));
        assert!(!e.is_connection_failure() && !e.is_retryable(), "{e:?}");
    }
}
