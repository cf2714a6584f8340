//! The embedded default: the persistent development PostgreSQL with the local
//! Lakebase-compatible credential service in front of it, so that programs run with no
//! cloud account and still log in with short-lived, really expiring tokens.

use std::time::Duration;

use super::error::Result;
use super::{LocalLakebase, LocalLakebaseConfig, LocalPostgres};
use crate::Config;

/// The database of the embedded default.
pub const DEV_DATABASE: &str = "shop";
/// The role the embedded default logs in as (the local service principal's id).
pub const DEV_ROLE: &str = "dal-local-app";

/// The development PostgreSQL plus a local Lakebase service minting its credentials.
///
/// The server outlives the process (see [`LocalPostgres::dev`]); the credential service
/// lives as long as this value.
#[derive(Debug)]
pub struct DevStack {
    /// The development server.
    pub postgres: LocalPostgres,
    /// The credential service in front of it.
    pub lakebase: LocalLakebase,
}

impl DevStack {
    /// Starts (or reuses) the development server, makes sure [`DEV_DATABASE`] exists and
    /// belongs to [`DEV_ROLE`], and starts a credential service whose database tokens
    /// live `token_ttl`.
    pub async fn start(token_ttl: Duration) -> Result<Self> {
        let postgres = LocalPostgres::dev().await?;
        let config = LocalLakebaseConfig::new()
            .with_client(DEV_ROLE, uuid::Uuid::new_v4().simple().to_string())
            .with_role(DEV_ROLE)
            .with_token_ttl(token_ttl);
        let lakebase = LocalLakebase::start(&postgres, config).await?;
        postgres
            .create_database(DEV_DATABASE, Some(DEV_ROLE))
            .await?;
        Ok(Self { postgres, lakebase })
    }

    /// A configuration for [`DEV_DATABASE`] with Lakebase credentials from the local service.
    pub fn config(&self) -> Result<Config> {
        self.lakebase.client_config(&self.postgres, DEV_DATABASE)
    }

    /// One line saying where this is, for programs to print.
    pub fn describe(&self) -> String {
        format!(
            "the embedded default: local PostgreSQL on {}:{} (data in {}), database {DEV_DATABASE}, \
             user {DEV_ROLE}, Lakebase-style tokens from {} lasting {}s",
            self.postgres.host(),
            self.postgres.port(),
            self.postgres.root().display(),
            self.lakebase.url(),
            self.lakebase.token_ttl().as_secs()
        )
    }
}
