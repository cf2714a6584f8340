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

    /// A SeaORM operation failed.
    #[error("SeaORM operation failed")]
    SeaOrm(#[source] sea_orm::DbErr),

    /// A Diesel operation failed.
    #[error("Diesel operation failed")]
    Diesel(#[source] diesel::result::Error),

    /// A retried transaction failed on every attempt; the cause is the last attempt's error.
    #[error("the transaction failed after {attempts} attempt(s)")]
    RetriesExhausted {
        /// How many times the transaction ran.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<Error>,
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

    /// A nested transaction was asked of an Aurora DSQL target. Nothing was sent.
    #[error("Aurora DSQL has no SAVEPOINT, so nested transactions are not supported")]
    SavepointUnsupported,

    /// A query returned a number of rows its caller ruled out.
    #[error("expected {expected}, but {actual} row(s) came back")]
    RowCount {
        /// What the caller expected.
        expected: crate::expect::Rows,
        /// How many rows came back.
        actual: usize,
    },

    /// The work of a transaction gave up with its own error; the transaction was rolled back
    /// and not retried.
    #[error("the transaction's work gave up")]
    Aborted(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The pool was shut down with [`Connector::shutdown`](crate::Connector::shutdown).
    #[error("the pool was shut down")]
    PoolClosed,
}

impl Error {
    /// The SQLSTATE code of a database error, such as `28P01` for a failed password.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.code().map(|c| c.code()),
            Error::AuthFailed { .. } => Some("28P01"),
            Error::Connect { source } => source.sqlstate(),
            Error::SeaOrm(e) => sqlx_error(e).and_then(pg_database_error).map(|e| e.code()),
            Error::Diesel(e) => diesel_sqlstate(e),
            Error::RetriesExhausted { last, .. } => last.sqlstate(),
            _ => None,
        }
    }

    /// The server's message of a database error, if there is one.
    fn db_message(&self) -> Option<&str> {
        match self {
            Error::Database(e) => e.as_db_error().map(|e| e.message()),
            Error::SeaOrm(e) => sqlx_error(e)
                .and_then(pg_database_error)
                .map(|e| e.message()),
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
    /// recognised by the server's (English) message.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::RetriesExhausted { last, .. } => return last.is_conflict(),
            Error::Connect { source } => return source.is_conflict(),
            _ => {}
        }
        if matches!(self.sqlstate(), Some("40001" | "40P01")) {
            return true;
        }
        self.db_message().is_some_and(|m| {
            m.contains("OC000")
                || m.contains("OC001")
                || (matches!(self, Error::Diesel(_)) && m.starts_with("deadlock detected"))
        })
    }

    /// Whether the connection failed or could not be opened (as opposed to the server
    /// answering with an error). A refused login is not a connection failure.
    pub fn is_connection_failure(&self) -> bool {
        use sea_orm::sqlx::Error as Sqlx;
        match self {
            Error::Database(e) => e.code().is_none(),
            Error::HttpTransport { .. } | Error::PoolTimeout(_) => true,
            Error::Connect { source } => source.is_connection_failure(),
            Error::SeaOrm(sea_orm::DbErr::ConnectionAcquire(_)) => true,
            Error::SeaOrm(e) => matches!(
                sqlx_error(e),
                Some(
                    Sqlx::Io(_)
                        | Sqlx::Tls(_)
                        | Sqlx::Protocol(_)
                        | Sqlx::PoolTimedOut
                        | Sqlx::PoolClosed
                        | Sqlx::WorkerCrashed
                )
            ),
            Error::Diesel(diesel::result::Error::DatabaseError(kind, _)) => {
                matches!(kind, diesel::result::DatabaseErrorKind::UnableToSendCommand)
            }
            Error::Diesel(diesel::result::Error::BrokenTransactionManager) => true,
            _ => false,
        }
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
    /// 5xx, and ORM errors that are [conflicts](Self::is_conflict). Bad settings and refused
    /// credentials are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Error::HttpTransport { .. } | Error::Credential { .. } | Error::PoolTimeout(_) => true,
            Error::Database(e) => e.code().is_none(),
            Error::Connect { source } => source.is_retryable(),
            Error::SeaOrm(_) | Error::Diesel(_) => {
                self.is_conflict() || (self.is_connection_failure() && !self.is_auth_failure())
            }
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

impl From<sea_orm::DbErr> for Error {
    fn from(e: sea_orm::DbErr) -> Self {
        Error::SeaOrm(e)
    }
}

impl From<diesel::result::Error> for Error {
    fn from(e: diesel::result::Error) -> Self {
        Error::Diesel(e)
    }
}

fn sqlx_error(e: &sea_orm::DbErr) -> Option<&sea_orm::sqlx::Error> {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e),
        _ => None,
    }
}

fn pg_database_error(
    e: &sea_orm::sqlx::Error,
) -> Option<&sea_orm::sqlx::postgres::PgDatabaseError> {
    e.as_database_error()?.try_downcast_ref()
}

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

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Database(e)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
