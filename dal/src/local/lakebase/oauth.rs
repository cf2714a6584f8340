//! The local service's OAuth beyond the machine-to-machine grant: a user login (authorization
//! code with PKCE S256, refresh tokens), workload identity federation (RFC 8693 token
//! exchange of an ID token its own identity provider signs), and a GitHub Actions-like ID
//! token service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Digest as _;

use super::{
    LocalLakebase, Shared, TokenForm, basic_credentials, oauth_error, random_secret, same,
};

type HmacSha256 = Hmac<sha2::Sha256>;

/// Databricks' public OAuth client of its own tools, the one user logins use.
pub(super) const USER_CLIENT_ID: &str = "databricks-cli";
/// How long an authorization code can be traded.
const CODE_TTL: Duration = Duration::from_secs(300);
/// How long the ID tokens of the identity provider live.
const ID_TOKEN_TTL: Duration = Duration::from_secs(300);
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// What the OAuth grants keep between requests.
pub(super) struct OAuthState {
    /// Authorization codes not yet traded.
    codes: Mutex<HashMap<String, PendingCode>>,
    /// Refresh tokens and the client each was issued to.
    refresh_tokens: Mutex<HashMap<String, String>>,
    /// Signs the identity provider's ID tokens.
    idp_key: [u8; 32],
}

struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    offline: bool,
    expires: SystemTime,
}

impl OAuthState {
    pub(super) fn new() -> Self {
        let mut idp_key = [0u8; 32];
        idp_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        idp_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self {
            codes: Mutex::new(HashMap::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
            idp_key,
        }
    }

    /// Ends a refresh token; whether it was one.
    pub(super) fn revoke(&self, token: &str) -> bool {
        lock(&self.refresh_tokens).remove(token).is_some()
    }

    /// Issues a refresh token to `client_id`.
    pub(super) fn refresh_token(&self, client_id: &str) -> String {
        let token = format!("doau{}", random_secret());
        lock(&self.refresh_tokens).insert(token.clone(), client_id.to_owned());
        token
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a token request was granted: whether to add a refresh token, and for which client.
pub(super) struct Grant {
    pub(super) refresh_for: Option<String>,
}

/// A refused token request: the OAuth `error` and its description.
pub(super) struct Denied(&'static str, &'static str);

impl Denied {
    pub(super) fn response(self) -> Response {
        let status = match self.0 {
            "invalid_client" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        };
        oauth_error(status, self.0, self.1)
    }
}

fn denied(error: &'static str, description: &'static str) -> Denied {
    Denied(error, description)
}

fn field(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|v| !v.is_empty())
}

/// Checks a token request of any supported grant.
pub(super) fn grant(
    shared: &Shared,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<Grant, Denied> {
    match form.grant_type.as_deref() {
        Some("client_credentials") => {
            let Some((id, secret)) = basic_credentials(headers) else {
                return Err(denied(
                    "invalid_client",
                    "Client authentication with HTTP Basic is required",
                ));
            };
            let config = &shared.config;
            // Both compared in full, so that a wrong id and a wrong secret take the same time.
            let id_ok = same(id.as_bytes(), config.client_id.as_bytes());
            let secret_ok = same(secret.as_bytes(), config.client_secret.as_bytes());
            if !(id_ok && secret_ok) {
                return Err(denied("invalid_client", "Client authentication failed"));
            }
            Ok(Grant { refresh_for: None })
        }
        Some("authorization_code") => {
            let (Some(code), Some(verifier), Some(redirect_uri), Some(client_id)) = (
                field(&form.code),
                field(&form.code_verifier),
                field(&form.redirect_uri),
                field(&form.client_id),
            ) else {
                return Err(denied(
                    "invalid_request",
                    "code, code_verifier, redirect_uri and client_id are required",
                ));
            };
            // Single use: taken out whatever follows.
            let pending = lock(&shared.oauth.codes).remove(code);
            let Some(pending) = pending.filter(|p| p.expires > SystemTime::now()) else {
                return Err(denied(
                    "invalid_grant",
                    "The authorization code is invalid or expired",
                ));
            };
            let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(verifier.as_bytes()));
            if pending.client_id != client_id
                || pending.redirect_uri != redirect_uri
                || !same(challenge.as_bytes(), pending.challenge.as_bytes())
            {
                return Err(denied(
                    "invalid_grant",
                    "The code was issued to another client, redirect or code challenge",
                ));
            }
            Ok(Grant {
                refresh_for: pending.offline.then(|| client_id.to_owned()),
            })
        }
        Some("refresh_token") => {
            let (Some(token), Some(client_id)) =
                (field(&form.refresh_token), field(&form.client_id))
            else {
                return Err(denied(
                    "invalid_request",
                    "refresh_token and client_id are required",
                ));
            };
            // Rotated: the old one ends here.
            match lock(&shared.oauth.refresh_tokens).remove(token) {
                Some(owner) if owner == client_id => Ok(Grant {
                    refresh_for: Some(owner),
                }),
                _ => Err(denied(
                    "invalid_grant",
                    "The refresh token is invalid or revoked",
                )),
            }
        }
        Some(TOKEN_EXCHANGE) => {
            if form.subject_token_type.as_deref() != Some(JWT_TYPE) {
                return Err(denied(
                    "invalid_request",
                    "subject_token_type must be urn:ietf:params:oauth:token-type:jwt",
                ));
            }
            let Some(subject) = field(&form.subject_token) else {
                return Err(denied("invalid_request", "subject_token is required"));
            };
            if let Some(id) = field(&form.client_id)
                && id != shared.config.client_id
            {
                return Err(denied(
                    "invalid_client",
                    "No federation policy of this service principal",
                ));
            }
            let audience = format!("{}/oidc/v1/token", shared.base);
            shared
                .verify_id_token(subject, &audience)
                .map_err(|why| denied("invalid_grant", why))?;
            Ok(Grant { refresh_for: None })
        }
        None => Err(denied("invalid_request", "Missing grant_type")),
        Some(_) => Err(denied(
            "unsupported_grant_type",
            "Supported: client_credentials, authorization_code, refresh_token and token exchange",
        )),
    }
}

/// `GET /oidc/v1/authorize`: the user is taken as signed in and consenting, so the answer
/// is the redirect with a code, as the real page gives after its login form; HTTP 403 unless
/// the service was started with the user login on.
pub(super) async fn authorize(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !shared.config.user_login {
        return (
            StatusCode::FORBIDDEN,
            "the user login is off on this local service (LocalLakebaseConfig::with_user_login)",
        )
            .into_response();
    }
    let param = |name: &str| {
        query
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let (Some(client_id), Some(redirect_uri)) = (param("client_id"), param("redirect_uri")) else {
        return (
            StatusCode::BAD_REQUEST,
            "client_id and redirect_uri are required",
        )
            .into_response();
    };
    // The client's registered redirects: loopback over http, any port (RFC 8252).
    let loopback = reqwest::Url::parse(redirect_uri).is_ok_and(|u| {
        u.scheme() == "http" && matches!(u.host_str(), Some("localhost" | "127.0.0.1"))
    });
    if client_id != USER_CLIENT_ID || !loopback {
        // Never redirect to an address the client did not register.
        return (StatusCode::BAD_REQUEST, "unknown client_id or redirect_uri").into_response();
    }
    let back = |params: &[(&str, &str)]| {
        let mut url = reqwest::Url::parse(redirect_uri).expect("checked above");
        url.query_pairs_mut().extend_pairs(params);
        if let Some(state) = param("state") {
            url.query_pairs_mut().append_pair("state", state);
        }
        Redirect::to(url.as_str()).into_response()
    };
    if param("response_type") != Some("code") {
        return back(&[("error", "unsupported_response_type")]);
    }
    let (Some(challenge), Some("S256")) = (param("code_challenge"), param("code_challenge_method"))
    else {
        return back(&[
            ("error", "invalid_request"),
            ("error_description", "PKCE with S256 is required"),
        ]);
    };
    let scopes: Vec<&str> = param("scope").unwrap_or("").split_whitespace().collect();
    if scopes
        .iter()
        .any(|s| !matches!(*s, "all-apis" | "offline_access"))
    {
        return back(&[("error", "invalid_scope")]);
    }
    let code = format!("dcod{}", random_secret());
    lock(&shared.oauth.codes).insert(
        code.clone(),
        PendingCode {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            challenge: challenge.to_owned(),
            offline: scopes.contains(&"offline_access"),
            expires: SystemTime::now() + CODE_TTL,
        },
    );
    back(&[("code", &code)])
}

/// `GET /idp/github?audience=...`: an ID token for the configured federated subject, as
/// GitHub Actions' `ACTIONS_ID_TOKEN_REQUEST_URL` answers it (`{"value": "<jwt>"}`), for the
/// bearer `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
pub(super) async fn github_id_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = shared.config.actions_request_token.as_bytes();
    if !bearer.is_some_and(|b| same(b.as_bytes(), expected)) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "message": "Bad credentials" })),
        )
            .into_response();
    }
    let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "message": "audience is required" })),
        )
            .into_response();
    };
    Json(json!({ "value": shared.sign_id_token(audience) })).into_response()
}

impl Shared {
    /// The identity provider's issuer, `<url>/idp`.
    fn issuer(&self) -> String {
        format!("{}/idp", self.base)
    }

    /// A JWT (HS256) for the configured federated subject and `audience`.
    fn sign_id_token(&self, audience: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let head = b64(&json!({ "alg": "HS256", "typ": "JWT" }));
        let claims = b64(&json!({
            "iss": self.issuer(),
            "sub": self.config.federated_subject,
            "aud": audience,
            "iat": now,
            "exp": now + ID_TOKEN_TTL.as_secs(),
        }));
        let signed = format!("{head}.{claims}");
        let mut mac = HmacSha256::new_from_slice(&self.oauth.idp_key).expect("any key length");
        mac.update(signed.as_bytes());
        let signature =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    /// Checks an ID token as a federation policy does: signature, issuer, audience, subject
    /// and expiry.
    fn verify_id_token(&self, jwt: &str, audience: &str) -> Result<(), &'static str> {
        let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = jwt.split('.');
        let (Some(head), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("The subject token is not a JWT");
        };
        let signature = engine
            .decode(signature)
            .map_err(|_| "The subject token is not a JWT")?;
        let mut mac = HmacSha256::new_from_slice(&self.oauth.idp_key).expect("any key length");
        mac.update(format!("{head}.{claims}").as_bytes());
        mac.verify_slice(&signature).map_err(
            |_| "The subject token's signature does not verify against the issuer's key",
        )?;
        let claims: Value = engine
            .decode(claims)
            .ok()
            .and_then(|c| serde_json::from_slice(&c).ok())
            .ok_or("The subject token's claims are not JSON")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims["iss"] != self.issuer().as_str() {
            return Err("No federation policy trusts the subject token's issuer");
        }
        if claims["aud"] != audience {
            return Err("The subject token's audience is not this workspace's token endpoint");
        }
        if claims["sub"] != self.config.federated_subject.as_str() {
            return Err("The federation policy does not allow the subject token's subject");
        }
        if claims["exp"].as_u64().is_none_or(|exp| exp <= now) {
            return Err("The subject token has expired");
        }
        Ok(())
    }
}

impl LocalLakebase {
    /// An OIDC ID token of this service's identity provider (issuer `<url>/idp`, HS256) for
    /// the configured [`federated_subject`](super::LocalLakebaseConfig::federated_subject) and
    /// `audience`, living five minutes: what `DATABRICKS_OIDC_TOKEN` or the file of
    /// `DATABRICKS_OIDC_TOKEN_FILEPATH` would hold. The token endpoint trades one whose
    /// audience is [`token_url`](Self::token_url).
    pub fn id_token(&self, audience: &str) -> String {
        self.shared.sign_id_token(audience)
    }

    /// The variables GitHub Actions sets in a job allowed to ask for ID tokens
    /// (`ACTIONS_ID_TOKEN_REQUEST_URL`, `ACTIONS_ID_TOKEN_REQUEST_TOKEN`), pointing at this
    /// service's stand-in for GitHub's token service.
    pub fn github_actions_env(&self) -> [(&'static str, String); 2] {
        [
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                format!("{}/idp/github?api-version=2.0", self.shared.base),
            ),
            (
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
                self.shared.config.actions_request_token.clone(),
            ),
        ]
    }
}
