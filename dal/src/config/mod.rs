//! Connection settings: plain data with documented defaults, built in code or read from the
//! environment ([`env`]: libpq's `PG*`, `DATABASE_URL` ([`url`]), Databricks and AWS variables),
//! checked where they are built: pool and cache settings by their builders, the rest by
//! [`Connector::new`](crate::Connector::new).

mod env;
mod settings;
mod url;

pub use env::DATABASE_VARIABLES;
pub(crate) use settings::LONGEST_LIMIT;
pub use settings::{
    CacheSettings, CacheSettingsBuilder, Config, ConnectionRate, Credentials,
    DEFAULT_APPLICATION_NAME, PoolSettings, PoolSettingsBuilder, TokenStrategy,
};

/// The first character of `value` that cannot be sent to the server: a control character, or
/// white space (the space too unless `space` allows it). NUL ends a startup value early,
/// PostgreSQL splits `options` on any white space, and no host name holds any.
pub(crate) fn unsendable(value: &str, space: bool) -> Option<char> {
    value
        .chars()
        .find(|&c| c.is_control() || (c.is_whitespace() && !(space && c == ' ')))
}
