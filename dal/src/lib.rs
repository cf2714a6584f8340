//! dal: a data-access layer for Postgres-compatible databases whose password is a short-lived
//! token (Databricks Lakebase, Aurora DSQL), and for plain PostgreSQL.
//!
//! This crate holds the sample schema for Diesel ([`schema`], [`models`]) and, behind the
//! `local` feature, a PostgreSQL server the project starts itself ([`local`]).
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
#[cfg(feature = "local")]
pub mod local;
pub mod models;
mod pool;
pub mod schema;
mod tls;

pub use cache::{CacheSettings, TokenCache, TokenStrategy};
pub use config::{Config, Credentials, DEFAULT_APPLICATION_NAME, PoolSettings, Target};
pub use connector::Connector;
pub use error::{Error, Result};
pub use pool::{ClientManager, DieselManager, DieselPool, PgClientPool, Pool};
pub use tls::SslMode;

pub use bb8;
pub use diesel;
pub use diesel_async;
pub use sea_orm;
pub use tokio_postgres;
