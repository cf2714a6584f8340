//! Every pool built from one connector, for its health report and its shutdown.

use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;

use crate::telemetry::PoolHealth;

/// What the registry keeps of each pool, without keeping a bb8 pool alive.
pub(crate) trait PoolHandle: Send + Sync {
    fn health(&self) -> PoolHealth;
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Every pool built from one connector, for its health report and its shutdown. bb8 pools
/// are held weakly (they live as long as their users keep them); sqlx pools strongly, since
/// the token cache pushes into them anyway.
#[derive(Default)]
pub(crate) struct Registry {
    bb8: Mutex<Vec<Weak<dyn PoolHandle>>>,
    sqlx: Mutex<Vec<Arc<dyn PoolHandle>>>,
}

impl Registry {
    pub(super) fn add(&self, pool: Weak<dyn PoolHandle>) {
        let mut pools = self.bb8.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(pool);
    }

    #[cfg(feature = "seaorm")]
    pub(super) fn add_strong(&self, pool: Arc<dyn PoolHandle>) {
        self.sqlx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pool);
    }

    fn live(&self) -> Vec<Arc<dyn PoolHandle>> {
        let mut live: Vec<_> = self.sqlx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        live.extend(
            self.bb8
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(Weak::upgrade),
        );
        live
    }

    /// The state of every pool still in use.
    pub(crate) fn health(&self) -> Vec<PoolHealth> {
        self.live().iter().map(|p| p.health()).collect()
    }

    /// Closes every pool: bb8 pools first, then the sqlx pools (which wait for their
    /// connections in use to come back).
    pub(crate) async fn close_all(&self) {
        let bb8: Vec<_> = self
            .bb8
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for pool in bb8 {
            pool.close().await;
        }
        let sqlx: Vec<_> = self
            .sqlx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for pool in sqlx {
            pool.close().await;
        }
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
