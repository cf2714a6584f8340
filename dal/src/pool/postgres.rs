//! Plain tokio-postgres clients, for raw SQL.

use futures_util::future::BoxFuture;
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{Client, Connection, Socket};

use super::bb8_pool::{Kind, Pool};
use super::reset::{OUTSIDE_TRANSACTION, ROLLBACK};
use crate::error::{Error, Result};

/// A pool of tokio-postgres clients, for raw SQL.
pub type PgClientPool = Pool<Client>;

/// tokio-postgres clients in a bb8 pool.
pub(crate) const KIND: Kind<Client> = Kind {
    name: "postgres",
    is_valid,
    has_broken,
    lifespan: None,
};

/// Checks a connection before it is handed out again: alive, and outside any transaction
/// (see [`reset`](super::reset)).
fn is_valid(client: &mut Client) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        if client.batch_execute(OUTSIDE_TRANSACTION).await.is_err() {
            tracing::debug!(
                pool = "postgres",
                "a connection came back inside a transaction; rolling back"
            );
            client
                .batch_execute(ROLLBACK)
                .await
                .map_err(Error::Database)?;
        }
        Ok(())
    })
}

fn has_broken(client: &mut Client) -> bool {
    client.is_closed()
}

/// Drives `connection` in a task of its own, which ends when the client is dropped or the
/// server closes the connection.
pub(crate) fn from_parts<S>(client: Client, connection: Connection<Socket, S>) -> Client
where
    S: TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed with an error");
        }
    });
    client
}
