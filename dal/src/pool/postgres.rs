//! Plain tokio-postgres clients, for raw SQL.

use futures_util::future::BoxFuture;
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{Client, Connection, Socket};

use super::bb8_pool::{Kind, Pool};
use crate::error::{Error, Result};

/// A pool of tokio-postgres clients, for raw SQL.
pub type PgClientPool = Pool<Client>;

/// tokio-postgres clients in a bb8 pool.
pub(crate) const KIND: Kind<Client> = Kind {
    name: "postgres",
    is_valid,
    has_broken,
};

fn is_valid(client: &mut Client) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        client
            .simple_query("")
            .await
            .map(drop)
            .map_err(Error::Database)
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
