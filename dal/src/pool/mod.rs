//! Pools over a way to connect. The bb8 pools ([`seaorm`], [`diesel`], [`postgres`]) take a
//! closure that opens one physical connection (the connector's, which pulls a fresh cached
//! token); the plain sqlx pool ([`sqlx`]) is pushed each new token instead.
//!
//! bb8 opens connections in background tasks and, when one fails, lets the waiting caller
//! time out. One [`ErrorSink`](bb8::ErrorSink) per pool hands the real cause (such as SQLSTATE
//! `28P01`) to one caller waiting at that moment instead. Every pool checks a connection it
//! hands out again ([`reset`]): alive, and outside any transaction.

mod bb8_pool;
#[cfg(feature = "diesel")]
pub(crate) mod diesel;
pub(crate) mod postgres;
mod registry;
mod reset;
#[cfg(feature = "seaorm")]
pub(crate) mod seaorm;
#[cfg(feature = "seaorm")]
pub(crate) mod sqlx;
pub(crate) mod wire;

#[cfg(feature = "diesel")]
pub use self::diesel::DieselPool;
pub(crate) use bb8_pool::{HoldingUp, Kind, Open, build};
pub use bb8_pool::{Manager, Pool};
pub use postgres::{PgClient, PgClientPool};
pub(crate) use registry::Registry;
#[cfg(feature = "seaorm")]
pub use seaorm::{SeaOrmPool, SeaOrmTransaction};
