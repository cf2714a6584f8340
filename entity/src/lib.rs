//! The sample schema, customers place orders and orders hold items, as both ORMs see it:
//! SeaORM entities (`customer`, `order`, `order_item`; feature `seaorm`) and Diesel `table!`
//! definitions with their row structs (`schema`, `models`; feature `diesel`).
//!
//! A test in the `tests` crate compares both descriptions with the columns of a freshly
//! migrated database, so the two cannot drift apart.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

#[cfg(feature = "seaorm")]
pub mod customer;
#[cfg(feature = "diesel")]
pub mod models;
#[cfg(feature = "seaorm")]
pub mod order;
#[cfg(feature = "seaorm")]
pub mod order_item;
#[cfg(feature = "diesel")]
pub mod schema;

/// The SeaORM entities under short names, for `use entity::prelude::*`.
#[cfg(feature = "seaorm")]
pub mod prelude {
    pub use super::customer::Entity as Customer;
    pub use super::order::{Entity as Order, OrderStatus};
    pub use super::order_item::Entity as OrderItem;
}
