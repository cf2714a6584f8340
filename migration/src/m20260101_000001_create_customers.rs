//! Creates `customers`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::ddl::{Ddl, Flavor};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration {
    pub(crate) flavor: Flavor,
}

#[derive(DeriveIden)]
pub(crate) enum Customers {
    Table,
    Id,
    Email,
    Name,
    CreatedAt,
}

// async_trait needs the trait's own elided `SchemaManager` lifetime.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    fn use_transaction(&self) -> Option<bool> {
        self.flavor.use_transaction()
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Ddl::begin(manager, self.flavor)
            .await?
            .create_table(
                Table::create()
                    .table(Customers::Table)
                    .if_not_exists()
                    .col(uuid(Customers::Id).primary_key())
                    .col(text(Customers::Email).unique_key())
                    .col(text(Customers::Name))
                    .col(
                        timestamp_with_time_zone(Customers::CreatedAt)
                            .default(Expr::current_timestamp()),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Ddl::begin(manager, self.flavor)
            .await?
            .drop_table(Table::drop().table(Customers::Table).if_exists().to_owned())
            .await
    }
}
