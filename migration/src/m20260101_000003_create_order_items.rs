//! Creates `order_items` and its foreign key to `orders`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::ddl::{Ddl, Flavor};
use crate::m20260101_000002_create_orders::Orders;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration {
    pub(crate) flavor: Flavor,
}

#[derive(DeriveIden)]
enum OrderItems {
    Table,
    OrderId,
    LineNo,
    Sku,
    Quantity,
    UnitPriceCents,
}

// async_trait needs the trait's own elided `SchemaManager` lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        self.flavor.use_transaction()
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let ddl = Ddl::begin(manager, self.flavor).await?;
        ddl.create_table(
            Table::create()
                .table(OrderItems::Table)
                .if_not_exists()
                .col(uuid(OrderItems::OrderId))
                .col(integer(OrderItems::LineNo))
                .col(text(OrderItems::Sku))
                .col(integer(OrderItems::Quantity).check(Expr::col(OrderItems::Quantity).gt(0)))
                .col(
                    big_integer(OrderItems::UnitPriceCents)
                        .check(Expr::col(OrderItems::UnitPriceCents).gte(0)),
                )
                .primary_key(
                    Index::create()
                        .name("pk_order_items")
                        .col(OrderItems::OrderId)
                        .col(OrderItems::LineNo),
                )
                .to_owned(),
        )
        .await?;
        ddl.add_foreign_key(
            ForeignKey::create()
                .name("fk_order_items_order_id")
                .from(OrderItems::Table, OrderItems::OrderId)
                .to(Orders::Table, Orders::Id)
                .on_delete(ForeignKeyAction::Cascade)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Ddl::begin(manager, self.flavor)
            .await?
            .drop_table(
                Table::drop()
                    .table(OrderItems::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
