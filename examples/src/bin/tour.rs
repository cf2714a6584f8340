//! The project's main job: migrates the sample schema up, runs the SeaORM tour and the
//! Diesel tour, then prints a summary (rows, tokens fetched, connections opened).
//!
//! ```text
//! cargo run -p examples --bin tour
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use examples::tour::Orm;

#[tokio::main]
async fn main() {
    examples::logging::init();
    examples::exit::on_error(examples::tour::run(&[Orm::SeaOrm, Orm::Diesel]).await);
}
