//! dal: a data-access layer for Postgres-compatible databases whose password is a short-lived
//! token (Databricks Lakebase, Aurora DSQL), and for plain PostgreSQL.
//!
//! One [`Connector`] holds the validated [`Config`], a [`TokenCache`] in front of a
//! [credential source](credentials), TLS and the per-connection settings; SeaORM, Diesel,
//! sqlx and tokio-postgres pools are built from it, and each new physical connection logs in
//! with a fresh cached token.
//!
//! ```no_run
//! # #[cfg(all(feature = "seaorm", feature = "diesel"))]
//! # async fn run() -> dal::Result<()> {
//! use dal::diesel::QueryDsl;
//! use dal::diesel_async::RunQueryDsl;
//! use dal::sea_orm::EntityTrait;
//!
//! // DATABASE_URL, PG*, DATABRICKS_* with LAKEBASE_*, or DSQL_ENDPOINT.
//! let connector = dal::Connector::new(dal::Config::from_env()?).await?;
//!
//! let db = connector.seaorm().await?;
//! let customers = entity::customer::Entity::find().all(&db).await;
//!
//! let diesel = connector.diesel_pool().await?;
//! let mut conn = diesel.get().await?;
//! let orders: i64 = entity::schema::orders::table
//!     .count()
//!     .get_result(&mut *conn)
//!     .await
//!     .expect("count");
//! # let _ = (customers, orders);
//! connector.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! dal runs on a Tokio runtime with its I/O and time drivers enabled (`#[tokio::main]` enables
//! both; a `tokio::runtime::Builder` needs `enable_all`): every connect, fetch, check and
//! refresh is bounded by a timer. On a runtime without timers, Tokio panics with a message
//! that names `enable_time`.
//!
//! # Features
//!
//! | Feature | What you get |
//! |---|---|
//! | `seaorm` (default) | [`Connector::seaorm`], [`Connector::sqlx_pool`], SeaORM transactions |
//! | `diesel` (default) | [`Connector::diesel_pool`], [`DieselPool`], Diesel transactions |
//! | `lakebase` (default) | [`credentials::Lakebase`]: Databricks OAuth and database credentials over HTTPS |
//! | `dsql` | [`credentials::Dsql`]: Aurora DSQL IAM tokens, signed locally |
//! | `dsql-sso` | `dsql`, and AWS profiles that sign in through IAM Identity Center (SSO) |
//! | `local` | [`local`]: a PostgreSQL server and a Lakebase-compatible service on this machine |
//!
//! The tokio-postgres pool ([`Connector::postgres_pool`]) and custom credential sources are
//! always there. With `default-features = false, features = ["diesel"]`, neither SeaORM nor
//! an HTTP client is compiled.
//!
//! # Architecture
//!
//! Layers whose imports point one way, down (no module imports one that imports it back):
//!
//! ```text
//!  tx/{transactions, seaorm, diesel}    pool/{bb8_pool, seaorm, diesel, postgres, wire, sqlx,
//!       |                                    |   reset, registry}  (a pool takes a closure
//!       |                                    |   that opens a connection)
//!  connector (Connector: builds pools, connect, health, shutdown)    lakebase/ (platform APIs)
//!       |
//!  token_cache (TokenCache: single-flight, refresh ahead, keep the last good token)
//!       |
//!  rate_limit    config/{settings, env, url}
//!       |
//!  credentials/{source, static_password, custom, lakebase/, dsql}    tls    telemetry
//!       |
//!  error (Error, Setting)    retry (Backoff, RetryPolicy)    target (Target)    expect
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

mod config;
mod connector;
pub mod credentials;
mod error;
pub mod expect;
#[cfg(feature = "lakebase")]
pub mod lakebase;
#[cfg(feature = "local")]
pub mod local;
mod pool;
mod rate_limit;
mod retry;
mod setting_file;
mod target;
pub mod telemetry;
mod tls;
mod token_cache;
#[cfg(any(feature = "seaorm", feature = "diesel"))]
mod tx;

pub use config::{
    CacheSettings, CacheSettingsBuilder, Config, ConnectionRate, Credentials, DATABASE_VARIABLES,
    DEFAULT_APPLICATION_NAME, PoolSettings, PoolSettingsBuilder, TokenStrategy,
};
pub use connector::{Connection, Connector};
pub use error::{Error, Result, Setting};
#[cfg(feature = "diesel")]
pub use pool::DieselPool;
pub use pool::{Manager, PgClient, PgClientPool, Pool};
#[cfg(feature = "seaorm")]
pub use pool::{SeaOrmPool, SeaOrmTransaction};
pub use retry::{RetryPolicy, RetryPolicyBuilder};
pub use target::Target;
pub use telemetry::{Health, PoolHealth};
pub use tls::SslMode;
pub use token_cache::TokenCache;
#[cfg(any(feature = "seaorm", feature = "diesel"))]
pub use tx::{Isolation, Transactions, TxMode};

pub use bb8;
#[cfg(feature = "diesel")]
pub use diesel;
#[cfg(feature = "diesel")]
pub use diesel_async;
#[cfg(feature = "seaorm")]
pub use sea_orm;
pub use tokio_postgres;
