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

use super::{BoxFuture, Clock, CredentialSource, SystemClock, Token};
use crate::{Error, Result};

const KIND: &str = "lakebase";
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The workspace token is renewed when less than this, or a tenth of its lifetime if that is
/// shorter, remains: enough to cover one credential call at the default timeout.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Every answer of these APIs is a few hundred bytes; a larger one is not theirs.
const MAX_BODY: usize = 1 << 20;
const MAX_ERROR_MESSAGE: usize = 300;
const REDACTED: &str = "** redacted **";
const PAT_HEADER_REASON: &str = "holds characters not allowed in an HTTP header";

const DATABRICKS_CONFIG_PATH: &str = "/.well-known/databricks-config";
const OAUTH_METADATA_SUFFIX: &str = "/.well-known/oauth-authorization-server";
const HOST_OIDC_METADATA_PATH: &str = "/oidc/.well-known/oauth-authorization-server";
const DEFAULT_TOKEN_PATH: &str = "/oidc/v1/token";
const AUTOSCALING_PATH: &str = "/api/2.0/postgres/credentials";
const PROVISIONED_PATH: &str = "/api/2.0/database/credentials";
const WORKSPACE_ID_HEADER: &str = "x-databricks-workspace-id";
const TOKEN_REQUEST_BODY: &str = "grant_type=client_credentials&scope=all-apis";

/// How this source authenticates to the Databricks workspace before asking for a database
/// credential.
#[derive(Clone)]
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
        }
    }
}

/// Which Lakebase database the credential is for.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    host: String,
    auth: WorkspaceAuth,
    target: LakebaseTarget,
    token_url: Option<Url>,
    workspace_id: Option<String>,
    http_timeout: Duration,
    clock: Arc<dyn Clock>,
    user_agent: String,
    client: reqwest::Client,
    /// Held across discovery and the token call, so that concurrent callers wait for one
    /// refresh instead of each starting their own.
    state: Mutex<AuthState>,
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
}

struct Discovery {
    token_url: Url,
    workspace_id: Option<String>,
}

struct WorkspaceToken {
    authorization: HeaderValue,
    access_token: SecretString,
    refresh_at: SystemTime,
    generation: u64,
}

/// What a credential call is authorized with.
struct Authorization {
    header: HeaderValue,
    /// `None` for a personal access token, which is never evicted.
    generation: Option<u64>,
    workspace_id: Option<String>,
    access_token: Option<SecretString>,
}

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Lakebase {
    /// A source for `target` in the workspace at `host`, such as
    /// `https://my-workspace.cloud.databricks.com` (a host without a scheme gets `https://`;
    /// `http://` is accepted only for `127.0.0.1` and `localhost`).
    ///
    /// Checks the settings and builds the HTTP client; makes no call.
    pub fn new(host: &str, auth: WorkspaceAuth, target: LakebaseTarget) -> Result<Self> {
        let host = parse_base_url(host, "Lakebase host")?;
        let token_url = match &auth {
            WorkspaceAuth::ClientCredentials {
                client_id,
                client_secret,
                token_url,
            } => {
                if client_id.trim().is_empty() {
                    return Err(Error::config(
                        "WorkspaceAuth::ClientCredentials client_id",
                        "must not be empty",
                    ));
                }
                if client_secret.expose_secret().is_empty() {
                    return Err(Error::config(
                        "WorkspaceAuth::ClientCredentials client_secret",
                        "must not be empty",
                    ));
                }
                token_url
                    .as_deref()
                    .map(|url| parse_url(url, "WorkspaceAuth::ClientCredentials token_url"))
                    .transpose()?
            }
            WorkspaceAuth::Pat(_) => None,
        };
        if let WorkspaceAuth::Pat(pat) = &auth {
            let pat = pat.expose_secret();
            if pat.is_empty() {
                return Err(Error::config("WorkspaceAuth::Pat", "must not be empty"));
            }
            if sensitive_header(&format!("Bearer {pat}")).is_none() {
                return Err(Error::config("WorkspaceAuth::Pat", PAT_HEADER_REASON));
            }
        }
        validate_target(&target)?;
        let loopback = is_loopback(&host);
        let client = build_client(loopback)?;
        Ok(Self {
            host: host.as_str().trim_end_matches('/').to_owned(),
            auth,
            target,
            token_url,
            workspace_id: None,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
            clock: Arc::new(SystemClock),
            user_agent: format!("dal/{}", env!("CARGO_PKG_VERSION")),
            client,
            state: Mutex::new(AuthState::default()),
        })
    }

    /// Sends `X-Databricks-Workspace-Id: <id>` on credential calls. Defaults to the
    /// `workspace_id` of the workspace's `/.well-known/databricks-config` when token endpoint
    /// discovery ran, and to no header otherwise.
    #[must_use]
    pub fn with_workspace_id(mut self, id: impl Into<String>) -> Self {
        self.workspace_id = Some(id.into());
        self
    }

    /// The longest any single HTTP call may take, from connecting to the last byte of the
    /// answer. Defaults to 10 s.
    #[must_use]
    pub fn with_http_timeout(mut self, d: Duration) -> Self {
        self.http_timeout = d;
        self
    }

    /// The clock that decides when the workspace token is renewed and whether a credential
    /// has already expired. Defaults to [`SystemClock`].
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The `User-Agent` of every HTTP call. Defaults to `dal/<version>`.
    #[must_use]
    pub fn with_user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    async fn database_credential(&self) -> Result<Token> {
        let auth = self.authorization().await?;
        let (path, body) = match &self.target {
            LakebaseTarget::Autoscaling { endpoint } => (
                AUTOSCALING_PATH,
                serde_json::json!({ "endpoint": endpoint }),
            ),
            LakebaseTarget::Provisioned { instance } => (
                PROVISIONED_PATH,
                serde_json::json!({
                    "instance_names": [instance],
                    "request_id": uuid::Uuid::new_v4().to_string(),
                }),
            ),
        };
        let mut request = self
            .client
            .post(format!("{}{path}", self.host))
            .header(AUTHORIZATION, auth.header)
            .header(ACCEPT, "application/json")
            .json(&body);
        if let Some(id) = &auth.workspace_id {
            request = request.header(WORKSPACE_ID_HEADER, id);
        }
        let reply = self.send(path, request).await?;
        if reply.status == StatusCode::UNAUTHORIZED
            && let Some(generation) = auth.generation
        {
            let mut state = self.state.lock().await;
            if state.token.as_ref().map(|t| t.generation) == Some(generation) {
                state.token = None;
            }
        }
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
        let now = self.clock.now();
        if SystemTime::from(expires_at) <= now {
            return Err(Error::Credential {
                source_kind: KIND,
                source: format!(
                    "the credential API returned a credential that expired at {} (now is {}); \
                     check the system clock",
                    expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    chrono::DateTime::<chrono::Utc>::from(now)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                )
                .into(),
            });
        }
        Ok(Token::new(token, Some(expires_at.into())))
    }

    /// The workspace authorization, from the cache when it is fresh enough.
    async fn authorization(&self) -> Result<Authorization> {
        let (client_id, client_secret) = match &self.auth {
            WorkspaceAuth::Pat(pat) => {
                let header = sensitive_header(&format!("Bearer {}", pat.expose_secret()))
                    .ok_or_else(|| Error::config("WorkspaceAuth::Pat", PAT_HEADER_REASON))?;
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
        };
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && self.clock.now() < token.refresh_at
        {
            return Ok(self.authorization_from(&state, token));
        }
        let token_url = match &self.token_url {
            Some(url) => url.clone(),
            None => {
                let discovery = match state.discovery.take() {
                    Some(discovery) => discovery,
                    None => self.discover().await?,
                };
                let url = discovery.token_url.clone();
                state.discovery = Some(discovery);
                url
            }
        };
        let requested_at = self.clock.now();
        let (authorization, access_token, lifetime) = self
            .request_workspace_token(&token_url, client_id, client_secret)
            .await?;
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
        let authorization = self.authorization_from(&state, &token);
        state.token = Some(token);
        Ok(authorization)
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

    async fn request_workspace_token(
        &self,
        token_url: &Url,
        client_id: &str,
        client_secret: &SecretString,
    ) -> Result<(HeaderValue, SecretString, Duration)> {
        let path = token_url.path();
        let request = self
            .client
            .post(token_url.clone())
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(TOKEN_REQUEST_BODY);
        let reply = self.send(path, request).await?;
        if !reply.status.is_success() {
            return Err(self.http_error(path, &reply, None));
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
        Ok((
            authorization,
            SecretString::from(access_token.to_owned()),
            lifetime,
        ))
    }

    /// Finds the token endpoint the way the Databricks SDKs do, newest mechanism first.
    async fn discover(&self) -> Result<Discovery> {
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
                    if let Some(token_url) = self.token_endpoint_from(&metadata).await? {
                        return Ok(Discovery {
                            token_url,
                            workspace_id,
                        });
                    }
                }
            }
        }
        let metadata = format!("{}{HOST_OIDC_METADATA_PATH}", self.host);
        let token_url = match self.token_endpoint_from(&metadata).await? {
            Some(url) => url,
            None => parse_url(
                &format!("{}{DEFAULT_TOKEN_PATH}", self.host),
                "Lakebase host",
            )?,
        };
        Ok(Discovery {
            token_url,
            workspace_id,
        })
    }

    async fn token_endpoint_from(&self, metadata_url: &str) -> Result<Option<Url>> {
        let Some(doc) = self.get_json(metadata_url).await? else {
            return Ok(None);
        };
        let url = doc
            .get("token_endpoint")
            .and_then(Value::as_str)
            .and_then(|u| parse_url(u, "token_endpoint").ok());
        if url.is_none() {
            tracing::debug!(
                document = metadata_path(metadata_url),
                "no usable https token_endpoint in the OAuth metadata"
            );
        }
        Ok(url)
    }

    /// A discovery document: `None` when it is absent or not a JSON object, so that the next
    /// mechanism is tried; an error only when the server cannot be reached.
    async fn get_json(&self, url: &str) -> Result<Option<Value>> {
        let Ok(parsed) = parse_url(url, "discovery URL") else {
            return Ok(None);
        };
        let path = parsed.path().to_owned();
        let request = self.client.get(parsed).header(ACCEPT, "application/json");
        let reply = self.send(&path, request).await?;
        if !reply.status.is_success() {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .filter(Value::is_object))
    }

    /// Sends one request within the timeout and reads the whole answer.
    async fn send(&self, path: &str, request: reqwest::RequestBuilder) -> Result<Reply> {
        enum Failure {
            Http(reqwest::Error),
            TooLarge,
        }
        let started = Instant::now();
        let request = request.header(USER_AGENT, &self.user_agent);
        let outcome = tokio::time::timeout(self.http_timeout, async {
            let mut response = request.send().await.map_err(Failure::Http)?;
            let status = response.status();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(Failure::Http)? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(Failure::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Reply { status, body })
        })
        .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (what, source): (String, Option<Box<dyn std::error::Error + Send + Sync>>) =
            match outcome {
                Ok(Ok(reply)) => {
                    tracing::debug!(
                        path,
                        status = reply.status.as_u16(),
                        elapsed_ms,
                        "lakebase HTTP call"
                    );
                    return Ok(reply);
                }
                Err(_) => (
                    format!("no complete answer within {:?}", self.http_timeout),
                    None,
                ),
                Ok(Err(Failure::TooLarge)) => {
                    (format!("the answer is larger than {MAX_BODY} bytes"), None)
                }
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

    /// Maps a vendor error answer, whichever of the Databricks error shapes it has.
    fn http_error(&self, path: &str, reply: &Reply, token: Option<&SecretString>) -> Error {
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
        }
    }

    /// Makes text from a server safe to show: the secrets this source knows are masked (a
    /// misbehaving proxy may echo a request back), control characters flattened, and the
    /// length bounded.
    fn scrub(&self, text: &str, token: Option<&SecretString>) -> String {
        let mut text = text.to_owned();
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
        }
        if let Some(token) = token {
            secrets.push(token.expose_secret());
        }
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            text = text.replace(secret, REDACTED);
        }
        let mut text: String = text
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

impl CredentialSource for Lakebase {
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        Box::pin(self.database_credential())
    }

    fn kind(&self) -> &'static str {
        KIND
    }
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

fn sensitive_header(value: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(value).ok()?;
    header.set_sensitive(true);
    Some(header)
}

fn parse_json(path: &str, body: &[u8]) -> Result<Value> {
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

fn malformed(path: &str, what: &str) -> Error {
    Error::HttpTransport {
        endpoint: path.to_owned(),
        what: what.to_owned(),
        source: None,
    }
}

fn metadata_path(url: &str) -> String {
    Url::parse(url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default()
}

fn is_loopback(url: &Url) -> bool {
    matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
}

/// An absolute http(s) URL that may carry credentials: https, or http on loopback only.
fn parse_url(raw: &str, setting: &str) -> Result<Url> {
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

fn parse_base_url(raw: &str, setting: &str) -> Result<Url> {
    let raw = raw.trim();
    let with_scheme;
    let raw = if raw.contains("://") {
        raw
    } else {
        with_scheme = format!("https://{raw}");
        &with_scheme
    };
    let url = parse_url(raw, setting)?;
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(Error::config(
            setting,
            "must be the workspace URL alone, such as https://my-workspace.cloud.databricks.com",
        ));
    }
    Ok(url)
}

fn validate_target(target: &LakebaseTarget) -> Result<()> {
    let is_name = |s: &str| {
        !s.is_empty() && !s.contains('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control())
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
                    "LakebaseTarget::Autoscaling endpoint",
                    "must look like projects/<project>/branches/<branch>/endpoints/<endpoint>",
                ));
            }
        }
        LakebaseTarget::Provisioned { instance } => {
            if !is_name(instance) {
                return Err(Error::config(
                    "LakebaseTarget::Provisioned instance",
                    "must be a database instance name: not empty, without '/' or spaces",
                ));
            }
        }
    }
    Ok(())
}

fn build_client(loopback: bool) -> Result<reqwest::Client> {
    let client_error = |e: Box<dyn std::error::Error + Send + Sync>| Error::Credential {
        source_kind: KIND,
        source: e,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // An explicit provider, so that no other crate can switch the process to another backend.
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| client_error(Box::new(e)))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // reqwest leaves ALPN of a preconfigured config alone.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const CLIENT_ID: &str = "my-client";
    const CLIENT_SECRET: &str = "my-secret";
    /// base64("my-client:my-secret")
    const BASIC: &str = "Basic bXktY2xpZW50Om15LXNlY3JldA==";
    const WS_TOKEN: &str = "ws-token-1";
    const DB_TOKEN: &str = "db-token-1";
    const PAT: &str = "dapi-pat-secret";
    const ENDPOINT: &str = "projects/shop/branches/main/endpoints/primary";
    const FAR: &str = "2099-01-01T00:00:00Z";

    #[derive(Debug, Clone)]
    struct Request {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Request {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    enum Reply {
        Json(u16, Value),
        Text(u16, String),
        Slow(Duration, Box<Reply>),
        Hang,
    }

    type Handler = dyn Fn(&Request, &str) -> Reply + Send + Sync;

    /// A scripted HTTP/1.1 server on loopback: one request per connection, every request
    /// recorded, answers chosen by a closure given the request and the server's base URL.
    struct Server {
        base: String,
        log: Arc<StdMutex<Vec<Request>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        async fn start(handler: impl Fn(&Request, &str) -> Reply + Send + Sync + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let log = Arc::new(StdMutex::new(Vec::new()));
            let handler: Arc<Handler> = Arc::new(handler);
            let task = tokio::spawn({
                let (base, log) = (base.clone(), log.clone());
                async move {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            return;
                        };
                        let (base, log, handler) = (base.clone(), log.clone(), handler.clone());
                        tokio::spawn(async move {
                            let _ = serve(stream, &base, &log, &*handler).await;
                        });
                    }
                }
            });
            Self { base, log, task }
        }

        fn requests(&self) -> Vec<Request> {
            self.log.lock().unwrap().clone()
        }

        fn paths(&self) -> Vec<String> {
            self.requests().into_iter().map(|r| r.path).collect()
        }

        fn count(&self, path: &str) -> usize {
            self.requests().iter().filter(|r| r.path == path).count()
        }
    }

    async fn serve(
        mut stream: TcpStream,
        base: &str,
        log: &StdMutex<Vec<Request>>,
        handler: &Handler,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let path = request_line.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let request = Request {
            method,
            path,
            headers,
            body: String::from_utf8_lossy(&buf[head_end..]).into_owned(),
        };
        log.lock().unwrap().push(request.clone());
        let mut reply = handler(&request, base);
        let (status, content_type, body) = loop {
            match reply {
                Reply::Json(status, value) => {
                    break (status, "application/json", value.to_string());
                }
                Reply::Text(status, text) => break (status, "text/html", text),
                Reply::Slow(delay, next) => {
                    tokio::time::sleep(delay).await;
                    reply = *next;
                }
                Reply::Hang => std::future::pending::<()>().await,
            }
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    }

    /// A well-behaved workspace with no discovery documents.
    fn workspace(request: &Request, _base: &str) -> Reply {
        match request.path.as_str() {
            "/oidc/v1/token" => token_reply(WS_TOKEN, 3600),
            AUTOSCALING_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": FAR })),
            PROVISIONED_PATH => {
                Reply::Json(200, json!({ "token": DB_TOKEN, "expiration_time": FAR }))
            }
            _ => not_found(),
        }
    }

    fn token_reply(token: &str, expires_in: u64) -> Reply {
        Reply::Json(
            200,
            json!({ "access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": "all-apis" }),
        )
    }

    fn not_found() -> Reply {
        Reply::Json(
            404,
            json!({ "error_code": "NOT_FOUND", "message": "no such path" }),
        )
    }

    fn m2m() -> WorkspaceAuth {
        m2m_with_token_url(None)
    }

    fn m2m_with_token_url(token_url: Option<String>) -> WorkspaceAuth {
        WorkspaceAuth::ClientCredentials {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            token_url,
        }
    }

    fn autoscaling() -> LakebaseTarget {
        LakebaseTarget::Autoscaling {
            endpoint: ENDPOINT.into(),
        }
    }

    fn source(server: &Server) -> Lakebase {
        Lakebase::new(&server.base, m2m(), autoscaling()).unwrap()
    }

    fn default_user_agent() -> String {
        format!("dal/{}", env!("CARGO_PKG_VERSION"))
    }

    struct ManualClock(StdMutex<SystemTime>);

    impl ManualClock {
        fn new() -> Arc<Self> {
            Arc::new(Self(StdMutex::new(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            )))
        }
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    fn assert_http(err: Error, endpoint: &str, status: u16, code: &str, message: &str) {
        match err {
            Error::Http {
                endpoint: e,
                status: s,
                code: c,
                message: m,
            } => {
                assert_eq!(
                    (e.as_str(), s, c.as_str(), m.as_str()),
                    (endpoint, status, code, message)
                );
            }
            other => panic!("expected Error::Http, got {other:?}"),
        }
    }

    fn assert_transport(err: &Error, endpoint: &str) {
        match err {
            Error::HttpTransport { endpoint: e, .. } => assert_eq!(e, endpoint),
            other => panic!("expected Error::HttpTransport, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn token_call_sends_the_exact_form_body_and_basic_auth() {
        let server = Server::start(workspace).await;
        let token = source(&server).fetch().await.unwrap();
        assert_eq!(token.expose(), DB_TOKEN);

        let requests = server.requests();
        let call = requests
            .iter()
            .find(|r| r.path == "/oidc/v1/token")
            .unwrap();
        assert_eq!(call.method, "POST");
        assert_eq!(call.body, "grant_type=client_credentials&scope=all-apis");
        assert_eq!(call.header("authorization"), Some(BASIC));
        assert_eq!(
            call.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert!(!call.body.contains(CLIENT_ID) && !call.body.contains(CLIENT_SECRET));

        let credential = requests
            .iter()
            .find(|r| r.path == AUTOSCALING_PATH)
            .unwrap();
        assert_eq!(
            credential.header("authorization"),
            Some(format!("Bearer {WS_TOKEN}").as_str())
        );
    }

    #[tokio::test]
    async fn discovery_follows_the_databricks_config_first() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DATABRICKS_CONFIG_PATH => Reply::Json(
                200,
                json!({
                    "oidc_endpoint": format!("{base}/oidc/accounts/{{account_id}}/"),
                    "account_id": "acc-7",
                    "workspace_id": 1234567890_u64,
                    "cloud": "aws",
                }),
            ),
            "/oidc/accounts/acc-7/.well-known/oauth-authorization-server" => Reply::Json(
                200,
                json!({ "token_endpoint": format!("{base}/oidc/accounts/acc-7/v1/token") }),
            ),
            "/oidc/accounts/acc-7/v1/token" => token_reply(WS_TOKEN, 3600),
            _ => workspace(r, base),
        })
        .await;
        source(&server).fetch().await.unwrap();
        assert_eq!(
            server.paths(),
            [
                DATABRICKS_CONFIG_PATH,
                "/oidc/accounts/acc-7/.well-known/oauth-authorization-server",
                "/oidc/accounts/acc-7/v1/token",
                AUTOSCALING_PATH,
            ]
        );
        let credential = server.requests().pop().unwrap();
        assert_eq!(
            credential.header("x-databricks-workspace-id"),
            Some("1234567890")
        );
    }

    #[tokio::test]
    async fn discovery_falls_back_to_the_workspace_oauth_metadata() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            HOST_OIDC_METADATA_PATH => Reply::Json(
                200,
                json!({ "issuer": format!("{base}/oidc"), "token_endpoint": format!("{base}/oidc/v2/token") }),
            ),
            "/oidc/v2/token" => token_reply(WS_TOKEN, 3600),
            _ => workspace(r, base),
        })
        .await;
        source(&server).fetch().await.unwrap();
        assert_eq!(
            server.paths(),
            [
                DATABRICKS_CONFIG_PATH,
                HOST_OIDC_METADATA_PATH,
                "/oidc/v2/token",
                AUTOSCALING_PATH,
            ]
        );
        let credential = server.requests().pop().unwrap();
        assert_eq!(credential.header("x-databricks-workspace-id"), None);
    }

    #[tokio::test]
    async fn discovery_ends_at_the_default_token_path() {
        // An HTML page with status 200 is what some front ends serve for unknown paths.
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DATABRICKS_CONFIG_PATH => Reply::Text(200, "<html>workspace</html>".into()),
            _ => workspace(r, base),
        })
        .await;
        source(&server).fetch().await.unwrap();
        assert_eq!(
            server.paths(),
            [
                DATABRICKS_CONFIG_PATH,
                HOST_OIDC_METADATA_PATH,
                DEFAULT_TOKEN_PATH,
                AUTOSCALING_PATH,
            ]
        );
    }

    #[tokio::test]
    async fn discovery_ignores_a_plain_http_token_endpoint_elsewhere() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            HOST_OIDC_METADATA_PATH => Reply::Json(
                200,
                json!({ "token_endpoint": "http://attacker.example/token" }),
            ),
            _ => workspace(r, base),
        })
        .await;
        source(&server).fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 1);
    }

    #[tokio::test]
    async fn an_explicit_token_url_skips_discovery() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            "/custom/token" => token_reply(WS_TOKEN, 3600),
            _ => workspace(r, base),
        })
        .await;
        let auth = m2m_with_token_url(Some(format!("{}/custom/token", server.base)));
        let lakebase = Lakebase::new(&server.base, auth, autoscaling()).unwrap();
        lakebase.fetch().await.unwrap();
        assert_eq!(server.paths(), ["/custom/token", AUTOSCALING_PATH]);
    }

    #[tokio::test]
    async fn the_workspace_token_is_reused_then_renewed_near_expiry() {
        let issued = Arc::new(AtomicUsize::new(0));
        let server = Server::start({
            let issued = issued.clone();
            move |r: &Request, base: &str| match r.path.as_str() {
                DEFAULT_TOKEN_PATH => {
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    token_reply(&format!("ws-token-{n}"), 3600)
                }
                _ => workspace(r, base),
            }
        })
        .await;
        let clock = ManualClock::new();
        let lakebase = source(&server).with_clock(clock.clone());
        let bearer = |server: &Server| {
            server
                .requests()
                .iter()
                .rev()
                .find(|r| r.path == AUTOSCALING_PATH)
                .and_then(|r| r.header("authorization").map(str::to_owned))
                .unwrap()
        };

        lakebase.fetch().await.unwrap();
        lakebase.fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 1);
        assert_eq!(server.count(AUTOSCALING_PATH), 2);

        // A 3600 s token is renewed 60 s before it expires.
        clock.advance(Duration::from_secs(3539));
        lakebase.fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 1);
        assert_eq!(bearer(&server), "Bearer ws-token-1");

        clock.advance(Duration::from_secs(2));
        lakebase.fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 2);
        assert_eq!(bearer(&server), "Bearer ws-token-2");
        // Discovery is remembered across renewals.
        assert_eq!(server.count(DATABRICKS_CONFIG_PATH), 1);
        assert_eq!(server.count(HOST_OIDC_METADATA_PATH), 1);
    }

    #[test]
    fn the_refresh_margin_is_a_minute_or_a_tenth_of_short_lifetimes() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(300)),
            Duration::from_secs(30)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_fetches_on_a_cold_source_share_one_token_call() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => Reply::Slow(
                Duration::from_millis(200),
                Box::new(token_reply(WS_TOKEN, 3600)),
            ),
            _ => workspace(r, base),
        })
        .await;
        let lakebase = Arc::new(source(&server));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let lakebase = lakebase.clone();
                tokio::spawn(async move { lakebase.fetch().await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap().expose(), DB_TOKEN);
        }
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 1);
        assert_eq!(server.count(DATABRICKS_CONFIG_PATH), 1);
        assert_eq!(server.count(AUTOSCALING_PATH), 50);
    }

    #[tokio::test]
    async fn autoscaling_credential_request_and_answer() {
        let server = Server::start(workspace).await;
        let token = source(&server).fetch().await.unwrap();
        assert_eq!(token.expose(), DB_TOKEN);
        assert_eq!(
            token.expires_at(),
            Some(SystemTime::from(
                chrono::DateTime::parse_from_rfc3339(FAR).unwrap()
            ))
        );
        let call = server.requests().pop().unwrap();
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            ("POST", AUTOSCALING_PATH)
        );
        assert_eq!(
            serde_json::from_str::<Value>(&call.body).unwrap(),
            json!({ "endpoint": ENDPOINT })
        );
        assert_eq!(call.header("content-type"), Some("application/json"));
        assert_eq!(call.header("accept"), Some("application/json"));
    }

    #[tokio::test]
    async fn provisioned_credential_request_carries_a_uuid4_request_id() {
        let server = Server::start(workspace).await;
        let target = LakebaseTarget::Provisioned {
            instance: "orders-db".into(),
        };
        let lakebase = Lakebase::new(&server.base, m2m(), target).unwrap();
        let token = lakebase.fetch().await.unwrap();
        assert_eq!(token.expose(), DB_TOKEN);
        assert!(token.expires_at().is_some());
        lakebase.fetch().await.unwrap();

        let calls: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.path == PROVISIONED_PATH)
            .collect();
        let mut ids = Vec::new();
        for call in &calls {
            let body: Value = serde_json::from_str(&call.body).unwrap();
            assert_eq!(body["instance_names"], json!(["orders-db"]));
            let id = uuid::Uuid::parse_str(body["request_id"].as_str().unwrap()).unwrap();
            assert_eq!(id.get_version_num(), 4);
            assert_eq!(body.as_object().unwrap().len(), 2);
            ids.push(id);
        }
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
    }

    #[tokio::test]
    async fn either_expiry_field_name_is_accepted() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Json(
                200,
                json!({ "token": DB_TOKEN, "expiration_time": "2099-01-01T00:00:00.5+01:00" }),
            ),
            PROVISIONED_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": FAR })),
            _ => workspace(r, base),
        })
        .await;
        let expected = SystemTime::from(
            chrono::DateTime::parse_from_rfc3339("2098-12-31T23:00:00.5Z").unwrap(),
        );
        let token = source(&server).fetch().await.unwrap();
        assert_eq!(token.expires_at(), Some(expected));
        let target = LakebaseTarget::Provisioned {
            instance: "orders-db".into(),
        };
        let token = Lakebase::new(&server.base, m2m(), target)
            .unwrap()
            .fetch()
            .await
            .unwrap();
        assert!(token.expires_at().is_some());
    }

    #[tokio::test]
    async fn every_request_carries_the_user_agent() {
        let server = Server::start(workspace).await;
        source(&server).fetch().await.unwrap();
        let requests = server.requests();
        assert_eq!(requests.len(), 4);
        for request in &requests {
            assert_eq!(
                request.header("user-agent"),
                Some(default_user_agent().as_str()),
                "{}",
                request.path
            );
        }

        let server = Server::start(workspace).await;
        source(&server)
            .with_user_agent("shop_orders/2.1")
            .fetch()
            .await
            .unwrap();
        for request in &server.requests() {
            assert_eq!(request.header("user-agent"), Some("shop_orders/2.1"));
        }
    }

    #[tokio::test]
    async fn an_explicit_workspace_id_is_sent_and_wins() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DATABRICKS_CONFIG_PATH => Reply::Json(
                200,
                json!({ "oidc_endpoint": format!("{base}/oidc"), "workspace_id": "111" }),
            ),
            _ => workspace(r, base),
        })
        .await;
        source(&server)
            .with_workspace_id("222")
            .fetch()
            .await
            .unwrap();
        let credential = server.requests().pop().unwrap();
        assert_eq!(credential.header("x-databricks-workspace-id"), Some("222"));
        let token_call = server
            .requests()
            .into_iter()
            .find(|r| r.path == DEFAULT_TOKEN_PATH)
            .unwrap();
        assert_eq!(token_call.header("x-databricks-workspace-id"), None);
    }

    #[tokio::test]
    async fn a_pat_calls_the_credential_api_directly() {
        let server = Server::start(workspace).await;
        let lakebase = Lakebase::new(&server.base, WorkspaceAuth::Pat(PAT.into()), autoscaling())
            .unwrap()
            .with_workspace_id("42");
        assert_eq!(lakebase.fetch().await.unwrap().expose(), DB_TOKEN);
        assert_eq!(server.paths(), [AUTOSCALING_PATH]);
        let call = server.requests().pop().unwrap();
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {PAT}").as_str())
        );
        assert_eq!(call.header("x-databricks-workspace-id"), Some("42"));
    }

    #[tokio::test]
    async fn an_oauth_error_maps_to_http_error() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => Reply::Json(
                401,
                json!({ "error": "invalid_client", "error_description": "Client authentication failed" }),
            ),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "/oidc/v1/token answered HTTP 401: invalid_client: Client authentication failed"
        );
        assert_http(
            err,
            DEFAULT_TOKEN_PATH,
            401,
            "invalid_client",
            "Client authentication failed",
        );
        assert_eq!(server.count(AUTOSCALING_PATH), 0);
    }

    #[tokio::test]
    async fn an_error_code_summary_body_maps_to_http_error() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => Reply::Json(
                400,
                json!({ "errorCode": "invalid_scope", "errorSummary": "The scope is not allowed" }),
            ),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_http(
            err,
            DEFAULT_TOKEN_PATH,
            400,
            "invalid_scope",
            "The scope is not allowed",
        );
    }

    #[tokio::test]
    async fn an_api_error_maps_to_http_error() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Json(
                403,
                json!({ "error_code": "PERMISSION_DENIED", "message": "No access to endpoint primary" }),
            ),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_http(
            err,
            AUTOSCALING_PATH,
            403,
            "PERMISSION_DENIED",
            "No access to endpoint primary",
        );
    }

    #[tokio::test]
    async fn a_non_json_error_body_is_flattened_truncated_and_scrubbed() {
        let page = format!(
            "<html>\n<h1>502 Bad Gateway</h1>\n<pre>Authorization: {BASIC} secret={CLIENT_SECRET} bearer {WS_TOKEN}</pre>{}</html>",
            "x".repeat(1000)
        );
        let server = Server::start(move |r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Text(502, page.clone()),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        let shown = format!("{err} {err:?}");
        for secret in [CLIENT_SECRET, WS_TOKEN, "bXktY2xpZW50Om15LXNlY3JldA=="] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        let Error::Http {
            endpoint,
            status,
            code,
            message,
        } = err
        else {
            panic!("expected Error::Http, got {err:?}");
        };
        assert_eq!((endpoint.as_str(), status), (AUTOSCALING_PATH, 502));
        assert_eq!(code, "Bad Gateway");
        assert!(
            message.starts_with(
                "<html> <h1>502 Bad Gateway</h1> <pre>Authorization: Basic ** redacted ** \
                 secret=** redacted ** bearer ** redacted **</pre>xxx"
            ),
            "{message}"
        );
        assert!(message.ends_with("..."), "{message}");
        assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE + 3);
    }

    #[tokio::test]
    async fn malformed_success_json_is_a_transport_error() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => Reply::Text(200, "{\"access_token\": ".into()),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_transport(&err, DEFAULT_TOKEN_PATH);
        assert_eq!(
            err.to_string(),
            "/oidc/v1/token: the answer is not valid JSON"
        );

        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Json(200, json!(["not", "an", "object"])),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_transport(&err, AUTOSCALING_PATH);
    }

    #[tokio::test]
    async fn a_missing_token_or_expiry_is_a_transport_error() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => {
                Reply::Json(200, json!({ "token_type": "Bearer", "expires_in": 3600 }))
            }
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "/oidc/v1/token: the answer has no access_token"
        );

        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Json(200, json!({ "expire_time": FAR })),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "/api/2.0/postgres/credentials: the answer has no token"
        );

        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => Reply::Json(200, json!({ "token": DB_TOKEN })),
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_transport(&err, AUTOSCALING_PATH);
        assert!(!format!("{err:?}").contains(DB_TOKEN));

        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            AUTOSCALING_PATH => {
                Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": "tomorrow" }))
            }
            _ => workspace(r, base),
        })
        .await;
        let err = source(&server).fetch().await.unwrap_err();
        assert_transport(&err, AUTOSCALING_PATH);
    }

    #[tokio::test]
    async fn a_credential_that_already_expired_is_refused() {
        let server = Server::start(workspace).await;
        let clock = ManualClock::new();
        // The injected clock says 2103; the answer says 2099.
        clock.advance(Duration::from_secs(2_400_000_000));
        let err = source(&server).with_clock(clock).fetch().await.unwrap_err();
        let Error::Credential {
            source_kind,
            source,
        } = &err
        else {
            panic!("expected Error::Credential, got {err:?}");
        };
        assert_eq!(*source_kind, "lakebase");
        assert_eq!(
            source.to_string(),
            "the credential API returned a credential that expired at 2099-01-01T00:00:00Z \
             (now is 2103-02-04T02:40:00Z); check the system clock"
        );
        assert!(!format!("{err:?}").contains(DB_TOKEN));
    }

    #[tokio::test]
    async fn a_hanging_endpoint_times_out_quickly_on_every_call() {
        for hanging in [
            DATABRICKS_CONFIG_PATH,
            HOST_OIDC_METADATA_PATH,
            DEFAULT_TOKEN_PATH,
            AUTOSCALING_PATH,
        ] {
            let server = Server::start(move |r: &Request, base: &str| {
                if r.path == hanging {
                    Reply::Hang
                } else {
                    workspace(r, base)
                }
            })
            .await;
            let lakebase = source(&server).with_http_timeout(Duration::from_millis(200));
            let started = Instant::now();
            let err = lakebase.fetch().await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2), "{hanging}");
            assert_transport(&err, hanging);
            assert_eq!(
                err.to_string(),
                format!("{hanging}: no complete answer within 200ms")
            );
        }
    }

    #[tokio::test]
    async fn a_slow_body_counts_against_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let _server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"token\":")
                .await;
            std::future::pending::<()>().await;
        });
        let lakebase = Lakebase::new(&base, WorkspaceAuth::Pat(PAT.into()), autoscaling())
            .unwrap()
            .with_http_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let err = lakebase.fetch().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_transport(&err, AUTOSCALING_PATH);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_transport_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let lakebase = Lakebase::new(&base, WorkspaceAuth::Pat(PAT.into()), autoscaling()).unwrap();
        let err = lakebase.fetch().await.unwrap_err();
        assert_transport(&err, AUTOSCALING_PATH);
        assert_eq!(
            err.to_string(),
            "/api/2.0/postgres/credentials: cannot connect"
        );
    }

    #[tokio::test]
    async fn a_401_from_the_credential_api_drops_the_workspace_token() {
        let calls = Arc::new(AtomicUsize::new(0));
        let server = Server::start({
            let calls = calls.clone();
            move |r: &Request, base: &str| match r.path.as_str() {
                AUTOSCALING_PATH if calls.fetch_add(1, Ordering::SeqCst) == 1 => Reply::Json(
                    401,
                    json!({ "error_code": "UNAUTHENTICATED", "message": "Token expired" }),
                ),
                _ => workspace(r, base),
            }
        })
        .await;
        let lakebase = source(&server);
        lakebase.fetch().await.unwrap();
        let err = lakebase.fetch().await.unwrap_err();
        assert_http(
            err,
            AUTOSCALING_PATH,
            401,
            "UNAUTHENTICATED",
            "Token expired",
        );
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 1);
        lakebase.fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 2);
        assert_eq!(server.count(DATABRICKS_CONFIG_PATH), 1);
    }

    #[tokio::test]
    async fn a_token_without_lifetime_is_not_reused() {
        let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
            DEFAULT_TOKEN_PATH => Reply::Json(200, json!({ "access_token": WS_TOKEN })),
            _ => workspace(r, base),
        })
        .await;
        let lakebase = source(&server);
        lakebase.fetch().await.unwrap();
        lakebase.fetch().await.unwrap();
        assert_eq!(server.count(DEFAULT_TOKEN_PATH), 2);
    }

    #[test]
    fn bad_settings_are_config_errors_naming_the_setting() {
        let setting_of = |result: Result<Lakebase>| match result {
            Err(Error::Config { setting, .. }) => setting,
            other => panic!("expected Error::Config, got {other:?}"),
        };
        let host = "https://my.cloud.databricks.com";
        for endpoint in [
            "",
            "primary",
            "projects/shop/branches/main/endpoints/",
            "projects/shop/branches/main/endpoints/primary/extra",
            "/projects/shop/branches/main/endpoints/primary",
            "projects/shop/branch/main/endpoints/primary",
            "projects/sh op/branches/main/endpoints/primary",
        ] {
            let target = LakebaseTarget::Autoscaling {
                endpoint: endpoint.into(),
            };
            assert_eq!(
                setting_of(Lakebase::new(host, m2m(), target)),
                "LakebaseTarget::Autoscaling endpoint",
                "{endpoint:?}"
            );
        }
        for instance in ["", "a/b", "a b"] {
            let target = LakebaseTarget::Provisioned {
                instance: instance.into(),
            };
            assert_eq!(
                setting_of(Lakebase::new(host, m2m(), target)),
                "LakebaseTarget::Provisioned instance"
            );
        }
        for bad_host in [
            "http://my.cloud.databricks.com",
            "ftp://my.cloud.databricks.com",
            "https://my.cloud.databricks.com/some/path",
            "https://user:pw@my.cloud.databricks.com",
            "https://",
        ] {
            assert_eq!(
                setting_of(Lakebase::new(bad_host, m2m(), autoscaling())),
                "Lakebase host",
                "{bad_host}"
            );
        }
        let err = Lakebase::new(
            "https://user:hunter2@my.cloud.databricks.com",
            m2m(),
            autoscaling(),
        )
        .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"));
        assert_eq!(
            setting_of(Lakebase::new(
                host,
                m2m_with_token_url(Some("http://idp.example/token".into())),
                autoscaling()
            )),
            "WorkspaceAuth::ClientCredentials token_url"
        );
        assert_eq!(
            setting_of(Lakebase::new(
                host,
                WorkspaceAuth::Pat("".into()),
                autoscaling()
            )),
            "WorkspaceAuth::Pat"
        );
        assert_eq!(
            setting_of(Lakebase::new(
                host,
                WorkspaceAuth::Pat("bad\ntoken".into()),
                autoscaling()
            )),
            "WorkspaceAuth::Pat"
        );

        // Accepted shapes.
        Lakebase::new(host, m2m(), autoscaling()).unwrap();
        Lakebase::new("my.cloud.databricks.com/", m2m(), autoscaling()).unwrap();
        Lakebase::new("http://localhost:8080", m2m(), autoscaling()).unwrap();
        Lakebase::new("http://127.0.0.1:8080", m2m(), autoscaling()).unwrap();
    }

    #[test]
    fn debug_redacts_every_secret() {
        assert_eq!(
            format!("{:?}", m2m()),
            "ClientCredentials { client_id: \"my-client\", client_secret: \"** redacted **\", token_url: None }"
        );
        assert_eq!(
            format!("{:?}", WorkspaceAuth::Pat(PAT.into())),
            "Pat(\"** redacted **\")"
        );
        let lakebase = Lakebase::new("my.cloud.databricks.com", m2m(), autoscaling())
            .unwrap()
            .with_workspace_id("42");
        assert_eq!(
            format!("{lakebase:?}"),
            format!(
                "Lakebase {{ host: \"https://my.cloud.databricks.com\", auth: ClientCredentials {{ \
                 client_id: \"my-client\", client_secret: \"** redacted **\", token_url: None }}, \
                 target: Autoscaling {{ endpoint: \"{ENDPOINT}\" }}, workspace_id: Some(\"42\"), \
                 http_timeout: 10s, user_agent: \"{}\", .. }}",
                default_user_agent()
            )
        );
        assert_eq!(lakebase.kind(), "lakebase");
    }
}
