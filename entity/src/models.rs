//! Rows of the sample schema for Diesel: what queries return and what inserts take.

use chrono::{DateTime, Utc};
use diesel::prelude::{Associations, Identifiable, Insertable, Queryable, Selectable};
use uuid::Uuid;

use crate::schema::{customers, order_items, orders};

/// A row of `customers`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = customers, check_for_backend(diesel::pg::Pg))]
pub struct Customer {
    /// Primary key, a UUIDv7 chosen by the application.
    pub id: Uuid,
    /// Unique e-mail address.
    pub email: String,
    /// Display name.
    pub name: String,
    /// When the row was inserted.
    pub created_at: DateTime<Utc>,
}

/// A new customer; `created_at` is filled in by the database.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = customers)]
pub struct NewCustomer<'a> {
    /// Primary key; use [`Uuid::now_v7`].
    pub id: Uuid,
    /// Unique e-mail address.
    pub email: &'a str,
    /// Display name.
    pub name: &'a str,
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, Associations)]
#[diesel(table_name = orders, belongs_to(Customer), check_for_backend(diesel::pg::Pg))]
pub struct Order {
    /// Primary key, a UUIDv7 chosen by the application.
    pub id: Uuid,
    /// The customer who placed the order.
    pub customer_id: Uuid,
    /// One of `pending`, `paid`, `shipped`, `cancelled`.
    pub status: String,
    /// Sum of the items, in cents.
    pub total_cents: i64,
    /// When the order was placed.
    pub placed_at: DateTime<Utc>,
}

/// A new order; `placed_at` is filled in by the database.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = orders)]
pub struct NewOrder<'a> {
    /// Primary key; use [`Uuid::now_v7`].
    pub id: Uuid,
    /// The customer placing the order.
    pub customer_id: Uuid,
    /// One of `pending`, `paid`, `shipped`, `cancelled`.
    pub status: &'a str,
    /// Sum of the items, in cents.
    pub total_cents: i64,
}

/// A row of `order_items`, also used to insert one.
#[derive(
    Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, Associations, Insertable,
)]
#[diesel(
    table_name = order_items,
    primary_key(order_id, line_no),
    belongs_to(Order),
    check_for_backend(diesel::pg::Pg)
)]
pub struct OrderItem {
    /// The order this line belongs to.
    pub order_id: Uuid,
    /// Position within the order, from 1.
    pub line_no: i32,
    /// Stock keeping unit.
    pub sku: String,
    /// Units ordered; positive.
    pub quantity: i32,
    /// Price of one unit, in cents.
    pub unit_price_cents: i64,
}
