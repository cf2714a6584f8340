//! A local Lakebase-compatible credential service in front of a [`LocalPostgres`]: the HTTP
//! calls a Databricks workspace answers for Lakebase, served on 127.0.0.1, minting credentials
//! that become a PostgreSQL role's password. See [`LocalLakebase`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, SubsecRound, TimeDelta, Utc};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::LocalPostgres;
use super::error::{Error, Result};
use super::token_login::Tokens;

mod branches;
mod data_api;
mod oauth;

/// The longest lifetime accepted for a token, so that expiry times stay within what
/// PostgreSQL and RFC 3339 can express.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long [`LocalLakebase::shutdown`] waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The one scope Databricks workspaces grant to machine-to-machine tokens.
const SCOPE: &str = "all-apis";

/// The settings of a [`LocalLakebase`].
///
/// [`Default`] generates a random client id (shaped like a service principal's application
/// id) and client secret, and uses the client id as the PostgreSQL role, as Lakebase does for
/// a service principal.
#[derive(Clone)]
pub struct LocalLakebaseConfig {
    /// The OAuth client id (`DATABRICKS_CLIENT_ID`). Defaults to a random UUID.
    pub client_id: String,
    /// The OAuth client secret (`DATABRICKS_CLIENT_SECRET`). Defaults to a random string.
    pub client_secret: String,
    /// A personal access token (`DATABRICKS_TOKEN`) accepted as a bearer token by the
    /// credential APIs, next to the OAuth tokens. Defaults to `None`.
    pub pat: Option<String>,
    /// The PostgreSQL role whose password the credentials become. Created at start when it
    /// does not exist. Defaults to the client id.
    pub role: String,
    /// The Autoscaling endpoint, `projects/{project}/branches/{branch}/endpoints/{endpoint}`.
    /// Defaults to `projects/local/branches/production/endpoints/primary`.
    pub endpoint: String,
    /// The Provisioned instance name. Defaults to `local-instance`.
    pub instance: String,
    /// The database that holds the data of the endpoint's branch, the project's default
    /// branch: what new branches copy. Defaults to `databricks_postgres`.
    pub database: String,
    /// The workspace id served by discovery. Defaults to a random 16-digit number.
    pub workspace_id: String,
    /// How long a database credential stays valid for new logins. Defaults to 60 s.
    pub token_ttl: Duration,
    /// How long a workspace OAuth token is accepted. Defaults to 3600 s.
    pub oauth_ttl: Duration,
    /// The subject (`sub`) the service principal's federation policy allows in ID tokens of
    /// the service's identity provider ([`LocalLakebase::id_token`]). Defaults to
    /// `repo:local/app:ref:refs/heads/main`, shaped like a GitHub Actions subject.
    pub federated_subject: String,
    /// The bearer token of the GitHub Actions-like ID token service
    /// ([`LocalLakebase::github_actions_env`]). Defaults to a random string.
    pub actions_request_token: String,
    /// Whether the user login of `external-browser` (`/oidc/v1/authorize`) is served. The
    /// service takes whoever asks for it as the user, signed in and consenting, so any
    /// program on this machine could then get workspace and database tokens: off by default
    /// (answered with HTTP 403).
    pub user_login: bool,
}

impl Default for LocalLakebaseConfig {
    fn default() -> Self {
        let client_id = uuid::Uuid::new_v4().to_string();
        Self {
            role: client_id.clone(),
            client_id,
            client_secret: format!("dose{}", random_secret()),
            pat: None,
            endpoint: "projects/local/branches/production/endpoints/primary".into(),
            instance: "local-instance".into(),
            database: "databricks_postgres".into(),
            workspace_id: (1_000_000_000_000_000
                + uuid::Uuid::new_v4().as_u128() % 9_000_000_000_000_000)
                .to_string(),
            token_ttl: Duration::from_secs(60),
            oauth_ttl: Duration::from_secs(3600),
            federated_subject: "repo:local/app:ref:refs/heads/main".into(),
            actions_request_token: random_secret(),
            user_login: false,
        }
    }
}

impl fmt::Debug for LocalLakebaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLakebaseConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"** redacted **")
            .field("pat", &self.pat.as_ref().map(|_| "** redacted **"))
            .field("role", &self.role)
            .field("endpoint", &self.endpoint)
            .field("instance", &self.instance)
            .field("database", &self.database)
            .field("workspace_id", &self.workspace_id)
            .field("token_ttl", &self.token_ttl)
            .field("oauth_ttl", &self.oauth_ttl)
            .field("federated_subject", &self.federated_subject)
            .field("actions_request_token", &"** redacted **")
            .field("user_login", &self.user_login)
            .finish()
    }
}

impl LocalLakebaseConfig {
    /// The same as [`Default::default`]: random client credentials, role = client id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the OAuth client id and secret. The role is left as it is.
    #[must_use]
    pub fn with_client(mut self, id: impl Into<String>, secret: impl Into<String>) -> Self {
        self.client_id = id.into();
        self.client_secret = secret.into();
        self
    }

    /// Serves the user login of `external-browser` (see
    /// [`user_login`](Self::user_login)), to anyone on this machine who asks.
    #[must_use]
    pub fn with_user_login(mut self) -> Self {
        self.user_login = true;
        self
    }

    /// Accepts `pat` as a bearer token on the credential APIs. Defaults to none.
    #[must_use]
    pub fn with_pat(mut self, pat: impl Into<String>) -> Self {
        self.pat = Some(pat.into());
        self
    }

    /// Sets the PostgreSQL role. Defaults to the client id.
    #[must_use]
    pub fn with_role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }

    /// Sets the Autoscaling endpoint path.
    /// Defaults to `projects/local/branches/production/endpoints/primary`.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    /// Sets the Provisioned instance name. Defaults to `local-instance`.
    #[must_use]
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// Sets the database of the default branch, which new branches copy. Defaults to
    /// `databricks_postgres`.
    #[must_use]
    pub fn with_database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }

    /// Sets the workspace id. Defaults to a random 16-digit number.
    #[must_use]
    pub fn with_workspace_id(mut self, workspace_id: impl Into<String>) -> Self {
        self.workspace_id = workspace_id.into();
        self
    }

    /// Sets the lifetime of database credentials. Defaults to 60 s.
    #[must_use]
    pub fn with_token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    /// Sets the lifetime of workspace OAuth tokens. Defaults to 3600 s.
    #[must_use]
    pub fn with_oauth_ttl(mut self, ttl: Duration) -> Self {
        self.oauth_ttl = ttl;
        self
    }

    fn validate(&self) -> Result<()> {
        let field = |name: &str| format!("LocalLakebaseConfig::{name}");
        if self.client_id.is_empty() || self.client_id.contains(':') {
            return Err(Error::config(
                field("client_id"),
                "must be non-empty and free of ':' (HTTP Basic separates id and secret with it)",
            ));
        }
        if self.client_secret.is_empty() {
            return Err(Error::config(field("client_secret"), "must be non-empty"));
        }
        if self.pat.as_deref() == Some("") {
            return Err(Error::config(field("pat"), "must be non-empty when set"));
        }
        if self.role.is_empty() {
            return Err(Error::config(field("role"), "must be non-empty"));
        }
        if !is_endpoint_path(&self.endpoint) {
            return Err(Error::config(
                field("endpoint"),
                "must look like projects/{project}/branches/{branch}/endpoints/{endpoint}",
            ));
        }
        if self.instance.is_empty() {
            return Err(Error::config(field("instance"), "must be non-empty"));
        }
        if self.database.is_empty() || self.database.len() > 63 {
            return Err(Error::config(
                field("database"),
                "must be a PostgreSQL database name: 1 to 63 bytes",
            ));
        }
        if self.workspace_id.is_empty() {
            return Err(Error::config(field("workspace_id"), "must be non-empty"));
        }
        for (name, ttl) in [("token_ttl", self.token_ttl), ("oauth_ttl", self.oauth_ttl)] {
            if ttl > MAX_TTL {
                return Err(Error::config(field(name), "must be at most ten years"));
            }
        }
        Ok(())
    }
}

fn is_endpoint_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(
        parts.as_slice(),
        ["projects", p, "branches", b, "endpoints", e] if !p.is_empty() && !b.is_empty() && !e.is_empty()
    )
}

/// A running local Lakebase-compatible credential service.
///
/// It answers the calls a Databricks workspace answers for Lakebase (discovery, the
/// machine-to-machine OAuth token, and both database credential APIs) on a free port of
/// 127.0.0.1, so that tests, examples and local development need no workspace:
///
/// - `GET /.well-known/databricks-config` and `GET /oidc/.well-known/oauth-authorization-server`;
/// - `POST /oidc/v1/token`, client id and secret in HTTP Basic, `grant_type=client_credentials`;
/// - `POST /api/2.0/postgres/credentials` (Autoscaling, `{"endpoint": ...}` -> `token`,
///   `expire_time`) and `POST /api/2.0/database/credentials` (Provisioned,
///   `{"instance_names": [...]}` -> `token`, `expiration_time`), with a bearer token issued by
///   the token call or the configured personal access token;
/// - `GET /api/2.0/postgres/{endpoint}` (`status.hosts.host`) and
///   `GET /api/2.0/database/instances/{name}` (`read_write_dns`): the database host,
///   `localhost`;
/// - `GET /api/2.0/preview/scim/v2/Me`: the current user, whose `userName` is the role;
/// - the Management API of projects, branches and endpoints (`/api/2.0/postgres/projects/...`:
///   list, get, create and delete, with long-running operations): a branch is a copy of its
///   source branch's database, served by an endpoint of its own on `127.0.0.<n>` with the
///   cluster's port (see [`LocalLakebaseConfig::database`]);
/// - a user's login (`GET /oidc/v1/authorize`, PKCE S256, for the public `databricks-cli`
///   client: the user is taken as signed in and consenting), the `authorization_code` and
///   `refresh_token` grants (refresh tokens rotate), and workload identity federation (the
///   token exchange grant) of ID tokens from its own identity provider
///   ([`id_token`](Self::id_token), [`github_actions_env`](Self::github_actions_env)).
///
/// Every database credential it mints logs in as the configured role until the credential
/// expires, however many were minted since, as on Lakebase: PostgreSQL checks it at login
/// (see [`TOKEN_GROUP`](super::TOKEN_GROUP)) and refuses it once expired (SQLSTATE `28000`),
/// while sessions already open go on. Credentials are signed with the cluster's key, so
/// services of several processes on one cluster issue credentials each other's logins take.
/// [`revoke`](Self::revoke) ends one credential early, which the real service never does. The optional
/// request fields (`expire_time`, `claims`, `group_name`, `request_id`) are accepted and
/// ignored; an Autoscaling `ttl` (300-3600 s) sets the credential's life, otherwise it is
/// [`token_ttl`](Self::token_ttl), so that tests control it.
///
/// Knobs such as [`fail_next`](Self::fail_next), [`set_latency`](Self::set_latency) and
/// [`set_down`](Self::set_down) make it misbehave on demand while it runs. It stops on
/// [`shutdown`](Self::shutdown) or when dropped.
///
/// ```no_run
/// # async fn demo() -> dal::local::Result<()> {
/// use dal::local::{LocalLakebase, LocalLakebaseConfig, LocalPostgres};
/// let pg = LocalPostgres::start().await?;
/// let lakebase = LocalLakebase::start(&pg, LocalLakebaseConfig::default()).await?;
/// let host = lakebase.url(); // DATABRICKS_HOST
/// let client_id = &lakebase.config().client_id; // DATABRICKS_CLIENT_ID, also the role
/// # let _ = (host, client_id);
/// # Ok(()) }
/// ```
pub struct LocalLakebase {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// What the request handlers share with the handle.
struct Shared {
    config: LocalLakebaseConfig,
    base: String,
    account_id: String,
    /// Signs the credentials the cluster checks at login.
    tokens: Arc<Tokens>,
    /// Issued workspace tokens and when they stop being accepted.
    workspace_tokens: Mutex<HashMap<String, Instant>>,
    token_ttl_nanos: AtomicU64,
    latency_nanos: AtomicU64,
    fail_remaining: AtomicUsize,
    fail_status: AtomicU16,
    fail_after_remaining: AtomicUsize,
    fail_after_status: AtomicU16,
    down: AtomicBool,
    requests: AtomicUsize,
    oauth_requests: AtomicUsize,
    credential_requests: AtomicUsize,
    stopping: watch::Receiver<bool>,
    oauth: oauth::OAuthState,
    /// Projects, branches and endpoints.
    model: Mutex<branches::Model>,
    cluster: branches::Cluster,
}

impl fmt::Debug for LocalLakebase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLakebase")
            .field("url", &self.shared.base)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl LocalLakebase {
    /// Starts the service on a free port of 127.0.0.1, in front of `pg`.
    ///
    /// Creates the configured role (a login role without a password, in
    /// [`TOKEN_GROUP`](super::TOKEN_GROUP)) when it does not exist, and adds an existing one to
    /// the group. The service does not borrow `pg`.
    ///
    /// Must be called within a Tokio runtime; the service runs on it.
    pub async fn start(pg: &LocalPostgres, config: LocalLakebaseConfig) -> Result<Self> {
        config.validate()?;
        pg.create_token_role(&config.role).await?;
        let tokens = pg.tokens();

        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Error::LocalServer {
                what: "cannot listen on 127.0.0.1 for the local Lakebase".into(),
                source: Some(Box::new(e)),
            })?;
        let addr = listener.local_addr().map_err(|e| Error::LocalServer {
            what: "cannot read the local Lakebase's address".into(),
            source: Some(Box::new(e)),
        })?;
        let (stop, stopping) = watch::channel(false);
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            account_id: uuid::Uuid::new_v4().to_string(),
            tokens,
            workspace_tokens: Mutex::new(HashMap::new()),
            token_ttl_nanos: AtomicU64::new(nanos(config.token_ttl)),
            latency_nanos: AtomicU64::new(0),
            fail_remaining: AtomicUsize::new(0),
            fail_status: AtomicU16::new(503),
            fail_after_remaining: AtomicUsize::new(0),
            fail_after_status: AtomicU16::new(504),
            down: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            oauth_requests: AtomicUsize::new(0),
            credential_requests: AtomicUsize::new(0),
            stopping: stopping.clone(),
            oauth: oauth::OAuthState::new(),
            model: Mutex::new(branches::Model::new(&config.endpoint, &config.database)),
            cluster: {
                let client_config = super::certs::client_tls(&pg.ca_cert_path())?;
                branches::Cluster {
                    admin: pg.admin_access(),
                    port: pg.port(),
                    server_tls: tokio_rustls::TlsAcceptor::from(super::certs::server_tls(pg)?),
                    client_tls: tokio_rustls::TlsConnector::from(Arc::clone(&client_config)),
                    client_config,
                }
            },
            config,
        });
        let router = Router::new()
            .route("/.well-known/databricks-config", get(databricks_config))
            .route(
                "/oidc/.well-known/oauth-authorization-server",
                get(authorization_server),
            )
            .route("/oidc/v1/token", post(token))
            .route("/oidc/v1/authorize", get(oauth::authorize))
            .route("/idp/github", get(oauth::github_id_token))
            .route(
                "/api/2.0/postgres/credentials",
                post(autoscaling_credential),
            )
            .route(
                "/api/2.0/database/credentials",
                post(provisioned_credential),
            )
            .route(
                "/api/2.0/postgres/{*name}",
                get(branches::get)
                    .post(branches::post)
                    .delete(branches::delete),
            )
            .route("/api/2.0/preview/scim/v2/Me", get(current_user))
            .route(
                "/data-api/{database}/{table}",
                axum::routing::any(data_api::handle),
            )
            .route("/api/2.0/database/instances/{name}", get(instance))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                misbehave,
            ))
            // Each request as a span at DEBUG, as a real service's access log would show it.
            .layer(tower_http::trace::TraceLayer::new_for_http())
            .with_state(Arc::clone(&shared));
        let mut signal = stopping;
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = signal.wait_for(|stop| *stop).await;
        });
        let task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "the local Lakebase stopped serving");
            }
        });
        tracing::debug!(url = %shared.base, "local Lakebase started");
        Ok(Self {
            shared,
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The base URL, `http://127.0.0.1:<port>`: the `DATABRICKS_HOST` of clients.
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// A [`Config`](crate::Config) that logs in to `database` of `pg` as the service's role,
    /// with database credentials from this service (OAuth client credentials, Autoscaling
    /// endpoint), over TLS verified against `pg`'s CA: what a Lakebase user configures, on
    /// this machine.
    pub fn client_config(&self, pg: &LocalPostgres, database: &str) -> Result<crate::Config> {
        let config = &self.shared.config;
        let source = self.source()?;
        Ok(crate::Config::new(pg.host(), &config.role)
            .port(pg.port())
            .database(database)
            .ssl_root_cert(pg.ca_cert_path())
            .credentials(crate::Credentials::source(source)))
    }

    /// A Lakebase credential source for the configured endpoint, signing in as the
    /// configured service principal: what [`client_config`](Self::client_config) uses, and
    /// what a [`Management`](crate::lakebase::Management) client takes.
    pub fn source(&self) -> Result<crate::credentials::Lakebase> {
        use crate::credentials::{Lakebase, LakebaseTarget, WorkspaceAuth};
        let config = &self.shared.config;
        Ok(Lakebase::new(
            &self.url(),
            WorkspaceAuth::ClientCredentials {
                client_id: config.client_id.clone(),
                client_secret: secrecy::SecretString::from(config.client_secret.clone()),
                token_url: None,
            },
            LakebaseTarget::Autoscaling {
                endpoint: config.endpoint.clone(),
            },
        )?)
    }

    /// The address the service listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The Data API of `database`, `<url>/data-api/<database>`: a PostgREST-compatible subset
    /// over its `public` tables, authenticated with a database credential of the role as
    /// bearer token (see [`DataApi`](crate::lakebase::DataApi)).
    pub fn data_api_url(&self, database: &str) -> String {
        format!("{}/data-api/{database}", self.shared.base)
    }

    /// The OAuth token endpoint, `<url>/oidc/v1/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oidc/v1/token", self.shared.base)
    }

    /// The settings the service was started with. The credential lifetime may have changed
    /// since: see [`token_ttl`](Self::token_ttl).
    pub fn config(&self) -> &LocalLakebaseConfig {
        &self.shared.config
    }

    /// The account id served by discovery, generated at start.
    pub fn account_id(&self) -> &str {
        &self.shared.account_id
    }

    /// The lifetime of the database credentials minted from now on.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_nanos(self.shared.token_ttl_nanos.load(Ordering::Relaxed))
    }

    /// Changes the lifetime of the database credentials minted from now on (capped at ten
    /// years). Credentials already minted keep their expiry.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.shared
            .token_ttl_nanos
            .store(nanos(ttl.min(MAX_TTL)), Ordering::Relaxed);
    }

    /// Delays every response, failures included, by `d`. Defaults to zero.
    pub fn set_latency(&self, d: Duration) {
        self.shared.latency_nanos.store(nanos(d), Ordering::Relaxed);
    }

    /// Makes the next `n` requests, on any path, fail with HTTP `status` and an error body
    /// shaped as the vendor's for that path (`error`/`error_description` under `/oidc`,
    /// `error_code`/`message` elsewhere). 429 and 503 answers carry `Retry-After: 1`.
    /// Requests answered while the service is [down](Self::set_down) do not count.
    /// `fail_next(0, _)` cancels failures still pending.
    ///
    /// # Panics
    ///
    /// When `status` is not an error status (400 to 599).
    pub fn fail_next(&self, n: usize, status: u16) {
        assert!(
            (400..=599).contains(&status),
            "fail_next needs an HTTP error status (400-599), not {status}"
        );
        self.shared.fail_status.store(status, Ordering::SeqCst);
        self.shared.fail_remaining.store(n, Ordering::SeqCst);
    }

    /// Carries out the next `n` requests, on any path, then answers each with HTTP `status`
    /// and a vendor-shaped error body instead of its result, as a gateway that gave up
    /// waiting does (`504`): the caller cannot tell whether its request took effect.
    /// `fail_after_next(0, _)` cancels those still pending.
    ///
    /// # Panics
    ///
    /// When `status` is not an error status (400 to 599).
    pub fn fail_after_next(&self, n: usize, status: u16) {
        assert!(
            (400..=599).contains(&status),
            "fail_after_next needs an HTTP error status (400-599), not {status}"
        );
        self.shared
            .fail_after_status
            .store(status, Ordering::SeqCst);
        self.shared.fail_after_remaining.store(n, Ordering::SeqCst);
    }

    /// While `true`, every request is answered 503 with a vendor-shaped error body.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Ends logins with `token`, a credential this service minted, before its expiry (the
    /// real service never does; for tests of refused tokens). Sessions already open go on.
    /// A refresh token given here is revoked, as a user or admin can revoke one.
    pub fn revoke(&self, token: &str) {
        if !self.shared.oauth.revoke(token) {
            self.shared.tokens.revoke(token);
        }
    }

    /// How many requests arrived, on any path, answered or failed.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The workspace OAuth access tokens issued that have not expired: secrets a test can
    /// look for where none may appear (logs, errors).
    pub fn workspace_tokens(&self) -> Vec<String> {
        let now = Instant::now();
        self.shared
            .workspace_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, expiry)| **expiry > now)
            .map(|(token, _)| token.clone())
            .collect()
    }

    /// How many of the failures [`fail_next`](Self::fail_next) asked for are still to come.
    pub fn failures_pending(&self) -> usize {
        self.shared.fail_remaining.load(Ordering::SeqCst)
    }

    /// How many workspace OAuth tokens were issued.
    pub fn oauth_requests(&self) -> usize {
        self.shared.oauth_requests.load(Ordering::SeqCst)
    }

    /// How many database credentials were minted (both APIs).
    pub fn credential_requests(&self) -> usize {
        self.shared.credential_requests.load(Ordering::SeqCst)
    }

    /// Stops accepting connections, lets requests in flight finish (pending latency is cut
    /// short), and returns once the port is free.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for LocalLakebase {
    fn drop(&mut self) {
        // The server task winds down by itself once told: in-flight requests finish and the
        // listener closes, without blocking the dropping thread.
        let _ = self.stop.send(true);
    }
}

/// Latency, outages and injected failures, in front of every route; and the request log.
async fn misbehave(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    // The path only: a query string could carry anything.
    let path = request.uri().path().to_owned();
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let latency = Duration::from_nanos(shared.latency_nanos.load(Ordering::Relaxed));
    if !latency.is_zero() {
        let mut stopping = shared.stopping.clone();
        tokio::select! {
            () = tokio::time::sleep(latency) => {}
            _ = stopping.wait_for(|stop| *stop) => {}
        }
    }
    let response = if shared.down.load(Ordering::SeqCst) {
        vendor_error(&path, StatusCode::SERVICE_UNAVAILABLE)
    } else if shared
        .fail_remaining
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let status = StatusCode::from_u16(shared.fail_status.load(Ordering::SeqCst))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        vendor_error(&path, status)
    } else {
        let response = next.run(request).await;
        match shared
            .fail_after_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => {
                let status = StatusCode::from_u16(shared.fail_after_status.load(Ordering::SeqCst))
                    .unwrap_or(StatusCode::GATEWAY_TIMEOUT);
                vendor_error(&path, status)
            }
            Err(_) => response,
        }
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "local Lakebase");
    response
}

/// An error of the kind the real service answers at `path` with `status`.
fn vendor_error(path: &str, status: StatusCode) -> Response {
    let mut response = if path.starts_with("/oidc") {
        let error = match status.as_u16() {
            401 => "invalid_client",
            403 => "access_denied",
            503 | 429 => "temporarily_unavailable",
            500..=599 => "server_error",
            _ => "invalid_request",
        };
        oauth_error(status, error, "the service cannot answer right now")
    } else {
        let code = match status.as_u16() {
            400 => "INVALID_PARAMETER_VALUE",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            409 => "RESOURCE_CONFLICT",
            429 => "REQUEST_LIMIT_EXCEEDED",
            501 => "NOT_IMPLEMENTED",
            503 => "TEMPORARILY_UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            500..=599 => "INTERNAL_ERROR",
            _ => "BAD_REQUEST",
        };
        api_error(status, code, "the service cannot answer right now")
    };
    if matches!(status.as_u16(), 429 | 503) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    (status, Json(body)).into_response()
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "error_code": code, "message": message });
    (status, Json(body)).into_response()
}

async fn databricks_config(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "oidc_endpoint": format!("{}/oidc", shared.base),
        "workspace_id": shared.config.workspace_id,
        "account_id": shared.account_id,
        "cloud": "local",
    }))
    .into_response()
}

async fn authorization_server(State(shared): State<Arc<Shared>>) -> Response {
    // Only what this service implements.
    Json(json!({
        "issuer": format!("{}/oidc", shared.base),
        "authorization_endpoint": format!("{}/oidc/v1/authorize", shared.base),
        "token_endpoint": format!("{}/oidc/v1/token", shared.base),
        "grant_types_supported": [
            "client_credentials",
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        "scopes_supported": [SCOPE, "offline_access"],
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    code: Option<String>,
    code_verifier: Option<String>,
    redirect_uri: Option<String>,
    refresh_token: Option<String>,
    subject_token: Option<String>,
    subject_token_type: Option<String>,
}

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let config = &shared.config;
    let Ok(Form(form)) = form else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded",
        );
    };
    let grant = match oauth::grant(&shared, &headers, &form) {
        Ok(grant) => grant,
        Err(denied) => return denied.response(),
    };
    if let Some(scope) = &form.scope
        && scope
            .split_whitespace()
            .any(|s| s != SCOPE && s != "offline_access")
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "Only the all-apis and offline_access scopes are supported",
        );
    }

    let access_token = random_secret();
    let now = Instant::now();
    {
        let mut tokens = shared
            .workspace_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, expiry| *expiry > now);
        tokens.insert(access_token.clone(), now + config.oauth_ttl);
    }
    shared.oauth_requests.fetch_add(1, Ordering::SeqCst);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": config.oauth_ttl.as_secs(),
        "scope": SCOPE,
    });
    if let Some(client_id) = grant.refresh_for {
        body["refresh_token"] = shared.oauth.refresh_token(&client_id).into();
        body["scope"] = format!("{SCOPE} offline_access").into();
    }
    Json(body).into_response()
}

/// The id and secret of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Compares two secrets in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Shared {
    /// Whether the request carries a bearer token this service issued and still accepts,
    /// or the configured personal access token.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, token)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let token = token.trim();
        if let Some(pat) = &self.config.pat
            && same(token.as_bytes(), pat.as_bytes())
        {
            return true;
        }
        let tokens = self
            .workspace_tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tokens
            .get(token)
            .is_some_and(|expiry| *expiry > Instant::now())
    }

    /// Mints a database credential; returns it with its expiry.
    /// A credential living `asked`, or [`token_ttl`](LocalLakebase::token_ttl).
    async fn mint(&self, asked: Option<Duration>) -> Result<(String, DateTime<Utc>), Response> {
        let ttl = asked
            .unwrap_or_else(|| Duration::from_nanos(self.token_ttl_nanos.load(Ordering::Relaxed)));
        // Whole milliseconds, so that the expiry in the answer is exactly the one checked.
        let until = TimeDelta::from_std(ttl.min(MAX_TTL))
            .ok()
            .and_then(|ttl| Utc::now().checked_add_signed(ttl))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
            .trunc_subsecs(3);
        let token = self.tokens.mint(&self.config.role, until.into());
        self.credential_requests.fetch_add(1, Ordering::SeqCst);
        Ok((token, until))
    }
}

fn unauthenticated() -> Response {
    api_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Credential was not sent or was of an unsupported type for this API.",
    )
}

fn invalid_body(rejection: &JsonRejection) -> Response {
    let message = match rejection {
        JsonRejection::MissingJsonContentType(_) => "Content-Type must be application/json",
        _ => "The request body is not valid JSON for this API",
    };
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The database host the endpoint and instance APIs answer: the cluster's, on loopback.
const DATABASE_HOST: &str = "localhost";

/// `GET /api/2.0/preview/scim/v2/Me`: the user the bearer token belongs to, whose user name
/// is the role the credentials log in as.
async fn current_user(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    Json(json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": shared.config.role,
        "active": true,
    }))
    .into_response()
}

/// `GET /api/2.0/database/instances/{name}`: the Provisioned instance, with its host.
async fn instance(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    if name != shared.config.instance {
        return api_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Database instance '{name}' does not exist."),
        );
    }
    Json(json!({ "name": name, "state": "AVAILABLE", "read_write_dns": DATABASE_HOST }))
        .into_response()
}

/// The Autoscaling request. `expire_time`, `claims` and `group_name` are accepted and ignored;
/// `ttl` sets the credential's life, else it is the service's own, so that tests control it.
#[derive(serde::Deserialize)]
struct AutoscalingRequest {
    endpoint: Option<String>,
    /// The credential life asked for, a protobuf duration such as `"1800s"`.
    ttl: Option<String>,
}

async fn autoscaling_credential(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<AutoscalingRequest>, JsonRejection>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return invalid_body(&rejection),
    };
    let Some(endpoint) = request.endpoint.filter(|e| !e.is_empty()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "Missing required field: endpoint",
        );
    };
    let known = shared
        .model
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .has_endpoint(&endpoint);
    if !known {
        return if is_endpoint_path(&endpoint) {
            api_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("Endpoint '{endpoint}' does not exist."),
            )
        } else {
            api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER_VALUE",
                "Endpoint names look like projects/{project}/branches/{branch}/endpoints/{endpoint}",
            )
        };
    }
    // As the API documents it: whole seconds from 300 to 3600.
    let ttl = match request.ttl.as_deref().map(parse_ttl) {
        None => None,
        Some(Some(ttl)) => Some(ttl),
        Some(None) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER_VALUE",
                "ttl must be a duration from 300s to 3600s",
            );
        }
    };
    match shared.mint(ttl).await {
        Ok((token, until)) => {
            Json(json!({ "token": token, "expire_time": rfc3339(until) })).into_response()
        }
        Err(response) => response,
    }
}

/// A `ttl` the credential API takes: `"<300..=3600>s"`.
fn parse_ttl(ttl: &str) -> Option<Duration> {
    let secs: u64 = ttl.strip_suffix('s')?.parse().ok()?;
    (300..=3600)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// The Provisioned request; `request_id` is accepted and not checked.
#[derive(serde::Deserialize)]
struct ProvisionedRequest {
    #[serde(default)]
    instance_names: Vec<String>,
}

async fn provisioned_credential(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<ProvisionedRequest>, JsonRejection>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return invalid_body(&rejection),
    };
    if request.instance_names.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "instance_names must name at least one instance",
        );
    }
    if let Some(unknown) = request
        .instance_names
        .iter()
        .find(|name| **name != shared.config.instance)
    {
        return api_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Database instance '{unknown}' does not exist."),
        );
    }
    match shared.mint(None).await {
        Ok((token, until)) => {
            Json(json!({ "token": token, "expiration_time": rfc3339(until) })).into_response()
        }
        Err(response) => response,
    }
}

async fn not_found(method: Method, request: Request) -> Response {
    let message = format!("No API found for '{} {}'", method, request.uri().path());
    api_error(StatusCode::NOT_FOUND, "ENDPOINT_NOT_FOUND", &message)
}

async fn method_not_allowed(method: Method, request: Request) -> Response {
    let message = format!(
        "Method {} is not allowed for {}",
        method,
        request.uri().path()
    );
    api_error(StatusCode::METHOD_NOT_ALLOWED, "BAD_REQUEST", &message)
}

/// 256 random bits (less the UUID version bits), hex-encoded.
fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> LocalLakebaseConfig {
        LocalLakebaseConfig::new()
            .with_client("app-id", "s3cret")
            .with_role("app")
            .with_workspace_id("42")
            .with_pat("dapi-secret")
    }

    #[test]
    fn debug_never_shows_a_secret() {
        assert_eq!(
            format!("{:?}", fixed()),
            "LocalLakebaseConfig { client_id: \"app-id\", client_secret: \"** redacted **\", \
             pat: Some(\"** redacted **\"), role: \"app\", \
             endpoint: \"projects/local/branches/production/endpoints/primary\", \
             instance: \"local-instance\", database: \"databricks_postgres\", workspace_id: \"42\", token_ttl: 60s, oauth_ttl: 3600s, \
             federated_subject: \"repo:local/app:ref:refs/heads/main\", \
             actions_request_token: \"** redacted **\", user_login: false }"
        );
    }

    #[test]
    fn defaults_are_random_and_valid() {
        let (a, b) = (
            LocalLakebaseConfig::default(),
            LocalLakebaseConfig::default(),
        );
        assert_ne!(a.client_id, b.client_id);
        assert_ne!(a.client_secret, b.client_secret);
        assert_eq!(a.role, a.client_id);
        assert_eq!(a.workspace_id.len(), 16);
        assert!(a.pat.is_none());
        a.validate().unwrap();
    }

    #[test]
    fn invalid_settings_are_named() {
        let err = fixed()
            .with_endpoint("projects/p/endpoints/e")
            .validate()
            .unwrap_err();
        assert!(
            err.to_string().contains("LocalLakebaseConfig::endpoint"),
            "{err}"
        );
        let err = fixed().with_client("a:b", "s").validate().unwrap_err();
        assert!(
            err.to_string().contains("LocalLakebaseConfig::client_id"),
            "{err}"
        );
        let err = fixed()
            .with_token_ttl(MAX_TTL + Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("token_ttl"), "{err}");
    }

    #[test]
    fn endpoint_paths() {
        assert!(is_endpoint_path("projects/p/branches/b/endpoints/e"));
        assert!(!is_endpoint_path("projects/p/branches/b/endpoints/"));
        assert!(!is_endpoint_path("projects/p/branches/b/endpoints/e/x"));
        assert!(!is_endpoint_path("instances/i"));
    }

    #[test]
    fn basic_header_parsing() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic aWQ6c2U6Y3JldA=="), // id:se:cret
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("id".to_owned(), "se:cret".to_owned()))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&headers), None);
    }

    #[test]
    fn secrets_compare_in_full() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
