//! Creates `orders`, its index on `customer_id` and its foreign key to `customers`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::ddl::{Ddl, Flavor};
use crate::m20260101_000001_create_customers::Customers;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration {
    pub(crate) flavor: Flavor,
}

#[derive(DeriveIden)]
pub(crate) enum Orders {
    Table,
    Id,
    CustomerId,
    Status,
    TotalCents,
    PlacedAt,
}

/// The values the `status` column accepts.
const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];

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
                .table(Orders::Table)
                .if_not_exists()
                .col(uuid(Orders::Id).primary_key())
                .col(uuid(Orders::CustomerId))
                .col(text(Orders::Status).check(Expr::col(Orders::Status).is_in(STATUSES)))
                .col(
                    big_integer(Orders::TotalCents)
                        .default(0)
                        .check(Expr::col(Orders::TotalCents).gte(0)),
                )
                .col(timestamp_with_time_zone(Orders::PlacedAt).default(Expr::current_timestamp()))
                .to_owned(),
        )
        .await?;
        ddl.create_index(
            Index::create()
                .if_not_exists()
                .name("idx_orders_customer_id")
                .table(Orders::Table)
                .col(Orders::CustomerId)
                .to_owned(),
        )
        .await?;
        ddl.add_foreign_key(
            ForeignKey::create()
                .name("fk_orders_customer_id")
                .from(Orders::Table, Orders::CustomerId)
                .to(Customers::Table, Customers::Id)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Ddl::begin(manager, self.flavor)
            .await?
            .drop_table(Table::drop().table(Orders::Table).if_exists().to_owned())
            .await
    }
}
