//! Connection settings: plain data with documented defaults, built in code or read from the
//! environment ([`env`]: libpq's `PG*`, `DATABASE_URL` ([`url`]), Databricks and AWS variables),
//! checked where they are built: pool and cache settings by their builders, the rest by
//! [`Connector::new`](crate::Connector::new).

mod env;
mod settings;
mod url;

pub use env::DATABASE_VARIABLES;
pub(crate) use settings::check_product;
pub use settings::{
    CacheSettings, CacheSettingsBuilder, Config, ConnectionRate, Credentials,
    DEFAULT_APPLICATION_NAME, PoolSettings, PoolSettingsBuilder, TokenStrategy,
};
