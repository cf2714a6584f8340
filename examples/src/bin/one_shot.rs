//! A script: one connection, one query, print the result, exit at once.
//!
//! The lazy strategy fetches one token for the one connection and starts no refresher, so
//! nothing is left running when the query is done.
//!
//! ```text
//! cargo run -p examples --bin one_shot
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use anyhow::Context as _;
use dal::TokenStrategy;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    examples::logging::init();
    examples::exit::on_error(run().await);
}

async fn run() -> anyhow::Result<()> {
    let database = examples::Database::from_env().await?;
    let result = query(&database).await;
    database.close().await;
    result
}

async fn query(database: &examples::Database) -> anyhow::Result<()> {
    let config = database.config().strategy(TokenStrategy::Lazy);
    let connector = examples::target::connector(config.clone()).await?;
    let (client, connection) = connector
        .connect()
        .await
        .map_err(|e| examples::target::explain(&config, e))?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, \
             to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
             current_setting('server_version')",
            &[],
        )
        .await
        .context("running the query")?;
    println!(
        "result: user {}, database {}, server time {}, PostgreSQL {}",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        row.get::<_, String>(2),
        row.get::<_, String>(3)
    );
    // Closing the client ends the connection task; then nothing is left running.
    drop(client);
    let _ = driver.await;
    connector.shutdown().await;
    Ok(())
}
