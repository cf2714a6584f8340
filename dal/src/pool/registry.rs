//! Every pool built from one connector, for its health report and its shutdown.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures_util::future::BoxFuture;

use crate::telemetry::PoolHealth;

/// What the registry keeps of each pool, without keeping a bb8 pool alive.
pub(crate) trait PoolHandle: Send + Sync {
    fn health(&self) -> PoolHealth;
    /// Closes the pool as it is called (no checkout, no new connection from then on); the
    /// future waits for what is left to end, such as connections in use.
    fn close(&self) -> BoxFuture<'_, ()>;
    /// Closed by its user, for a pool the registry keeps alive: then it leaves the registry.
    fn is_closed(&self) -> bool {
        false
    }
}

/// Every pool built from one connector, for its health report and its shutdown. bb8 pools
/// are held weakly (they live as long as their users keep them); sqlx pools strongly, since
/// the token cache pushes into them anyway, until they are closed.
#[derive(Default)]
pub(crate) struct Registry(Mutex<Pools>);

#[derive(Default)]
struct Pools {
    bb8: Vec<Weak<dyn PoolHandle>>,
    sqlx: Vec<Arc<dyn PoolHandle>>,
    /// Set by [`Registry::close_all`]: no pool is taken in after it.
    closed: bool,
}

impl Registry {
    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `pool` in; `false` once the registry has closed (its connector shut down while
    /// the pool was built), and the caller closes the pool.
    #[must_use]
    pub(super) fn add(&self, pool: Weak<dyn PoolHandle>) -> bool {
        let mut pools = self.pools();
        pools.bb8.retain(|p| p.strong_count() > 0);
        if !pools.closed {
            pools.bb8.push(pool);
        }
        !pools.closed
    }

    /// As [`add`](Self::add), for a pool the registry keeps alive.
    #[cfg(feature = "seaorm")]
    #[must_use]
    pub(super) fn add_strong(&self, pool: Arc<dyn PoolHandle>) -> bool {
        let mut pools = self.pools();
        pools.sqlx.retain(|p| !p.is_closed());
        if !pools.closed {
            pools.sqlx.push(pool);
        }
        !pools.closed
    }

    fn live(&self) -> Vec<Arc<dyn PoolHandle>> {
        let mut pools = self.pools();
        pools.sqlx.retain(|p| !p.is_closed());
        let mut live = pools.sqlx.clone();
        live.extend(pools.bb8.iter().filter_map(Weak::upgrade));
        live
    }

    /// The state of every pool still in use.
    pub(crate) fn health(&self) -> Vec<PoolHealth> {
        self.live().iter().map(|p| p.health()).collect()
    }

    /// Closes every pool, and every pool taken in later as it comes, then waits for the sqlx
    /// pools' connections in use to come back. Every pool is closed before the first wait, so
    /// a shutdown dropped there (a timeout around it) leaves none open.
    pub(crate) async fn close_all(&self) {
        let pools = {
            let mut pools = self.pools();
            pools.closed = true;
            let mut all: Vec<_> = pools.bb8.iter().filter_map(Weak::upgrade).collect();
            all.append(&mut pools.sqlx);
            all
        };
        let closing: Vec<_> = pools.iter().map(|pool| pool.close()).collect();
        futures_util::future::join_all(closing).await;
        #[cfg(feature = "seaorm")]
        logged_out().await;
    }
}

#[cfg(feature = "seaorm")]
pub(crate) use logouts::{LoggingOut, logged_out};

/// The SeaORM pool's logouts, which run on tasks of their own after its connections are
/// dropped (see its `Conn`).
#[cfg(feature = "seaorm")]
mod logouts {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::reset::LOG_OUT;

    /// Logouts under way in this process, which a connector's shutdown waits for.
    static LOGGING_OUT: AtomicUsize = AtomicUsize::new(0);
    static LOGGED_OUT: tokio::sync::Notify = tokio::sync::Notify::const_new();

    /// One logout under way, until dropped (done, or its task dropped with its runtime).
    pub(crate) struct LoggingOut;

    impl LoggingOut {
        pub(crate) fn start() -> Self {
            LOGGING_OUT.fetch_add(1, Ordering::SeqCst);
            LoggingOut
        }
    }

    impl Drop for LoggingOut {
        fn drop(&mut self) {
            if LOGGING_OUT.fetch_sub(1, Ordering::SeqCst) == 1 {
                LOGGED_OUT.notify_waiters();
            }
        }
    }

    /// Waits, at most [`LOG_OUT`], until the connections dropped so far have logged out: a
    /// program that ends its runtime right after a connector's shutdown would otherwise drop
    /// their logouts with it.
    pub(crate) async fn logged_out() {
        let all = async {
            loop {
                let notified = LOGGED_OUT.notified();
                if LOGGING_OUT.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(LOG_OUT, all).await;
    }
}
