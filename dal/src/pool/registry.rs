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
        super::seaorm::logged_out().await;
    }
}
