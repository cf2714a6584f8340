//! SeaORM entities of the sample schema: customers place orders, orders hold items.
//!
//! The same tables are described for Diesel in `dal::schema`; a test in the `tests` crate
//! compares both descriptions with the columns of a freshly migrated database.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod customer;
pub mod order;
pub mod order_item;

/// The entities under short names, for `use entity::prelude::*`.
pub mod prelude {
    pub use super::customer::Entity as Customer;
    pub use super::order::{Entity as Order, OrderStatus};
    pub use super::order_item::Entity as OrderItem;
}
