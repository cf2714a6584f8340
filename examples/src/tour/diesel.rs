//! The Diesel tour, on the `table!` schema and row types of `entity`.

use anyhow::Context as _;
use dal::DieselPool;
use dal::diesel::prelude::{
    BelongingToDsl, BoolExpressionMethods, ExpressionMethods, GroupedBy, QueryDsl,
    SelectableHelper, TextExpressionMethods,
};
use dal::diesel::upsert::excluded;
use dal::diesel_async::{AsyncConnection, RunQueryDsl};
use entity::models::{Customer, NewCustomer, NewOrder, Order, OrderItem};
use entity::schema::{customers, order_items, orders};
use uuid::Uuid;

use super::Stats;

type Conn = dal::diesel_async::AsyncPgConnection;

async fn insert_customer(conn: &mut Conn, email: &str, name: &str) -> anyhow::Result<Customer> {
    Ok(dal::diesel::insert_into(customers::table)
        .values(NewCustomer {
            id: Uuid::now_v7(),
            email,
            name,
        })
        .returning(Customer::as_returning())
        .get_result(conn)
        .await?)
}

fn line(order_id: Uuid, line_no: i32, sku: &str, quantity: i32, unit: i64) -> OrderItem {
    OrderItem {
        order_id,
        line_no,
        sku: sku.to_owned(),
        quantity,
        unit_price_cents: unit,
    }
}

/// Runs the tour on `pool`; `savepoints` is false on Aurora DSQL, which has none.
pub async fn run(pool: &DieselPool, savepoints: bool) -> anyhow::Result<Stats> {
    let tag = super::run_tag();
    let mut stats = Stats::default();
    let mut conn = pool.get().await?;
    let conn: &mut Conn = &mut conn;
    println!("diesel: tour {tag}");

    // Create and read.
    let ada = insert_customer(conn, &format!("ada-{tag}@example.com"), "Ada").await?;
    let grace = insert_customer(conn, &format!("grace-{tag}@example.com"), "Grace").await?;
    let linus = insert_customer(conn, &format!("linus-{tag}@example.com"), "Linus").await?;
    stats.written += 3;
    let found: Customer = customers::table
        .find(ada.id)
        .select(Customer::as_select())
        .first(conn)
        .await?;
    stats.read += 1;
    println!("diesel: created 3 customers, read back {}", found.email);

    // Update.
    let ada: Customer = dal::diesel::update(customers::table.find(ada.id))
        .set(customers::name.eq("Ada Lovelace"))
        .returning(Customer::as_returning())
        .get_result(conn)
        .await?;
    stats.written += 1;
    println!("diesel: renamed to {}", ada.name);

    // Relations: an order with its items, a join, and items grouped by order.
    let order_id = Uuid::now_v7();
    dal::diesel::insert_into(orders::table)
        .values(NewOrder {
            id: order_id,
            customer_id: ada.id,
            status: "pending",
            total_cents: 2 * 450 + 1200,
        })
        .execute(conn)
        .await?;
    dal::diesel::insert_into(order_items::table)
        .values(&[
            line(order_id, 1, "PEN-BLUE", 2, 450),
            line(order_id, 2, "NOTEBOOK-A5", 1, 1200),
        ])
        .execute(conn)
        .await?;
    stats.written += 3;
    let joined: Vec<(Order, String)> = orders::table
        .inner_join(customers::table)
        .filter(customers::id.eq(ada.id))
        .select((Order::as_select(), customers::name))
        .load(conn)
        .await?;
    let ada_orders: Vec<Order> = joined.iter().map(|(o, _)| o.clone()).collect();
    let items: Vec<OrderItem> = OrderItem::belonging_to(&ada_orders)
        .select(OrderItem::as_select())
        .order(order_items::line_no)
        .load(conn)
        .await?;
    stats.read += (joined.len() + items.len()) as u64;
    let grouped = items.grouped_by(&ada_orders);
    for (order, lines) in ada_orders.iter().zip(&grouped) {
        println!(
            "diesel: order {} of {} holds {} line(s), {} cents",
            order.id,
            joined[0].1,
            lines.len(),
            order.total_cents
        );
    }

    // Pagination, two rows a page, in a stable order.
    let mine = format!("%-{tag}@example.com");
    for page_no in 0.. {
        let page: Vec<Customer> = customers::table
            .filter(customers::email.like(&mine))
            .order(customers::email)
            .limit(2)
            .offset(page_no * 2)
            .select(Customer::as_select())
            .load(conn)
            .await?;
        if page.is_empty() {
            break;
        }
        stats.read += page.len() as u64;
        let names: Vec<_> = page.iter().map(|c| c.name.as_str()).collect();
        println!("diesel: page {}: {}", page_no + 1, names.join(", "));
    }

    // Upsert: inserting an existing e-mail updates the name instead.
    let grace: Customer = dal::diesel::insert_into(customers::table)
        .values(NewCustomer {
            id: Uuid::now_v7(),
            email: &grace.email,
            name: "Grace Hopper",
        })
        .on_conflict(customers::email)
        .do_update()
        .set(customers::name.eq(excluded(customers::name)))
        .returning(Customer::as_returning())
        .get_result(conn)
        .await?;
    stats.written += 1;
    println!("diesel: upserted {} -> {}", grace.email, grace.name);

    // A transaction with a nested savepoint: the inner part rolls back, the outer commits.
    if savepoints {
        let grace_id = grace.id;
        let kept = Uuid::now_v7();
        conn.transaction::<_, anyhow::Error, _>(async move |tx| {
            dal::diesel::insert_into(orders::table)
                .values(NewOrder {
                    id: kept,
                    customer_id: grace_id,
                    status: "paid",
                    total_cents: 300,
                })
                .execute(tx)
                .await?;
            let inner = tx
                .transaction::<(), dal::diesel::result::Error, _>(async move |sp| {
                    dal::diesel::insert_into(orders::table)
                        .values(NewOrder {
                            id: Uuid::now_v7(),
                            customer_id: grace_id,
                            status: "pending",
                            total_cents: 999_999,
                        })
                        .execute(sp)
                        .await?;
                    Err(dal::diesel::result::Error::RollbackTransaction)
                })
                .await;
            anyhow::ensure!(
                matches!(inner, Err(dal::diesel::result::Error::RollbackTransaction)),
                "the savepoint should have rolled back: {inner:?}"
            );
            Ok(())
        })
        .await?;
        stats.written += 1;
        let ids: Vec<Uuid> = orders::table
            .filter(orders::customer_id.eq(grace.id))
            .select(orders::id)
            .load(conn)
            .await?;
        stats.read += ids.len() as u64;
        anyhow::ensure!(
            ids == [kept],
            "the savepoint's order should have been rolled back"
        );
        println!("diesel: transaction committed 1 order, its savepoint rolled 1 back");
    } else {
        println!("diesel: transaction with a savepoint skipped (Aurora DSQL has no SAVEPOINT)");
    }

    // Delete.
    let deleted = dal::diesel::delete(
        customers::table.filter(customers::id.eq(linus.id).and(customers::email.like(&mine))),
    )
    .execute(conn)
    .await
    .context("deleting a customer")?;
    stats.written += deleted as u64;
    println!("diesel: deleted {deleted} customer(s)");
    Ok(stats)
}
