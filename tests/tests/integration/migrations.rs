//! Migrations: up, down to zero, up again, against a real server.

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

async fn applied(db: &DatabaseConnection) -> Vec<String> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT version FROM seaql_migrations ORDER BY version",
    ))
    .await
    .expect("read seaql_migrations")
    .iter()
    .map(|row| row.try_get::<String>("", "version").unwrap())
    .collect()
}

async fn tables(db: &DatabaseConnection) -> Vec<String> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT table_name::text AS name FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> 'seaql_migrations' ORDER BY 1",
    ))
    .await
    .expect("list tables")
    .iter()
    .map(|row| row.try_get::<String>("", "name").unwrap())
    .collect()
}

#[tokio::test]
async fn up_down_up_round_trip() {
    let pg = tests::server().await;
    let db = tests::migrated(&pg, "round_trip").await;
    let all = vec![
        "m20260101_000001_create_customers".to_owned(),
        "m20260101_000002_create_orders".to_owned(),
        "m20260101_000003_create_order_items".to_owned(),
    ];
    assert_eq!(applied(&db).await, all);
    assert_eq!(tables(&db).await, ["customers", "order_items", "orders"]);

    // Running `up` again changes nothing.
    Migrator::up(&db, None).await.expect("second up");
    assert_eq!(applied(&db).await, all);

    Migrator::down(&db, None).await.expect("down to zero");
    assert!(applied(&db).await.is_empty());
    assert!(tables(&db).await.is_empty());

    Migrator::up(&db, None).await.expect("up again");
    assert_eq!(applied(&db).await, all);
    assert_eq!(tables(&db).await, ["customers", "order_items", "orders"]);
    assert!(
        Migrator::get_pending_migrations(&db)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn constraints_hold() {
    let pg = tests::server().await;
    let db = tests::migrated(&pg, "constraints").await;
    let run = |sql: &'static str| {
        let db = db.clone();
        async move { db.execute_unprepared(sql).await }
    };
    run("INSERT INTO customers (id, email, name) VALUES \
         ('0190c7f0-0000-7000-8000-000000000001', 'a@example.com', 'A')")
    .await
    .expect("insert customer");
    let dup = run("INSERT INTO customers (id, email, name) VALUES \
                   ('0190c7f0-0000-7000-8000-000000000002', 'a@example.com', 'B')")
    .await
    .unwrap_err();
    assert!(dup.to_string().contains("customers_email_key"), "{dup}");
    let bad_status = run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a1', '0190c7f0-0000-7000-8000-000000000001', 'lost')")
    .await
    .unwrap_err();
    assert!(
        bad_status.to_string().contains("check constraint"),
        "{bad_status}"
    );
    let orphan = run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a2', '0190c7f0-0000-7000-8000-00000000ffff', 'paid')")
    .await
    .unwrap_err();
    assert!(
        orphan.to_string().contains("fk_orders_customer_id"),
        "{orphan}"
    );
    run("INSERT INTO orders (id, customer_id, status) VALUES \
         ('0190c7f0-0000-7000-8000-0000000000a3', '0190c7f0-0000-7000-8000-000000000001', 'paid')")
    .await
    .expect("insert order");
    let zero_qty = run(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_cents) \
         VALUES ('0190c7f0-0000-7000-8000-0000000000a3', 1, 'X', 0, 100)",
    )
    .await
    .unwrap_err();
    assert!(
        zero_qty.to_string().contains("check constraint"),
        "{zero_qty}"
    );
}
