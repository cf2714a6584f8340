//! Pools logging in with Lakebase database credentials from the local Lakebase-compatible
//! service, whose tokens the server checks at login until their own expiry.

use std::time::Duration;

use dal::local::{LocalLakebase, LocalPostgres};
use dal::{Connector, TokenStrategy};
use migration::MigratorTrait;

/// The service, with the role it logs in as owning a migrated database `name`.
async fn lakebase(pg: &LocalPostgres, name: &str, ttl: Duration) -> LocalLakebase {
    let lb = tests::lakebase(pg, name, ttl).await;
    let connector = Connector::new(lb.client_config(pg, name).unwrap())
        .await
        .unwrap();
    let db = tests::migration_db(&connector).await;
    migration::Migrator::up(&db, None).await.expect("migrate");
    connector.shutdown().await;
    lb
}

#[tokio::test]
async fn both_orms_run_on_lakebase_credentials_and_show_their_application_name() {
    let pg = tests::server().await;
    let lb = lakebase(&pg, "lb", Duration::from_secs(60)).await;
    let connector = Connector::new(lb.client_config(&pg, "lb").unwrap())
        .await
        .unwrap();
    assert_eq!(connector.target(), dal::Target::Lakebase);
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "lb-seaorm").await;
    tests::diesel_round_trip(&diesel, "lb-diesel").await;
    let _held = diesel.get().await.unwrap();

    // The vendor's validation query.
    let admin = pg.admin("postgres").await.unwrap();
    let rows = admin
        .query(
            "SELECT pid, usename, client_addr, application_name, state, query \
             FROM pg_stat_activity WHERE usename = $1 ORDER BY application_name",
            &[&lb.config().role],
        )
        .await
        .unwrap();
    assert!(rows.len() >= 2, "both pools hold connections");
    for row in rows {
        assert_eq!(
            row.get::<_, String>("application_name"),
            dal::DEFAULT_APPLICATION_NAME
        );
    }
    connector.shutdown().await;
}

#[tokio::test]
async fn a_hundred_cold_connects_cause_one_oauth_and_one_credential_fetch() {
    let pg = tests::server().await;
    let lb = lakebase(&pg, "cold", Duration::from_secs(60)).await;
    let (oauth, credentials) = (lb.oauth_requests(), lb.credential_requests());
    let mut config = lb
        .client_config(&pg, "cold")
        .unwrap()
        .strategy(TokenStrategy::Lazy);
    // A hundred TLS logins at once on a busy machine: what is counted here is fetches, not
    // how fast the logins finish.
    config.connect_timeout = Duration::from_secs(300);
    let connector = Connector::new(config).await.unwrap();
    let connects = (0..100).map(|_| {
        let connector = connector.clone();
        tokio::spawn(async move {
            let (client, connection) = connector.connect().await.expect("connect");
            tokio::spawn(connection);
            client.simple_query("SELECT 1").await.expect("query");
            client
        })
    });
    let clients = futures_join_all(connects).await;
    assert_eq!(clients.len(), 100);
    assert_eq!(lb.oauth_requests() - oauth, 1, "OAuth token fetches");
    assert_eq!(
        lb.credential_requests() - credentials,
        1,
        "database credential fetches"
    );
}

/// A hundred cold connects against a credential service that refuses the workspace's
/// credentials (HTTP 403): as many requests as one connect makes alone (endpoint discovery
/// falls back, then the token request), and every connect gets the refusal. Each connect
/// waiting on the failed fetch made a fetch of its own, one after another.
#[tokio::test]
async fn a_hundred_cold_connects_against_a_refusing_service_make_one_fetch() {
    let pg = tests::server().await;
    let lb = lakebase(&pg, "refused", Duration::from_secs(60)).await;
    let connector = || async {
        let mut config = lb
            .client_config(&pg, "refused")
            .unwrap()
            .strategy(TokenStrategy::Lazy);
        config.connect_timeout = Duration::from_secs(300);
        Connector::new(config).await.unwrap()
    };
    lb.fail_next(usize::MAX, 403);
    let alone = connector().await;
    let before = lb.requests();
    alone.connect().await.err().expect("refused");
    let one_fetch = lb.requests() - before;

    let many = connector().await;
    let before = lb.requests();
    let connects = (0..100).map(|_| {
        let connector = many.clone();
        tokio::spawn(async move { connector.connect().await.err().expect("refused") })
    });
    let errors = futures_join_all(connects).await;
    let requests = lb.requests() - before;
    println!(
        "cold connects against a refusing service | connects 100 | failed {} | requests {requests} \
         (one connect alone: {one_fetch})",
        errors.len()
    );
    assert_eq!(requests, one_fetch, "requests to the credential service");
    for err in &errors {
        assert!(err.is_auth_failure() && !err.is_retryable(), "{err:?}");
        assert!(err.to_string().contains("403"), "{err}");
    }
    lb.fail_next(0, 403);
    alone.shutdown().await;
    many.shutdown().await;
}

/// A service that runs a single-threaded runtime per core (as actix-web's workers do) builds
/// one connector and its pools on each runtime: the runtimes' first connects, racing on a
/// cold cache, cause one OAuth and one credential fetch in all; each runtime's pools serve on
/// it; and the connector's shutdown, from another runtime, closes every runtime's pools.
#[tokio::test]
async fn pools_on_a_runtime_per_core_share_one_token_and_close_together() {
    let pg = tests::server().await;
    let lb = lakebase(&pg, "cores", Duration::from_secs(60)).await;
    let (oauth, credentials) = (lb.oauth_requests(), lb.credential_requests());
    let config = lb
        .client_config(&pg, "cores")
        .unwrap()
        .strategy(TokenStrategy::Lazy);
    let connector = Connector::new(config).await.unwrap();
    let (served, mut all_served) = tokio::sync::mpsc::unbounded_channel();
    let (closed, is_closed) = tokio::sync::watch::channel(false);
    let cores: Vec<_> = (0..2)
        .map(|_| {
            let (connector, served, mut is_closed) =
                (connector.clone(), served.clone(), is_closed.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let diesel = connector.diesel_pool().await.unwrap();
                    let clients = connector.postgres_pool().await.unwrap();
                    let mut conn = diesel.get().await.unwrap();
                    dal::diesel_async::SimpleAsyncConnection::batch_execute(&mut *conn, "SELECT 1")
                        .await
                        .unwrap();
                    drop(conn);
                    let client = clients.get().await.unwrap();
                    client.simple_query("SELECT 1").await.unwrap();
                    drop(client);
                    served.send(()).unwrap();
                    is_closed.wait_for(|closed| *closed).await.unwrap();
                    let closed = |e: &dal::Error| matches!(e, dal::Error::PoolClosed);
                    (
                        diesel.get().await.err().is_some_and(|e| closed(&e)),
                        clients.get().await.err().is_some_and(|e| closed(&e)),
                    )
                })
            })
        })
        .collect();
    drop(served);
    for _ in 0..cores.len() {
        all_served
            .recv()
            .await
            .expect("a runtime ended before its pools served");
    }
    assert_eq!(lb.oauth_requests() - oauth, 1, "OAuth token fetches");
    assert_eq!(
        lb.credential_requests() - credentials,
        1,
        "database credential fetches"
    );
    connector.shutdown().await;
    closed.send(true).unwrap();
    for core in cores {
        let refused = tokio::task::spawn_blocking(move || core.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            refused,
            (true, true),
            "each runtime's pools closed (Diesel, tokio-postgres)"
        );
    }
}

async fn futures_join_all<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

async fn rotation(strategy: TokenStrategy) {
    let pg = tests::server().await;
    let ttl = Duration::from_secs(3);
    let lb = lakebase(&pg, "rot", ttl).await;
    let before = lb.credential_requests();
    let config = lb.client_config(&pg, "rot").unwrap().strategy(strategy);
    tests::rotation_workload(config, ttl).await;
    assert!(lb.credential_requests() - before >= 3);
}

#[tokio::test]
async fn lakebase_credentials_rotate_under_load_eager() {
    rotation(TokenStrategy::Eager).await;
}

#[tokio::test]
async fn lakebase_credentials_rotate_under_load_lazy() {
    rotation(TokenStrategy::Lazy).await;
}

#[tokio::test]
async fn an_outage_shorter_than_the_token_life_fails_no_query() {
    let pg = tests::server().await;
    let ttl = Duration::from_secs(10);
    let lb = lakebase(&pg, "outage", ttl).await;
    let config = lb
        .client_config(&pg, "outage")
        .unwrap()
        .strategy(TokenStrategy::Eager)
        .pool(
            dal::PoolSettings::builder()
                .max_size(3)
                .max_lifetime(Some(Duration::from_millis(800)))
                .idle_timeout(Some(Duration::from_millis(500)))
                .build()
                .unwrap(),
        );
    let connector = Connector::new(config).await.unwrap();
    let expires = connector.cache().expires_at().unwrap();
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();

    // Down from 1 s, through the refresh margin (the last fifth of the life, 2 s), until
    // after expiry; queries run until 1.5 s before expiry, however slow the machine.
    tokio::time::sleep(Duration::from_secs(1)).await;
    lb.set_down(true);
    let remaining = || {
        expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    while remaining() > Duration::from_millis(1500) {
        tokio::join!(
            tests::seaorm_round_trip(&db, "outage-seaorm"),
            tests::diesel_round_trip(&diesel, "outage-diesel"),
        );
        // Fresh physical connections too, with the still-valid token.
        let (client, connection) = connector
            .connect()
            .await
            .expect("connect during the outage");
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Past expiry with the service still down: a clear credential error.
    let wait = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    let err = connector
        .connect()
        .await
        .err()
        .expect("no valid token is left");
    assert!(
        matches!(err, dal::Error::Http { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("503"), "{err}");
    assert!(
        connector.cache().failures() >= 1,
        "the refreshes during the outage should have failed"
    );

    // The service comes back: the next connection fetches and succeeds.
    lb.set_down(false);
    let (client, connection) = connector.connect().await.expect("recovered");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    tests::diesel_round_trip(&diesel, "after-outage").await;
    connector.shutdown().await;
}

/// Two programs (two connectors, two caches) on one role, each minting its own tokens, with
/// every pool's connections renewed all the time: neither's tokens end the other's logins.
/// Each token is refreshed half its life ahead of expiry, so that a login that read it just
/// before (or while its successor was fetched) has 1.5 s to finish even on a busy machine.
#[tokio::test]
async fn two_connectors_on_one_role_never_refuse_each_others_tokens() {
    let pg = tests::server().await;
    let ttl = Duration::from_secs(3);
    let lb = lakebase(&pg, "two", ttl).await;
    let churn = dal::PoolSettings::builder()
        .max_size(2)
        .max_lifetime(Some(Duration::from_millis(400)))
        .lifetime_jitter(0.0)
        .idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let connector = || async {
        let cache = dal::CacheSettings::builder()
            .refresh_margin(ttl / 2)
            .build()
            .unwrap();
        let config = lb
            .client_config(&pg, "two")
            .unwrap()
            .pool(churn.clone())
            .cache(cache);
        Connector::new(config).await.unwrap()
    };
    let (a, b) = (connector().await, connector().await);
    let (a_db, b_db) = (a.seaorm().await.unwrap(), b.seaorm().await.unwrap());
    let (a_diesel, b_diesel) = (
        a.diesel_pool().await.unwrap(),
        b.diesel_pool().await.unwrap(),
    );
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < ttl * 3 {
        tokio::join!(
            tests::seaorm_round_trip(&a_db, "two-a"),
            tests::seaorm_round_trip(&b_db, "two-b"),
            tests::diesel_round_trip(&a_diesel, "two-a"),
            tests::diesel_round_trip(&b_diesel, "two-b"),
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each cache fetched its own tokens, and each refused none.
    for c in [&a, &b] {
        assert!(c.cache().fetches() >= 3, "fetches {}", c.cache().fetches());
        assert_eq!(c.cache().failures(), 0);
    }
    let (accepted, refused) = pg.token_logins();
    println!("rounds {rounds}, token logins accepted {accepted}, refused {refused}");
    assert_eq!(refused, 0);
    assert!(
        accepted >= 8,
        "connections should have been renewed: {accepted}"
    );
    a.shutdown().await;
    b.shutdown().await;
}
