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

/// A migration under a running service. The orders migration's foreign key needs a lock on
/// `customers` that an open transaction writing to it holds (a slow request, a batch job);
/// waiting for it, the migration would queue every later write to `customers` behind it, and
/// the service would stall for as long as that transaction stays open. Each migration bounds
/// its lock waits (`lock_timeout`): it gives up instead (SQLSTATE `55P03`), the service's
/// writes go on, and run again once the transaction has ended, it succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_that_cannot_take_its_lock_gives_up_instead_of_stalling_the_service() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    let pg = tests::server().await;
    let password = format!("pw-{}", uuid::Uuid::new_v4());
    pg.create_role("busy", &password, None).await.unwrap();
    pg.create_database("busy", Some("busy")).await.unwrap();
    let connector = dal::Connector::new(pg.config("busy", "busy", &password))
        .await
        .unwrap();
    let db = tests::migration_db(&connector).await;
    Migrator::up(&db, Some(1)).await.expect("customers");

    // The service: writes to customers, one after another.
    let pool = connector.postgres_pool().await.unwrap();
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let worst_us = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let service = tokio::spawn({
        let (pool, done, failed, stop) = (pool.clone(), done.clone(), failed.clone(), stop.clone());
        let worst_us = worst_us.clone();
        async move {
            while !stop.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let written = async {
                    pool.get()
                        .await?
                        .execute(
                            "INSERT INTO customers (id, email, name) \
                             VALUES (gen_random_uuid(), gen_random_uuid()::text, 'service')",
                            &[],
                        )
                        .await
                        .map_err(dal::Error::Database)
                }
                .await;
                worst_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
                match written {
                    Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                    Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }
    });

    // The open transaction, holding its write lock on customers.
    let (open, connection) = connector.connect().await.unwrap();
    tokio::spawn(connection);
    open.batch_execute(
        "BEGIN; INSERT INTO customers (id, email, name) \
         VALUES (gen_random_uuid(), 'open@example.com', 'open')",
    )
    .await
    .unwrap();

    let err = tokio::time::timeout(Duration::from_secs(120), Migrator::up(&db, None))
        .await
        .expect("the migration waited on the lock, and the service's writes behind it")
        .expect_err("the lock is held");
    assert!(err.to_string().contains("lock timeout"), "{err}");
    // The transaction is still open, and the service writes on.
    let before = done.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::SeqCst) < before + 10 {
        assert!(std::time::Instant::now() < deadline, "the service stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    open.batch_execute("COMMIT").await.unwrap();
    Migrator::up(&db, None)
        .await
        .expect("once the transaction ended");
    assert!(
        Migrator::get_pending_migrations(&db)
            .await
            .unwrap()
            .is_empty()
    );
    stop.store(true, Ordering::SeqCst);
    service.await.unwrap();
    println!(
        "service writes {}, failed {}, worst write {} ms (lock_timeout {})",
        done.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        worst_us.load(Ordering::SeqCst) / 1000,
        migration::LOCK_TIMEOUT
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    connector.shutdown().await;
}
