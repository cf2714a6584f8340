//! The embedded default: the persistent development PostgreSQL, with a local Lakebase-compatible
//! credential service in front of it or (`DAL_LOCAL=dsql`) local Aurora DSQL IAM tokens, so that
//! programs run with no cloud account and still log in with short-lived, really expiring tokens.

use std::time::Duration;

use super::error::{Error, Result};
use super::{LocalLakebase, LocalLakebaseConfig, LocalPostgres};
use crate::Config;

/// The database of the embedded default.
pub const DEV_DATABASE: &str = "shop";
/// The role the embedded default logs in as (the local service principal's id).
pub const DEV_ROLE: &str = "dal-local-app";
/// The database of the embedded default in its DSQL flavour (owned by `admin`).
pub const DEV_DSQL_DATABASE: &str = "dsql";
/// The non-admin role of the DSQL flavour, with a schema of its own, as in the DSQL samples.
pub const DEV_DSQL_ROLE: &str = "dal_app";
/// The variable that chooses the flavour: `lakebase` (the default) or `dsql`.
pub const FLAVOR_VAR: &str = "DAL_LOCAL";

/// The key of the session advisory lock under which programs set up the development
/// cluster's databases, roles and schemas: "dal_setu" in ASCII.
const SETUP_LOCK: i64 = 0x6461_6c5f_7365_7475;

/// Which cloud database the embedded default behaves like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Flavor {
    /// Databricks Lakebase: OAuth and database credentials from a local HTTP service.
    #[default]
    Lakebase,
    /// Aurora DSQL: IAM tokens signed locally (needs the `dsql` feature).
    Dsql,
}

impl Flavor {
    /// The flavour [`FLAVOR_VAR`] names; Lakebase when it is unset or empty.
    ///
    /// # Errors
    /// [`Error::Config`] naming `DAL_LOCAL` for any other value.
    pub fn from_env() -> Result<Self> {
        match std::env::var(FLAVOR_VAR) {
            Err(_) => Ok(Self::Lakebase),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "lakebase" => Ok(Self::Lakebase),
                "dsql" => Ok(Self::Dsql),
                _ => Err(Error::config(
                    FLAVOR_VAR,
                    format!("{v:?} is not one of lakebase, dsql"),
                )),
            },
        }
    }
}

/// The development PostgreSQL plus what issues its tokens.
///
/// The server outlives the process (see [`LocalPostgres::dev`]); the credential service
/// lives as long as this value. Several programs may run on the embedded default at once:
/// every token logs in until its own expiry, whichever program fetched it.
#[derive(Debug)]
pub struct DevStack {
    /// The development server.
    pub postgres: LocalPostgres,
    lakebase: Option<LocalLakebase>,
    token_ttl: Duration,
}

impl DevStack {
    /// The Lakebase flavour: starts (or reuses) the development server, makes sure
    /// [`DEV_DATABASE`] exists and belongs to [`DEV_ROLE`], and starts a credential service
    /// whose database tokens live `token_ttl`.
    pub async fn start(token_ttl: Duration) -> Result<Self> {
        Self::start_flavor(Flavor::Lakebase, token_ttl).await
    }

    /// The flavour [`FLAVOR_VAR`] names; see [`start_flavor`](Self::start_flavor).
    pub async fn from_env(token_ttl: Duration) -> Result<Self> {
        Self::start_flavor(Flavor::from_env()?, token_ttl).await
    }

    /// Starts the embedded default in `flavor`, with tokens that live `token_ttl`.
    ///
    /// The DSQL flavour logs in as `admin` (schema `public`) to [`DEV_DSQL_DATABASE`], and
    /// also creates [`DEV_DSQL_ROLE`] with a schema of its own; tokens are signed for
    /// [`LOCAL_DSQL_HOST`](super::LOCAL_DSQL_HOST) and checked at login.
    ///
    /// # Errors
    /// [`Error::Config`] for the DSQL flavour without the `dsql` feature.
    pub async fn start_flavor(flavor: Flavor, token_ttl: Duration) -> Result<Self> {
        let postgres = LocalPostgres::dev().await?;
        // Programs started together (a service and its migration) set up the same
        // databases, roles and schemas: one at a time, each finding what the one before made.
        let setup = postgres.admin("postgres").await?;
        setup
            .execute("SELECT pg_advisory_lock($1)", &[&SETUP_LOCK])
            .await?;
        let lakebase = match flavor {
            Flavor::Lakebase => {
                let config = LocalLakebaseConfig::new()
                    .with_client(DEV_ROLE, uuid::Uuid::new_v4().simple().to_string())
                    .with_role(DEV_ROLE)
                    .with_token_ttl(token_ttl);
                let lakebase = LocalLakebase::start(&postgres, config).await?;
                postgres
                    .create_database(DEV_DATABASE, Some(DEV_ROLE))
                    .await?;
                Some(lakebase)
            }
            Flavor::Dsql => {
                dsql_roles(&postgres).await?;
                None
            }
        };
        // Released with the session.
        drop(setup);
        Ok(Self {
            postgres,
            lakebase,
            token_ttl,
        })
    }

    /// The local Lakebase service, in the Lakebase flavour.
    pub fn lakebase(&self) -> Option<&LocalLakebase> {
        self.lakebase.as_ref()
    }

    /// The configuration of the embedded default: Lakebase credentials from the local
    /// service, or DSQL tokens for `admin`.
    pub fn config(&self) -> Result<Config> {
        match &self.lakebase {
            Some(lakebase) => lakebase.client_config(&self.postgres, DEV_DATABASE),
            None => self.dsql_config("admin"),
        }
    }

    #[cfg(feature = "dsql")]
    fn dsql_config(&self, user: &str) -> Result<Config> {
        let expires_in = self.token_ttl.max(Duration::from_secs(1));
        let source = self
            .postgres
            .dsql_source(user)?
            .with_expires_in(expires_in)?;
        Ok(Config::new(super::LOCAL_DSQL_HOST, user)
            .port(self.postgres.port())
            .database(DEV_DSQL_DATABASE)
            .ssl_root_cert(self.postgres.ca_cert_path())
            .credentials(crate::Credentials::source(source)))
    }

    #[cfg(not(feature = "dsql"))]
    fn dsql_config(&self, _user: &str) -> Result<Config> {
        Err(no_dsql())
    }

    /// Stops the credential service, if one runs; the server keeps running for the next
    /// program.
    pub async fn shutdown(self) {
        if let Some(lakebase) = self.lakebase {
            lakebase.shutdown().await;
        }
    }

    /// One line saying where this is, for programs to print.
    pub fn describe(&self) -> String {
        let server = format!(
            "the embedded default: local PostgreSQL on {}:{} (data in {})",
            self.postgres.host(),
            self.postgres.port(),
            self.postgres.root().display(),
        );
        match &self.lakebase {
            Some(lakebase) => format!(
                "{server}, database {DEV_DATABASE}, user {DEV_ROLE}, Lakebase-style tokens from \
                 {} lasting {}s",
                lakebase.url(),
                lakebase.token_ttl().as_secs()
            ),
            None => format!(
                "{server}, database {DEV_DATABASE_DSQL}, user admin, Aurora DSQL-style IAM \
                 tokens lasting {}s",
                self.token_ttl.as_secs(),
                DEV_DATABASE_DSQL = DEV_DSQL_DATABASE
            ),
        }
    }
}

/// `admin` owning [`DEV_DSQL_DATABASE`] (so its `public` schema), and [`DEV_DSQL_ROLE`] with
/// a schema of its own: token roles both.
#[cfg(feature = "dsql")]
async fn dsql_roles(postgres: &LocalPostgres) -> Result<()> {
    postgres.create_token_role("admin").await?;
    postgres.create_token_role(DEV_DSQL_ROLE).await?;
    postgres
        .create_database(DEV_DSQL_DATABASE, Some("admin"))
        .await?;
    let db = postgres.admin(DEV_DSQL_DATABASE).await?;
    let sql: String = db
        .query_one(
            "SELECT format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', $1::text, $1::text)",
            &[&DEV_DSQL_ROLE],
        )
        .await?
        .get(0);
    db.batch_execute(&sql).await?;
    // Refuse what Aurora DSQL refuses, so that programs meet DSQL's rules here first.
    postgres
        .enable_dsql_checks(DEV_DSQL_DATABASE, super::DsqlChecks::Enforce)
        .await
}

#[cfg(not(feature = "dsql"))]
async fn dsql_roles(_postgres: &LocalPostgres) -> Result<()> {
    Err(no_dsql())
}

#[cfg(not(feature = "dsql"))]
fn no_dsql() -> Error {
    Error::config(
        FLAVOR_VAR,
        "dsql needs dal's `dsql` feature; enable it in Cargo.toml",
    )
}
