//! tokio-postgres clients in a pool, for raw SQL: each session's wire is followed
//! ([`wire`](super::wire)), so that a client used moments ago is handed out again without a
//! round trip, and prepared statements can be cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{Client, Connection, Socket, Statement};

use super::bb8_pool::{Kind, Lifespan, Pool};
use super::reset::{LOG_OUT, OUTSIDE_TRANSACTION, ROLLBACK};
use super::wire::{Session, Watched, Wire};
use crate::error::{Error, Result};

/// A pool of tokio-postgres clients, for raw SQL.
pub type PgClientPool = Pool<PgClient>;

/// Prepared statements [`PgClient::prepare_cached`] keeps per connection; beyond, it prepares
/// each time.
const CACHED_STATEMENTS: usize = 256;

/// A tokio-postgres client of a [`PgClientPool`]: dereferences to [`tokio_postgres::Client`],
/// and keeps the statements it prepared with [`prepare_cached`](Self::prepare_cached).
pub struct PgClient {
    client: Client,
    /// The session's wire, when it is followed (over TLS).
    wire: Option<Arc<Wire>>,
    statements: Mutex<HashMap<String, Statement>>,
    lifespan: Lifespan,
    /// Dropped with the client, which lets its connection task know (see [`from_parts`]).
    _hang_up: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for PgClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgClient")
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for PgClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl PgClient {
    /// `query` prepared once per connection (as deadpool-postgres' `prepare_cached`): later
    /// calls return the same [`Statement`] without a round trip, for up to 256 statements per
    /// connection.
    ///
    /// A schema change that alters a cached statement's result type fails its next run with
    /// SQLSTATE `0A000` ("cached plan must not change result type"); from then on this
    /// prepares each time, and the pool drops the connection, and its cache with it, as it
    /// comes back. Without TLS the pool cannot see that error, so this prepares each time.
    ///
    /// # Errors
    ///
    /// The error of `prepare`.
    pub async fn prepare_cached(
        &self,
        query: &str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        // A client held across a schema change (a queue consumer, say) would fail on each run
        // of a statement cached before it.
        if self.wire.as_ref().is_none_or(|wire| wire.stale()) {
            return self.client.prepare(query).await;
        }
        let cached = self.statements().get(query).cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.client.prepare(query).await?;
        let mut statements = self.statements();
        if statements.len() < CACHED_STATEMENTS {
            statements.insert(query.to_owned(), statement.clone());
        }
        Ok(statement)
    }

    fn statements(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        self.statements.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// tokio-postgres clients in a bb8 pool.
pub(crate) const KIND: Kind<PgClient> = Kind {
    name: "postgres",
    is_settled,
    is_valid,
    has_broken,
    lifespan: Some(|conn| Some(&mut conn.lifespan)),
};

/// Handed out without a check: came back within
/// [`RECENTLY_USED`](super::reset::RECENTLY_USED), its socket open and its session idle
/// (every request answered, nothing queued, outside a transaction: see [`Wire::session`]).
/// Without TLS the wire is not followed, and every checkout checks.
fn is_settled(conn: &mut PgClient) -> bool {
    let Some(wire) = &conn.wire else {
        return false;
    };
    matches!(wire.session(), Session::Idle)
        && !conn.client.is_closed()
        && conn.lifespan.recently_back()
}

/// Checks a connection before it is handed out again: alive, and outside any transaction
/// (see [`reset`](super::reset)).
///
/// Runs an empty query, whose `ReadyForQuery` tells the transaction status, and a `ROLLBACK`
/// when it is not idle. One whose replies wait for a row stream its last user kept is not
/// handed out (a request would wait behind them); the stream still gets its rows. Without
/// TLS the wire is not followed, and the check is the one the other pools run.
fn is_valid(conn: &mut PgClient) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        let client = &conn.client;
        let in_transaction = match &conn.wire {
            Some(wire) => {
                if let Session::HeldBack = wire.session() {
                    return Err(held_back());
                }
                tokio::select! {
                    biased;
                    checked = client.batch_execute("") => checked.map_err(Error::Database)?,
                    () = wire.held_back() => return Err(held_back()),
                }
                wire.status() != b'I'
            }
            None => client.batch_execute(OUTSIDE_TRANSACTION).await.is_err(),
        };
        if in_transaction {
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

fn held_back() -> Error {
    Error::Pool("a row stream of its last user holds its replies back".to_owned())
}

/// Broken: closed, or a prepared statement the server no longer accepts after a schema
/// change.
fn has_broken(conn: &mut PgClient) -> bool {
    conn.client.is_closed() || conn.wire.as_ref().is_some_and(|wire| wire.stale())
}

/// Drives `connection` in a task of its own, which ends when the client is dropped or the
/// server closes the connection; `wire` is the session's, followed when TLS carried it.
///
/// tokio-postgres ends the session of a dropped client only once every reply it is owed has
/// come: one dropped with a query unanswered (its future dropped, a check that gave up on a
/// server that stopped answering) kept its socket, and its server backend, for as long as the
/// server stayed silent, minutes for a flow a firewall dropped. Once the client is dropped,
/// the task closes it after [`LOG_OUT`] with no progress: no reply read, no row taken by a
/// row stream still open (which keeps getting its rows however slowly it reads; under TLS,
/// replies held back for such a stream do not count as silence at all).
pub(crate) fn from_parts<S>(
    client: Client,
    connection: Connection<Socket, S>,
    wire: Arc<Wire>,
) -> PgClient
where
    S: TlsStream + Unpin + Send + 'static,
{
    let attached = wire.attached();
    let connection = Watched::new(connection, Arc::clone(&wire));
    let (hang_up, dropped) = tokio::sync::oneshot::channel::<()>();
    let watched = Arc::clone(&wire);
    tokio::spawn(async move {
        let given_up = async {
            let _ = dropped.await;
            loop {
                let wakes = watched.wakes();
                tokio::time::sleep(LOG_OUT).await;
                let held_back = attached && watched.session() == Session::HeldBack;
                if watched.wakes() == wakes && !held_back {
                    break;
                }
            }
        };
        tokio::select! {
            biased;
            ended = connection => if let Err(e) = ended {
                tracing::debug!(error = %e, "connection closed with an error");
            },
            () = given_up => tracing::debug!(
                pool = "postgres",
                "a dropped client still waited for replies; its connection is closed"
            ),
        }
    });
    PgClient {
        client,
        wire: attached.then_some(wire),
        statements: Mutex::new(HashMap::new()),
        // Just opened: as good as one that came back now.
        lifespan: Lifespan::returned_now(),
        _hang_up: hang_up,
    }
}
