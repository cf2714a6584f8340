//! The plain sqlx pool ([`Connector::sqlx_pool`](crate::Connector::sqlx_pool)). sqlx cannot ask for a password when it opens a connection,
//! so the token cache pushes each new token into the pool's connect options before the
//! refresh that fetched it returns, and keeps the token fresh ahead of expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;
use sea_orm::sqlx::Error as SqlxError;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::registry::{PoolHandle, Registry};
use super::reset::RECENTLY_USED;
use crate::config::PoolSettings;
use crate::error::{Error, Result};
use crate::telemetry::PoolHealth;
use crate::token_cache::TokenCache;

/// A sqlx pool whose connections log in to the `active` one of `endpoints` (the options of
/// each, without password, and its token cache) with its cached token.
pub(crate) async fn build(
    endpoints: &[(TokenCache, PgConnectOptions)],
    active: Arc<AtomicUsize>,
    settings: &PoolSettings,
    registry: &Registry,
) -> Result<PgPool> {
    let (cache, base) = &endpoints[active.load(Ordering::Relaxed)];
    let token = cache.token().await?;
    let lifetime = settings.jittered_lifetime();
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_size)
        .min_connections(settings.min_idle)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(settings.idle_timeout)
        .max_lifetime(lifetime)
        // sqlx keeps a cancelled BEGIN's transaction open: each connection that comes back
        // ends any transaction before it goes idle, off the request path. One handed out
        // again within RECENTLY_USED goes without a round trip; one idle longer is checked
        // first, instead of sqlx's ping and at its cost.
        .test_before_acquire(false)
        .after_release(|conn, _| {
            Box::pin(async move { end_transaction(conn).await.map(|()| true) })
        })
        .before_acquire(move |conn, meta| {
            // sqlx retires a connection past its lifetime as it comes back or when its reaper
            // comes by, not as it is handed out: an idle one could go out minutes past it.
            let expired = lifetime.is_some_and(|lifetime| meta.age >= lifetime);
            Box::pin(async move {
                if expired {
                    return Ok(false);
                }
                if meta.idle_for >= RECENTLY_USED {
                    end_transaction(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(base.clone().password(token.expose()));
    let handle = Arc::new(SqlxPool {
        pool: pool.clone(),
        close_within: settings.acquire_timeout,
    });
    if !registry.add_strong(handle) {
        // The connector shut down while the token was fetched.
        drop(pool.close());
        return Err(Error::PoolClosed);
    }
    for (i, (cache, options)) in endpoints.iter().enumerate() {
        let (pushed, options, active) = (pool.clone(), options.clone(), Arc::clone(&active));
        // Until the pool closes: then the cache lets go of it.
        cache.on_refresh_while(move |token| {
            if let Some(token) = token
                && active.load(Ordering::Relaxed) == i
            {
                pushed.set_connect_options(options.clone().password(token.expose()));
            }
            !pushed.is_closed()
        });
        cache.keep_fresh_while_listened();
    }
    // The token may have been replaced while the pool was built.
    if let Some(current) = cache.current() {
        pool.set_connect_options(base.clone().password(current.expose()));
    }
    Ok(pool)
}

struct SqlxPool {
    pool: PgPool,
    /// How long shutdown waits for connections in use to come back; they close when they
    /// do, however late.
    close_within: std::time::Duration,
}

impl PoolHandle for SqlxPool {
    fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }

    fn health(&self) -> PoolHealth {
        PoolHealth {
            kind: "sqlx",
            max_size: self.pool.options().get_max_connections(),
            connections: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            waiting: 0,
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let closing = self.pool.close();
        Box::pin(async move {
            if tokio::time::timeout(self.close_within, closing)
                .await
                .is_err()
            {
                tracing::warn!(
                    in_use = self.pool.size(),
                    "shutdown did not wait for the SeaORM connections still in use; each closes when it comes back"
                );
            }
        })
    }
}

/// Ends the transaction the server has open on `conn`, if any, in one round trip as cheap as
/// sqlx's ping: a `SELECT 1`, after which sqlx knows the server's transaction status and
/// `begin_with` reports it (it fails when the statement left no transaction open).
///
/// sqlx reports an aborted transaction block as no transaction. One is left by a single
/// string that begins a transaction and fails inside it (`BEGIN; SELECT 1/0`), since sqlx
/// queues a ROLLBACK for every transaction of its own that is dropped; there the `SELECT 1`
/// fails with SQLSTATE `25P02`, and sqlx queues the ROLLBACK of the transaction it meant
/// to begin, which the ping then sends.
async fn end_transaction(conn: &mut PgConnection) -> std::result::Result<(), SqlxError> {
    use sea_orm::sqlx::Connection;
    match conn.begin_with("SELECT 1").await {
        Ok(open) => {
            tracing::debug!(
                pool = "sqlx",
                "a connection came back inside a transaction; rolling back"
            );
            return open.rollback().await;
        }
        Err(SqlxError::BeginFailed) => return Ok(()),
        Err(SqlxError::Database(e)) if e.code().as_deref() == Some("25P02") => {}
        Err(e) => return Err(e),
    };
    tracing::debug!(
        pool = "sqlx",
        "a connection came back inside an aborted transaction; rolling back"
    );
    conn.ping().await
}
