//! Login-time token checks, as Lakebase and Aurora DSQL do them: every token the local services
//! issue logs in until its own expiry, however many were issued since.
//!
//! PostgreSQL's `ldap` authentication (simple-bind mode) asks the client for its password in
//! clear text, inside TLS, and hands it to an LDAP simple bind as `cn=<role>,dc=dal`. This
//! module answers those binds: it accepts a token signed with the cluster's key (HMAC-SHA256)
//! for that role and not yet expired. The refusal reaches the client as SQLSTATE `28000`.
//!
//! With the `dsql` feature it also checks Aurora DSQL IAM tokens: SigV4-presigned
//! `DbConnect`/`DbConnectAdmin` URLs for [`LOCAL_DSQL_HOST`], signed with the cluster's local
//! AWS keys ([`LocalPostgres::dsql_source`](super::LocalPostgres::dsql_source)). A token is
//! accepted when signing the same request again (same keys, region, date and lifetime, and the
//! action the role is allowed: `DbConnectAdmin` for `admin` only) gives the same token, and
//! `X-Amz-Date` + `X-Amz-Expires` is still ahead.
//!
//! Roles in the group [`TOKEN_GROUP`] log in this way (over TLS only); every other role,
//! the superuser included, keeps `scram-sha-256`. The key and the verifier's port live in
//! the cluster's directory (`token-logins.json`, readable by its owner only), so every process
//! that opens the same cluster verifies the same tokens. On the development cluster each
//! process answers on an address of its own, all on the same port, and `pg_hba.conf` names
//! them all: PostgreSQL tries them in order, so logins go on while any of those processes
//! runs, with no wait when one exits.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use ldap3_proto::{DisconnectionNotice, LdapCodec, LdapResultCode, ServerOps, SimpleBindRequest};
use tokio_util::codec::Framed;

use super::binaries::ServerUser;
use super::error::{Error, Result};
use super::files::write_private;

/// The group role whose members log in with tokens checked at login.
pub const TOKEN_GROUP: &str = "dal_token_login";

const STATE_FILE: &str = "token-logins.json";
const DN_PREFIX: &str = "cn=";
const DN_SUFFIX: &str = ",dc=dal";
const HBA_MARK: &str = "# dal: token logins, checked by the local LDAP verifier";
/// Ends each `pg_hba.conf` line for the other logins through a local DSQL endpoint.
const ENDPOINT_LOGINS_MARK: &str = "# dal: other logins through a local DSQL endpoint";
const TOKEN_PREFIX: &str = "dal1";

/// The endpoint name the local Aurora DSQL tokens are signed for (and clients connect to).
#[cfg(feature = "dsql")]
pub const LOCAL_DSQL_HOST: &str = "localhost";
/// The AWS region of the local Aurora DSQL endpoint.
#[cfg(feature = "dsql")]
pub const LOCAL_DSQL_REGION: &str = "us-east-1";
/// The endpoint name of the local cluster's multi-region peer, as
/// [`LocalDsqlEndpoint::start_peer`](super::LocalDsqlEndpoint::start_peer) serves it.
#[cfg(feature = "dsql")]
pub const LOCAL_DSQL_PEER_HOST: &str = "127.0.0.1";
/// The AWS region of the local multi-region peer.
#[cfg(feature = "dsql")]
pub const LOCAL_DSQL_PEER_REGION: &str = "us-east-2";

/// The loopback address each local DSQL endpoint connects to the server from, by the host
/// it serves: `pg_hba.conf` names the endpoint to the verifier by that address, so that
/// each endpoint accepts only tokens signed for it, as DSQL's do.
#[cfg(feature = "dsql")]
pub(crate) const DSQL_ENDPOINT_SOURCES: [(&str, std::net::Ipv4Addr); 2] = [
    (LOCAL_DSQL_HOST, std::net::Ipv4Addr::new(127, 0, 0, 2)),
    (LOCAL_DSQL_PEER_HOST, std::net::Ipv4Addr::new(127, 0, 0, 3)),
];

/// What follows the role in the bind DN of a login through a DSQL endpoint, before
/// [`DN_SUFFIX`]: the endpoint's host.
#[cfg(feature = "dsql")]
const DN_ENDPOINT: &str = ",ou=";

type HmacSha256 = Hmac<sha2::Sha256>;

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    ldap_port: u16,
    key: String,
}

/// The signing key and the revocations of one cluster: mints and checks tokens.
pub(crate) struct Tokens {
    key: [u8; 32],
    revoked: Mutex<HashSet<String>>,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl Tokens {
    /// A token for `role` that logs in until `expires_at`.
    pub(crate) fn mint(&self, role: &str, expires_at: SystemTime) -> String {
        let exp = millis(expires_at);
        let nonce = B64.encode(uuid::Uuid::new_v4().as_bytes());
        let sig = B64.encode(self.mac(role, exp, &nonce).finalize().into_bytes());
        format!("{TOKEN_PREFIX}.{exp}.{nonce}.{sig}")
    }

    /// Ends logins with `token` before its expiry (a test knob: real services have none).
    pub(crate) fn revoke(&self, token: &str) {
        if let Some(nonce) = token.split('.').nth(2) {
            self.lock().insert(nonce.to_owned());
        }
    }

    /// Why `token` may not log in as `role` at `now`, if it may not.
    fn refusal(&self, role: &str, token: &str, now: SystemTime) -> Option<&'static str> {
        let parts: Vec<&str> = token.split('.').collect();
        let [TOKEN_PREFIX, exp, nonce, sig] = parts[..] else {
            return Some("not a token of this service");
        };
        let (Ok(exp), Ok(sig)) = (exp.parse::<u128>(), B64.decode(sig)) else {
            return Some("malformed token");
        };
        if self.mac(role, exp, nonce).verify_slice(&sig).is_err() {
            return Some("bad signature, or a token for another role");
        }
        if millis(now) >= exp {
            return Some("expired");
        }
        if self.lock().contains(nonce) {
            return Some("revoked");
        }
        None
    }

    fn mac(&self, role: &str, exp: u128, nonce: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{role}\0{exp}\0{nonce}").as_bytes());
        mac
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.revoked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The local AWS access key id and secret key that sign this cluster's DSQL tokens:
    /// derived from the cluster's key, so that every process on the cluster has the same.
    #[cfg(feature = "dsql")]
    pub(crate) fn dsql_keys(&self) -> (String, String) {
        let derive = |label: &str| {
            let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
            mac.update(label.as_bytes());
            mac.finalize().into_bytes()
        };
        let id: String = derive("dsql access key id")[..8]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let secret = B64.encode(derive("dsql secret access key"));
        (format!("AKIA{id}"), secret[..40].to_owned())
    }

    /// Why the DSQL token `token` may not log in as `role` at `now`, if it may not.
    #[cfg(feature = "dsql")]
    async fn dsql_refusal(
        &self,
        role: &str,
        token: &str,
        endpoint: Option<&str>,
        now: SystemTime,
    ) -> Option<&'static str> {
        use crate::credentials::{Clock, CredentialSource, Dsql};
        struct At(SystemTime);
        impl Clock for At {
            fn now(&self) -> SystemTime {
                self.0
            }
        }
        let Some((host, query)) = token.split_once("/?") else {
            return Some("malformed token");
        };
        let region_of_host = match host {
            LOCAL_DSQL_HOST => LOCAL_DSQL_REGION,
            LOCAL_DSQL_PEER_HOST => LOCAL_DSQL_PEER_REGION,
            _ => return Some("signed for another endpoint"),
        };
        if endpoint.is_some_and(|endpoint| endpoint != host) {
            return Some("signed for another endpoint than the one connected to");
        }
        let param = |name: &str| {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| percent_encoding::percent_decode_str(v).decode_utf8_lossy())
            })
        };
        let (Some(date), Some(expires), Some(credential)) = (
            param("X-Amz-Date"),
            param("X-Amz-Expires").and_then(|v| v.parse::<u64>().ok()),
            param("X-Amz-Credential"),
        ) else {
            return Some("malformed token");
        };
        let Ok(signed_at) = chrono::NaiveDateTime::parse_from_str(&date, "%Y%m%dT%H%M%SZ") else {
            return Some("malformed X-Amz-Date");
        };
        let signed_at: SystemTime = signed_at.and_utc().into();
        let Some(expires_at) = signed_at.checked_add(std::time::Duration::from_secs(expires))
        else {
            return Some("malformed X-Amz-Expires");
        };
        if now >= expires_at {
            return Some("expired");
        }
        let scope: Vec<&str> = credential.split('/').collect();
        let (id, secret) = self.dsql_keys();
        let [key_id, _, region, "dsql", "aws4_request"] = scope[..] else {
            return Some("malformed X-Amz-Credential");
        };
        if key_id != id {
            return Some("signed with unknown keys");
        }
        if region != region_of_host {
            return Some("signed for another region than the endpoint's");
        }
        // Signing the same request again with the role's own action must give the same token.
        // Temporary keys (an SSO or assumed role's) add their session token, which the
        // signature covers; the local keys take any.
        let session = param("X-Amz-Security-Token").map(|t| t.into_owned());
        let again = Dsql::new(host, role, Some(region)).and_then(|source| {
            source
                .with_static_credentials(id, secret, session)
                .with_clock(Arc::new(At(signed_at)))
                .with_expires_in(std::time::Duration::from_secs(expires))
        });
        let Ok(again) = again else {
            return Some("malformed token");
        };
        match again.fetch().await {
            Ok(expected) if expected.expose().as_bytes() == token.as_bytes() => None,
            Ok(_) => Some("bad signature, or an action the role may not use"),
            Err(_) => Some("cannot sign the token again"),
        }
    }

    /// Why `token` may not log in as `role` now, whichever kind of token it is, through
    /// `endpoint` (the host of the DSQL endpoint connected through, if any).
    async fn check(&self, role: &str, endpoint: Option<&str>, token: &str) -> Option<&'static str> {
        let now = SystemTime::now();
        #[cfg(feature = "dsql")]
        if token.contains("/?Action=") {
            return self.dsql_refusal(role, token, endpoint, now).await;
        }
        let _ = endpoint;
        self.refusal(role, token, now)
    }

    /// Answers one simple bind.
    async fn bind(&self, request: &SimpleBindRequest) -> ldap3_proto::LdapMsg {
        let role = request
            .dn
            .strip_prefix(DN_PREFIX)
            .and_then(|rest| rest.strip_suffix(DN_SUFFIX));
        #[cfg(feature = "dsql")]
        let role = role.map(|r| match r.rsplit_once(DN_ENDPOINT) {
            Some((role, host)) => (role, Some(host)),
            None => (r, None),
        });
        #[cfg(not(feature = "dsql"))]
        let role = role.map(|r| (r, None));
        let refusal = match role {
            Some((role, endpoint)) => self.check(role, endpoint, &request.pw).await,
            None => Some("unexpected bind DN"),
        };
        match refusal {
            None => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dn = %request.dn, "token login accepted");
                request.gen_success()
            }
            Some(reason) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dn = %request.dn, reason, "token login refused");
                request.gen_invalid_cred()
            }
        }
    }
}

/// The verifier of one cluster in this process: its [`Tokens`] and the LDAP listener that
/// answers PostgreSQL, on a thread of its own (so that it answers whatever the program's
/// runtimes do). Stops when dropped.
pub(crate) struct TokenLogins {
    tokens: Arc<Tokens>,
    port: u16,
    /// Whether other processes verify for the same cluster (see [`SHARED_ADDRESSES`]).
    shared: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for TokenLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLogins")
            .field("ldap_port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TokenLogins {
    /// Opens the verifier of the cluster in `root`, creating its key and choosing its port
    /// on first use. `shared`: other processes may verify for the same cluster at once (the
    /// development cluster); an ephemeral cluster's port is this process's alone.
    pub(crate) fn open(root: &Path, shared: bool) -> Result<Self> {
        let path = root.join(STATE_FILE);
        let state = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<State>(&bytes).ok());
        let (key, port) = match &state {
            Some(s) => (
                decode_key(&s.key).ok_or_else(|| corrupt(&path))?,
                s.ldap_port,
            ),
            None => {
                let mut key = [0u8; 32];
                key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
                (key, 0)
            }
        };
        let tokens = Arc::new(Tokens {
            key,
            revoked: Mutex::new(HashSet::new()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let (port, stop) = listen(port, shared, Arc::clone(&tokens))?;
        if state.is_none() {
            let state = State {
                ldap_port: port,
                key: B64.encode(key),
            };
            let bytes = serde_json::to_vec(&state).map_err(|e| Error::LocalServer {
                what: "cannot encode the token verifier's state".into(),
                source: Some(Box::new(e)),
            })?;
            write_private(&path, &bytes, ServerUser { switch_to: None })?;
        }
        Ok(Self {
            tokens,
            port,
            shared,
            stop: Some(stop),
        })
    }

    /// The key and revocations, for the services that mint tokens.
    pub(crate) fn tokens(&self) -> Arc<Tokens> {
        Arc::clone(&self.tokens)
    }

    /// Logins this process's verifier accepted and refused.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.tokens.accepted.load(Ordering::Relaxed),
            self.tokens.refused.load(Ordering::Relaxed),
        )
    }

    /// Puts the token-login rule first in `data/pg_hba.conf`; returns whether the file
    /// changed (the server must then reload it).
    pub(crate) fn write_hba(&self, data: &Path) -> Result<bool> {
        let path = data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let servers = SHARED_ADDRESSES[..if self.shared {
            SHARED_ADDRESSES.len()
        } else {
            1
        }]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let rule = |from: &str, endpoint: &str| {
            format!(
                "hostssl all +{TOKEN_GROUP} {from}/32 ldap ldapserver=\"{servers}\" ldapport={} \
                 ldapprefix=\"{DN_PREFIX}\" ldapsuffix=\"{endpoint}{DN_SUFFIX}\"",
                self.port
            )
        };
        let mut lines = vec![HBA_MARK.to_owned(), rule("127.0.0.1", "")];
        #[cfg(feature = "dsql")]
        {
            lines.extend(
                DSQL_ENDPOINT_SOURCES
                    .iter()
                    .map(|(host, from)| rule(&from.to_string(), &format!("{DN_ENDPOINT}{host}"))),
            );
            // Other logins through an endpoint, as the server's own lines for 127.0.0.1.
            lines.extend(DSQL_ENDPOINT_SOURCES.iter().map(|(_, from)| {
                format!("host all all {from}/32 scram-sha-256 {ENDPOINT_LOGINS_MARK}")
            }));
        }
        lines.extend(
            old.lines()
                .filter(|l| {
                    *l != HBA_MARK
                        && !l.contains(&format!("+{TOKEN_GROUP} "))
                        && !l.ends_with(ENDPOINT_LOGINS_MARK)
                })
                .map(str::to_owned),
        );
        let new = lines.join("\n") + "\n";
        if new == old {
            return Ok(false);
        }
        // Written in place: the file keeps its owner (the server user) and mode.
        std::fs::write(&path, new).map_err(Error::io(&path))?;
        Ok(true)
    }
}

impl Drop for TokenLogins {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The addresses the verifiers of a shared cluster listen on, one process each, all on the
/// cluster's one port; `pg_hba.conf` names them all, and PostgreSQL's LDAP client tries them
/// in order until one answers. A program that exits takes its address with it, and the
/// others go on answering at theirs: no login waits for another process to take over.
const SHARED_ADDRESSES: [std::net::Ipv4Addr; 8] = [
    std::net::Ipv4Addr::LOCALHOST,
    std::net::Ipv4Addr::new(127, 0, 1, 1),
    std::net::Ipv4Addr::new(127, 0, 1, 2),
    std::net::Ipv4Addr::new(127, 0, 1, 3),
    std::net::Ipv4Addr::new(127, 0, 1, 4),
    std::net::Ipv4Addr::new(127, 0, 1, 5),
    std::net::Ipv4Addr::new(127, 0, 1, 6),
    std::net::Ipv4Addr::new(127, 0, 1, 7),
];

/// Starts the LDAP listener on `port` (0: any free port) on a thread of its own: on
/// 127.0.0.1, or for a `shared` cluster on the first free one of the [`SHARED_ADDRESSES`]
/// (with all of them taken, it waits for one to come free).
fn listen(
    port: u16,
    shared: bool,
    tokens: Arc<Tokens>,
) -> Result<(u16, tokio::sync::oneshot::Sender<()>)> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, bound_rx) = std::sync::mpsc::channel::<std::io::Result<u16>>();
    std::thread::Builder::new()
        .name("dal-token-logins".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let serving = if shared && port != 0 {
                    // Listening, if an address is free, before this program's first login.
                    let now = free_address_now(port);
                    let _ = bound.send(Ok(port));
                    futures_util::future::Either::Left(async move {
                        let listener = match now {
                            Some(listener) => listener,
                            None => free_address(port).await,
                        };
                        serve(listener, tokens).await;
                    })
                } else {
                    let listener = match bind(std::net::Ipv4Addr::LOCALHOST, port) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = bound.send(Err(e));
                            return;
                        }
                    };
                    let _ = bound.send(listener.local_addr().map(|a| a.port()));
                    futures_util::future::Either::Right(serve(listener, tokens))
                };
                tokio::select! {
                    () = serving => {}
                    _ = stopped => {}
                }
            });
        })
        .map_err(|e| Error::LocalServer {
            what: "cannot start the token verifier's thread".into(),
            source: Some(Box::new(e)),
        })?;
    let port = bound_rx
        .recv()
        .map_err(|e| Error::LocalServer {
            what: "the token verifier's thread ended before it listened".into(),
            source: Some(Box::new(e)),
        })?
        .map_err(|e| Error::LocalServer {
            what: format!(
                "cannot listen on 127.0.0.1:{port} for token logins; if another program holds \
                 that port, stop it (or remove the cluster's directory to start afresh)"
            ),
            source: Some(Box::new(e)),
        })?;
    Ok((port, stop))
}

/// A listener on `port` at the first of the [`SHARED_ADDRESSES`] no other process holds,
/// once there is one.
async fn free_address(port: u16) -> tokio::net::TcpListener {
    loop {
        if let Some(listener) = free_address_now(port) {
            return listener;
        }
        tracing::debug!(
            port,
            "every address for token logins is taken; waiting for one"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A listener on `port` at the first of the [`SHARED_ADDRESSES`] no other process holds, if
/// one is free now.
fn free_address_now(port: u16) -> Option<tokio::net::TcpListener> {
    SHARED_ADDRESSES
        .into_iter()
        .find_map(|address| match bind(address, port) {
            Ok(listener) => {
                tracing::debug!(%address, port, "this process answers token logins");
                Some(listener)
            }
            Err(e) => {
                tracing::trace!(%address, port, error = %e, "taken");
                None
            }
        })
}

fn bind(address: std::net::Ipv4Addr, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Not `SO_REUSEPORT`: a second listener on an address must fail, and the addresses
    // decide which process answers. `SO_REUSEADDR` lets a new one bind past connections of
    // an exited process that linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind((address, port).into())?;
    socket.listen(1024)
}

async fn serve(listener: tokio::net::TcpListener, tokens: Arc<Tokens>) {
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                tokio::spawn(session(socket, Arc::clone(&tokens)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "the token verifier could not accept a connection");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// One LDAP session of PostgreSQL: a simple bind, then an unbind.
async fn session(socket: tokio::net::TcpStream, tokens: Arc<Tokens>) {
    use tracing::instrument::WithSubscriber;
    let mut framed = Framed::new(socket, LdapCodec::default());
    // The codec traces each message it reads, a bind's password (the token) included as
    // bytes: nothing it emits may reach the application's subscriber.
    let silent = tracing::subscriber::NoSubscriber::default;
    while let Some(Ok(message)) = framed.next().with_subscriber(silent()).await {
        let reply = match ServerOps::try_from(message) {
            Ok(ServerOps::SimpleBind(request)) => tokens.bind(&request).await,
            Ok(ServerOps::Unbind(_)) => return,
            _ => DisconnectionNotice::gen_response(
                LdapResultCode::UnwillingToPerform,
                "only simple binds are served",
            ),
        };
        if framed.send(reply).await.is_err() {
            return;
        }
    }
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text).ok()?.try_into().ok()
}

fn corrupt(path: &Path) -> Error {
    Error::local(format!(
        "{} is damaged; remove the cluster's directory to start afresh",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tokens() -> Tokens {
        Tokens {
            key: [7; 32],
            revoked: Mutex::new(HashSet::new()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_token_logs_in_as_its_role_until_its_expiry_and_no_longer() {
        let t = tokens();
        let now = SystemTime::now();
        let token = t.mint("app", now + Duration::from_secs(60));
        assert_eq!(t.refusal("app", &token, now), None);
        let later = t.mint("app", now + Duration::from_secs(120));
        assert_eq!(
            t.refusal("app", &token, now),
            None,
            "an earlier token stays valid"
        );
        assert_eq!(t.refusal("app", &later, now), None);
        assert_eq!(
            t.refusal("app", &token, now + Duration::from_secs(60)),
            Some("expired")
        );
        assert!(t.refusal("other", &token, now).is_some());
        t.revoke(&token);
        assert_eq!(t.refusal("app", &token, now), Some("revoked"));
        assert_eq!(t.refusal("app", &later, now), None);
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let t = tokens();
        let now = SystemTime::now();
        let token = t.mint("app", now + Duration::from_secs(60));
        let mut other = tokens();
        other.key = [8; 32];
        assert!(other.refusal("app", &token, now).is_some());
        // A later expiry written into a token breaks its signature.
        let parts: Vec<&str> = token.split('.').collect();
        let stretched = format!("{}.{}9.{}.{}", parts[0], parts[1], parts[2], parts[3]);
        assert!(t.refusal("app", &stretched, now).is_some());
        for junk in ["", "password", "dal1.x.y.z", "dal1.1.2"] {
            assert!(t.refusal("app", junk, now).is_some(), "{junk}");
        }
    }
}
