//! bb8 pools over the connector: Diesel's `AsyncPgConnection` and plain tokio-postgres
//! clients. Every new physical connection pulls its token from the cache.
//!
//! bb8 opens connections in background tasks and, when one fails, lets the waiting caller
//! time out. These pools report the real cause (such as SQLSTATE `28P01`) to the callers
//! waiting at that moment instead.

use std::sync::Arc;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use tokio::sync::broadcast;

use crate::config::PoolSettings;
use crate::connector::Connector;
use crate::{Error, Result};

/// The bb8 manager of Diesel connections built by [`Connector::diesel_pool`].
pub type DieselManager = AsyncDieselConnectionManager<AsyncPgConnection>;

/// A pool of Diesel connections.
pub type DieselPool = Pool<DieselManager>;

/// A pool of tokio-postgres clients, for raw SQL.
pub type PgClientPool = Pool<ClientManager>;

/// A bb8 pool that fails fast with the cause when connections cannot be opened.
pub struct Pool<M: bb8::ManageConnection> {
    pool: bb8::Pool<M>,
    failures: broadcast::Sender<Arc<Error>>,
    acquire_timeout: std::time::Duration,
}

impl<M: bb8::ManageConnection> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            failures: self.failures.clone(),
            acquire_timeout: self.acquire_timeout,
        }
    }
}

impl<M: bb8::ManageConnection> std::fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.pool.state();
        f.debug_struct("Pool")
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl<M: bb8::ManageConnection> Pool<M> {
    /// A connection from the pool, opening one if needed.
    ///
    /// Fails with [`Error::Connect`] carrying the cause as soon as a connection the pool
    /// tried to open for it fails, or with [`Error::PoolTimeout`] after the acquire timeout.
    pub async fn get(&self) -> Result<bb8::PooledConnection<'_, M>> {
        let mut failures = self.failures.subscribe();
        tokio::select! {
            biased;
            got = self.pool.get() => got.map_err(|e| match e {
                bb8::RunError::TimedOut => Error::PoolTimeout(self.acquire_timeout),
                bb8::RunError::User(e) => Error::Pool(format!("{e:?}")),
            }),
            Ok(cause) = failures.recv() => Err(Error::Connect { source: cause }),
        }
    }

    /// The bb8 pool itself, for its full API.
    pub fn inner(&self) -> &bb8::Pool<M> {
        &self.pool
    }

    /// Open and idle connections right now.
    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }
}

impl Connector {
    async fn bb8_pool<M: bb8::ManageConnection>(
        &self,
        manager: M,
        failures: broadcast::Sender<Arc<Error>>,
        settings: &PoolSettings,
    ) -> Pool<M> {
        let pool = bb8::Pool::builder()
            .max_size(settings.max_size)
            .min_idle(Some(settings.min_idle).filter(|n| *n > 0))
            .connection_timeout(settings.acquire_timeout)
            .idle_timeout(settings.idle_timeout)
            .max_lifetime(settings.jittered_lifetime())
            // Failures are reported to the waiting callers instead of being retried until
            // they time out; has_broken still drops dead connections.
            .retry_connection(false)
            .test_on_check_out(false)
            .build_unchecked(manager);
        Pool {
            pool,
            failures,
            acquire_timeout: settings.acquire_timeout,
        }
    }

    /// A Diesel pool: `custom_setup` opens each new physical connection with a token from
    /// the cache, TLS and the startup parameters of this connector.
    pub async fn diesel_pool(&self) -> Result<DieselPool> {
        self.diesel_pool_with(self.pool_settings()).await
    }

    /// Like [`diesel_pool`](Self::diesel_pool), with its own sizes and lifetimes.
    pub async fn diesel_pool_with(&self, settings: &PoolSettings) -> Result<DieselPool> {
        let (failures, _) = broadcast::channel(16);
        let mut config = ManagerConfig::<AsyncPgConnection>::default();
        let connector = self.clone();
        let report = failures.clone();
        config.custom_setup = Box::new(move |_url| {
            let connector = connector.clone();
            let report = report.clone();
            Box::pin(async move {
                match connector.connect().await {
                    Ok((client, connection)) => {
                        AsyncPgConnection::try_from_client_and_connection(client, connection).await
                    }
                    Err(e) => {
                        let message = crate::cache::ErrorChain(&e).to_string();
                        let _ = report.send(Arc::new(e));
                        Err(diesel::ConnectionError::BadConnection(message))
                    }
                }
            })
        });
        // The URL is never used: custom_setup builds every connection from typed options.
        let manager = DieselManager::new_with_config("postgres://", config);
        Ok(self.bb8_pool(manager, failures, settings).await)
    }

    /// A pool of tokio-postgres clients for raw SQL.
    pub async fn postgres_pool(&self) -> Result<PgClientPool> {
        self.postgres_pool_with(self.pool_settings()).await
    }

    /// Like [`postgres_pool`](Self::postgres_pool), with its own sizes and lifetimes.
    pub async fn postgres_pool_with(&self, settings: &PoolSettings) -> Result<PgClientPool> {
        let (failures, _) = broadcast::channel(16);
        let manager = ClientManager {
            connector: self.clone(),
            failures: failures.clone(),
        };
        Ok(self.bb8_pool(manager, failures, settings).await)
    }
}

/// The bb8 manager of tokio-postgres clients built by [`Connector::postgres_pool`].
#[derive(Debug)]
pub struct ClientManager {
    connector: Connector,
    failures: broadcast::Sender<Arc<Error>>,
}

impl bb8::ManageConnection for ClientManager {
    type Connection = tokio_postgres::Client;
    type Error = Arc<Error>;

    async fn connect(&self) -> std::result::Result<tokio_postgres::Client, Arc<Error>> {
        match self.connector.connect().await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection closed with an error");
                    }
                });
                Ok(client)
            }
            Err(e) => {
                let e = Arc::new(e);
                let _ = self.failures.send(Arc::clone(&e));
                Err(e)
            }
        }
    }

    async fn is_valid(
        &self,
        client: &mut tokio_postgres::Client,
    ) -> std::result::Result<(), Arc<Error>> {
        client
            .simple_query("")
            .await
            .map(|_| ())
            .map_err(|e| Arc::new(Error::Database(e)))
    }

    fn has_broken(&self, client: &mut tokio_postgres::Client) -> bool {
        client.is_closed()
    }
}
