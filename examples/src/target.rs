//! Choosing the database: the one the environment names, else the embedded default.

use std::time::Duration;

use anyhow::Context as _;
use dal::Config;
use dal::local::DevStack;

/// Overrides the life of the embedded default's tokens, in seconds.
pub const TOKEN_TTL_VAR: &str = "DAL_LOCAL_TOKEN_TTL_SECS";

/// The embedded default's token life: short, so that refreshes show in the logs.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30);

/// The database a program runs against, and the embedded default's services when it is the
/// one. Keep it alive while the program runs: the credential service stops when it drops.
#[derive(Debug)]
pub struct Database {
    config: Config,
    stack: Option<DevStack>,
}

impl Database {
    /// Reads `.env` and the environment: the configured database when it names one
    /// ([`dal::Config::env_names_a_database`]: any of [`dal::DATABASE_VARIABLES`], or
    /// Databricks credentials), else starts the embedded default. Prints which one on stdout.
    pub async fn from_env() -> anyhow::Result<Self> {
        // A missing .env is normal; a malformed one is not.
        migration::env_file::load().map_err(anyhow::Error::msg)?;
        let database = if Config::env_names_a_database() {
            Self {
                config: Config::from_env()?,
                stack: None,
            }
        } else {
            let ttl = token_ttl()?;
            let stack = DevStack::from_env(ttl)
                .await
                .context("starting the embedded default")?;
            Self {
                config: stack.config()?,
                stack: Some(stack),
            }
        };
        println!("target: {}", database.describe());
        Ok(database)
    }

    /// A copy of the configuration, to adjust for one program.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// Whether this is the embedded default.
    pub fn is_embedded(&self) -> bool {
        self.stack.is_some()
    }

    /// One line saying which database this is (never a secret).
    pub fn describe(&self) -> String {
        if let Some(stack) = &self.stack {
            return stack.describe();
        }
        let c = &self.config;
        // A target that contradicts the credentials is reported when the connector is built.
        let kind = c
            .resolved_target()
            .map_or_else(|_| "a server".to_owned(), |t| t.to_string());
        // No host: the connector looks it up from the credential source (a Lakebase endpoint).
        let host = if c.host.is_empty() {
            "the endpoint's host"
        } else {
            c.host.as_str()
        };
        format!(
            "{kind} at {host}:{}, database {}, user {} (from the environment)",
            c.port, c.database, c.user
        )
    }

    /// Stops the embedded default's credential service, if it runs; its PostgreSQL keeps
    /// running for the next program.
    pub async fn close(self) {
        if let Some(stack) = self.stack {
            stack.shutdown().await;
        }
    }
}

fn token_ttl() -> anyhow::Result<Duration> {
    match std::env::var(TOKEN_TTL_VAR) {
        Err(_) => Ok(DEFAULT_TOKEN_TTL),
        Ok(v) if v.trim().is_empty() => Ok(DEFAULT_TOKEN_TTL),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => anyhow::bail!(
                "invalid setting {TOKEN_TTL_VAR}: {v:?} is not a positive number of seconds"
            ),
        },
    }
}

/// Puts a connection or token error in words a reader can act on: whether the credential
/// service or the database failed, and where.
pub fn explain(config: &Config, e: dal::Error) -> anyhow::Error {
    // A pool's connect wraps its cause.
    let cause = match &e {
        dal::Error::Connect { source } => &**source,
        other => other,
    };
    // A host looked up as the connector connects (a Lakebase endpoint's) is not named here.
    let at = if config.host.is_empty() {
        String::new()
    } else {
        format!(" at {}:{}", config.host, config.port)
    };
    let what = match cause {
        // Their own words are clear; a pool's wrapping is not.
        dal::Error::Config { .. } | dal::Error::Unreachable { .. } if std::ptr::eq(cause, &e) => {
            return e.into();
        }
        dal::Error::Config { .. } | dal::Error::Unreachable { .. } => cause.to_string(),
        dal::Error::Credential { .. } | dal::Error::Http { .. } => {
            "cannot get a database credential".to_owned()
        }
        dal::Error::HttpTransport { .. } => "cannot reach the credential service".to_owned(),
        dal::Error::AuthFailed { user, .. } => {
            format!("the database{at} refused to log in user {user}")
        }
        _ => format!("cannot connect to the database{at}"),
    };
    anyhow::Error::new(e).context(what)
}

/// A connector for `config`, with [`explain`]ed errors. The eager strategy fetches its first
/// token here, so a refused credential is reported now.
pub async fn connector(config: Config) -> anyhow::Result<dal::Connector> {
    let copy = config.clone();
    dal::Connector::new(config)
        .await
        .map_err(|e| explain(&copy, e))
}

/// Opens one connection now, so that an unreachable database or a refused token is
/// reported with its cause before the program goes on.
pub async fn check(connector: &dal::Connector, config: &Config) -> anyhow::Result<()> {
    let (client, connection) = connector.connect().await.map_err(|e| explain(config, e))?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use dal::Config;

    use super::explain;

    /// What a connect says went wrong, with a pool's wrapping or without, and for a
    /// configuration whose host and user are looked up as it connects (a Lakebase endpoint,
    /// a browser login): a credential service's refusal behind a pool was "cannot connect to
    /// the database at :5432".
    #[test]
    fn explanations_see_through_a_pools_wrapping_and_name_no_empty_host() {
        let looked_up = Config::new("", "");
        let refused = || dal::Error::Http {
            endpoint: "https://example.cloud.databricks.com/oidc/v1/token".to_owned(),
            status: 401,
            code: "invalid_client".to_owned(),
            message: "bad secret".to_owned(),
            retry_after: None,
        };
        let by_pool = dal::Error::Connect {
            source: Arc::new(refused()),
        };
        for e in [refused(), by_pool] {
            let said = explain(&looked_up, e).to_string();
            assert_eq!(said, "cannot get a database credential");
        }
        let late = dal::Error::ConnectTimeout {
            endpoint: "ep.example.com:5432".to_owned(),
            timeout: Duration::from_secs(10),
            last_answer: None,
        };
        let said = explain(&looked_up, late).to_string();
        assert_eq!(said, "cannot connect to the database");
        let named = Config::new("db.example.com", "app");
        let late = dal::Error::ConnectTimeout {
            endpoint: "db.example.com:5432".to_owned(),
            timeout: Duration::from_secs(10),
            last_answer: None,
        };
        let said = explain(&named, late).to_string();
        assert_eq!(
            said,
            "cannot connect to the database at db.example.com:5432"
        );
    }
}
