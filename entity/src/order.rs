//! `orders`: an order placed by a customer, with its status and total.
// The derive macros generate public items (Column, Entity, ActiveModel, ...) that carry no docs.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// The life cycle of an order, stored as text (checked by a constraint in the database).
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum)]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum OrderStatus {
    /// Placed, not paid yet.
    #[sea_orm(string_value = "pending")]
    Pending,
    /// Paid, not shipped yet.
    #[sea_orm(string_value = "paid")]
    Paid,
    /// On its way.
    #[sea_orm(string_value = "shipped")]
    Shipped,
    /// Cancelled before shipping.
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

/// An order.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    /// Primary key, a UUIDv7 chosen by the application.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The customer who placed the order.
    pub customer_id: Uuid,
    /// Where the order is in its life cycle.
    pub status: OrderStatus,
    /// Sum of the items, in cents; never negative.
    pub total_cents: i64,
    /// When the order was placed; the database fills it in.
    pub placed_at: DateTimeWithTimeZone,
}

/// Relations of an order.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The customer who placed the order.
    #[sea_orm(
        belongs_to = "super::customer::Entity",
        from = "Column::CustomerId",
        to = "super::customer::Column::Id"
    )]
    Customer,
    /// The lines of the order.
    #[sea_orm(has_many = "super::order_item::Entity")]
    Items,
}

impl Related<super::customer::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Customer.def()
    }
}

impl Related<super::order_item::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Items.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
