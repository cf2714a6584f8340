//! The SeaORM tour, on the entities of the `entity` crate.

use anyhow::Context as _;
use entity::order::OrderStatus;
use entity::{customer, order, order_item};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, ModelTrait, PaginatorTrait, QueryFilter,
    QueryOrder, Set, TransactionTrait,
};
use uuid::Uuid;

use super::Stats;

fn new_customer(email: &str, name: &str) -> customer::ActiveModel {
    customer::ActiveModel {
        id: Set(Uuid::now_v7()),
        email: Set(email.to_owned()),
        name: Set(name.to_owned()),
        ..Default::default()
    }
}

fn new_order(customer_id: Uuid, total_cents: i64) -> order::ActiveModel {
    order::ActiveModel {
        id: Set(Uuid::now_v7()),
        customer_id: Set(customer_id),
        status: Set(OrderStatus::Pending),
        total_cents: Set(total_cents),
        ..Default::default()
    }
}

fn item(
    order_id: Uuid,
    line_no: i32,
    sku: &str,
    quantity: i32,
    unit: i64,
) -> order_item::ActiveModel {
    order_item::ActiveModel {
        order_id: Set(order_id),
        line_no: Set(line_no),
        sku: Set(sku.to_owned()),
        quantity: Set(quantity),
        unit_price_cents: Set(unit),
    }
}

/// Runs the tour on `db`; `savepoints` is false on Aurora DSQL, which has none.
pub async fn run(db: &dal::SeaOrmPool, savepoints: bool) -> anyhow::Result<Stats> {
    let tag = super::run_tag();
    let mut stats = Stats::default();
    println!("seaorm: tour {tag}");

    // Create and read.
    let ada = new_customer(&format!("ada-{tag}@example.com"), "Ada")
        .insert(db)
        .await?;
    let grace = new_customer(&format!("grace-{tag}@example.com"), "Grace")
        .insert(db)
        .await?;
    let linus = new_customer(&format!("linus-{tag}@example.com"), "Linus")
        .insert(db)
        .await?;
    stats.written += 3;
    let found = customer::Entity::find_by_id(ada.id)
        .one(db)
        .await?
        .context("the customer just inserted is missing")?;
    stats.read += 1;
    println!("seaorm: created 3 customers, read back {}", found.email);

    // Update.
    let mut renamed: customer::ActiveModel = found.into();
    renamed.name = Set("Ada Lovelace".into());
    let ada = renamed.update(db).await?;
    stats.written += 1;
    println!("seaorm: renamed to {}", ada.name);

    // Relations: an order with its items, then the customer's orders and an order's items.
    let order = new_order(ada.id, 2 * 450 + 1200).insert(db).await?;
    order_item::Entity::insert_many([
        item(order.id, 1, "PEN-BLUE", 2, 450),
        item(order.id, 2, "NOTEBOOK-A5", 1, 1200),
    ])
    .exec(db)
    .await?;
    stats.written += 3;
    let with_orders = customer::Entity::find_by_id(ada.id)
        .find_with_related(order::Entity)
        .all(db)
        .await?;
    let items = order.find_related(order_item::Entity).all(db).await?;
    stats.read += (with_orders.len() + items.len()) as u64;
    println!(
        "seaorm: {} has {} order(s); the first has {} item(s)",
        ada.name,
        with_orders.first().map_or(0, |(_, orders)| orders.len()),
        items.len()
    );

    // Pagination, two rows a page, in a stable order.
    let mut pages = customer::Entity::find()
        .filter(customer::Column::Email.like(format!("%-{tag}@example.com")))
        .order_by_asc(customer::Column::Email)
        .paginate(db, 2);
    let mut page_no = 0;
    while let Some(page) = pages.fetch_and_next().await? {
        page_no += 1;
        stats.read += page.len() as u64;
        let names: Vec<_> = page.iter().map(|c| c.name.as_str()).collect();
        println!("seaorm: page {page_no}: {}", names.join(", "));
    }

    // Upsert: inserting an existing e-mail updates the name instead.
    customer::Entity::insert(new_customer(&grace.email, "Grace Hopper"))
        .on_conflict(
            OnConflict::column(customer::Column::Email)
                .update_column(customer::Column::Name)
                .to_owned(),
        )
        .exec(db)
        .await?;
    stats.written += 1;
    let grace = customer::Entity::find_by_id(grace.id)
        .one(db)
        .await?
        .context("the upserted customer is missing")?;
    stats.read += 1;
    println!("seaorm: upserted {} -> {}", grace.email, grace.name);

    // A transaction with a nested savepoint: the inner part rolls back, the outer commits.
    if savepoints {
        let txn = db.begin().await?;
        let paid = new_order(grace.id, 300).insert(&txn).await?;
        let nested = txn.begin().await?;
        new_order(grace.id, 999_999).insert(&nested).await?;
        nested.rollback().await?;
        txn.commit().await?;
        stats.written += 1;
        let orders = grace.find_related(order::Entity).all(db).await?;
        stats.read += orders.len() as u64;
        anyhow::ensure!(
            orders.len() == 1 && orders[0].id == paid.id,
            "the savepoint's order should have been rolled back"
        );
        println!("seaorm: transaction committed 1 order, its savepoint rolled 1 back");
    } else {
        println!("seaorm: transaction with a savepoint skipped (Aurora DSQL has no SAVEPOINT)");
    }

    // Delete.
    let deleted = customer::Entity::delete_by_id(linus.id).exec(db).await?;
    stats.written += deleted.rows_affected;
    println!("seaorm: deleted {} customer(s)", deleted.rows_affected);
    Ok(stats)
}
