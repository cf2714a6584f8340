//! The local Lakebase-compatible credential service: discovery, the OAuth token call, both
//! database credential APIs, credentials that really log into PostgreSQL and expire there,
//! and the knobs that make the service misbehave.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dal::local::{LocalLakebase, LocalLakebaseConfig, LocalPostgres};
use reqwest::StatusCode;
use serde_json::{Value, json};

const AUTOSCALING: &str = "/api/2.0/postgres/credentials";
const PROVISIONED: &str = "/api/2.0/database/credentials";

async fn start(pg: &LocalPostgres, config: LocalLakebaseConfig) -> LocalLakebase {
    LocalLakebase::start(pg, config)
        .await
        .expect("start the local Lakebase")
}

/// The token call as the Databricks SDKs make it.
async fn token_call(
    lb: &LocalLakebase,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    tests::http()
        .post(lb.token_url())
        .basic_auth(id, Some(secret))
        .form(form)
        .send()
        .await
        .expect("send the token call")
}

async fn workspace_token(lb: &LocalLakebase) -> String {
    let config = lb.config();
    let response = token_call(
        lb,
        &config.client_id,
        &config.client_secret,
        &[("grant_type", "client_credentials"), ("scope", "all-apis")],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn credential_call(
    lb: &LocalLakebase,
    path: &str,
    bearer: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut request = tests::http()
        .post(format!("{}{path}", lb.url()))
        .json(&body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request.send().await.expect("send the credential call")
}

/// An Autoscaling credential for the configured endpoint: the token and its expiry.
async fn database_token(lb: &LocalLakebase, bearer: &str) -> (String, DateTime<Utc>) {
    let body = json!({ "endpoint": lb.config().endpoint });
    let response = credential_call(lb, AUTOSCALING, Some(bearer), body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let expiry = DateTime::parse_from_rfc3339(body["expire_time"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    (body["token"].as_str().unwrap().to_owned(), expiry)
}

async fn json_of(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    response.json().await.expect("a JSON body")
}

async fn port_is_free(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn discovery_leads_to_the_token_endpoint() {
    let pg = tests::server().await;
    let lb = start(
        &pg,
        LocalLakebaseConfig::default().with_workspace_id("1234"),
    )
    .await;
    assert!(lb.url().starts_with("http://127.0.0.1:"), "{}", lb.url());

    let config: Value = json_of(
        tests::http()
            .get(format!("{}/.well-known/databricks-config", lb.url()))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(config["oidc_endpoint"], format!("{}/oidc", lb.url()));
    assert_eq!(config["workspace_id"], "1234");
    assert_eq!(config["account_id"], lb.account_id());
    assert_eq!(config["cloud"], "local");

    let discovery_url = format!(
        "{}/.well-known/oauth-authorization-server",
        config["oidc_endpoint"].as_str().unwrap()
    );
    assert_eq!(
        discovery_url,
        format!("{}/oidc/.well-known/oauth-authorization-server", lb.url())
    );
    let discovery: Value = json_of(
        tests::http().get(&discovery_url).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(discovery["issuer"], format!("{}/oidc", lb.url()));
    assert_eq!(discovery["token_endpoint"], lb.token_url());
    assert_eq!(lb.token_url(), format!("{}/oidc/v1/token", lb.url()));
}

#[tokio::test]
async fn the_token_call_checks_the_client_credentials() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let (id, secret) = (
        lb.config().client_id.clone(),
        lb.config().client_secret.clone(),
    );
    let grant = [("grant_type", "client_credentials"), ("scope", "all-apis")];

    let ok = json_of(token_call(&lb, &id, &secret, &grant).await, StatusCode::OK).await;
    assert!(ok["access_token"].as_str().unwrap().len() >= 32, "{ok}");
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["expires_in"], 3600);
    assert_eq!(ok["scope"], "all-apis");
    // The scope may be left out.
    let ok = token_call(&lb, &id, &secret, &[("grant_type", "client_credentials")]).await;
    assert_eq!(ok.status(), StatusCode::OK);

    let wrong = json_of(
        token_call(&lb, &id, "not-the-secret", &grant).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(wrong["error"], "invalid_client");
    assert!(wrong["error_description"].is_string(), "{wrong}");
    assert!(!wrong.to_string().contains("not-the-secret"), "{wrong}");
    let wrong_id = token_call(&lb, "someone-else", &secret, &grant).await;
    assert_eq!(wrong_id.status(), StatusCode::UNAUTHORIZED);

    // The id and secret in the body instead of HTTP Basic are not client authentication.
    let no_basic = tests::http()
        .post(lb.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let no_basic = json_of(no_basic, StatusCode::UNAUTHORIZED).await;
    assert_eq!(no_basic["error"], "invalid_client");

    let bad_grant = json_of(
        token_call(&lb, &id, &secret, &[("grant_type", "password")]).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(bad_grant["error"], "unsupported_grant_type");
    assert!(bad_grant["error_description"].is_string());

    let bad_scope = token_call(
        &lb,
        &id,
        &secret,
        &[("grant_type", "client_credentials"), ("scope", "sql")],
    )
    .await;
    assert_eq!(
        json_of(bad_scope, StatusCode::BAD_REQUEST).await["error"],
        "invalid_scope"
    );

    assert_eq!(lb.oauth_requests(), 2, "only successful calls count");
}

#[tokio::test]
async fn both_credential_apis_answer_with_their_own_field_names() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let bearer = workspace_token(&lb).await;

    let before = Utc::now();
    let autoscaling = json_of(
        credential_call(
            &lb,
            AUTOSCALING,
            Some(&bearer),
            json!({ "endpoint": lb.config().endpoint }),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(autoscaling["token"].is_string(), "{autoscaling}");
    assert!(
        autoscaling.get("expiration_time").is_none(),
        "{autoscaling}"
    );
    let expire_time = autoscaling["expire_time"].as_str().unwrap();
    assert!(expire_time.ends_with('Z'), "{expire_time}");
    let expiry = DateTime::parse_from_rfc3339(expire_time).unwrap();
    let lifetime = expiry.with_timezone(&Utc) - before;
    assert!(
        (59..=61).contains(&lifetime.num_seconds()),
        "expires after {lifetime}, not the default 60 s"
    );

    let provisioned = json_of(
        credential_call(
            &lb,
            PROVISIONED,
            Some(&bearer),
            json!({
                "instance_names": [lb.config().instance],
                "request_id": uuid::Uuid::new_v4().to_string(),
            }),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(provisioned["token"].is_string(), "{provisioned}");
    assert!(provisioned.get("expire_time").is_none(), "{provisioned}");
    DateTime::parse_from_rfc3339(provisioned["expiration_time"].as_str().unwrap()).unwrap();
    assert_ne!(provisioned["token"], autoscaling["token"]);

    assert_eq!(lb.oauth_requests(), 1);
    assert_eq!(lb.credential_requests(), 2);
}

#[tokio::test]
async fn every_minted_token_logs_in_until_its_own_expiry() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    // The role did not exist: the service created it, named after the client id as Lakebase
    // names a service principal's role.
    let role = lb.config().role.clone();
    assert_eq!(role, lb.config().client_id);
    let bearer = workspace_token(&lb).await;

    let (first, _) = database_token(&lb, &bearer).await;
    let session = tests::login(&pg, &role, &first)
        .await
        .expect("log in with the token");
    let user: String = session
        .query_one("SELECT current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);

    // A second token does not end the first: both log in, as on Lakebase.
    let (second, _) = database_token(&lb, &bearer).await;
    tests::login(&pg, &role, &first)
        .await
        .expect("the first token still logs in");
    tests::login(&pg, &role, &second)
        .await
        .expect("log in with the new token");

    // Refused with SQLSTATE 28000: a guess, a token of another role, a revoked token.
    let refused = |r: dal::Result<_>| r.expect_err("refused").sqlstate().map(str::to_owned);
    assert_eq!(
        refused(tests::login(&pg, &role, "a-guess").await).as_deref(),
        Some("28000")
    );
    pg.create_role("other", "other-password", None)
        .await
        .unwrap();
    tests::assert_auth_failure(tests::login(&pg, "other", &first).await);
    lb.revoke(&first);
    tests::assert_auth_failure(tests::login(&pg, &role, &first).await);
    tests::login(&pg, &role, &second)
        .await
        .expect("revoking one token leaves the others");
    // The connector tries a refused login once more only with a different token, and here
    // the source gives the same one again: one refusal each for the guess and the revoked
    // token; the other role's login is a password login, which the verifier never sees.
    assert_eq!(pg.token_logins(), (4, 2));
}

#[tokio::test]
async fn a_credential_expires_but_open_sessions_go_on() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    // Long enough for a login on a busy machine before expiry.
    lb.set_token_ttl(Duration::from_secs(4));
    assert_eq!(lb.token_ttl(), Duration::from_secs(4));
    let bearer = workspace_token(&lb).await;
    let role = lb.config().role.clone();

    let (token, expiry) = database_token(&lb, &bearer).await;
    let lifetime = expiry - Utc::now();
    assert!(lifetime <= chrono::Duration::seconds(4), "{lifetime}");
    let session = tests::login(&pg, &role, &token)
        .await
        .expect("log in before expiry");

    let wait = (expiry - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(500);
    tokio::time::sleep(wait).await;
    tests::assert_auth_failure(tests::login(&pg, &role, &token).await);
    // PostgreSQL checks the password only at login, as Lakebase does.
    let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn credential_calls_need_a_valid_bearer_token() {
    let pg = tests::server().await;
    let config = LocalLakebaseConfig::default()
        .with_oauth_ttl(Duration::from_secs(3))
        .with_pat("dapi-local-pat");
    let lb = start(&pg, config).await;
    let body = || json!({ "endpoint": lb.config().endpoint });

    let unauthenticated = |v: &Value| {
        assert_eq!(v["error_code"], "UNAUTHENTICATED", "{v}");
        assert!(v["message"].is_string(), "{v}");
    };
    let missing = credential_call(&lb, AUTOSCALING, None, body()).await;
    unauthenticated(&json_of(missing, StatusCode::UNAUTHORIZED).await);
    let invalid = credential_call(&lb, AUTOSCALING, Some("made-up"), body()).await;
    let invalid = json_of(invalid, StatusCode::UNAUTHORIZED).await;
    unauthenticated(&invalid);
    assert!(!invalid.to_string().contains("made-up"), "{invalid}");
    let basic = tests::http()
        .post(format!("{}{AUTOSCALING}", lb.url()))
        .basic_auth(&lb.config().client_id, Some(&lb.config().client_secret))
        .json(&body())
        .send()
        .await
        .unwrap();
    unauthenticated(&json_of(basic, StatusCode::UNAUTHORIZED).await);
    let provisioned = credential_call(
        &lb,
        PROVISIONED,
        Some("made-up"),
        json!({ "instance_names": [lb.config().instance] }),
    )
    .await;
    unauthenticated(&json_of(provisioned, StatusCode::UNAUTHORIZED).await);

    // The workspace token works until its expiry, three seconds here (long enough for a
    // call on a busy machine), and not after.
    let bearer = workspace_token(&lb).await;
    let ok = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    assert_eq!(ok.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let expired = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    unauthenticated(&json_of(expired, StatusCode::UNAUTHORIZED).await);

    // A personal access token calls the API directly.
    let pat = credential_call(&lb, AUTOSCALING, Some("dapi-local-pat"), body()).await;
    assert_eq!(pat.status(), StatusCode::OK);
    assert_eq!(lb.credential_requests(), 2);
}

#[tokio::test]
async fn unknown_endpoints_instances_and_paths_are_not_found() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let bearer = workspace_token(&lb).await;

    let other = "projects/other/branches/production/endpoints/primary";
    let response = credential_call(
        &lb,
        AUTOSCALING,
        Some(&bearer),
        json!({ "endpoint": other }),
    )
    .await;
    let body = json_of(response, StatusCode::NOT_FOUND).await;
    assert_eq!(body["error_code"], "NOT_FOUND");
    assert!(body["message"].as_str().unwrap().contains(other), "{body}");

    let malformed = credential_call(
        &lb,
        AUTOSCALING,
        Some(&bearer),
        json!({ "endpoint": "primary" }),
    )
    .await;
    let malformed = json_of(malformed, StatusCode::BAD_REQUEST).await;
    assert_eq!(malformed["error_code"], "INVALID_PARAMETER_VALUE");

    let response = credential_call(
        &lb,
        PROVISIONED,
        Some(&bearer),
        json!({ "instance_names": ["elsewhere"], "request_id": uuid::Uuid::new_v4().to_string() }),
    )
    .await;
    assert_eq!(
        json_of(response, StatusCode::NOT_FOUND).await["error_code"],
        "NOT_FOUND"
    );

    let path = tests::http()
        .get(format!("{}/api/2.0/nothing-here", lb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_of(path, StatusCode::NOT_FOUND).await["error_code"],
        "ENDPOINT_NOT_FOUND"
    );
    assert_eq!(lb.credential_requests(), 0);
}

#[tokio::test]
async fn fail_next_fails_exactly_that_many_requests() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let bearer = workspace_token(&lb).await;
    let body = || json!({ "endpoint": lb.config().endpoint });

    lb.fail_next(2, 503);
    // Each in the shape its path answers errors with.
    let first = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    assert_eq!(first.headers()["retry-after"], "1");
    let first = json_of(first, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(first["error_code"], "TEMPORARILY_UNAVAILABLE");
    assert!(first["message"].is_string());
    let config = lb.config();
    let second = token_call(
        &lb,
        &config.client_id,
        &config.client_secret,
        &[("grant_type", "client_credentials")],
    )
    .await;
    let second = json_of(second, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(second["error"], "temporarily_unavailable");
    assert!(second["error_description"].is_string());

    let third = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    assert_eq!(third.status(), StatusCode::OK);
    assert_eq!(lb.oauth_requests(), 1);
    assert_eq!(lb.credential_requests(), 1);

    lb.fail_next(1, 429);
    let limited = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    assert_eq!(
        json_of(limited, StatusCode::TOO_MANY_REQUESTS).await["error_code"],
        "REQUEST_LIMIT_EXCEEDED"
    );
    lb.fail_next(5, 500);
    lb.fail_next(0, 500);
    let ok = credential_call(&lb, AUTOSCALING, Some(&bearer), body()).await;
    assert_eq!(ok.status(), StatusCode::OK, "fail_next(0, _) cancels");
}

#[tokio::test]
async fn latency_delays_every_response() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let url = format!("{}/.well-known/databricks-config", lb.url());
    let client = tests::http();

    lb.set_latency(Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // Failures too.
    lb.fail_next(1, 500);
    let started = Instant::now();
    let failed = client.get(&url).send().await.unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    lb.set_latency(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_service_that_is_down_answers_503_until_it_is_back() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    let bearer = workspace_token(&lb).await;
    let body = json!({ "endpoint": lb.config().endpoint });

    lb.set_down(true);
    for _ in 0..3 {
        let response = credential_call(&lb, AUTOSCALING, Some(&bearer), body.clone()).await;
        assert_eq!(
            json_of(response, StatusCode::SERVICE_UNAVAILABLE).await["error_code"],
            "TEMPORARILY_UNAVAILABLE"
        );
    }
    let discovery = tests::http()
        .get(format!(
            "{}/oidc/.well-known/oauth-authorization-server",
            lb.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(discovery.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(lb.credential_requests(), 0);

    lb.set_down(false);
    let response = credential_call(&lb, AUTOSCALING, Some(&bearer), body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(lb.credential_requests(), 1);
}

#[tokio::test]
async fn an_existing_role_served_by_the_service_logs_in_with_tokens_only() {
    let pg = tests::server().await;
    pg.create_role("app", "static-password", None)
        .await
        .unwrap();
    tests::login(&pg, "app", "static-password")
        .await
        .expect("a password role logs in with its password");
    let lb = start(&pg, LocalLakebaseConfig::default().with_role("app")).await;

    let bearer = workspace_token(&lb).await;
    let (token, _) = database_token(&lb, &bearer).await;
    tests::login(&pg, "app", &token)
        .await
        .expect("log in with the token");
    // Like a Lakebase OAuth role: its logins are token logins now.
    tests::assert_auth_failure(tests::login(&pg, "app", "static-password").await);
}

/// The user login takes whoever asks as the user, signed in and consenting, so it is served
/// only when asked for: on by default, any program on the machine got a login code for the
/// price of a request, then workspace and database tokens with it.
#[tokio::test]
async fn the_user_login_is_served_only_when_asked_for() {
    let pg = tests::server().await;
    // Redirected back to the service itself, which knows no such page: the address shows
    // whether a code came with the redirect.
    let authorize = |lb: &LocalLakebase| {
        let base = lb.url();
        async move {
            let url = format!(
                "{base}/oidc/v1/authorize?client_id=databricks-cli&\
                 redirect_uri={base}/callback&response_type=code&code_challenge=abc&\
                 code_challenge_method=S256"
            );
            let response = tests::http().get(url).send().await.unwrap();
            let coded = response.url().query_pairs().any(|(k, _)| k == "code");
            (response.status(), coded)
        }
    };
    let off = start(&pg, LocalLakebaseConfig::default()).await;
    assert_eq!(authorize(&off).await, (StatusCode::FORBIDDEN, false));
    let on = start(&pg, LocalLakebaseConfig::default().with_user_login()).await;
    assert!(authorize(&on).await.1, "a code, with the user login on");
}

#[tokio::test]
async fn debug_output_holds_no_secret() {
    let pg = tests::server().await;
    let lb = start(
        &pg,
        LocalLakebaseConfig::default().with_pat("dapi-local-pat"),
    )
    .await;
    let debug = format!("{lb:?}");
    assert!(debug.contains(&lb.url()), "{debug}");
    assert!(!debug.contains(&lb.config().client_secret), "{debug}");
    assert!(!debug.contains("dapi-local-pat"), "{debug}");
}

#[tokio::test]
async fn invalid_settings_are_refused_at_start() {
    let pg = tests::server().await;
    let err = LocalLakebase::start(
        &pg,
        LocalLakebaseConfig::default().with_endpoint("endpoints/primary"),
    )
    .await
    .expect_err("a malformed endpoint path");
    assert!(
        err.to_string().contains("LocalLakebaseConfig::endpoint"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_and_drop_free_the_port() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    // A kept-alive connection must not hold the service open.
    let client = tests::http();
    let url = format!("{}/.well-known/databricks-config", lb.url());
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::OK
    );
    let port = lb.addr().port();
    tokio::time::timeout(Duration::from_secs(5), lb.shutdown())
        .await
        .expect("shutdown returns promptly");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "still listening on {port} after shutdown"
    );
    assert!(client.get(&url).send().await.is_err());

    // A request waiting out its latency does not hold a dropped service open.
    let lb = start(&pg, LocalLakebaseConfig::default()).await;
    lb.set_latency(Duration::from_secs(3600));
    let port = lb.addr().port();
    let url = format!("{}/.well-known/databricks-config", lb.url());
    let pending = tokio::spawn(async move { tests::http().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(lb);
    assert!(
        port_is_free(port).await,
        "still listening on {port} after drop"
    );
    let answered = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the pending request ends")
        .unwrap();
    if let Ok(response) = answered {
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// An Autoscaling `ttl` sets the credential's life, within the documented 300-3600 s; one
/// outside is refused with 400, as the API answers; and dal asks for it end to end.
#[tokio::test]
async fn a_credential_lives_the_ttl_asked_for() {
    let pg = tests::server().await;
    let lb = start(&pg, LocalLakebaseConfig::new()).await;
    let bearer = workspace_token(&lb).await;
    let ask = |ttl: &str| json!({ "endpoint": lb.config().endpoint, "ttl": ttl });
    let before = Utc::now();
    let body = json_of(
        credential_call(&lb, AUTOSCALING, Some(&bearer), ask("900s")).await,
        StatusCode::OK,
    )
    .await;
    let expiry = DateTime::parse_from_rfc3339(body["expire_time"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    assert!(
        expiry >= before + chrono::Duration::seconds(899)
            && expiry <= Utc::now() + chrono::Duration::seconds(900),
        "{expiry}"
    );
    for bad in ["299s", "3601s", "15m", "900"] {
        let body = json_of(
            credential_call(&lb, AUTOSCALING, Some(&bearer), ask(bad)).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(body["error_code"], "INVALID_PARAMETER_VALUE", "{bad}");
    }

    // Through dal: the service's own life is 60 s; 600 s asked for, 600 s given.
    let source = dal::credentials::Lakebase::new(
        &lb.url(),
        dal::credentials::WorkspaceAuth::ClientCredentials {
            client_id: lb.config().client_id.clone(),
            client_secret: lb.config().client_secret.clone().into(),
            token_url: None,
        },
        dal::credentials::LakebaseTarget::Autoscaling {
            endpoint: lb.config().endpoint.clone(),
        },
    )
    .unwrap()
    .with_ttl(std::time::Duration::from_secs(600))
    .unwrap();
    use dal::credentials::CredentialSource;
    let token = source.fetch().await.unwrap();
    let left = token
        .expires_at()
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > std::time::Duration::from_secs(590), "{left:?}");
}

/// A user login (`external-browser`) to `lb`'s workspace, which keeps its refresh token under
/// `cache` and takes the login's redirect on any free port.
fn user_login(lb: &LocalLakebase, cache: &std::path::Path) -> dal::credentials::Lakebase {
    use dal::credentials::{Lakebase, LakebaseTarget, WorkspaceAuth};
    Lakebase::new(
        &lb.url(),
        WorkspaceAuth::ExternalBrowser {
            client_id: None,
            open_browser: false,
        },
        LakebaseTarget::Autoscaling {
            endpoint: lb.config().endpoint.clone(),
        },
    )
    .unwrap()
    .with_token_cache_dir(cache.join("dal"))
    .with_redirect_port(0)
}

/// Logs `source` in as its user would: its fetch shows the login's address (to `addresses`,
/// through its login prompt), which is then opened in place of a browser.
async fn log_in(
    source: &std::sync::Arc<dal::credentials::Lakebase>,
    addresses: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use dal::credentials::CredentialSource;
    let login = tokio::spawn({
        let source = std::sync::Arc::clone(source);
        async move { source.fetch().await }
    });
    open_in_browser(&addresses.recv().await.unwrap()).await;
    login.await.unwrap().unwrap();
}

/// Opens a login's address as a browser would, for a user already signed in.
async fn open_in_browser(address: &str) {
    let page = tests::http().get(address).send().await.unwrap();
    assert!(page.status().is_success(), "{:?}", page.text().await);
}

/// A user login outlives a caller cancelled while it waits (as a connect timeout cancels
/// one): the next caller waits for the same login at the address already shown, instead of
/// showing a new one whose redirect the first address would miss.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_outlives_a_cancelled_caller() {
    use dal::credentials::CredentialSource;
    let pg = tests::server().await;
    let lb = LocalLakebase::start(&pg, LocalLakebaseConfig::new().with_user_login())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (shown, mut addresses) = tokio::sync::mpsc::unbounded_channel::<String>();
    let source = std::sync::Arc::new(user_login(&lb, cache.path()).with_login_prompt(move |url| {
        let _ = shown.send(url.to_owned());
    }));
    let first = tokio::spawn({
        let source = std::sync::Arc::clone(&source);
        async move { source.fetch().await }
    });
    let address = addresses.recv().await.unwrap();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let second = tokio::spawn({
        let source = std::sync::Arc::clone(&source);
        async move { source.fetch().await }
    });
    open_in_browser(&address).await;
    let token = second.await.unwrap().unwrap();
    assert!(!token.expose().is_empty());
    assert!(addresses.try_recv().is_err(), "a second login was started");
}

/// Programs sharing a user login's token cache file, started together, each trade its
/// refresh token without logging in again. Databricks' refresh tokens are single-use by
/// default, and so are the local service's: of two programs that traded the same one, one
/// was refused, and found the file not yet rewritten by the other; it showed a new login
/// address. Each round here starts four such programs (sources of their own, one file).
#[tokio::test(flavor = "multi_thread")]
async fn programs_sharing_a_login_refresh_together_without_logging_in_again() {
    use dal::credentials::CredentialSource;
    let pg = tests::server().await;
    let lb = LocalLakebase::start(&pg, LocalLakebaseConfig::new().with_user_login())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let program = |prompt: Box<dyn Fn(&str) + Send + Sync>| {
        user_login(&lb, cache.path()).with_login_prompt(prompt)
    };
    // The user's one login.
    let (shown, mut addresses) = tokio::sync::mpsc::unbounded_channel::<String>();
    let first = std::sync::Arc::new(program(Box::new(move |url| {
        let _ = shown.send(url.to_owned());
    })));
    log_in(&first, &mut addresses).await;

    for round in 0..10 {
        let logins = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let together: Vec<_> = (0..4)
            .map(|_| {
                let logins = std::sync::Arc::clone(&logins);
                program(Box::new(move |_| {
                    logins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }))
            })
            .collect();
        // A program that had to log in waits for a browser: the round's bound.
        let fetched = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            futures_util::future::join_all(together.iter().map(|p| p.fetch())),
        )
        .await;
        assert_eq!(
            logins.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "round {round}: a program had to log in again"
        );
        for token in fetched.expect("no login was shown, and yet a program waited") {
            token.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

/// A program logged in goes on with the refresh token it holds when the token cache file
/// can no longer be read (made readable by others, here): the file's fault is logged, and
/// the token in memory is traded. Before, every refresh failed on the file.
#[tokio::test(flavor = "multi_thread")]
async fn a_login_goes_on_with_its_refresh_token_when_the_cache_file_cannot_be_read() {
    use dal::credentials::{Clock, CredentialSource};
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The system's clock, moved on by the seconds held.
    struct Later(Arc<AtomicU64>);
    impl Clock for Later {
        fn now(&self) -> std::time::SystemTime {
            std::time::SystemTime::now() + Duration::from_secs(self.0.load(Ordering::SeqCst))
        }
    }

    let pg = tests::server().await;
    let lb = LocalLakebase::start(
        &pg,
        LocalLakebaseConfig::new()
            .with_oauth_ttl(Duration::from_secs(60))
            .with_token_ttl(Duration::from_secs(3600))
            .with_user_login(),
    )
    .await
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let later = Arc::new(AtomicU64::new(0));
    let (shown, mut addresses) = tokio::sync::mpsc::unbounded_channel::<String>();
    let source = Arc::new(
        user_login(&lb, cache.path())
            .with_clock(Arc::new(Later(Arc::clone(&later))))
            .with_login_prompt(move |url| {
                let _ = shown.send(url.to_owned());
            }),
    );
    log_in(&source, &mut addresses).await;

    let file = std::fs::read_dir(cache.path().join("dal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The workspace token's life gone by: the next fetch trades the refresh token.
    later.store(120, Ordering::SeqCst);
    source
        .fetch()
        .await
        .expect("the refresh token in memory is traded");
    assert!(addresses.try_recv().is_err(), "a second login was started");
}
