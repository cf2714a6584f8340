//! The error type of the local services: the server binaries, the cluster's files and
//! processes, and the settings of the local services.

use std::path::PathBuf;

/// What went wrong while preparing, starting or driving a local service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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

    /// A setting of a local service is malformed.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The variable or builder setting at fault, e.g. `DAL_DEV_DIR`.
        setting: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The local server answered with an error, or the connection to it failed.
    #[error("local PostgreSQL server: database error")]
    Database(#[from] tokio_postgres::Error),

    /// dal itself failed, for instance building a configuration for the local services.
    #[error(transparent)]
    Dal(#[from] crate::Error),
}

impl Error {
    pub(crate) fn config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn local(what: impl Into<String>) -> Self {
        Error::LocalServer {
            what: what.into(),
            source: None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// `Result` with the local services' [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
