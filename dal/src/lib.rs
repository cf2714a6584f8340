//! dal: a data-access layer for Postgres-compatible databases whose password is a short-lived
//! token (Databricks Lakebase, Aurora DSQL), and for plain PostgreSQL.
//!
//! One [`Connector`] holds the validated [`Config`], a [`TokenCache`] in front of a
//! [credential source](credentials), TLS and the per-connection settings; SeaORM, Diesel,
//! sqlx and tokio-postgres pools are built from it, and each new physical connection logs in
//! with a fresh cached token.
//!
//! ```no_run
//! # async fn run() -> dal::Result<()> {
//! use dal::diesel::QueryDsl;
//! use dal::diesel_async::RunQueryDsl;
//! use sea_orm::EntityTrait;
//!
//! // DATABASE_URL, PG*, DATABRICKS_* with LAKEBASE_*, or DSQL_ENDPOINT.
//! let connector = dal::Connector::new(dal::Config::from_env()?).await?;
//!
//! let db = connector.seaorm().await?;
//! let customers = entity::customer::Entity::find().all(&db).await;
//!
//! let diesel = connector.diesel_pool().await?;
//! let mut conn = diesel.get().await?;
//! let orders: i64 = dal::schema::orders::table
//!     .count()
//!     .get_result(&mut *conn)
//!     .await
//!     .expect("count");
//! # let _ = (customers, orders);
//! connector.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Behind the `local` feature, [`local`] starts a PostgreSQL server and a Lakebase-compatible
//! credential service on this machine, for tests, examples and development.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod cache;
mod config;
mod connector;
pub mod credentials;
mod env;
mod error;
pub mod expect;
#[cfg(feature = "local")]
pub mod local;
pub mod models;
mod pool;
pub mod schema;
pub mod telemetry;
mod tls;
mod tx;

pub use cache::{CacheSettings, TokenCache, TokenStrategy};
pub use config::{Config, Credentials, DEFAULT_APPLICATION_NAME, PoolSettings, Target};
pub use connector::Connector;
pub use env::DATABASE_VARIABLES;
pub use error::{Error, Result};
pub use pool::{ClientManager, Closable, DieselManager, DieselPool, PgClientPool, Pool};
pub use telemetry::{Health, PoolHealth};
pub use tls::SslMode;
pub use tx::{Isolation, RetryPolicy, RetryPolicyBuilder, Transactions, TxMode};

pub use bb8;
pub use diesel;
pub use diesel_async;
pub use sea_orm;
pub use tokio_postgres;
