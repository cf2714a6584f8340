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

    /// The database answered with an error, or the connection to it failed.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),
}

impl Error {
    /// The SQLSTATE code of a database error, such as `28P01` for a failed password.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            _ => None,
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
