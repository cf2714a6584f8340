//! Diesel on the sample schema: CRUD, joins, pagination, an upsert, and a transaction with a
//! nested savepoint.
//!
//! ```text
//! cargo run -p examples --bin diesel_tour
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use examples::tour::Orm;

#[tokio::main]
async fn main() {
    examples::logging::init();
    examples::exit::on_error(examples::tour::run(&[Orm::Diesel]).await);
}
