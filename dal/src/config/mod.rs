//! Connection settings: plain data with documented defaults, built in code or read from the
//! environment ([`env`]: libpq's `PG*`, `DATABASE_URL` ([`url`]), Databricks and AWS variables),
//! validated once by [`Connector::new`](crate::Connector::new).

mod env;
mod settings;
mod url;

pub use env::DATABASE_VARIABLES;
pub use settings::{
    CacheSettings, Config, Credentials, DEFAULT_APPLICATION_NAME, PoolSettings, TokenStrategy,
};
