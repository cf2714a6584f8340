//! Helpers shared by the integration tests: each test binary starts its own PostgreSQL.
//!
//! A test that needs the server fails, never skips, when the server cannot start; the panic
//! message says how to install the server binaries.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

use std::time::{Duration, Instant};

use dal::diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
use dal::diesel_async::RunQueryDsl;
use dal::local::LocalPostgres;
use dal::{CacheSettings, Config, Connector, PoolSettings};
use diesel_async::AsyncPgConnection;
use entity::customer;
use entity::models::{Customer, NewCustomer, NewOrder};
use entity::schema::{customers, orders};
use migration::MigratorTrait;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, Set};
use sea_orm::{DatabaseConnection, SqlxPostgresConnector};
use uuid::Uuid;

/// Starts an ephemeral PostgreSQL server, or fails the test with the reason.
pub async fn server() -> LocalPostgres {
    match LocalPostgres::start().await {
        Ok(pg) => pg,
        Err(e) => panic!("cannot start the test PostgreSQL server: {e}"),
    }
}

/// A SeaORM connection as superuser to `database`, over TLS verified against the test CA.
pub async fn seaorm(pg: &LocalPostgres, database: &str) -> DatabaseConnection {
    let pool = sea_orm::sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(pg.sqlx_options(database))
        .await
        .expect("connect with sqlx");
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}

/// A Diesel connection as superuser to `database`.
pub async fn diesel(pg: &LocalPostgres, database: &str) -> AsyncPgConnection {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(pg.port())
        .user(pg.superuser())
        .password(secrecy::ExposeSecret::expose_secret(
            pg.superuser_password(),
        ))
        .dbname(database)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect with tokio-postgres");
    AsyncPgConnection::try_from_client_and_connection(client, connection)
        .await
        .expect("wrap the connection for Diesel")
}

/// Creates `database` and migrates it to the newest schema; returns a SeaORM connection to it.
pub async fn migrated(pg: &LocalPostgres, database: &str) -> DatabaseConnection {
    pg.create_database(database, None)
        .await
        .expect("create database");
    let db = seaorm(pg, database).await;
    migration::Migrator::up(&db, None)
        .await
        .expect("migrate up");
    db
}

/// A role `name` with a fresh password, and an empty database `name` it owns; the password.
pub async fn owned_database(pg: &LocalPostgres, name: &str) -> String {
    let password = format!("pw-{}", Uuid::new_v4());
    pg.create_role(name, &password, None).await.unwrap();
    pg.create_database(name, Some(name)).await.unwrap();
    password
}

/// A database `name` owned by the login role `name`, migrated; returns the role's password.
pub async fn app_database(pg: &LocalPostgres, name: &str) -> String {
    let password = owned_database(pg, name).await;
    let connector = Connector::new(pg.config(name, name, &password))
        .await
        .unwrap();
    let db = migration_db(&connector).await;
    migration::Migrator::up(&db, None).await.expect("migrate");
    connector.shutdown().await;
    password
}

/// SeaORM's own connection through `connector` (over a plain sqlx pool), as sea-orm-migration
/// takes it.
pub async fn migration_db(connector: &Connector) -> DatabaseConnection {
    DatabaseConnection::from(connector.sqlx_pool().await.expect("the sqlx pool"))
}

/// The server process of the connection that a SeaORM statement on `db` runs on.
pub async fn seaorm_backend_pid(db: &impl sea_orm::ConnectionTrait) -> i32 {
    db.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT pg_backend_pid() AS pid",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "pid")
    .unwrap()
}

/// Inserts a customer with SeaORM and reads it back.
pub async fn seaorm_round_trip(db: &impl sea_orm::ConnectionTrait, tag: &str) {
    let email = format!("{tag}-{}@example.com", Uuid::now_v7());
    customer::ActiveModel {
        id: Set(Uuid::now_v7()),
        email: Set(email.clone()),
        name: Set(tag.to_owned()),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("SeaORM insert");
    let found = customer::Entity::find()
        .filter(customer::Column::Email.eq(email))
        .count(db)
        .await
        .expect("SeaORM select");
    assert_eq!(found, 1);
}

/// Inserts a customer and an order with Diesel and reads them back with a join.
pub async fn diesel_round_trip(pool: &dal::DieselPool, tag: &str) {
    let mut conn = pool.get().await.expect("Diesel connection");
    let id = Uuid::now_v7();
    let email = format!("{tag}-{id}@example.com");
    diesel::insert_into(customers::table)
        .values(NewCustomer {
            id,
            email: &email,
            name: tag,
        })
        .execute(&mut *conn)
        .await
        .expect("Diesel insert");
    diesel::insert_into(orders::table)
        .values(NewOrder {
            id: Uuid::now_v7(),
            customer_id: id,
            status: "pending",
            total_cents: 100,
        })
        .execute(&mut *conn)
        .await
        .expect("Diesel insert order");
    let (customer, total): (Customer, i64) = customers::table
        .inner_join(orders::table)
        .filter(customers::id.eq(id))
        .select((Customer::as_select(), orders::total_cents))
        .first(&mut *conn)
        .await
        .expect("Diesel join");
    assert_eq!((customer.email, total), (email, 100));
}

/// Runs both ORMs against `config`'s database for three token lives and a second. Every
/// pool's connections live 1.5 s, so that new physical connections open all through the
/// run: Diesel's each pulling the current token, SeaORM's logging in with the one pushed
/// into its pool. Tokens are refreshed half their life ahead of expiry: a login that read a
/// token just before its refresh has that long to finish, which a busy machine needs (the
/// default fifth of a 3 s life left 0.6 s, and the plain sqlx pool does not retry a refused
/// login). Fails on any failed query; checks that a connection opened with the first
/// token still works at the end, that new connections were opened, and that the SeaORM pool
/// opens a new connection after a refresh.
pub async fn rotation_workload(config: Config, ttl: Duration) {
    let config = config
        .cache(
            CacheSettings::builder()
                .retries(3, Duration::from_millis(50), Duration::from_millis(500))
                .refresh_margin(ttl / 2)
                .build()
                .unwrap(),
        )
        .pool(
            PoolSettings::builder()
                .max_size(4)
                .max_lifetime(Some(Duration::from_millis(1500)))
                .idle_timeout(Some(Duration::from_secs(1)))
                .build()
                .unwrap(),
        );
    let connector = Connector::new(config).await.expect("connector");
    let sqlx_settings = PoolSettings::builder()
        .max_size(2)
        .min_idle(1)
        .max_lifetime(Some(Duration::from_millis(1500)))
        .lifetime_jitter(0.0)
        .idle_timeout(Some(Duration::from_secs(1)))
        .build()
        .unwrap();
    let sqlx = connector
        .sqlx_pool_with(&sqlx_settings)
        .await
        .expect("sqlx pool");
    let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(sqlx.clone());
    let diesel = connector.diesel_pool().await.expect("Diesel pool");
    let backend = "SELECT pg_backend_pid()";
    let first_pid: i32 = sea_orm::sqlx::query_scalar(backend)
        .fetch_one(&sqlx)
        .await
        .expect("first sqlx connection");

    // A connection opened with the first token keeps working after that token expired.
    let mut old = diesel
        .inner()
        .dedicated_connection()
        .await
        .expect("first connection");

    let deadline = Instant::now() + ttl * 3 + Duration::from_secs(1);
    let mut rounds = 0;
    while Instant::now() < deadline {
        tokio::join!(
            seaorm_round_trip(&db, "rot-seaorm"),
            diesel_round_trip(&diesel, "rot-diesel"),
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..40))).await;
    }
    let n: i64 = customers::table
        .count()
        .get_result(&mut old)
        .await
        .expect("the first connection still works");
    assert_eq!(n as usize, rounds * 2);
    // The first token is long gone; a second sqlx connection must log in with a pushed one.
    let mut second = sqlx
        .acquire()
        .await
        .expect("a new sqlx connection after rotation");
    let pid: i32 = sea_orm::sqlx::query_scalar(backend)
        .fetch_one(&mut *second)
        .await
        .expect("query on the new sqlx connection");
    assert_ne!(
        pid, first_pid,
        "the SeaORM pool's connections should have been renewed"
    );
    drop(second);
    assert!(
        connector.connections_opened() >= 3,
        "new physical connections should have opened, got {}",
        connector.connections_opened()
    );
    connector.shutdown().await;
}

/// Logs in to the `postgres` database of `pg` as `user` with `password`, over TLS verified
/// against the cluster's CA (token roles log in over TLS only). One attempt: the password is
/// fixed, so the connector's retry after a refusal sends the same one again.
pub async fn login(
    pg: &LocalPostgres,
    user: &str,
    password: &str,
) -> dal::Result<tokio_postgres::Client> {
    let config = pg
        .config("postgres", user, password)
        .strategy(dal::TokenStrategy::Lazy);
    let connector = Connector::new(config).await?;
    let (client, connection) = connector.connect().await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Fails unless the server refused the login: SQLSTATE `28P01` (a password role) or `28000`
/// (a token role, checked by the local verifier).
pub fn assert_auth_failure(result: dal::Result<tokio_postgres::Client>) {
    let err = result.expect_err("the login should have been refused");
    assert!(err.is_auth_failure(), "{err:?}");
    assert!(matches!(err.sqlstate(), Some("28P01" | "28000")), "{err:?}");
}

/// A plain-HTTP client for the services the tests start on 127.0.0.1. Its TLS configuration
/// names its crypto provider, as every rustls configuration of the project does.
pub fn http() -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build the HTTP client")
}

/// A connector for `config` and its SeaORM pool, with the sample schema migrated through it.
pub async fn migrated_connector(config: dal::Config) -> (dal::Connector, dal::SeaOrmPool) {
    let connector = dal::Connector::new(config)
        .await
        .expect("build the connector");
    <migration::Migrator as migration::MigratorTrait>::up(&migration_db(&connector).await, None)
        .await
        .expect("migrate");
    let db = connector.seaorm().await.expect("the SeaORM pool");
    (connector, db)
}

/// The local Lakebase service in front of `pg`, with database tokens living `ttl`, and a
/// fresh database `name` owned by its role.
pub async fn lakebase(pg: &LocalPostgres, name: &str, ttl: Duration) -> dal::local::LocalLakebase {
    let config = dal::local::LocalLakebaseConfig::new().with_token_ttl(ttl);
    let lb = dal::local::LocalLakebase::start(pg, config)
        .await
        .expect("start the local Lakebase service");
    pg.create_database(name, Some(&lb.config().role))
        .await
        .expect("create the database");
    lb
}

/// A loopback port nothing listens on, for as long as the socket returned is held: bound
/// and never listening, so connections to it are refused, and no other program takes it.
pub fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("a loopback port");
    let port = socket.local_addr().expect("its address").port();
    (socket, port)
}

/// A development cluster in a temporary directory, stopped when dropped (even when the test
/// fails).
#[derive(Debug)]
pub struct DevCluster(pub tempfile::TempDir);

impl DevCluster {
    /// A new, empty directory for one.
    pub fn new() -> Self {
        Self(tempfile::tempdir().expect("a temporary directory"))
    }

    /// Where it lives (`DAL_DEV_DIR`).
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Default for DevCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = LocalPostgres::stop_dev_in(self.0.path());
        // The cluster's lock, beside its directory.
        let _ = std::fs::remove_file(self.0.path().with_extension("lock"));
    }
}
