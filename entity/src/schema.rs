//! The sample schema as Diesel `table!` definitions.
//!
//! These mirror the SeaORM entities of this crate; a test compares both with the
//! columns of a freshly migrated database, so the two ORMs cannot drift apart.
// `table!` generates public items (column structs, DSL modules) that carry no docs.
#![allow(missing_docs)]

diesel::table! {
    /// Buyers, unique by e-mail.
    customers (id) {
        id -> Uuid,
        email -> Text,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    /// Orders placed by customers.
    orders (id) {
        id -> Uuid,
        customer_id -> Uuid,
        status -> Text,
        total_cents -> BigInt,
        placed_at -> Timestamptz,
    }
}

diesel::table! {
    /// The lines of each order.
    order_items (order_id, line_no) {
        order_id -> Uuid,
        line_no -> Integer,
        sku -> Text,
        quantity -> Integer,
        unit_price_cents -> BigInt,
    }
}

diesel::joinable!(orders -> customers (customer_id));
diesel::joinable!(order_items -> orders (order_id));
diesel::allow_tables_to_appear_in_same_query!(customers, orders, order_items);
