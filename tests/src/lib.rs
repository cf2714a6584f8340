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

use dal::local::LocalPostgres;
use diesel_async::AsyncPgConnection;
use migration::MigratorTrait;
use sea_orm::{DatabaseConnection, SqlxPostgresConnector};

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
