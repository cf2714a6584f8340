//! Interactive user login (U2M, Databricks' `external-browser`): OAuth authorization code with
//! PKCE S256, redirected to a listener on loopback, and the refresh token kept in a token cache
//! file only its owner can read.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::{AuthState, Authorization, Issued, Lakebase};
use crate::error::{Error, Result, Setting};

/// The public OAuth client of Databricks' own tools, which every workspace knows.
pub(super) const DEFAULT_CLIENT_ID: &str = "databricks-cli";
/// The redirect registered for that client: `http://localhost:8020`.
pub(super) const DEFAULT_REDIRECT_PORT: u16 = 8020;
/// The scopes of a user login: the APIs, and a refresh token.
const SCOPE: &str = "all-apis offline_access";
/// How long a user has to finish logging in at the printed address.
const LOGIN_WAIT: Duration = Duration::from_secs(300);
/// How long one connection to the redirect listener may take to send its request (each is
/// served on its own, so a slow one holds up no other).
const REQUEST_WAIT: Duration = Duration::from_secs(30);
/// The largest request head the redirect listener reads.
const MAX_REQUEST: usize = 16 * 1024;
/// How often a program waiting for the token cache file's lock tries it again.
const LOCK_POLL: Duration = Duration::from_millis(10);
/// How long a program waits for the token cache file's lock, in HTTP timeouts: the holder
/// makes two token calls at most (the file's refresh token, then its own), then writes.
const LOCK_WAIT_CALLS: u32 = 3;

/// What a login's listener found: the code, or why there is none.
type LoginOutcome = Option<std::result::Result<SecretString, String>>;

/// A login under way. Its listener is a task of its own, so that a caller cancelled while it
/// waits (a connect timeout) does not end it: the next caller waits for the same login, at
/// the address already printed. Dropped with the source's state, it stops listening.
pub(super) struct PendingLogin {
    verifier: String,
    redirect_uri: String,
    outcome: watch::Receiver<LoginOutcome>,
    listener: tokio::task::AbortHandle,
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Lakebase {
    /// The workspace authorization of a user login: the cached token, else one from the
    /// refresh token (kept in memory and in the token cache file), else a login.
    pub(super) async fn browser_authorization(
        &self,
        client_id: &str,
        open_browser: bool,
    ) -> Result<Authorization> {
        let mut state = self.state.lock().await;
        if let Some(token) = &state.token
            && self.clock.now() < token.refresh_at
        {
            return Ok(self.authorization_from(&state, token));
        }
        let cache = self.token_cache_file(client_id);
        let (token_url, authorize_url) = self.oauth_endpoints(&mut state).await?;
        let requested_at = self.clock.now();
        // Programs sharing the token cache file trade its refresh token one at a time, each
        // starting from the file's: Databricks' refresh tokens are single-use by default
        // (https://docs.databricks.com/aws/en/integrations/single-use-tokens), so one that
        // another program has just traded is refused, and its successor is in the file.
        let mut held = match &cache {
            Some(path) => lock_cache(path, self.http_timeout * LOCK_WAIT_CALLS).await,
            None => None,
        };
        let on_file = match cache
            .as_ref()
            .map(|path| read_cache(path, &self.host, client_id))
        {
            Some(Ok(on_file)) => on_file,
            // One in memory goes on; the file's fault is shown for the next program.
            Some(Err(e)) if state.refresh_token.is_some() => {
                tracing::warn!(error = %e, "the token cache file is not read");
                None
            }
            Some(Err(e)) => return Err(e),
            None => None,
        };
        let mut tried: Vec<SecretString> = Vec::new();
        let mut refused = None;
        let mut issued = None;
        for refresh_token in on_file.into_iter().chain(state.refresh_token.clone()) {
            if tried
                .iter()
                .any(|t| t.expose_secret() == refresh_token.expose_secret())
            {
                continue;
            }
            let request = self.client.post(token_url.clone()).form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose_secret()),
                ("client_id", client_id),
            ]);
            match self
                .token_call(&token_url, request, Some(&refresh_token))
                .await
            {
                Ok(new) => {
                    issued = Some(new);
                    state.refresh_token = Some(refresh_token);
                    break;
                }
                // Revoked or expired: the other one, else a login.
                Err(Error::Http {
                    status: 400 | 401,
                    code,
                    ..
                }) => {
                    refused = Some(code);
                    tried.push(refresh_token);
                }
                Err(e) => return Err(e),
            }
        }
        if issued.is_none() {
            if let Some(code) = refused {
                tracing::info!(%code, "the refresh token was refused; logging in again");
            }
            state.refresh_token = None;
            drop(held.take());
        }
        let issued = match issued {
            Some(issued) => issued,
            None => {
                self.login(
                    &mut state,
                    &token_url,
                    &authorize_url,
                    client_id,
                    open_browser,
                )
                .await?
            }
        };
        // A rotated refresh token replaces the old one; otherwise the old one stays.
        if let Some(refresh_token) = &issued.refresh_token {
            state.refresh_token = Some(refresh_token.clone());
        }
        if let (Some(path), Some(refresh_token)) = (&cache, &state.refresh_token)
            && let Err(e) = write_cache(path, &self.host, client_id, refresh_token)
        {
            // The login holds for this process; the next one logs in again.
            tracing::warn!(error = %e, "the refresh token cannot be kept");
        }
        drop(held);
        Ok(self.keep_token(&mut state, issued, requested_at))
    }

    /// Waits for the login under way, or starts one, and trades its code for tokens.
    async fn login(
        &self,
        state: &mut AuthState,
        token_url: &Url,
        authorize_url: &Url,
        client_id: &str,
        open_browser: bool,
    ) -> Result<Issued> {
        if state.login.is_none() {
            state.login = Some(
                self.start_login(authorize_url, client_id, open_browser)
                    .await?,
            );
        }
        let mut outcome = state
            .login
            .as_ref()
            .map(|login| login.outcome.clone())
            .expect("started above");
        let found = outcome
            .wait_for(Option::is_some)
            .await
            .map(|found| found.clone().expect("waited for"))
            .unwrap_or_else(|_| Err("the login ended early".to_owned()));
        let login = state.login.take().expect("started above");
        let code = found.map_err(|why| Error::config(Setting::DatabricksAuthType, why))?;
        let request = self.client.post(token_url.clone()).form(&[
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("code_verifier", &login.verifier),
            ("redirect_uri", &login.redirect_uri),
            ("client_id", client_id),
        ]);
        self.token_call(token_url, request, Some(&code)).await
    }

    /// Listens for the redirect, prints the address to open (and opens it in a browser unless
    /// told not to), and leaves the waiting to a task of its own.
    async fn start_login(
        &self,
        authorize_url: &Url,
        client_id: &str,
        open_browser: bool,
    ) -> Result<PendingLogin> {
        let port = self.redirect_port;
        let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|e| {
            Error::config(
                Setting::DatabricksAuthType,
                format!(
                    "external-browser cannot listen on localhost:{port} for the login's \
                     redirect ({e}): stop what uses the port and try again"
                ),
            )
        })?;
        // The port bound, should 0 have asked for any.
        let port = listener.local_addr().map_or(port, |a| a.port());
        let redirect_uri = format!("http://localhost:{port}");
        let verifier = random_text(32);
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        let expected_state = random_text(16);
        let mut url = authorize_url.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", SCOPE)
            .append_pair("state", &expected_state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        // The address carries no secret: the challenge is a hash, the state is single-use.
        match &self.login_prompt {
            Some(prompt) => prompt(url.as_str()),
            None => eprintln!(
                "To log in to {}, open this address in a browser:\n{url}",
                self.host
            ),
        }
        if open_browser && let Err(e) = open::that_detached(url.as_str()) {
            tracing::debug!(error = %e, "cannot open a browser; the address is printed");
        }
        let (found, outcome) = watch::channel(None);
        let host = self.host.clone();
        let task = tokio::spawn(async move {
            let result =
                match tokio::time::timeout(LOGIN_WAIT, redirect(listener, expected_state, host))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(format!(
                        "nobody finished the login within {} s: open the address printed above \
                         in a browser, then run again",
                        LOGIN_WAIT.as_secs()
                    )),
                };
            let _ = found.send(Some(result));
        });
        Ok(PendingLogin {
            verifier,
            redirect_uri,
            outcome,
            listener: task.abort_handle(),
        })
    }
    /// The token endpoint and the authorization endpoint, discovered once.
    pub(super) async fn oauth_endpoints(&self, state: &mut AuthState) -> Result<(Url, Url)> {
        let token_url = self.token_url_of(state).await?;
        let authorize_url = match state
            .discovery
            .as_ref()
            .and_then(|d| d.authorize_url.clone())
        {
            Some(url) => url,
            None => super::parse_url(
                &format!("{}/oidc/v1/authorize", self.host),
                Setting::DatabricksHost,
            )?,
        };
        Ok((token_url, authorize_url))
    }

    /// `<cache dir>/dal/oauth-<host>-<client id>.json`, or `None` without a cache directory.
    fn token_cache_file(&self, client_id: &str) -> Option<PathBuf> {
        let dir = self.token_cache_dir.clone().or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|d| !d.is_empty())
                        .map(|home| PathBuf::from(home).join(".cache"))
                })
                .map(|cache| cache.join("dal"))
        })?;
        let name: String = format!("{}-{client_id}", self.host)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Some(dir.join(format!("oauth-{name}.json")))
    }
}

/// Waits for the browser's request to the redirect listener, serving each connection on its
/// own: the code when the state matches, or why the login failed.
async fn redirect(
    listener: TcpListener,
    state: String,
    host: String,
) -> std::result::Result<SecretString, String> {
    let (found, mut results) = mpsc::channel(1);
    loop {
        tokio::select! {
            result = results.recv() => {
                // This loop holds a sender, so the channel stays open.
                if let Some(result) = result {
                    return result;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (found, state, host) = (found.clone(), state.clone(), host.clone());
                    tokio::spawn(async move {
                        if let Some(result) = serve_redirect(stream, &state, &host).await {
                            let _ = found.send(result).await;
                        }
                    });
                }
                // Out of file descriptors, say: a pause, not a spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
        }
    }
}

/// Answers one request to the redirect listener: `Some` when it is this login's redirect.
async fn serve_redirect(
    mut stream: tokio::net::TcpStream,
    state: &str,
    host: &str,
) -> Option<std::result::Result<SecretString, String>> {
    let target = tokio::time::timeout(REQUEST_WAIT, request_target(&mut stream))
        .await
        .ok()?
        .ok()?;
    let Ok(url) = Url::parse(&format!("http://localhost{target}")) else {
        let _ = respond(&mut stream, "400 Bad Request", "Not a login redirect.").await;
        return None;
    };
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    if param("state").as_deref() != Some(state) {
        // Another page's request (say a favicon), or a forged redirect.
        let _ = respond(&mut stream, "400 Bad Request", "Not this login's redirect.").await;
        return None;
    }
    if let Some(error) = param("error") {
        let _ = respond(&mut stream, "200 OK", "The login failed; see the program.").await;
        let description = param("error_description").unwrap_or_default();
        let text: String = format!("the login was refused: {error}: {description}")
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect();
        return Some(Err(text));
    }
    match param("code").filter(|c| !c.is_empty()) {
        Some(code) => {
            let text = format!("You are logged in to {host}. You can close this window.");
            let _ = respond(&mut stream, "200 OK", &text).await;
            Some(Ok(SecretString::from(code)))
        }
        None => {
            let _ = respond(&mut stream, "400 Bad Request", "The redirect has no code.").await;
            None
        }
    }
}

/// The request target of an HTTP/1 request (`GET <target> HTTP/1.1`).
async fn request_target(stream: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) if target.starts_with('/') => Ok(target.to_owned()),
        _ => Err(std::io::ErrorKind::InvalidData.into()),
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    text: &str,
) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// `bytes` random bytes from the operating system, URL-safe base64 without padding.
fn random_text(bytes: usize) -> String {
    let mut random = Vec::with_capacity(bytes + 16);
    while random.len() < bytes {
        random.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    random.truncate(bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

/// The refresh token of the cache file, if there is one. A file others can read is refused:
/// it would not be the file this source writes.
fn read_cache(path: &Path, host: &str, client_id: &str) -> Result<Option<SecretString>> {
    use std::os::unix::fs::PermissionsExt as _;
    let file_error = |what: String| Error::config(Setting::DatabricksTokenCache, what);
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(format!("cannot read {}: {e}", path.display()))),
    };
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(file_error(format!(
            "{} can be read by others: delete it (the next login writes it again, mode 0600)",
            path.display()
        )));
    }
    let text = crate::setting_file::read(path)
        .map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    // A damaged file, or one of another workspace or client, is a missing one: the login
    // writes it again.
    Ok(serde_json::from_slice::<Value>(&text)
        .ok()
        .filter(|v| v["host"] == host && v["client_id"] == client_id)
        .and_then(|v| v.get("refresh_token")?.as_str().map(str::to_owned))
        .filter(|t| !t.is_empty())
        .map(SecretString::from))
}

/// The directory of the token cache file `path`, created mode 0700 when missing, and
/// refused when others can read it.
fn cache_dir(path: &Path) -> Result<&Path> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let file_error = |what: String| Error::config(Setting::DatabricksTokenCache, what);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_error(format!("cannot create {}: {e}", dir.display())))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| file_error(format!("cannot read {}: {e}", dir.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(file_error(format!(
            "{} can be read by others: use a directory of your own (chmod 700)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The lock of the token cache file `path` (an exclusive `flock` of `<file>.lock`, released
/// when the file is dropped or its program ends), taken within `wait`. `None` when it was
/// not: a program stopped while holding it holds up the others for `wait` at most, which
/// then go on as without a lock.
async fn lock_cache(path: &Path, wait: Duration) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let lock_path = path.with_extension("lock");
    let opened = cache_dir(path).and_then(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                Error::config(
                    Setting::DatabricksTokenCache,
                    format!("cannot open {}: {e}", lock_path.display()),
                )
            })
    });
    let file = match opened {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(error = %e, "the token cache file is used without its lock");
            return None;
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Some(file),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    path = %lock_path.display(),
                    "the token cache file is used without its lock"
                );
                return None;
            }
        }
    }
}

/// Writes the refresh token to `path`, mode 0600 from the start (a new, exclusively created
/// temporary file, then renamed), in a directory of mode 0700 that no one else can read.
fn write_cache(
    path: &Path,
    host: &str,
    client_id: &str,
    refresh_token: &SecretString,
) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let file_error = |what: String| Error::config(Setting::DatabricksTokenCache, what);
    let dir = cache_dir(path)?;
    let body = json!({
        "host": host,
        "client_id": client_id,
        "refresh_token": refresh_token.expose_secret(),
        "written": chrono::DateTime::<chrono::Utc>::from(SystemTime::now()).to_rfc3339(),
    });
    let write = || -> std::io::Result<()> {
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(body.to_string().as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(path).map(drop).map_err(|e| e.error)
    };
    write().map_err(|e| file_error(format!("cannot write {}: {e}", path.display())))
}
