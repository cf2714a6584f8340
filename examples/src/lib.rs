//! What the example programs share: choosing the database they run against, migrating the
//! sample schema, the tours of both ORMs, logging and how errors end a program.
//!
//! Every program runs against the database named by the environment (`DATABASE_URL`, `PG*`,
//! Lakebase or DSQL settings, see `.env.example`), or, when none is named, against the
//! embedded default: the local development PostgreSQL with a local Lakebase-compatible
//! credential service minting short-lived tokens.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod exit;
pub mod logging;
pub mod migrate;
pub mod signal;
pub mod target;
pub mod tour;

pub use target::Database;
