//! `order_items`: the lines of an order, keyed by order and line number.
// The derive macros generate public items (Column, Entity, ActiveModel, ...) that carry no docs.
#![allow(missing_docs)]

use sea_orm::entity::prelude::*;

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "order_items")]
pub struct Model {
    /// The order this line belongs to.
    #[sea_orm(primary_key, auto_increment = false)]
    pub order_id: Uuid,
    /// Position of the line within its order, from 1.
    #[sea_orm(primary_key, auto_increment = false)]
    pub line_no: i32,
    /// Stock keeping unit of the product.
    pub sku: String,
    /// How many units; always positive.
    pub quantity: i32,
    /// Price of one unit, in cents; never negative.
    pub unit_price_cents: i64,
}

/// Relations of an order line.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The order this line belongs to.
    #[sea_orm(
        belongs_to = "super::order::Entity",
        from = "Column::OrderId",
        to = "super::order::Column::Id"
    )]
    Order,
}

impl Related<super::order::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Order.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
