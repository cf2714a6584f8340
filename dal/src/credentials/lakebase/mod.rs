//! The Databricks Lakebase credential source.
//!
//! A Lakebase password is a database credential of at most one hour, minted by the workspace's
//! REST API. Calling that API takes a workspace token: an OAuth machine-to-machine token of a
//! service principal (cached here, shared by concurrent callers) or a personal access token.
//! Each [`fetch`](CredentialSource::fetch) mints a new database credential; deciding when one
//! is needed is the job of the cache in front of this source.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::credentials::source::{BoxFuture, Clock, CredentialSource, SystemClock, Token};
use crate::error::{Error, Result, Setting};

mod browser;
mod federation;

pub use federation::IdTokenSource;
pub(crate) use federation::{NOT_A_VARIABLE_NAME, is_variable_name};

const KIND: &str = "lakebase";
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The workspace token is renewed when less than this, or a tenth of its lifetime if that is
/// shorter, remains: enough to cover one credential call at the default timeout.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Every answer of these APIs is a few hundred bytes; a larger one is not theirs.
const MAX_BODY: usize = 1 << 20;
/// The longest a database credential lasts: an hour (Lakebase's documentation of the
/// credential APIs). An answer with a later expiry (a clock far behind the service's, an
/// expiry the service did not mean) is held to an hour from the request.
const MAX_CREDENTIAL_LIFE: Duration = Duration::from_secs(3600);
/// How far apart an answer's `Date` and this machine's clock may be and still be read as the
/// same clock: `Date` is rounded down to the second, and the answer took its time to arrive.
const CLOCKS_AGREE: Duration = Duration::from_secs(5);
const MAX_ERROR_MESSAGE: usize = 300;
const REDACTED: &str = "** redacted **";
const PAT_HEADER_REASON: &str = "holds characters not allowed in an HTTP header";

const DATABRICKS_CONFIG_PATH: &str = "/.well-known/databricks-config";
const OAUTH_METADATA_SUFFIX: &str = "/.well-known/oauth-authorization-server";
const HOST_OIDC_METADATA_PATH: &str = "/oidc/.well-known/oauth-authorization-server";
const DEFAULT_TOKEN_PATH: &str = "/oidc/v1/token";
const AUTOSCALING_PATH: &str = "/api/2.0/postgres/credentials";
const PROVISIONED_PATH: &str = "/api/2.0/database/credentials";
pub(crate) const WORKSPACE_ID_HEADER: &str = "x-databricks-workspace-id";
const TOKEN_REQUEST_BODY: &str = "grant_type=client_credentials&scope=all-apis";

/// How this source authenticates to the Databricks workspace before asking for a database
/// credential.
#[derive(Clone)]
#[non_exhaustive]
pub enum WorkspaceAuth {
    /// OAuth machine-to-machine (service principal).
    ClientCredentials {
        /// The service principal's application id (`DATABRICKS_CLIENT_ID`).
        client_id: String,
        /// Its OAuth secret (`DATABRICKS_CLIENT_SECRET`).
        client_secret: SecretString,
        /// The token endpoint; `None` discovers it from the workspace, as the Databricks SDKs do.
        token_url: Option<String>,
    },
    /// A personal access token: only a way to call the credential API.
    ///
    /// Lakebase refuses a personal access token as the Postgres password; this source trades it
    /// for a database credential like any other workspace token.
    Pat(SecretString),
    /// The Databricks CLI's login (`databricks auth login`): each workspace token comes from
    /// `databricks auth token`, as the Databricks SDKs' `databricks-cli` auth type gets it.
    DatabricksCli {
        /// The CLI profile (`--profile`); `None` names the workspace by host (`--host`).
        profile: Option<String>,
    },
    /// Workload identity federation (`env-oidc`, `file-oidc`, `github-oidc`): an OIDC ID
    /// token of another identity provider, traded for a workspace token at the workspace's
    /// token endpoint with the RFC 8693 token exchange grant, as the Databricks SDKs do.
    Federated {
        /// The service principal whose federation policy trusts the ID token
        /// (`DATABRICKS_CLIENT_ID`); `None` for account-wide token federation.
        client_id: Option<String>,
        /// Where each ID token comes from.
        id_token: IdTokenSource,
    },
    /// A user's interactive login (U2M, `external-browser`): OAuth authorization code with
    /// PKCE S256 in a browser, redirected to `http://localhost:8020`; the refresh token is kept
    /// in a token cache file of mode 0600 (see [`Lakebase::with_token_cache_dir`]) so that
    /// later runs log in without a browser until it is refused.
    ExternalBrowser {
        /// The OAuth client; `None` is Databricks' public `databricks-cli` client.
        client_id: Option<String>,
        /// Whether to open the login address in a browser; it is printed on stderr either
        /// way (`BROWSER=none` turns this off: a headless login).
        open_browser: bool,
    },
}

/// A permission asked for with Lakebase database credentials (the Autoscaling credential
/// API's `claims`): a permission set, such as `READ_ONLY`, on some tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The permission set, such as `READ_ONLY`.
    pub permission_set: String,
    /// The tables, as `catalog.schema.table`.
    pub tables: Vec<String>,
}

impl Claim {
    /// `permission_set` on `tables`.
    pub fn new(permission_set: impl Into<String>, tables: &[&str]) -> Self {
        Self {
            permission_set: permission_set.into(),
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    /// As the API takes it: `{"permission_set": ..., "resources": [{"table_name": ...}]}`.
    fn to_json(&self) -> Value {
        let resources: Vec<Value> = self
            .tables
            .iter()
            .map(|t| serde_json::json!({ "table_name": t }))
            .collect();
        serde_json::json!({ "permission_set": self.permission_set, "resources": resources })
    }
}

impl WorkspaceAuth {
    /// Databricks' name of this way to authenticate (its SDKs' `auth_type`): `oauth-m2m`,
    /// `pat`, `databricks-cli`, `env-oidc`, `file-oidc`, `github-oidc` or `external-browser`.
    pub fn auth_type(&self) -> &'static str {
        match self {
            WorkspaceAuth::ClientCredentials { .. } => "oauth-m2m",
            WorkspaceAuth::Pat(_) => "pat",
            WorkspaceAuth::DatabricksCli { .. } => "databricks-cli",
            WorkspaceAuth::Federated { id_token, .. } => id_token.auth_type(),
            WorkspaceAuth::ExternalBrowser { .. } => "external-browser",
        }
    }
}

/// The `User-Agent` of the credential source's HTTP calls: the product if any, dal, and the
/// auth type, as the Databricks SDKs name theirs.
fn user_agent(product: Option<&str>, auth: &WorkspaceAuth) -> String {
    let dal = concat!("dal/", env!("CARGO_PKG_VERSION"));
    match product {
        Some(product) => format!("{product} {dal} auth/{}", auth.auth_type()),
        None => format!("{dal} auth/{}", auth.auth_type()),
    }
}

impl fmt::Debug for WorkspaceAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkspaceAuth::ClientCredentials {
                client_id,
                token_url,
                ..
            } => f
                .debug_struct("ClientCredentials")
                .field("client_id", client_id)
                .field("client_secret", &REDACTED)
                .field("token_url", token_url)
                .finish(),
            WorkspaceAuth::Pat(_) => f.debug_tuple("Pat").field(&REDACTED).finish(),
            WorkspaceAuth::DatabricksCli { profile } => f
                .debug_struct("DatabricksCli")
                .field("profile", profile)
                .finish(),
            WorkspaceAuth::Federated {
                client_id,
                id_token,
            } => f
                .debug_struct("Federated")
                .field("client_id", client_id)
                .field("id_token", id_token)
                .finish(),
            WorkspaceAuth::ExternalBrowser {
                client_id,
                open_browser,
            } => f
                .debug_struct("ExternalBrowser")
                .field("client_id", client_id)
                .field("open_browser", open_browser)
                .finish(),
        }
    }
}

/// Which Lakebase database the credential is for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LakebaseTarget {
    /// `projects/{p}/branches/{b}/endpoints/{e}` (Autoscaling).
    Autoscaling {
        /// The endpoint's resource name, `projects/{project}/branches/{branch}/endpoints/{endpoint}`.
        endpoint: String,
    },
    /// A Provisioned instance name.
    Provisioned {
        /// The database instance name.
        instance: String,
    },
}

/// Database credentials from Databricks Lakebase.
///
/// ```no_run
/// use dal::credentials::{CredentialSource, Lakebase, LakebaseTarget, WorkspaceAuth};
/// # async fn demo() -> dal::Result<()> {
/// let source = Lakebase::new(
///     "https://my-workspace.cloud.databricks.com",
///     WorkspaceAuth::ClientCredentials {
///         client_id: "6b0c...".into(),
///         client_secret: "dose...".into(),
///         token_url: None,
///     },
///     LakebaseTarget::Autoscaling {
///         endpoint: "projects/shop/branches/main/endpoints/primary".into(),
///     },
/// )?;
/// let password = source.fetch().await?;
/// # Ok(()) }
/// ```
///
/// Every HTTP call is bounded by [`with_http_timeout`](Lakebase::with_http_timeout); a fetch
/// makes one call when the workspace token is cached, and up to four on a cold start with
/// token endpoint discovery.
pub struct Lakebase {
    /// `scheme://host[:port]`, without a trailing slash.
    pub(crate) host: String,
    auth: WorkspaceAuth,
    target: LakebaseTarget,
    token_url: Option<Url>,
    workspace_id: Option<String>,
    http_timeout: Duration,
    clock: Arc<dyn Clock>,
    user_agent: String,
    /// The credential life to ask for (Autoscaling `ttl`).
    ttl: Option<Duration>,
    /// The Databricks CLI to run for [`WorkspaceAuth::DatabricksCli`]; `None`: `databricks`
    /// on `PATH`.
    cli_path: Option<String>,
    /// The OIDC discovery document to read the token endpoint from, first.
    discovery_url: Option<Url>,
    /// The permissions to ask for (Autoscaling `claims`).
    claims: Vec<Claim>,
    /// The audience of federated ID tokens; `None`: the token endpoint.
    token_audience: Option<String>,
    /// Where a user login keeps its refresh token; `None`: the user's cache directory.
    token_cache_dir: Option<std::path::PathBuf>,
    /// The loopback port a user login is redirected to.
    redirect_port: u16,
    /// Shows the address of a user login; `None`: printed on stderr.
    login_prompt: Option<LoginPrompt>,
    pub(crate) client: reqwest::Client,
    /// Held across discovery and the token call, so that concurrent callers wait for one
    /// refresh instead of each starting their own.
    state: Arc<Mutex<AuthState>>,
}

impl fmt::Debug for Lakebase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lakebase")
            .field("host", &self.host)
            .field("auth", &self.auth)
            .field("target", &self.target)
            .field("workspace_id", &self.workspace_id)
            .field("http_timeout", &self.http_timeout)
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct AuthState {
    discovery: Option<Discovery>,
    token: Option<WorkspaceToken>,
    /// Counts workspace tokens, so that a 401 only evicts the token it was answered to.
    generation: u64,
    /// A user login's refresh token.
    refresh_token: Option<SecretString>,
    /// A user login under way.
    login: Option<browser::PendingLogin>,
}

struct Discovery {
    token_url: Url,
    /// Where a user logs in, when the discovery document names it.
    authorize_url: Option<Url>,
    workspace_id: Option<String>,
}

/// A workspace token as a token endpoint answers it.
struct Issued {
    authorization: HeaderValue,
    access_token: SecretString,
    lifetime: Duration,
    refresh_token: Option<SecretString>,
}

struct WorkspaceToken {
    authorization: HeaderValue,
    access_token: SecretString,
    refresh_at: SystemTime,
    generation: u64,
}

/// Shows a login address.
type LoginPrompt = Arc<dyn Fn(&str) + Send + Sync>;

/// What a credential call is authorized with.
pub(crate) struct Authorization {
    pub(crate) header: HeaderValue,
    /// `None` for a personal access token, which is never evicted.
    generation: Option<u64>,
    pub(crate) workspace_id: Option<String>,
    pub(crate) access_token: Option<SecretString>,
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Vec<u8>,
    /// `Retry-After` in seconds (the HTTP-date form is not used by the services).
    pub(crate) retry_after: Option<Duration>,
    /// The answer's `Date` (RFC 9110, section 6.6.1): when the service answered, by its own
    /// clock, to the second.
    pub(crate) date: Option<SystemTime>,
}

impl Lakebase {
    /// A source for `target` in the workspace at `host`, such as
    /// `https://my-workspace.cloud.databricks.com` (a host without a scheme gets `https://`;
    /// `http://` is accepted only for `127.0.0.1` and `localhost`).
    ///
    /// Checks the settings and builds the HTTP client; makes no call.
    pub fn new(host: &str, auth: WorkspaceAuth, target: LakebaseTarget) -> Result<Self> {
        let host = parse_base_url(host, Setting::DatabricksHost)?;
        let token_url = match &auth {
            WorkspaceAuth::ClientCredentials {
                client_id,
                client_secret,
                token_url,
            } => {
                check_client_credentials(client_id, client_secret)?;
                token_url
                    .as_deref()
                    .map(|url| parse_url(url, Setting::DatabricksTokenUrl))
                    .transpose()?
            }
            WorkspaceAuth::Federated {
                client_id,
                id_token,
            } => {
                client_id.as_deref().map(check_client_id).transpose()?;
                id_token.validate()?;
                None
            }
            WorkspaceAuth::ExternalBrowser { client_id, .. } => {
                client_id.as_deref().map(check_client_id).transpose()?;
                None
            }
            WorkspaceAuth::Pat(_) | WorkspaceAuth::DatabricksCli { .. } => None,
        };
        if let WorkspaceAuth::Pat(pat) = &auth {
            let pat = pat.expose_secret();
            if pat.is_empty() {
                return Err(Error::config(Setting::DatabricksToken, "must not be empty"));
            }
            if sensitive_header(&format!("Bearer {pat}")).is_none() {
                return Err(Error::config(Setting::DatabricksToken, PAT_HEADER_REASON));
            }
        }
        validate_target(&target)?;
        let loopback = is_loopback(&host);
        let client = build_client(loopback)?;
        let user_agent = user_agent(None, &auth);
        Ok(Self {
            host: host.as_str().trim_end_matches('/').to_owned(),
            auth,
            target,
            token_url,
            workspace_id: None,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
            clock: Arc::new(SystemClock),
            user_agent,
            ttl: None,
            cli_path: None,
            discovery_url: None,
            claims: Vec::new(),
            token_audience: None,
            token_cache_dir: None,
            redirect_port: browser::DEFAULT_REDIRECT_PORT,
            login_prompt: None,
            client,
            state: Arc::new(Mutex::new(AuthState::default())),
        })
    }

    /// Sends `X-Databricks-Workspace-Id: <id>` on credential calls; `id` is the workspace's
    /// number (`DATABRICKS_WORKSPACE_ID`), white space around it ignored. Defaults to the
    /// `workspace_id` of the workspace's `/.well-known/databricks-config` when token endpoint
    /// discovery ran, and to no header otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::DatabricksWorkspaceId`] when `id` is not all digits.
    pub fn with_workspace_id(mut self, id: impl AsRef<str>) -> Result<Self> {
        let id = id.as_ref().trim();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::config(
                Setting::DatabricksWorkspaceId,
                "must be the workspace's number, digits only, such as 1234567890123456",
            ));
        }
        self.workspace_id = Some(id.to_owned());
        Ok(self)
    }

    /// The longest any single HTTP call may take, from connecting to the last byte of the
    /// answer. Defaults to 10 s.
    ///
    /// # Errors
    /// [`Error::Config`] for [`Setting::LakebaseHttpTimeout`] outside 1 ms to 1 day.
    pub fn with_http_timeout(mut self, d: Duration) -> Result<Self> {
        if d < Duration::from_millis(1) || d > Duration::from_secs(24 * 3600) {
            return Err(Error::config(
                Setting::LakebaseHttpTimeout,
                format!("{d:?} is not a wait from 1 ms to 1 day, such as 10 s"),
            ));
        }
        self.http_timeout = d;
        Ok(self)
    }

    /// The clock that decides when the workspace token is renewed and when a database
    /// credential expires: at its expiry by this clock, unless the answer's `Date` is more
    /// than 5 s away from it; then the credential's life is the service's, its expiry less
    /// that `Date`, counted from the request by this clock. Defaults to [`SystemClock`].
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The whole `User-Agent` of every HTTP call, as given. Defaults to
    /// `dal/<version> auth/<auth type>`; see [`with_product`](Self::with_product).
    #[must_use]
    pub fn with_user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Names the product in the `User-Agent` of every HTTP call, as the Lakebase partner
    /// guide asks: `<product> dal/<version> auth/<auth type>`, where `product` is
    /// `<isv-name_product-name>/<product-version>` (see [`Config::product`](crate::Config::product))
    /// and the auth type is Databricks' name for it (`oauth-m2m`, `pat`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::Product`] when `product` is not of that shape.
    pub fn with_product(mut self, product: &str) -> Result<Self> {
        crate::telemetry::check_product(product)?;
        self.user_agent = user_agent(Some(product), &self.auth);
        Ok(self)
    }

    /// Reads the token endpoint from this OIDC discovery document
    /// (`.../.well-known/oauth-authorization-server`, `DATABRICKS_DISCOVERY_URL`) instead of
    /// discovering it from the workspace, as the Databricks SDKs do when it is set. An explicit
    /// token URL still wins.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::DatabricksDiscoveryUrl`] when `url` is not an `https`
    /// URL (`http` on loopback only).
    pub fn with_discovery_url(mut self, url: &str) -> Result<Self> {
        self.discovery_url = Some(parse_url(url, Setting::DatabricksDiscoveryUrl)?);
        Ok(self)
    }

    /// Runs `path` as the Databricks CLI for [`WorkspaceAuth::DatabricksCli`] instead of
    /// `databricks` on `PATH` (`DATABRICKS_CLI_PATH`).
    #[must_use]
    pub fn with_cli_path(mut self, path: impl Into<String>) -> Self {
        self.cli_path = Some(path.into());
        self
    }

    /// Uses this OAuth token endpoint instead of discovering it (`DATABRICKS_TOKEN_URL`), for
    /// every OAuth way to sign in.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::DatabricksTokenUrl`] when `url` is not `https`
    /// (`http` on loopback only).
    pub fn with_token_url(mut self, url: &str) -> Result<Self> {
        self.token_url = Some(parse_url(url, Setting::DatabricksTokenUrl)?);
        Ok(self)
    }

    /// The audience to ask federated ID tokens for (`DATABRICKS_TOKEN_AUDIENCE`), where the
    /// source can ask for one (GitHub Actions). Defaults to the workspace's token endpoint,
    /// as the Databricks SDKs do.
    #[must_use]
    pub fn with_token_audience(mut self, audience: impl Into<String>) -> Self {
        self.token_audience = Some(audience.into());
        self
    }

    /// Keeps a user login's refresh token in `dir` (created with mode 0700; the file is
    /// `oauth-<host>-<client id>.json`, mode 0600). Defaults to `$XDG_CACHE_HOME/dal`, else
    /// `$HOME/.cache/dal`; without either, the refresh token lives in memory only. Programs
    /// sharing the file trade its refresh token (single-use on Databricks by default) one at
    /// a time, under an empty `oauth-<host>-<client id>.lock` beside it.
    #[must_use]
    pub fn with_token_cache_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.token_cache_dir = Some(dir.into());
        self
    }

    /// The loopback port a user login is redirected to, `http://localhost:<port>`. Defaults to
    /// 8020, the redirect Databricks registers for its `databricks-cli` client; another port
    /// needs an OAuth app of your own that allows it (0: any free port, for a service that
    /// takes any loopback port, as RFC 8252 lets native apps' redirects do).
    #[must_use]
    pub fn with_redirect_port(mut self, port: u16) -> Self {
        self.redirect_port = port;
        self
    }

    /// Shows the address a user opens to log in (`external-browser`) with `prompt` instead of
    /// printing it on stderr: for a program with a window of its own, or a test that plays
    /// the browser. Called once per login, with the whole address.
    #[must_use]
    pub fn with_login_prompt(mut self, prompt: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.login_prompt = Some(Arc::new(prompt));
        self
    }

    /// Asks for credentials that live `ttl` (the Autoscaling API's optional `ttl`, documented
    /// from 300 s to 3600 s; whole seconds) instead of the service's default of an hour. The
    /// cache takes the shorter of `ttl` and the expiry the service answers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::LakebaseCredentialTtl`] outside 300-3600 s, not in
    /// whole seconds, or with a Provisioned instance (whose API has no `ttl`).
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self> {
        self.autoscaling_only(Setting::LakebaseCredentialTtl)?;
        if !(300..=3600).contains(&ttl.as_secs()) || ttl.subsec_nanos() != 0 {
            return Err(Error::config(
                Setting::LakebaseCredentialTtl,
                format!(
                    "{} s is not a whole number of seconds from 300 to 3600, the range the \
                     credential API takes",
                    ttl.as_secs_f64()
                ),
            ));
        }
        self.ttl = Some(ttl);
        Ok(self)
    }

    /// Asks for credentials limited to `claims` (the Autoscaling API's optional `claims`), such
    /// as read-only access to some tables.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::LakebaseClaims`] with a Provisioned instance, an empty
    /// permission set, or a claim without tables.
    pub fn with_claims(mut self, claims: Vec<Claim>) -> Result<Self> {
        self.autoscaling_only(Setting::LakebaseClaims)?;
        if let Some(bad) = claims
            .iter()
            .find(|c| c.permission_set.trim().is_empty() || c.tables.is_empty())
        {
            return Err(Error::config(
                Setting::LakebaseClaims,
                format!(
                    "a claim needs a permission set (such as READ_ONLY) and at least one table: \
                     {bad:?}"
                ),
            ));
        }
        self.claims = claims;
        Ok(self)
    }

    /// The same workspace, authentication and settings for another database: the workspace
    /// token (and a user login) is shared with this source.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a malformed target, or a Provisioned one while this source asks
    /// for a `ttl` or `claims`.
    pub fn for_target(&self, target: LakebaseTarget) -> Result<Self> {
        validate_target(&target)?;
        let source = Self {
            host: self.host.clone(),
            auth: self.auth.clone(),
            target,
            token_url: self.token_url.clone(),
            workspace_id: self.workspace_id.clone(),
            http_timeout: self.http_timeout,
            clock: Arc::clone(&self.clock),
            user_agent: self.user_agent.clone(),
            ttl: self.ttl,
            cli_path: self.cli_path.clone(),
            discovery_url: self.discovery_url.clone(),
            claims: self.claims.clone(),
            token_audience: self.token_audience.clone(),
            token_cache_dir: self.token_cache_dir.clone(),
            redirect_port: self.redirect_port,
            login_prompt: self.login_prompt.clone(),
            client: self.client.clone(),
            state: Arc::clone(&self.state),
        };
        if source.ttl.is_some() {
            source.autoscaling_only(Setting::LakebaseCredentialTtl)?;
        }
        if !source.claims.is_empty() {
            source.autoscaling_only(Setting::LakebaseClaims)?;
        }
        Ok(source)
    }

    fn autoscaling_only(&self, setting: Setting) -> Result<()> {
        match self.target {
            LakebaseTarget::Autoscaling { .. } => Ok(()),
            LakebaseTarget::Provisioned { .. } => Err(Error::config(
                setting,
                "only Lakebase Autoscaling's credential API takes it (set LAKEBASE_ENDPOINT, \
                 not LAKEBASE_INSTANCE)",
            )),
        }
    }

    /// The host name of the database: the Autoscaling endpoint's (`GET
    /// /api/2.0/postgres/{endpoint}`, `status.hosts.host`) or the Provisioned instance's (`GET
    /// /api/2.0/database/instances/{name}`, `read_write_dns`), as the Databricks API reference
    /// describes them.
    ///
    /// # Errors
    ///
    /// As a credential call: [`Error::Http`] for an answer other than 200, naming the URL;
    /// [`Error::HttpTransport`] when the answer has no host.
    pub async fn endpoint_host(&self) -> Result<String> {
        let (url, pointer) = match &self.target {
            LakebaseTarget::Autoscaling { endpoint } => (
                format!("{}/api/2.0/postgres/{}", self.host, resource_path(endpoint)),
                "/status/hosts/host",
            ),
            LakebaseTarget::Provisioned { instance } => (
                format!(
                    "{}/api/2.0/database/instances/{}",
                    self.host,
                    resource_path(instance)
                ),
                "/read_write_dns",
            ),
        };
        self.get_field(&url, pointer).await
    }

    /// The user name of the identity the workspace token belongs to: `userName` of the
    /// current user API (`GET /api/2.0/preview/scim/v2/Me`), which is the Postgres role of a
    /// Databricks user.
    ///
    /// # Errors
    ///
    /// As a credential call: [`Error::Http`] for an answer other than 200, naming the URL;
    /// [`Error::HttpTransport`] when the answer has no `userName`.
    pub async fn current_user(&self) -> Result<String> {
        let url = format!("{}/api/2.0/preview/scim/v2/Me", self.host);
        self.get_field(&url, "/userName").await
    }

    /// The text at `pointer` (a JSON pointer) of what `GET url` answers, authorized with
    /// the workspace token: an error for an answer other than 200 or without the field.
    async fn get_field(&self, url: &str, pointer: &str) -> Result<String> {
        let auth = self.authorization().await?;
        let mut request = self
            .client
            .get(url)
            .header(AUTHORIZATION, auth.header)
            .header(ACCEPT, "application/json");
        if let Some(id) = &auth.workspace_id {
            request = request.header(WORKSPACE_ID_HEADER, id);
        }
        let reply = self.send(url, request).await?;
        if !reply.status.is_success() {
            return Err(self.http_error(url, &reply, auth.access_token.as_ref()));
        }
        parse_json(url, &reply.body)?
            .pointer(pointer)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| malformed(url, &format!("the answer has no {pointer}")))
    }

    /// The credential API's path for the target and the body to send it.
    fn credential_path(&self) -> (&'static str, Value) {
        match &self.target {
            LakebaseTarget::Autoscaling { endpoint } => {
                let mut body = serde_json::json!({ "endpoint": endpoint });
                if let Some(ttl) = self.ttl {
                    body["ttl"] = format!("{}s", ttl.as_secs()).into();
                }
                if !self.claims.is_empty() {
                    body["claims"] = self.claims.iter().map(Claim::to_json).collect();
                }
                (AUTOSCALING_PATH, body)
            }
            LakebaseTarget::Provisioned { instance } => (
                PROVISIONED_PATH,
                serde_json::json!({
                    "instance_names": [instance],
                    "request_id": uuid::Uuid::new_v4().to_string(),
                }),
            ),
        }
    }

    /// One call of the credential API with the workspace authorization `auth`: its URL and
    /// the answer.
    async fn credential_call(&self, auth: &Authorization) -> Result<(String, Reply)> {
        let (path, body) = self.credential_path();
        let url = format!("{}{path}", self.host);
        let mut request = self
            .client
            .post(&url)
            .header(AUTHORIZATION, auth.header.clone())
            .header(ACCEPT, "application/json")
            .json(&body);
        if let Some(id) = &auth.workspace_id {
            request = request.header(WORKSPACE_ID_HEADER, id);
        }
        let reply = self.send(&url, request).await?;
        Ok((url, reply))
    }

    async fn database_credential(&self) -> Result<Token> {
        // A 401 with a workspace token that can be renewed (revoked, or ended before the
        // time it gave) is asked once more with a new one.
        let mut auth = self.authorization().await?;
        let mut requested_at = self.clock.now();
        let (url, mut reply) = self.credential_call(&auth).await?;
        if reply.status == StatusCode::UNAUTHORIZED
            && let Some(generation) = auth.generation
        {
            let mut state = self.state.lock().await;
            if state.token.as_ref().map(|t| t.generation) == Some(generation) {
                state.token = None;
            }
            drop(state);
            auth = self.authorization().await?;
            requested_at = self.clock.now();
            reply = self.credential_call(&auth).await?.1;
        }
        let path = url.as_str();
        if !reply.status.is_success() {
            return Err(self.http_error(path, &reply, auth.access_token.as_ref()));
        }
        let json = parse_json(path, &reply.body)?;
        let token = json
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed(path, "the answer has no token"))?;
        let expiry = json
            .get("expire_time")
            .or_else(|| json.get("expiration_time"))
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(path, "the answer has no expire_time or expiration_time"))?;
        let expires_at = chrono::DateTime::parse_from_rfc3339(expiry)
            .map_err(|e| Error::HttpTransport {
                endpoint: path.to_owned(),
                what: "the answer's expiry is not an RFC 3339 time".to_owned(),
                source: Some(Box::new(e)),
            })?
            .with_timezone(&chrono::Utc);
        let expires_at = SystemTime::from(expires_at);
        // Its life by the service's clock, when the answer's `Date` says that clock is more
        // than `Date`'s rounding and the trip away from this machine's: one ahead by more than
        // a credential's life would otherwise see each one expired on arrival, and open no
        // connection. It counts from the request, by this machine's clock, less the second
        // `Date` rounds off.
        let now = self.clock.now();
        let apart =
            |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or_else(|e| e.duration());
        let (now, answered) = match reply.date.filter(|&date| apart(date, now) > CLOCKS_AGREE) {
            Some(date) => {
                let life = expires_at
                    .duration_since(date)
                    .ok()
                    .filter(|l| !l.is_zero());
                (
                    date,
                    life.map(|life| requested_at + life.saturating_sub(Duration::from_secs(1))),
                )
            }
            None => (now, (now < expires_at).then_some(expires_at)),
        };
        let Some(answered) = answered else {
            return Err(Error::TokenExpired {
                source_kind: KIND,
                expires_at,
                now,
            });
        };
        // The shortest life: the one asked for, the one answered, or the longest there is.
        let expires_at = match self.ttl.and_then(|ttl| requested_at.checked_add(ttl)) {
            Some(asked) => asked.min(answered),
            None => answered,
        }
        .min(requested_at + MAX_CREDENTIAL_LIFE);
        Ok(Token::new(token, Some(expires_at)))
    }

    /// The workspace authorization, from the cache when it is fresh enough.
    pub(crate) async fn authorization(&self) -> Result<Authorization> {
        let (client_id, client_secret) = match &self.auth {
            WorkspaceAuth::Pat(pat) => {
                let header = sensitive_header(&format!("Bearer {}", pat.expose_secret()))
                    .ok_or_else(|| Error::config(Setting::DatabricksToken, PAT_HEADER_REASON))?;
                return Ok(Authorization {
                    header,
                    generation: None,
                    workspace_id: self.workspace_id.clone(),
                    access_token: None,
                });
            }
            WorkspaceAuth::ClientCredentials {
                client_id,
                client_secret,
                ..
            } => (client_id, client_secret),
            WorkspaceAuth::DatabricksCli { profile } => {
                return self.cli_authorization(profile.as_deref()).await;
            }
            WorkspaceAuth::ExternalBrowser {
                client_id,
                open_browser,
            } => {
                let client_id = client_id.as_deref().unwrap_or(browser::DEFAULT_CLIENT_ID);
                return self.browser_authorization(client_id, *open_browser).await;
            }
            WorkspaceAuth::Federated {
                client_id,
                id_token,
            } => {
                return self
                    .federated_authorization(client_id.as_deref(), id_token)
                    .await;
            }
        };
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && self.clock.now() < token.refresh_at
        {
            return Ok(self.authorization_from(&state, token));
        }
        let token_url = self.token_url_of(&mut state).await?;
        let requested_at = self.clock.now();
        let request = self
            .client
            .post(token_url.clone())
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(TOKEN_REQUEST_BODY);
        let issued = self.token_call(&token_url, request, None).await?;
        Ok(self.keep_token(&mut state, issued, requested_at))
    }

    /// The workspace token of workload identity federation: a new ID token traded at the
    /// token endpoint (`grant_type=urn:ietf:params:oauth:grant-type:token-exchange`,
    /// `subject_token_type=urn:ietf:params:oauth:token-type:jwt`, `scope=all-apis`, and the
    /// service principal's `client_id` when there is one; no client secret), cached until
    /// shortly before its expiry.
    async fn federated_authorization(
        &self,
        client_id: Option<&str>,
        id_token: &IdTokenSource,
    ) -> Result<Authorization> {
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && self.clock.now() < token.refresh_at
        {
            return Ok(self.authorization_from(&state, token));
        }
        // A token of the environment or a file first, so that a missing one is told before
        // any call; GitHub's is asked for the token endpoint as its audience.
        let early = match id_token {
            IdTokenSource::GitHubActions { .. } => None,
            _ => Some(self.id_token(id_token, "").await?),
        };
        let token_url = self.token_url_of(&mut state).await?;
        let subject = match early {
            Some(subject) => subject,
            None => {
                let audience = self
                    .token_audience
                    .clone()
                    .unwrap_or_else(|| token_url.to_string());
                self.id_token(id_token, &audience).await?
            }
        };
        let mut form = vec![
            ("grant_type", federation::TOKEN_EXCHANGE_GRANT),
            ("subject_token", subject.expose_secret()),
            ("subject_token_type", federation::JWT_TOKEN_TYPE),
            ("scope", "all-apis"),
        ];
        if let Some(client_id) = client_id {
            form.push(("client_id", client_id));
        }
        let requested_at = self.clock.now();
        let request = self.client.post(token_url.clone()).form(&form);
        let issued = self.token_call(&token_url, request, Some(&subject)).await?;
        Ok(self.keep_token(&mut state, issued, requested_at))
    }

    /// The token endpoint: the configured one, else the one discovered (once).
    async fn token_url_of(&self, state: &mut AuthState) -> Result<Url> {
        if let Some(url) = &self.token_url {
            return Ok(url.clone());
        }
        let discovery = match state.discovery.take() {
            Some(discovery) => discovery,
            None => self.discover().await?,
        };
        let url = discovery.token_url.clone();
        state.discovery = Some(discovery);
        Ok(url)
    }

    /// Keeps a new workspace token, renewed a margin before its lifetime from `requested_at`
    /// runs out, and returns its authorization.
    fn keep_token(
        &self,
        state: &mut AuthState,
        issued: Issued,
        requested_at: SystemTime,
    ) -> Authorization {
        let Issued {
            authorization,
            access_token,
            lifetime,
            ..
        } = issued;
        state.generation += 1;
        let token = WorkspaceToken {
            authorization,
            access_token,
            // An absurd lifetime that overflows the clock is treated like a missing one.
            refresh_at: requested_at
                .checked_add(lifetime.saturating_sub(refresh_margin(lifetime)))
                .unwrap_or(requested_at),
            generation: state.generation,
        };
        let authorization = self.authorization_from(state, &token);
        state.token = Some(token);
        authorization
    }

    /// The workspace token of the Databricks CLI's login, cached until shortly before its
    /// expiry: `databricks auth token --host <host>` (or `--profile <profile>`) prints
    /// `{"access_token", "token_type", "expiry"}` and refreshes the login itself.
    async fn cli_authorization(&self, profile: Option<&str>) -> Result<Authorization> {
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && self.clock.now() < token.refresh_at
        {
            return Ok(self.authorization_from(&state, token));
        }
        let cli = self.cli_path.as_deref().unwrap_or("databricks");
        let mut command = tokio::process::Command::new(cli);
        command.args(["auth", "token"]);
        match profile {
            Some(profile) => command.args(["--profile", profile]),
            None => command.args(["--host", &self.host]),
        };
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let endpoint = format!("`{cli} auth token`");
        let failed = |what: String| Error::Credential {
            source_kind: KIND,
            source: what.into(),
        };
        let output = match tokio::time::timeout(self.http_timeout, bounded_output(command)).await {
            Err(_) => {
                return Err(failed(format!(
                    "{endpoint} did not answer within {} s",
                    self.http_timeout.as_secs()
                )));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::config(
                    Setting::DatabricksCliPath,
                    format!(
                        "the Databricks CLI ({cli}) was not found: install it and run \
                         `databricks auth login --host {}`, or set DATABRICKS_CLI_PATH",
                        self.host
                    ),
                ));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(failed(format!(
                    "{endpoint} printed more than {MAX_BODY} bytes"
                )));
            }
            Ok(Err(e)) => return Err(failed(format!("cannot run {endpoint}: {e}"))),
            Ok(Ok(output)) => output,
        };
        if !output.status.success() {
            // The CLI says why (not logged in, an expired refresh token) on its last line.
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(failed(format!(
                "{endpoint} failed ({}): {}; run `databricks auth login --host {}`",
                output.status,
                self.scrub(why, None),
                self.host
            )));
        }
        let json = parse_json(&endpoint, &output.stdout)?;
        let field = |name: &str| {
            json.get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        };
        let access_token = field("access_token")
            .ok_or_else(|| malformed(&endpoint, "the answer has no access_token"))?;
        let token_type = field("token_type").unwrap_or("Bearer");
        let authorization = sensitive_header(&format!("{token_type} {access_token}"))
            .ok_or_else(|| malformed(&endpoint, "the access token is not a valid header value"))?;
        let now = self.clock.now();
        // Without an expiry the token serves this one call and is not reused.
        let expiry = field("expiry")
            .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
            .map(SystemTime::from)
            .unwrap_or(now);
        let lifetime = expiry.duration_since(now).unwrap_or_default();
        let access_token = SecretString::from(access_token.to_owned());
        let issued = Issued {
            authorization,
            access_token,
            lifetime,
            refresh_token: None,
        };
        Ok(self.keep_token(&mut state, issued, now))
    }

    fn authorization_from(&self, state: &AuthState, token: &WorkspaceToken) -> Authorization {
        Authorization {
            header: token.authorization.clone(),
            generation: Some(token.generation),
            workspace_id: self.workspace_id.clone().or_else(|| {
                state
                    .discovery
                    .as_ref()
                    .and_then(|d| d.workspace_id.clone())
            }),
            access_token: Some(token.access_token.clone()),
        }
    }

    /// Sends a token request and reads the workspace token of its answer. `secret` is what
    /// the request carries besides the client's own secrets, to mask if echoed.
    async fn token_call(
        &self,
        token_url: &Url,
        request: reqwest::RequestBuilder,
        secret: Option<&SecretString>,
    ) -> Result<Issued> {
        let path = &endpoint_of(token_url);
        let reply = self
            .send(path, request.header(ACCEPT, "application/json"))
            .await?;
        if !reply.status.is_success() {
            return Err(self.http_error(path, &reply, secret));
        }
        let json = parse_json(path, &reply.body)?;
        let access_token = json
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| malformed(path, "the answer has no access_token"))?;
        let token_type = json
            .get("token_type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .unwrap_or("Bearer");
        // Without a lifetime the token is used for this one call and never reused.
        let lifetime = json
            .get("expires_in")
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_f64().filter(|s| *s >= 0.0).map(|s| s as u64))
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .map(Duration::from_secs)
            .unwrap_or(Duration::ZERO);
        let authorization =
            sensitive_header(&format!("{token_type} {access_token}")).ok_or_else(|| {
                malformed(
                    path,
                    "the token holds characters not allowed in an HTTP header",
                )
            })?;
        let refresh_token = json
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| SecretString::from(t.to_owned()));
        Ok(Issued {
            authorization,
            access_token: SecretString::from(access_token.to_owned()),
            lifetime,
            refresh_token,
        })
    }

    /// Finds the token endpoint the way the Databricks SDKs do, newest mechanism first.
    async fn discover(&self) -> Result<Discovery> {
        if let Some(url) = &self.discovery_url {
            // Named by the user: its token endpoint or an error, no fallback.
            let (token_url, authorize_url) = self
                .token_endpoint_from(url.as_str())
                .await?
                .ok_or_else(|| {
                    Error::config(
                        Setting::DatabricksDiscoveryUrl,
                        format!(
                            "{} did not answer a discovery document with a token_endpoint",
                            endpoint_of(url)
                        ),
                    )
                })?;
            return Ok(Discovery {
                token_url,
                authorize_url,
                workspace_id: None,
            });
        }
        let mut workspace_id = None;
        let config_url = format!("{}{DATABRICKS_CONFIG_PATH}", self.host);
        if let Some(config) = self.get_json(&config_url).await? {
            workspace_id = config.get("workspace_id").and_then(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            if let Some(oidc) = config.get("oidc_endpoint").and_then(Value::as_str) {
                let account_id = config.get("account_id").and_then(Value::as_str);
                let oidc = match account_id {
                    Some(id) => oidc.replace("{account_id}", id),
                    None => oidc.to_owned(),
                };
                if !oidc.contains("{account_id}") {
                    let metadata = format!("{}{OAUTH_METADATA_SUFFIX}", oidc.trim_end_matches('/'));
                    if let Some((token_url, authorize_url)) =
                        self.token_endpoint_from(&metadata).await?
                    {
                        return Ok(Discovery {
                            token_url,
                            authorize_url,
                            workspace_id,
                        });
                    }
                }
            }
        }
        let metadata = format!("{}{HOST_OIDC_METADATA_PATH}", self.host);
        let (token_url, authorize_url) = match self.token_endpoint_from(&metadata).await? {
            Some(urls) => urls,
            None => (
                parse_url(
                    &format!("{}{DEFAULT_TOKEN_PATH}", self.host),
                    Setting::DatabricksHost,
                )?,
                None,
            ),
        };
        Ok(Discovery {
            token_url,
            authorize_url,
            workspace_id,
        })
    }

    /// The token endpoint of a discovery document, and its authorization endpoint if any.
    async fn token_endpoint_from(&self, metadata_url: &str) -> Result<Option<(Url, Option<Url>)>> {
        let Some(doc) = self.get_json(metadata_url).await? else {
            return Ok(None);
        };
        let authorize_url = doc
            .get("authorization_endpoint")
            .and_then(Value::as_str)
            .and_then(|u| parse_url(u, Setting::DatabricksHost).ok());
        let url = doc
            .get("token_endpoint")
            .and_then(Value::as_str)
            .and_then(|u| parse_url(u, Setting::DatabricksHost).ok());
        if url.is_none() {
            tracing::debug!(
                document = metadata_path(metadata_url),
                "no usable https token_endpoint in the OAuth metadata"
            );
        }
        Ok(url.map(|url| (url, authorize_url)))
    }

    /// A discovery document: `None` when it is absent or not a JSON object, so that the next
    /// mechanism is tried; an error when the server cannot be reached or cannot serve it for
    /// now (HTTP 5xx, 429), since what is found is kept.
    async fn get_json(&self, url: &str) -> Result<Option<Value>> {
        let Ok(parsed) = parse_url(url, Setting::DatabricksHost) else {
            return Ok(None);
        };
        let path = endpoint_of(&parsed);
        let request = self.client.get(parsed).header(ACCEPT, "application/json");
        let reply = self.send(&path, request).await?;
        if reply.status.is_server_error() || reply.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(self.http_error(&path, &reply, None));
        }
        if !reply.status.is_success() {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .filter(Value::is_object))
    }

    /// Sends one request within the HTTP timeout, with the source's `User-Agent`, and reads
    /// the whole answer.
    pub(crate) async fn send(&self, path: &str, request: reqwest::RequestBuilder) -> Result<Reply> {
        let request = request.header(USER_AGENT, &self.user_agent);
        read_reply(path, request, self.http_timeout, MAX_BODY).await
    }

    /// Maps a vendor error answer, whichever of the Databricks error shapes it has.
    pub(crate) fn http_error(
        &self,
        path: &str,
        reply: &Reply,
        token: Option<&SecretString>,
    ) -> Error {
        const SHAPES: [(&str, &str); 3] = [
            ("error", "error_description"),
            ("errorCode", "errorSummary"),
            ("error_code", "message"),
        ];
        let generic_code = reply
            .status
            .canonical_reason()
            .unwrap_or("unknown")
            .to_owned();
        let (code, message) = match serde_json::from_slice::<Value>(&reply.body) {
            Ok(Value::Object(map)) => {
                let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
                let code = SHAPES.iter().find_map(|(code, _)| text(code));
                let message = SHAPES.iter().find_map(|(_, message)| text(message));
                (code.unwrap_or(generic_code), message.unwrap_or_default())
            }
            _ => (
                generic_code,
                String::from_utf8_lossy(&reply.body).into_owned(),
            ),
        };
        Error::Http {
            endpoint: path.to_owned(),
            status: reply.status.as_u16(),
            code: self.scrub(&code, token),
            message: self.scrub(&message, token),
            retry_after: reply.retry_after,
        }
    }

    /// Makes text from a server safe to show: the secrets this source knows are masked (a
    /// misbehaving proxy may echo a request back), control characters flattened, and the
    /// length bounded.
    fn scrub(&self, text: &str, token: Option<&SecretString>) -> String {
        let mut secrets: Vec<&str> = Vec::new();
        let basic;
        match &self.auth {
            WorkspaceAuth::ClientCredentials {
                client_id,
                client_secret,
                ..
            } => {
                basic = basic_credentials(client_id, client_secret.expose_secret());
                secrets.push(client_secret.expose_secret());
                secrets.push(&basic);
            }
            WorkspaceAuth::Pat(pat) => secrets.push(pat.expose_secret()),
            WorkspaceAuth::Federated {
                id_token: IdTokenSource::GitHubActions { request_token, .. },
                ..
            } => secrets.push(request_token.expose_secret()),
            WorkspaceAuth::DatabricksCli { .. }
            | WorkspaceAuth::Federated { .. }
            | WorkspaceAuth::ExternalBrowser { .. } => {}
        }
        if let Some(token) = token {
            secrets.push(token.expose_secret());
        }
        let mut text: String = mask_secrets(text, &secrets)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_MESSAGE) {
            text.truncate(cut);
            text.push_str("...");
        }
        text
    }
}

/// The shortest run of a secret's characters that [`mask_secrets`] masks on its own.
const SHORTEST_ECHO: usize = 12;

/// `text` with each of `secrets` replaced by [`REDACTED`], and with it every run of
/// [`SHORTEST_ECHO`] or more bytes of a secret: a service or proxy may echo a token cut
/// short, or one part of a JWT. A secret shorter than that is masked where it appears whole.
pub(crate) fn mask_secrets(text: &str, secrets: &[&str]) -> String {
    let bytes = text.as_bytes();
    let mut masked = vec![false; bytes.len()];
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if secret.len() < SHORTEST_ECHO {
            for (at, _) in text.match_indices(secret) {
                masked[at..at + secret.len()].fill(true);
            }
            continue;
        }
        let parts: std::collections::HashSet<&[u8]> =
            secret.as_bytes().windows(SHORTEST_ECHO).collect();
        for (at, window) in bytes.windows(SHORTEST_ECHO).enumerate() {
            if parts.contains(window) {
                masked[at..at + SHORTEST_ECHO].fill(true);
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut in_secret = false;
    for (at, c) in text.char_indices() {
        if masked[at..at + c.len_utf8()].contains(&true) {
            if !in_secret {
                out.push_str(REDACTED);
            }
            in_secret = true;
        } else {
            out.push(c);
            in_secret = false;
        }
    }
    out
}

impl CredentialSource for Lakebase {
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        Box::pin(self.database_credential())
    }

    fn kind(&self) -> &'static str {
        KIND
    }
    fn target(&self) -> Option<crate::Target> {
        Some(crate::Target::Lakebase)
    }

    fn database_host(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async { self.endpoint_host().await.map(Some) })
    }

    fn database_user(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async {
            match &self.auth {
                // A service principal logs in as its application id.
                WorkspaceAuth::ClientCredentials { client_id, .. }
                | WorkspaceAuth::Federated {
                    client_id: Some(client_id),
                    ..
                } => Ok(Some(client_id.clone())),
                _ => self.current_user().await.map(Some),
            }
        })
    }
}

/// Runs `command` to its end, as `Command::output` does, but reads at most [`MAX_BODY`] bytes
/// of its standard output and of its error output, as of an HTTP answer: past that, an error
/// of kind `FileTooLarge`, and the command is killed (it must be `kill_on_drop`).
async fn bounded_output(
    mut command: tokio::process::Command,
) -> std::io::Result<std::process::Output> {
    use tokio::io::{AsyncRead, AsyncReadExt as _};
    async fn read(stream: Option<impl AsyncRead + Unpin>) -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        if let Some(stream) = stream {
            stream
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut bytes)
                .await?;
        }
        if bytes.len() > MAX_BODY {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        Ok(bytes)
    }
    let mut child = command.spawn()?;
    let (stdout, stderr) = tokio::try_join!(read(child.stdout.take()), read(child.stderr.take()))?;
    let status = child.wait().await?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// Sends one request within `timeout` and reads the whole answer, of at most `max_body`
/// bytes; a failure names `path` (no query string) and says what went wrong.
pub(crate) async fn read_reply(
    path: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    max_body: usize,
) -> Result<Reply> {
    enum Failure {
        Http(reqwest::Error),
        TooLarge,
    }
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, async {
        let mut response = request.send().await.map_err(Failure::Http)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let date = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
            .map(SystemTime::from);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(Failure::Http)? {
            if body.len() + chunk.len() > max_body {
                return Err(Failure::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            body,
            retry_after,
            date,
        })
    })
    .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let (what, source): (String, Option<Box<dyn std::error::Error + Send + Sync>>) = match outcome {
        Ok(Ok(reply)) => {
            tracing::debug!(
                path,
                status = reply.status.as_u16(),
                elapsed_ms,
                "lakebase HTTP call"
            );
            return Ok(reply);
        }
        Err(_) => (format!("no complete answer within {:?}", timeout), None),
        Ok(Err(Failure::TooLarge)) => (format!("the answer is larger than {max_body} bytes"), None),
        Ok(Err(Failure::Http(e))) => {
            let what = if e.is_connect() {
                "cannot connect"
            } else if e.is_timeout() {
                "timed out"
            } else {
                "the HTTP request failed"
            };
            (what.to_owned(), Some(Box::new(e.without_url())))
        }
    };
    tracing::debug!(path, elapsed_ms, error = %what, "lakebase HTTP call failed");
    Err(Error::HttpTransport {
        endpoint: path.to_owned(),
        what,
        source,
    })
}

/// A resource name as a URL path: each segment escaped, so that none can reach another path.
pub(crate) fn resource_path(name: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    let segments: Vec<String> = name
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, KEEP).to_string())
        .collect();
    segments.join("/")
}

/// The renewal margin of a workspace token with this lifetime: a minute, or a tenth of the
/// lifetime for tokens shorter than ten minutes.
fn refresh_margin(lifetime: Duration) -> Duration {
    MAX_REFRESH_MARGIN.min(lifetime / 10)
}

/// The base64 `id:secret` of HTTP Basic, to mask it too if a server echoes it.
fn basic_credentials(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
}

pub(crate) fn sensitive_header(value: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(value).ok()?;
    header.set_sensitive(true);
    Some(header)
}

pub(crate) fn parse_json(path: &str, body: &[u8]) -> Result<Value> {
    // Parsing into a `Value` first keeps serde's messages to positions: a typed struct's
    // "invalid type" message would quote the offending value, which may be a secret.
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(malformed(path, "the answer is not a JSON object")),
        Err(e) => Err(Error::HttpTransport {
            endpoint: path.to_owned(),
            what: "the answer is not valid JSON".to_owned(),
            source: Some(Box::new(e)),
        }),
    }
}

pub(crate) fn malformed(path: &str, what: &str) -> Error {
    Error::HttpTransport {
        endpoint: path.to_owned(),
        what: what.to_owned(),
        source: None,
    }
}

/// What errors name of an HTTP call: scheme, host, port and path; never a query string.
pub(crate) fn endpoint_of(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

fn metadata_path(url: &str) -> String {
    Url::parse(url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default()
}

pub(crate) fn is_loopback(url: &Url) -> bool {
    matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
}

/// An absolute http(s) URL that may carry credentials: https, or http on loopback only.
pub(crate) fn parse_url(raw: &str, setting: Setting) -> Result<Url> {
    // The parse error never quotes the input, which could hold a password in its userinfo.
    let url = Url::parse(raw.trim())
        .map_err(|e| Error::config(setting, format!("not an absolute URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(
            setting,
            "must not carry a user name or password",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::config(setting, "has no host"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Error::config(
            setting,
            "must use https:// (http:// is accepted only for 127.0.0.1 and localhost)",
        )),
        _ => Err(Error::config(setting, "must be an https:// URL")),
    }
}

fn parse_base_url(raw: &str, setting: Setting) -> Result<Url> {
    let url = parse_url(&with_scheme(raw), setting)?;
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(Error::config(
            setting,
            "must be the workspace URL alone, such as https://my-workspace.cloud.databricks.com",
        ));
    }
    Ok(url)
}

/// `raw`, a workspace URL as written, trimmed, with `https://` when it names no scheme, as
/// the Databricks SDKs add it.
fn with_scheme(raw: &str) -> std::borrow::Cow<'_, str> {
    let raw = raw.trim();
    match raw.contains("://") {
        true => raw.into(),
        false => format!("https://{raw}").into(),
    }
}

/// Whether two workspace URLs as written in settings or profiles both parse and name
/// different workspaces: another scheme, host or port, whatever the path or query (an Azure
/// profile's `/?o=<workspace id>`, say). A URL that does not parse is left to the check
/// that reads it.
pub(crate) fn other_workspaces(a: &str, b: &str) -> bool {
    let origin = |raw: &str| {
        let url = Url::parse(&with_scheme(raw)).ok()?;
        Some((
            url.scheme().to_owned(),
            url.host_str()?.to_owned(),
            url.port_or_known_default()?,
        ))
    };
    matches!((origin(a), origin(b)), (Some(a), Some(b)) if a != b)
}

/// A workspace URL as settings and profiles write it, shown as its scheme, host and port
/// alone (a user name or password in it is not); `None` when it does not parse.
pub(crate) fn workspace_origin(raw: &str) -> Option<String> {
    let url = Url::parse(&with_scheme(raw)).ok()?;
    Some(url.origin().ascii_serialization())
}

/// Refuses an OAuth client id that is empty or holds white space or a control character:
/// none has any, and a service principal's is also the database user, where a newline (from
/// a secret made from a file) would be reported as the user's.
fn check_client_id(id: &str) -> Result<()> {
    check_oauth_value(
        Setting::DatabricksClientId,
        id,
        ": an OAuth client id has none",
    )
}

/// Refuses an OAuth value of `setting` that is empty or holds white space or a control
/// character, naming the character (never the value) and then `why`.
fn check_oauth_value(setting: Setting, value: &str, why: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::config(setting, "must not be empty"));
    }
    match value.chars().find(|c| c.is_control() || c.is_whitespace()) {
        Some(c) => Err(Error::config(
            setting,
            format!("contains the white-space or control character {c:?}{why}"),
        )),
        None => Ok(()),
    }
}

/// Refuses client credentials that HTTP Basic authentication (RFC 7617) cannot carry as
/// given: a client id that [`check_client_id`] refuses or that holds `:` (where Basic
/// authentication ends the id), or a client secret that is empty or holds white space or a
/// control character (a secret made from a file keeps its newline), naming the character but
/// never the secret.
fn check_client_credentials(id: &str, secret: &SecretString) -> Result<()> {
    check_client_id(id)?;
    if id.contains(':') {
        return Err(Error::config(
            Setting::DatabricksClientId,
            "contains ':', which HTTP Basic authentication reads as the end of the client id: \
             a Databricks OAuth client id has none",
        ));
    }
    check_oauth_value(
        Setting::DatabricksClientSecret,
        secret.expose_secret(),
        " (a secret read from a file keeps its last newline): remove it; an OAuth secret has \
         none",
    )
}

/// Refuses a target that is not one resource: a name that is empty, holds `/`, white space
/// or a control character, or is a dot segment (`.` or `..`, which a URL path resolves to
/// another resource, escaped or not).
fn validate_target(target: &LakebaseTarget) -> Result<()> {
    let is_name = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && !s.contains('/')
            && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    match target {
        LakebaseTarget::Autoscaling { endpoint } => {
            let parts: Vec<&str> = endpoint.split('/').collect();
            let well_formed = matches!(
                parts.as_slice(),
                ["projects", p, "branches", b, "endpoints", e]
                    if is_name(p) && is_name(b) && is_name(e)
            );
            if !well_formed {
                return Err(Error::config(
                    Setting::LakebaseEndpoint,
                    "must look like projects/<project>/branches/<branch>/endpoints/<endpoint>",
                ));
            }
        }
        LakebaseTarget::Provisioned { instance } => {
            if !is_name(instance) {
                return Err(Error::config(
                    Setting::LakebaseInstance,
                    "must be a database instance name: not empty, not . or .., without '/' or \
                     spaces",
                ));
            }
        }
    }
    Ok(())
}

/// The HTTP client of the platform's APIs, trusting the public roots; `loopback` (a local
/// emulator) bypasses any proxy.
pub(crate) fn build_client(loopback: bool) -> Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    client_trusting(roots, loopback)
}

/// The HTTP client, trusting `roots`.
fn client_trusting(roots: rustls::RootCertStore, loopback: bool) -> Result<reqwest::Client> {
    let client_error = |e: Box<dyn std::error::Error + Send + Sync>| Error::Credential {
        source_kind: KIND,
        source: e,
    };
    // An explicit provider, so that no other crate can switch the process to another backend.
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| client_error(Box::new(e)))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // reqwest leaves ALPN of a preconfigured config alone. HTTP/1.1 only: the client is built
    // without HTTP/2, and hyper panics on a connection a server switched to it.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // A redirect would carry the credentials somewhere nobody configured.
        .redirect(reqwest::redirect::Policy::none());
    if loopback {
        builder = builder.no_proxy();
    }
    builder.build().map_err(|e| client_error(Box::new(e)))
}

#[cfg(test)]
mod tests;
