//! The Lakebase source against a scripted HTTP server on loopback.
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

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

/// A scripted HTTP server on loopback (axum): every request recorded, answers chosen by a
/// closure given the request and the server's base URL.
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(StdMutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let app = axum::Router::new().fallback({
            let (base, log) = (base.clone(), log.clone());
            move |request: axum::extract::Request| {
                let (base, log, handler) = (base.clone(), log.clone(), handler.clone());
                async move { answer(request, &base, &log, &*handler).await }
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
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

/// Records `request` and answers it as the handler says.
async fn answer(
    request: axum::extract::Request,
    base: &str,
    log: &StdMutex<Vec<Request>>,
    handler: &Handler,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let request = Request {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    log.lock().unwrap().push(request.clone());
    let mut reply = handler(&request, base);
    let (status, content_type, body) = loop {
        match reply {
            Reply::Json(status, value) => break (status, "application/json", value.to_string()),
            Reply::Text(status, text) => break (status, "text/html", text),
            Reply::Slow(delay, next) => {
                tokio::time::sleep(delay).await;
                reply = *next;
            }
            Reply::Hang => std::future::pending::<()>().await,
        }
    };
    let status = axum::http::StatusCode::from_u16(status).unwrap();
    (
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response()
}

/// A well-behaved workspace with no discovery documents.
fn workspace(request: &Request, _base: &str) -> Reply {
    match request.path.as_str() {
        "/oidc/v1/token" => token_reply(WS_TOKEN, 3600),
        AUTOSCALING_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": FAR })),
        PROVISIONED_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expiration_time": FAR })),
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
    format!("dal/{} auth/oauth-m2m", env!("CARGO_PKG_VERSION"))
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

/// An error's text, or an endpoint, with the test server's origin taken off: errors name the
/// whole URL called, `http://127.0.0.1:<port>/path`.
fn without_origin(text: &str) -> String {
    let rest = text
        .strip_prefix("http://127.0.0.1:")
        .expect("errors name the host they called");
    rest.trim_start_matches(|c: char| c.is_ascii_digit())
        .to_owned()
}

fn assert_http(err: Error, endpoint: &str, status: u16, code: &str, message: &str) {
    match err {
        Error::Http {
            endpoint: e,
            status: s,
            code: c,
            message: m,
            ..
        } => {
            assert_eq!(
                (without_origin(&e).as_str(), s, c.as_str(), m.as_str()),
                (endpoint, status, code, message)
            );
        }
        other => panic!("expected Error::Http, got {other:?}"),
    }
}

fn assert_transport(err: &Error, endpoint: &str) {
    match err {
        Error::HttpTransport { endpoint: e, .. } => assert_eq!(without_origin(e), endpoint),
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

/// A discovery document the server could not serve for now (HTTP 503, 429) fails the fetch,
/// to be tried again, rather than being taken as absent: the fallback endpoint found instead
/// was kept for the life of the process, without the workspace id.
#[tokio::test]
async fn a_discovery_document_unavailable_for_now_is_asked_for_again() {
    let config_calls = Arc::new(AtomicUsize::new(0));
    let server = Server::start({
        let config_calls = config_calls.clone();
        move |r: &Request, base: &str| match r.path.as_str() {
            DATABRICKS_CONFIG_PATH if config_calls.fetch_add(1, Ordering::SeqCst) == 0 => {
                Reply::Json(
                    503,
                    json!({ "error_code": "TEMPORARILY_UNAVAILABLE", "message": "try later" }),
                )
            }
            DATABRICKS_CONFIG_PATH => Reply::Json(200, json!({ "workspace_id": "42" })),
            _ => workspace(r, base),
        }
    })
    .await;
    let lakebase = source(&server);
    let err = lakebase.fetch().await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    lakebase.fetch().await.unwrap();
    let credential = server.requests().pop().unwrap();
    assert_eq!(credential.path, AUTOSCALING_PATH);
    assert_eq!(credential.header("x-databricks-workspace-id"), Some("42"));
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

/// `DATABRICKS_DISCOVERY_URL`: its document names the token endpoint, and nothing else is
/// asked; one without a token endpoint is an error naming the setting.
#[tokio::test]
async fn a_discovery_url_names_the_token_endpoint() {
    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        "/idp/.well-known/oauth-authorization-server" => Reply::Json(
            200,
            json!({ "issuer": format!("{base}/idp"), "token_endpoint": format!("{base}/idp/token") }),
        ),
        "/idp/token" => token_reply(WS_TOKEN, 3600),
        "/empty/.well-known/oauth-authorization-server" => Reply::Json(200, json!({})),
        _ => workspace(r, base),
    })
    .await;
    source(&server)
        .with_discovery_url(&format!(
            "{}/idp/.well-known/oauth-authorization-server",
            server.base
        ))
        .unwrap()
        .fetch()
        .await
        .unwrap();
    assert_eq!(
        server.paths(),
        [
            "/idp/.well-known/oauth-authorization-server",
            "/idp/token",
            AUTOSCALING_PATH
        ]
    );
    let err = source(&server)
        .with_discovery_url(&format!(
            "{}/empty/.well-known/oauth-authorization-server",
            server.base
        ))
        .unwrap()
        .fetch()
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Config {
                setting: Setting::DatabricksDiscoveryUrl,
                ..
            }
        ),
        "{err:?}"
    );
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
    let before = SystemTime::now();
    let token = source(&server).fetch().await.unwrap();
    assert_eq!(token.expose(), DB_TOKEN);
    // Answered for 2099: a credential lasts an hour at most, counted from the request.
    let expires = token.expires_at().expect("an expiry");
    assert!(
        expires >= before + MAX_CREDENTIAL_LIFE
            && expires <= SystemTime::now() + MAX_CREDENTIAL_LIFE,
        "{expires:?}"
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
    // Half an hour ahead, written in another time zone with a fraction of a second.
    let in_half_an_hour = chrono::Utc::now() + chrono::Duration::minutes(30);
    let written = in_half_an_hour
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    let server = Server::start(move |r: &Request, base: &str| match r.path.as_str() {
        AUTOSCALING_PATH => Reply::Json(
            200,
            json!({ "token": DB_TOKEN, "expiration_time": written }),
        ),
        PROVISIONED_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": FAR })),
        _ => workspace(r, base),
    })
    .await;
    let expected = SystemTime::from(
        in_half_an_hour
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
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

    // A product: named first, then dal and the auth type, as the Databricks SDKs do.
    let server = Server::start(workspace).await;
    source(&server)
        .with_product("acme_orders/2.1")
        .unwrap()
        .fetch()
        .await
        .unwrap();
    let expected = format!(
        "acme_orders/2.1 dal/{} auth/oauth-m2m",
        env!("CARGO_PKG_VERSION")
    );
    for request in &server.requests() {
        assert_eq!(request.header("user-agent"), Some(expected.as_str()));
    }
}

#[test]
fn a_product_is_name_slash_version() {
    let base =
        || Lakebase::new("https://example.cloud.databricks.com", m2m(), autoscaling()).unwrap();
    for bad in [
        "acme orders/2.1",
        "acme_orders",
        "/2.1",
        "acme/",
        "acme/2.1/x",
        "acme/2 1",
        "a\nb/1",
    ] {
        let err = base().with_product(bad).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Config {
                    setting: Setting::Product,
                    ..
                }
            ),
            "{bad:?}: {err}"
        );
    }
    for good in ["acme_orders/2.1", "acme-orders/2.1.0-beta+7", "a.b/1"] {
        base().with_product(good).unwrap();
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
        .unwrap()
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
        .with_workspace_id("42")
        .unwrap();
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
        without_origin(&err.to_string()),
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
        ..
    } = err
    else {
        panic!("expected Error::Http, got {err:?}");
    };
    assert_eq!(
        (without_origin(&endpoint).as_str(), status),
        (AUTOSCALING_PATH, 502)
    );
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
        without_origin(&err.to_string()),
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
        without_origin(&err.to_string()),
        "/oidc/v1/token: the answer has no access_token"
    );

    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        AUTOSCALING_PATH => Reply::Json(200, json!({ "expire_time": FAR })),
        _ => workspace(r, base),
    })
    .await;
    let err = source(&server).fetch().await.unwrap_err();
    assert_eq!(
        without_origin(&err.to_string()),
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

/// A credential the service answers already expired is refused, and not fetched again.
#[tokio::test]
async fn a_credential_that_already_expired_is_refused() {
    const PAST: &str = "2000-01-01T00:00:00Z";
    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        AUTOSCALING_PATH => Reply::Json(200, json!({ "token": DB_TOKEN, "expire_time": PAST })),
        _ => workspace(r, base),
    })
    .await;
    let err = source(&server).fetch().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TokenExpired {
                source_kind: "lakebase",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable(), "a clock that is wrong stays wrong");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "the lakebase credential source returned a token that expired at \
             2000-01-01T00:00:00Z (now is 20"
        ) && text.ends_with("); check the clocks of this machine and of the source"),
        "{text}"
    );
    assert!(!format!("{err:?}").contains(DB_TOKEN));
}

/// A machine whose clock runs ahead of the service's by more than a credential's life still
/// uses its credentials: with the clocks apart, a credential's life is the service's (its
/// expiry less its answer's `Date`), counted from the request by this machine's clock.
/// Before, each arrived expired by this machine's clock (`TokenExpired`), and no connection
/// opened.
#[tokio::test]
async fn a_clock_ahead_of_the_services_keeps_the_credentials_life() {
    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        AUTOSCALING_PATH => {
            let expiry = chrono::Utc::now() + chrono::Duration::seconds(300);
            Reply::Json(
                200,
                json!({ "token": DB_TOKEN, "expire_time": expiry.to_rfc3339() }),
            )
        }
        _ => workspace(r, base),
    })
    .await;
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(2 * 3600));
    let asked = clock.now();
    assert!(asked > SystemTime::now() + Duration::from_secs(3600));
    let token = source(&server).with_clock(clock).fetch().await.unwrap();
    let life = token.expires_at().unwrap().duration_since(asked).unwrap();
    assert!(
        (Duration::from_secs(298)..=Duration::from_secs(300)).contains(&life),
        "{life:?}"
    );
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
        let lakebase = source(&server)
            .with_http_timeout(Duration::from_millis(200))
            .unwrap();
        let started = Instant::now();
        let err = lakebase.fetch().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{hanging}");
        assert_transport(&err, hanging);
        assert_eq!(
            without_origin(&err.to_string()),
            format!("{hanging}: no complete answer within 200ms")
        );
    }
}

#[tokio::test]
async fn a_slow_body_counts_against_the_timeout() {
    use futures_util::StreamExt;
    // The head and the start of the body arrive at once, the rest never.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(|| async {
        let start = futures_util::stream::iter([Ok::<_, std::io::Error>("{\"token\":")]);
        axum::body::Body::from_stream(start.chain(futures_util::stream::pending()))
    });
    let _server = tokio::spawn(async move { axum::serve(listener, app).await });
    let lakebase = Lakebase::new(&base, WorkspaceAuth::Pat(PAT.into()), autoscaling())
        .unwrap()
        .with_http_timeout(Duration::from_millis(200))
        .unwrap();
    let started = Instant::now();
    let err = lakebase.fetch().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_transport(&err, AUTOSCALING_PATH);
}

#[tokio::test]
async fn a_closed_port_is_a_transport_error() {
    // Bound, never listening: connections are refused, and nothing else takes the port.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    let lakebase = Lakebase::new(&base, WorkspaceAuth::Pat(PAT.into()), autoscaling()).unwrap();
    let err = lakebase.fetch().await.unwrap_err();
    assert_transport(&err, AUTOSCALING_PATH);
    assert_eq!(
        without_origin(&err.to_string()),
        "/api/2.0/postgres/credentials: cannot connect"
    );
}

/// A workspace token the service stopped taking (revoked, or ended early) while it still
/// looked fresh: the fetch that meets the 401 signs in anew and asks once more, so the
/// callers waiting on it get a credential.
#[tokio::test]
async fn a_401_from_the_credential_api_signs_in_anew_and_asks_once_more() {
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
    lakebase.fetch().await.unwrap();
    assert_eq!(server.count(AUTOSCALING_PATH), 3);
    assert_eq!(server.count(DEFAULT_TOKEN_PATH), 2);
    assert_eq!(server.count(DATABRICKS_CONFIG_PATH), 1);
}

/// A 401 that a new workspace token does not cure is the caller's to see, after one more
/// try; a personal access token, which cannot be renewed, is not tried again.
#[tokio::test]
async fn a_401_that_persists_fails_after_one_more_try() {
    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        AUTOSCALING_PATH => Reply::Json(
            401,
            json!({ "error_code": "UNAUTHENTICATED", "message": "Token expired" }),
        ),
        _ => workspace(r, base),
    })
    .await;
    let lakebase = source(&server);
    let err = lakebase.fetch().await.unwrap_err();
    assert_http(
        err,
        AUTOSCALING_PATH,
        401,
        "UNAUTHENTICATED",
        "Token expired",
    );
    assert_eq!(server.count(AUTOSCALING_PATH), 2);
    assert_eq!(server.count(DEFAULT_TOKEN_PATH), 2);
    let pat = Lakebase::new(&server.base, WorkspaceAuth::Pat(PAT.into()), autoscaling()).unwrap();
    pat.fetch().await.unwrap_err();
    assert_eq!(server.count(AUTOSCALING_PATH), 3);
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
        // A dot segment would move the API path to another resource.
        "projects/shop/branches/../endpoints/primary",
        "projects/./branches/main/endpoints/primary",
    ] {
        let target = LakebaseTarget::Autoscaling {
            endpoint: endpoint.into(),
        };
        assert_eq!(
            setting_of(Lakebase::new(host, m2m(), target)),
            Setting::LakebaseEndpoint,
            "{endpoint:?}"
        );
    }
    for instance in ["", "a/b", "a b", ".", ".."] {
        let target = LakebaseTarget::Provisioned {
            instance: instance.into(),
        };
        assert_eq!(
            setting_of(Lakebase::new(host, m2m(), target)),
            Setting::LakebaseInstance
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
            Setting::DatabricksHost,
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
        Setting::DatabricksTokenUrl
    );
    assert_eq!(
        setting_of(Lakebase::new(
            host,
            WorkspaceAuth::Pat("".into()),
            autoscaling()
        )),
        Setting::DatabricksToken
    );
    assert_eq!(
        setting_of(Lakebase::new(
            host,
            WorkspaceAuth::Pat("bad\ntoken".into()),
            autoscaling()
        )),
        Setting::DatabricksToken
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
        .with_workspace_id("42")
        .unwrap();
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

#[test]
fn a_workspace_host_without_a_scheme_gets_https_as_the_sdks_give_it() {
    let url = parse_base_url("ws.cloud.databricks.com", Setting::DatabricksHost).unwrap();
    assert_eq!(url.as_str(), "https://ws.cloud.databricks.com/");
    let url = parse_base_url(
        " https://ws.cloud.databricks.com/ ",
        Setting::DatabricksHost,
    )
    .unwrap();
    assert_eq!(url.as_str(), "https://ws.cloud.databricks.com/");
}

/// `ttl` and `claims` go in the Autoscaling request as the API takes them, and the token
/// lives the shorter of the life asked for and the one answered (here 2099).
#[tokio::test]
async fn ttl_and_claims_are_asked_for_and_the_shorter_life_wins() {
    let server = Server::start(workspace).await;
    let before = SystemTime::now();
    let token = source(&server)
        .with_ttl(Duration::from_secs(1800))
        .unwrap()
        .with_claims(vec![Claim::new("READ_ONLY", &["main.shop.orders"])])
        .unwrap()
        .fetch()
        .await
        .unwrap();
    let requests = server.requests();
    let credential = requests
        .iter()
        .find(|r| r.path == AUTOSCALING_PATH)
        .expect("a credential request");
    let body: Value = serde_json::from_str(&credential.body).unwrap();
    assert_eq!(
        body,
        json!({
            "endpoint": ENDPOINT,
            "ttl": "1800s",
            "claims": [{"permission_set": "READ_ONLY", "resources": [{"table_name": "main.shop.orders"}]}],
        })
    );
    let expires = token.expires_at().expect("an expiry");
    assert!(
        expires >= before + Duration::from_secs(1800)
            && expires <= SystemTime::now() + Duration::from_secs(1800),
        "{expires:?}"
    );
}

#[test]
fn ttl_and_claims_are_checked() {
    let base =
        || Lakebase::new("https://example.cloud.databricks.com", m2m(), autoscaling()).unwrap();
    for bad in [
        Duration::from_secs(299),
        Duration::from_secs(3601),
        Duration::from_millis(1_800_500),
    ] {
        let err = base().with_ttl(bad).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Config {
                    setting: Setting::LakebaseCredentialTtl,
                    ..
                }
            ),
            "{bad:?}: {err}"
        );
    }
    base().with_ttl(Duration::from_secs(300)).unwrap();
    base().with_ttl(Duration::from_secs(3600)).unwrap();
    let provisioned = Lakebase::new(
        "https://example.cloud.databricks.com",
        m2m(),
        LakebaseTarget::Provisioned {
            instance: "shop".into(),
        },
    )
    .unwrap();
    let err = provisioned.with_ttl(Duration::from_secs(600)).unwrap_err();
    assert!(err.to_string().contains("LAKEBASE_ENDPOINT"), "{err}");
    let err = base()
        .with_claims(vec![Claim::new("READ_ONLY", &[])])
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Config {
                setting: Setting::LakebaseClaims,
                ..
            }
        ),
        "{err}"
    );
}

/// The database host from the endpoint (or instance) API, each name escaped in the path.
#[tokio::test]
async fn the_database_host_comes_from_the_endpoint_or_instance_api() {
    let server = Server::start(|r: &Request, base: &str| match r.path.as_str() {
        "/api/2.0/postgres/projects/shop/branches/main/endpoints/primary" => Reply::Json(
            200,
            json!({ "status": { "hosts": { "host": "ep-x.database.us-east-1.cloud.databricks.com" } } }),
        ),
        "/api/2.0/database/instances/shop%2Einstance" => {
            Reply::Json(200, json!({ "read_write_dns": "instance-1.database.cloud.databricks.com" }))
        }
        "/api/2.0/database/instances/empty" => Reply::Json(200, json!({ "state": "STARTING" })),
        _ => workspace(r, base),
    })
    .await;
    assert_eq!(
        source(&server).endpoint_host().await.unwrap(),
        "ep-x.database.us-east-1.cloud.databricks.com"
    );
    let instance = |name: &str| {
        Lakebase::new(
            &server.base,
            m2m(),
            LakebaseTarget::Provisioned {
                instance: name.into(),
            },
        )
        .unwrap()
    };
    assert_eq!(
        instance("shop.instance").endpoint_host().await.unwrap(),
        "instance-1.database.cloud.databricks.com"
    );
    let err = instance("empty").endpoint_host().await.unwrap_err();
    assert!(
        err.to_string().contains("read_write_dns") || format!("{err:?}").contains("read_write_dns"),
        "{err:?}"
    );
    let err = instance("missing").endpoint_host().await.unwrap_err();
    assert!(matches!(err, Error::Http { status: 404, .. }), "{err:?}");
}

#[test]
fn masking_leaves_other_text_and_short_secrets_elsewhere_alone() {
    assert_eq!(
        super::mask_secrets("user pw1 pw12 café", &["pw1", ""]),
        "user ** redacted ** ** redacted **2 café"
    );
    assert_eq!(
        super::mask_secrets(
            "id 0123456789abcdefXYZ, é0123456789ab",
            &["0123456789abcdef"]
        ),
        "id ** redacted **XYZ, é** redacted **"
    );
}

/// The platform's HTTPS front ends offer HTTP/2 as well as HTTP/1.1: the client, built
/// without HTTP/2 (one request at a time, a few per token life), must settle on HTTP/1.1 at
/// the TLS handshake. Offering `h2` there made a server that picks it fail every request
/// (with hyper's HTTP/2 compiled in by another crate) or panic in hyper (without it).
#[cfg(feature = "local")]
#[tokio::test]
async fn the_client_asks_for_http_1_1_of_a_server_that_speaks_http_2() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = crate::local::certs::generate().unwrap();
    let mut server = certs.server_config().unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(socket).await.unwrap();
        let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if protocol.as_deref() == Some(b"http/1.1") {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(tls.read_u8().await.unwrap());
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
        }
        protocol
    });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(certs.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let client = client_trusting(roots, true).unwrap();
    let answer = client
        .get(format!("https://localhost:{port}/"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map(drop);
    let protocol = served.await.unwrap();
    assert_eq!(
        protocol.as_deref().map(String::from_utf8_lossy).as_deref(),
        Some("http/1.1")
    );
    answer.unwrap();
}

/// The Databricks CLI's answer is read no further than an HTTP answer is: a CLI that prints
/// more (a wrapper gone wrong, printing on and on) fails the sign-in at once, naming the
/// command, instead of filling the memory until the timeout.
#[tokio::test]
async fn the_databricks_clis_answer_is_read_no_further_than_a_bound() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = Server::start(workspace).await;
    let cli = std::env::temp_dir().join(format!("dal-cli-{}", uuid::Uuid::new_v4()));
    // Valid JSON after white space, but more than an answer may hold.
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\nhead -c {} /dev/zero | tr '\\0' ' '\n\
             printf '{{\"access_token\": \"{PAT}\", \"token_type\": \"Bearer\", \"expiry\": \"{FAR}\"}}'\n",
            MAX_BODY + 1
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lakebase = Lakebase::new(
        &server.base,
        WorkspaceAuth::DatabricksCli { profile: None },
        autoscaling(),
    )
    .unwrap()
    .with_workspace_id("42")
    .unwrap()
    .with_cli_path(cli.to_str().unwrap());
    // A process forked by another test thread before the script was closed holds it open
    // for writing until it execs, and Linux refuses to run it meanwhile (ETXTBSY).
    let err = loop {
        let err = lakebase.fetch().await.map(drop).unwrap_err();
        if !format!("{err:?}").contains("Text file busy") {
            break err;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = std::fs::remove_file(&cli);
    let Error::Credential { source, .. } = &err else {
        panic!("expected a credential error, got {err:?}");
    };
    assert!(
        source
            .to_string()
            .contains(&format!("printed more than {MAX_BODY} bytes")),
        "{source}"
    );
    assert!(server.paths().is_empty(), "{:?}", server.paths());
}

/// The HTTP timeout is a wait, from 1 ms to 1 day: zero failed every call ("no complete
/// answer within 0ns"), and `Duration::MAX` ("no timeout") panicked on the first browser
/// login, in the wait for the token cache's lock.
#[test]
fn an_http_timeout_of_zero_or_past_any_clock_is_named() {
    for timeout in [
        Duration::ZERO,
        Duration::MAX,
        Duration::from_secs(24 * 3600 + 1),
    ] {
        let lakebase = Lakebase::new(
            "https://ws.example",
            WorkspaceAuth::Pat(PAT.into()),
            autoscaling(),
        )
        .unwrap();
        match lakebase.with_http_timeout(timeout) {
            Err(Error::Config { setting, .. }) => assert_eq!(setting, Setting::LakebaseHttpTimeout),
            other => panic!(
                "{timeout:?}: expected it refused, got {:?}",
                other.map(drop)
            ),
        }
    }
    let lakebase = Lakebase::new(
        "https://ws.example",
        WorkspaceAuth::Pat(PAT.into()),
        autoscaling(),
    )
    .unwrap();
    assert!(lakebase.with_http_timeout(Duration::from_millis(1)).is_ok());
}
