//! bb8 pools over the connector: Diesel's `AsyncPgConnection` and plain tokio-postgres
//! clients. Every new physical connection pulls its token from the cache.
//!
//! bb8 opens connections in background tasks and, when one fails, lets the waiting caller
//! time out. These pools report the real cause (such as SQLSTATE `28P01`) to the callers
//! waiting at that moment instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures_util::future::BoxFuture;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use tokio::sync::broadcast;

use crate::config::PoolSettings;
use crate::connector::Connector;
use crate::telemetry::{self, PoolHealth};
use crate::{Error, Result};

/// The bb8 manager of Diesel connections built by [`Connector::diesel_pool`].
pub type DieselManager = AsyncDieselConnectionManager<AsyncPgConnection>;

/// A pool of Diesel connections.
pub type DieselPool = Pool<DieselManager>;

/// A pool of tokio-postgres clients, for raw SQL.
pub type PgClientPool = Pool<ClientManager>;

/// A bb8 pool that fails fast with the cause when connections cannot be opened, and that
/// [`Connector::shutdown`] closes.
pub struct Pool<M: bb8::ManageConnection> {
    core: Arc<Core<M>>,
}

struct Core<M: bb8::ManageConnection> {
    pool: bb8::Pool<Closable<M>>,
    failures: broadcast::Sender<Arc<Error>>,
    acquire_timeout: std::time::Duration,
    kind: &'static str,
    max_size: u32,
    waiting: AtomicU64,
    closed: Arc<AtomicBool>,
}

/// What the connector keeps of each pool it built, without keeping the pool alive.
pub(crate) trait PoolHandle: Send + Sync {
    fn health(&self) -> PoolHealth;
    fn close(&self) -> BoxFuture<'_, ()>;
}

impl<M: bb8::ManageConnection> PoolHandle for Core<M> {
    fn health(&self) -> PoolHealth {
        let state = self.pool.state();
        PoolHealth {
            kind: self.kind,
            max_size: self.max_size,
            connections: state.connections,
            idle: state.idle_connections,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Refuses new checkouts, closes the idle connections now and the others when they
    /// come back.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Ordering::Relaxed);
            let mut taken = Vec::new();
            for _ in 0..self.pool.state().idle_connections {
                match tokio::time::timeout(std::time::Duration::from_secs(1), self.pool.get()).await
                {
                    Ok(Ok(conn)) => taken.push(conn),
                    _ => break,
                }
            }
            // Each returns to the pool broken (closed), so the pool drops it.
            drop(taken);
        })
    }
}

impl<M: bb8::ManageConnection> Clone for Pool<M> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
        }
    }
}

impl<M: bb8::ManageConnection> std::fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.core.pool.state();
        f.debug_struct("Pool")
            .field("kind", &self.core.kind)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl<M: bb8::ManageConnection> Pool<M> {
    /// A connection from the pool, opening one if needed.
    ///
    /// Fails with [`Error::Connect`] carrying the cause as soon as a connection the pool
    /// tried to open for it fails, with [`Error::PoolTimeout`] after the acquire timeout, and
    /// with [`Error::PoolClosed`] after [`Connector::shutdown`].
    pub async fn get(&self) -> Result<bb8::PooledConnection<'_, Closable<M>>> {
        let core = &*self.core;
        if core.closed.load(Ordering::Relaxed) {
            return Err(Error::PoolClosed);
        }
        let mut failures = core.failures.subscribe();
        let started = std::time::Instant::now();
        let labels = [("pool", core.kind)];
        let waiting = core.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(telemetry::POOL_WAITING, &labels).set(waiting as f64);
        let got = tokio::select! {
            biased;
            got = core.pool.get() => got.map_err(|e| match e {
                bb8::RunError::TimedOut => Error::PoolTimeout(core.acquire_timeout),
                bb8::RunError::User(e) => Error::Pool(format!("{e:?}")),
            }),
            Ok(cause) = failures.recv() => Err(Error::Connect { source: cause }),
        };
        let waiting = core.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        let waited = started.elapsed();
        let state = core.pool.state();
        metrics::gauge!(telemetry::POOL_WAITING, &labels).set(waiting as f64);
        metrics::gauge!(telemetry::POOL_CONNECTIONS, &labels).set(state.connections as f64);
        metrics::gauge!(telemetry::POOL_IDLE, &labels).set(state.idle_connections as f64);
        metrics::histogram!(telemetry::POOL_ACQUIRE_SECONDS, &labels).record(waited.as_secs_f64());
        tracing::trace!(
            pool = core.kind,
            wait_ms = waited.as_millis() as u64,
            ok = got.is_ok(),
            connections = state.connections,
            idle = state.idle_connections,
            "pool acquire"
        );
        got
    }

    /// The bb8 pool itself, for its full API.
    pub fn inner(&self) -> &bb8::Pool<Closable<M>> {
        &self.core.pool
    }

    /// Open and idle connections right now.
    pub fn state(&self) -> bb8::State {
        self.core.pool.state()
    }

    /// This pool's state, as [`Connector::health`] reports it.
    pub fn health(&self) -> PoolHealth {
        self.core.health()
    }
}

/// A bb8 manager wrapped so that [`Connector::shutdown`] can close its pool: after it, every
/// connection that returns to the pool is dropped.
#[derive(Debug)]
pub struct Closable<M> {
    manager: M,
    closed: Arc<AtomicBool>,
}

impl<M: bb8::ManageConnection> bb8::ManageConnection for Closable<M> {
    type Connection = M::Connection;
    type Error = M::Error;

    fn connect(
        &self,
    ) -> impl std::future::Future<Output = std::result::Result<M::Connection, M::Error>> + Send
    {
        self.manager.connect()
    }

    fn is_valid(
        &self,
        conn: &mut M::Connection,
    ) -> impl std::future::Future<Output = std::result::Result<(), M::Error>> + Send {
        self.manager.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut M::Connection) -> bool {
        self.closed.load(Ordering::Relaxed) || self.manager.has_broken(conn)
    }
}

impl Connector {
    async fn bb8_pool<M: bb8::ManageConnection>(
        &self,
        kind: &'static str,
        manager: M,
        failures: broadcast::Sender<Arc<Error>>,
        settings: &PoolSettings,
    ) -> Result<Pool<M>> {
        if self.is_shut_down() {
            return Err(Error::PoolClosed);
        }
        let closed = Arc::new(AtomicBool::new(false));
        let manager = Closable {
            manager,
            closed: Arc::clone(&closed),
        };
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
        let core = Arc::new(Core {
            pool,
            failures,
            acquire_timeout: settings.acquire_timeout,
            kind,
            max_size: settings.max_size,
            waiting: AtomicU64::new(0),
            closed,
        });
        let handle: Arc<dyn PoolHandle> = core.clone();
        self.register_pool(Arc::downgrade(&handle));
        Ok(Pool { core })
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
                        let mut conn =
                            AsyncPgConnection::try_from_client_and_connection(client, connection)
                                .await?;
                        diesel_async::AsyncConnection::set_instrumentation(
                            &mut conn,
                            QueryTimer::default(),
                        );
                        Ok(conn)
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
        self.bb8_pool("diesel", manager, failures, settings).await
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
        self.bb8_pool("postgres", manager, failures, settings).await
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

/// Diesel's instrumentation: times each query for a `tracing` event and the
/// [`QUERY_SECONDS`](telemetry::QUERY_SECONDS) histogram. The SQL is left out: it can hold
/// literals that must not reach a log.
#[derive(Default)]
struct QueryTimer {
    started: Option<std::time::Instant>,
}

impl diesel::connection::Instrumentation for QueryTimer {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent as Event;
        match event {
            Event::StartQuery { .. } => self.started = Some(std::time::Instant::now()),
            Event::FinishQuery { error, .. } => {
                let elapsed = self.started.take().map(|t| t.elapsed()).unwrap_or_default();
                crate::telemetry::query_done("diesel", elapsed, error.is_some());
            }
            Event::BeginTransaction { depth, .. } => {
                tracing::trace!(orm = "diesel", depth = depth.get(), "begin")
            }
            Event::CommitTransaction { depth, .. } => {
                tracing::trace!(orm = "diesel", depth = depth.get(), "commit")
            }
            Event::RollbackTransaction { depth, .. } => {
                tracing::trace!(orm = "diesel", depth = depth.get(), "rollback")
            }
            _ => {}
        }
    }
}
