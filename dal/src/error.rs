//! The one error type of the crate.

use std::path::PathBuf;

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
        /// The variable or builder method at fault, e.g. `PGPORT`.
        setting: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The PostgreSQL server binaries (`initdb`, `postgres`) were not found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; searched {searched}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
         macOS: `brew install postgresql`) or set PG_BINDIR to the directory holding them"
    )]
    ServerBinariesNotFound {
        /// The places that were searched, for the message.
        searched: String,
    },

    /// The local PostgreSQL server could not be prepared, started or stopped.
    #[error("local PostgreSQL server: {what}")]
    LocalServer {
        /// What failed and what to do about it.
        what: String,
        /// The underlying cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A file or directory could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying cause.
        #[source]
        source: std::io::Error,
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

    /// An HTTP call of a credential source failed or was refused.
    #[error("{endpoint} answered HTTP {status}: {code}: {message}")]
    Http {
        /// The URL path called (never a query string or secret), e.g. `/oidc/v1/token`.
        endpoint: String,
        /// The HTTP status code.
        status: u16,
        /// The vendor's error code, e.g. `invalid_client` or `PERMISSION_DENIED`.
        code: String,
        /// The vendor's message.
        message: String,
    },

    /// An HTTP call of a credential source did not complete: connection refused, timeout,
    /// malformed response.
    #[error("{endpoint}: {what}")]
    HttpTransport {
        /// The URL path called (never a query string or secret).
        endpoint: String,
        /// What went wrong.
        what: String,
        /// The underlying cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The server refused the password at login (SQLSTATE `28P01`): for a token, it is
    /// wrong or expired. The cache was invalidated and one fresh token tried already.
    #[error(
        "the server refused the credentials of user {user} (SQLSTATE 28P01): the token or \
         password is wrong or has expired"
    )]
    AuthFailed {
        /// The database user.
        user: String,
        /// The server's answer.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A pool could not open a connection; the cause is the connection's own error.
    #[error("the pool could not open a connection")]
    Connect {
        /// Why the connection failed.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// No connection became available within the pool's acquire timeout.
    #[error(
        "no connection became available within {0:?}; the pool is exhausted or the database is slow"
    )]
    PoolTimeout(std::time::Duration),

    /// The pool itself failed.
    #[error("pool error: {0}")]
    Pool(String),

    /// The database answered with an error, or the connection to it failed.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),
}

impl Error {
    /// The SQLSTATE code of a database error, such as `28P01` for a failed password.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            Error::AuthFailed { .. } => Some("28P01"),
            Error::Connect { source } => source.sqlstate(),
            _ => None,
        }
    }

    /// Whether the server refused the credentials (SQLSTATE `28P01`), or the credential
    /// service refused ours (HTTP 401 or 403).
    pub fn is_auth_failure(&self) -> bool {
        match self {
            Error::Http { status, .. } => matches!(status, 401 | 403),
            Error::Connect { source } => source.is_auth_failure(),
            _ => self.sqlstate() == Some("28P01"),
        }
    }

    /// Whether trying again may succeed: timeouts, connection failures, HTTP 408, 429 and
    /// 5xx. Bad settings and refused credentials are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Error::HttpTransport { .. } | Error::Credential { .. } | Error::PoolTimeout(_) => true,
            Error::Database(e) => e.code().is_none(),
            Error::Connect { source } => source.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    #[cfg_attr(not(feature = "local"), allow(dead_code))]
    pub(crate) fn local(what: impl Into<String>) -> Self {
        Error::LocalServer {
            what: what.into(),
            source: None,
        }
    }

    #[cfg_attr(not(feature = "local"), allow(dead_code))]
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Database(e)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
