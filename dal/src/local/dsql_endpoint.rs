//! An Aurora DSQL-like endpoint in front of a local cluster: it forwards each connection to
//! the server untouched (TLS and login end to end), and refuses the connections DSQL would
//! refuse for its limits, as DSQL does: over TLS, before login, with a `FATAL` error carrying
//! DSQL's SQLSTATE and message.
//!
//! DSQL's documented connection limits ("Cluster quotas and database limits" in the Aurora
//! DSQL user guide): 100 new connections per second with bursts of 1,000, beyond which a
//! connection is refused with `53400` "Unable to accept connection, rate exceeded." The rate
//! is a knob ([`LocalDsqlEndpoint::limit_connection_rate`]), off at start. So is an outage of
//! the endpoint ([`LocalDsqlEndpoint::set_down`]), for the failover of a multi-region cluster,
//! whose peer the cluster also serves ([`LocalDsqlEndpoint::start_peer`]).
//!
//! Each endpoint accepts only tokens signed for its host, as DSQL's do (the SigV4 signature
//! covers it): it connects to the server from a loopback address of its own (`127.0.0.2`,
//! `127.0.0.3`), by which `pg_hba.conf` names the endpoint to the cluster's token verifier.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::error::{Error, Result};
use super::server::LocalPostgres;
use crate::config::{Config, ConnectionRate, Credentials};

/// SQLSTATE and message of DSQL's refusal beyond the connection rate.
const RATE_EXCEEDED: (&str, &str) = ("53400", "Unable to accept connection, rate exceeded.");

/// PostgreSQL's SSLRequest and GSSENCRequest codes (protocol 3.0).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// A DSQL-like endpoint on a loopback port in front of a [`LocalPostgres`]. Tokens are
/// checked by the cluster as [`LocalPostgres::dsql_source`] describes. Stops accepting when
/// dropped; forwarded connections run on until either side closes them.
///
/// ```no_run
/// # async fn demo() -> dal::local::Result<()> {
/// use dal::local::{LocalDsqlEndpoint, LocalPostgres};
/// let pg = LocalPostgres::start().await?;
/// pg.create_token_role("admin").await?;
/// let endpoint = LocalDsqlEndpoint::start(&pg).await?;
/// endpoint.limit_connection_rate(Some(dal::ConnectionRate::DSQL));
/// let connector = dal::Connector::new(endpoint.config(&pg, "admin", "postgres")?).await?;
/// # Ok(()) }
/// ```
pub struct LocalDsqlEndpoint {
    addr: SocketAddr,
    host: &'static str,
    region: &'static str,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// The loopback address this endpoint connects to the server from, which tells the
    /// cluster's verifier the endpoint (see `DSQL_ENDPOINT_SOURCES`).
    source: std::net::Ipv4Addr,
    tls: TlsAcceptor,
    rate: Mutex<Option<Arc<DefaultDirectRateLimiter>>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Whether the endpoint is down: not listening, its connections closed.
    down: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for LocalDsqlEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDsqlEndpoint")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl LocalDsqlEndpoint {
    /// Listens on a free loopback port and forwards to `pg`, with no limit yet, as the
    /// endpoint [`LOCAL_DSQL_HOST`](super::LOCAL_DSQL_HOST) in
    /// [`LOCAL_DSQL_REGION`](super::LOCAL_DSQL_REGION).
    ///
    /// # Errors
    ///
    /// [`Error::LocalServer`] when the port cannot be bound or the server's certificate
    /// cannot be read.
    pub async fn start(pg: &LocalPostgres) -> Result<Self> {
        Self::start_as(pg, super::LOCAL_DSQL_HOST, super::LOCAL_DSQL_REGION).await
    }

    /// Like [`start`](Self::start), as the endpoint of the cluster's multi-region peer:
    /// [`LOCAL_DSQL_PEER_HOST`](super::LOCAL_DSQL_PEER_HOST) in
    /// [`LOCAL_DSQL_PEER_REGION`](super::LOCAL_DSQL_PEER_REGION). Both peers serve the same
    /// data, as a peered cluster does; each accepts only tokens signed for it.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn start_peer(pg: &LocalPostgres) -> Result<Self> {
        Self::start_as(
            pg,
            super::LOCAL_DSQL_PEER_HOST,
            super::LOCAL_DSQL_PEER_REGION,
        )
        .await
    }

    async fn start_as(
        pg: &LocalPostgres,
        host: &'static str,
        region: &'static str,
    ) -> Result<Self> {
        let tls = super::certs::server_tls(pg)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::local(format!("cannot bind the DSQL endpoint: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::local(format!("cannot bind the DSQL endpoint: {e}")))?;
        let source = super::token_login::DSQL_ENDPOINT_SOURCES
            .iter()
            .find_map(|(name, from)| (*name == host).then_some(*from))
            .ok_or_else(|| Error::local(format!("no local DSQL endpoint is named {host}")))?;
        // Linux has all of 127.0.0.0/8 on its loopback interface; other systems may not.
        tokio::net::TcpSocket::new_v4()
            .and_then(|socket| socket.bind(SocketAddr::from((source, 0))))
            .map_err(|e| {
                Error::local(format!(
                    "the local DSQL endpoint {host} connects to the server from {source}, which \
                     this machine does not have on its loopback interface ({e}); add it (on \
                     macOS: `sudo ifconfig lo0 alias {source}`)"
                ))
            })?;
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], pg.port())),
            source,
            tls: TlsAcceptor::from(tls),
            rate: Mutex::new(None),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            down: tokio::sync::watch::channel(false).0,
        });
        let task = tokio::spawn(serve(listener, addr, Arc::clone(&shared)));
        Ok(Self {
            addr,
            host,
            region,
            shared,
            task,
        })
    }

    /// Takes the endpoint down, as in a regional outage: it stops listening (connecting is
    /// refused) and closes every connection it forwards; or brings it back on the same port.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// The endpoint's port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Refuses connections beyond `rate` (`None`: no limit) with SQLSTATE `53400`, as DSQL
    /// does beyond [`ConnectionRate::DSQL`]. The bucket starts full.
    pub fn limit_connection_rate(&self, rate: Option<ConnectionRate>) {
        let limiter = rate.map(|rate| {
            Arc::new(DefaultDirectRateLimiter::direct(
                Quota::per_second(rate.per_second).allow_burst(rate.burst),
            ))
        });
        *self.shared.rate.lock().unwrap_or_else(|e| e.into_inner()) = limiter;
    }

    /// Connections forwarded to the server so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused for a limit so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// A configuration for the [token role](LocalPostgres::create_token_role) `user` on
    /// `database` through this endpoint, with DSQL tokens the cluster accepts and its CA.
    ///
    /// # Errors
    ///
    /// As [`LocalPostgres::dsql_source`].
    pub fn config(&self, pg: &LocalPostgres, user: &str, database: &str) -> Result<Config> {
        let source = pg.dsql_source_at(self.host, self.region, user)?;
        Ok(Config::new(self.host, user)
            .port(self.port())
            .database(database)
            .ssl_root_cert(pg.ca_cert_path())
            .credentials(Credentials::source(source)))
    }
}

impl Drop for LocalDsqlEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts while the endpoint is up; while it is down, listens to nothing.
async fn serve(mut listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut down = shared.down.subscribe();
    loop {
        loop {
            tokio::select! {
                biased;
                _ = down.wait_for(|down| *down) => break,
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        admit(client, &shared);
                    }
                }
            }
        }
        drop(listener);
        if down.wait_for(|down| !*down).await.is_err() {
            return;
        }
        listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, %addr, "the DSQL endpoint cannot listen again");
                return;
            }
        };
    }
}

/// Forwards `client` to the server, or refuses it for a limit.
fn admit(client: TcpStream, shared: &Arc<Shared>) {
    let limiter = shared
        .rate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let shared = Arc::clone(shared);
    if limiter.is_some_and(|l| l.check().is_err()) {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let (code, message) = RATE_EXCEEDED;
            if let Err(e) = refuse(client, &shared.tls, code, message).await {
                tracing::debug!(error = %e, "a refused client went away early");
            }
        });
        return;
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let mut down = shared.down.subscribe();
    tokio::spawn(async move {
        let mut server = match connect_from(shared.source, shared.upstream).await {
            Ok(server) => server,
            Err(e) => {
                let from = shared.source;
                tracing::warn!(error = %e, %from, "the DSQL endpoint cannot reach the server");
                return;
            }
        };
        // Each piece goes on as it comes, as both ends send it (libpq, tokio-postgres and
        // PostgreSQL all turn Nagle's algorithm off): held for an ACK, the last short piece of
        // a reply would wait out the client's delayed ACK, 40 ms on Linux.
        for socket in [&client, &server] {
            let _ = socket.set_nodelay(true);
        }
        let mut client = client;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            // An outage ends the connection: both sides are dropped.
            _ = down.wait_for(|down| *down) => {}
        }
    });
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// Answers a client's startup with a `FATAL` error, over TLS when the client asks for it.
async fn refuse(
    mut tcp: TcpStream,
    tls: &TlsAcceptor,
    code: &str,
    message: &str,
) -> std::io::Result<()> {
    let error = error_response(code, message);
    loop {
        let len = tcp.read_u32().await?;
        let request = tcp.read_u32().await?;
        match request {
            SSL_REQUEST => {
                tcp.write_all(b"S").await?;
                let mut tls = tls.accept(tcp).await?;
                skip_message(&mut tls, None).await?;
                tls.write_all(&error).await?;
                return tls.shutdown().await;
            }
            GSSENC_REQUEST => tcp.write_all(b"N").await?,
            _ => {
                // A startup packet in clear: its length and version are read already.
                skip_message(&mut tcp, Some(len.saturating_sub(8))).await?;
                tcp.write_all(&error).await?;
                return tcp.shutdown().await;
            }
        }
    }
}

/// Reads past one startup packet (`rest` bytes of it, or all when `None`).
async fn skip_message<R: AsyncRead + Unpin>(r: &mut R, rest: Option<u32>) -> std::io::Result<()> {
    let rest = match rest {
        Some(rest) => rest,
        None => r.read_u32().await?.saturating_sub(4),
    };
    let mut body = vec![0; rest.min(64 * 1024) as usize];
    r.read_exact(&mut body).await.map(drop)
}

/// An ErrorResponse message: severity `FATAL`, SQLSTATE `code`, `message`.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}
