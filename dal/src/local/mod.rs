//! A PostgreSQL server the project starts itself, for tests, examples and development, and a
//! Lakebase-compatible credential service in front of it ([`LocalLakebase`]).
//!
//! [`LocalPostgres::start`] creates an *ephemeral* cluster in a temporary directory: fsync off,
//! removed when the handle is dropped, or when the process that started it exits, whichever
//! comes first. [`LocalPostgres::dev`] starts (or reuses) the *persistent* development cluster
//! kept under `target/dal-dev`, which keeps running until [`LocalPostgres::stop_dev`].
//!
//! Both listen on a free loopback port with `scram-sha-256` authentication, a superuser with a
//! generated password, and TLS on with a certificate for `localhost` and `127.0.0.1` signed by
//! a CA generated at creation, so that clients can test `sslmode=verify-full`. The handle's
//! own superuser logins go over that TLS, verified against that CA, with SCRAM channel
//! binding: a program holding the port (the old one, after a restart) never sees the password.
//!
//! When started by root, the server runs as the `postgres` OS user (`initdb` refuses root).
//!
//! ```no_run
//! # async fn demo() -> dal::local::Result<()> {
//! let pg = dal::local::LocalPostgres::start().await?;
//! pg.create_database("app", None).await?;
//! pg.create_role("app_user", "first-token", Some(chrono::Utc::now() + chrono::Duration::minutes(15)))
//!     .await?;
//! # Ok(()) }
//! ```

mod binaries;
pub(crate) mod certs;
mod dsql_checks;
#[cfg(feature = "dsql")]
mod dsql_endpoint;
mod error;
mod files;
mod lakebase;
mod server;
mod stack;
mod token_login;

pub use dsql_checks::{
    Check, DSQL_FINDINGS_SQL, DSQL_UNSUPPORTED, DsqlChecks, Unsupported, dsql_findings,
};
#[cfg(feature = "dsql")]
pub use dsql_endpoint::LocalDsqlEndpoint;
pub use error::{Error, Result};
pub use lakebase::{LocalLakebase, LocalLakebaseConfig};
pub use server::{ConnectionAgeLimit, LocalPostgres};
pub use stack::{
    DEV_DATABASE, DEV_DSQL_DATABASE, DEV_DSQL_ROLE, DEV_ROLE, DevStack, FLAVOR_VAR, Flavor,
};
pub use token_login::TOKEN_GROUP;
#[cfg(feature = "dsql")]
pub use token_login::{
    LOCAL_DSQL_HOST, LOCAL_DSQL_PEER_HOST, LOCAL_DSQL_PEER_REGION, LOCAL_DSQL_REGION,
};
