//! No secret reaches a log line (TRACE, `log` records included), a `Debug`, a `Display` or an
//! error, through a run with Lakebase credentials, rotation, DSQL tokens, static passwords
//! and refused logins.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dal::credentials::{Clock, CredentialSource, Dsql};
use dal::local::{LocalLakebase, LocalLakebaseConfig};
use dal::{Config, Connector, TokenStrategy};
use secrecy::ExposeSecret;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Now;
impl Clock for Now {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_debug_display_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("install the capturing subscriber");

    let pg = tests::server().await;
    let lb = LocalLakebase::start(
        &pg,
        LocalLakebaseConfig::new().with_token_ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    pg.create_database("sec", Some(&lb.config().role))
        .await
        .unwrap();
    let mut secrets: Vec<String> = vec![
        lb.config().client_secret.clone(),
        pg.superuser_password().expose_secret().to_owned(),
    ];
    let mut shown: Vec<String> = Vec::new();

    // Lakebase credentials through both ORMs, across a rotation.
    let connector = Connector::new(
        lb.client_config(&pg, "sec")
            .unwrap()
            .strategy(TokenStrategy::Eager),
    )
    .await
    .unwrap();
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&tokens);
    connector.cache().on_refresh(move |t| {
        seen.lock().unwrap().push(t.expose().to_owned());
        true
    });
    secrets.push(connector.cache().current().unwrap().expose().to_owned());
    let db = connector.seaorm().await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    <migration::Migrator as migration::MigratorTrait>::up(
        &tests::migration_db(&connector).await,
        None,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tests::diesel_round_trip(&diesel, "sec").await;
    tests::seaorm_round_trip(&db, "sec").await;
    shown.push(format!(
        "{connector:?} {:?} {:?} {db:?} {diesel:?}",
        connector.cache(),
        connector.cache().current()
    ));
    shown.push(format!("{lb:?} {pg:?}"));

    // A wrong client secret, a wrong static password, a refused token.
    let mut bad = lb.client_config(&pg, "sec").unwrap();
    let wrong_secret = "wrong-client-secret-0123456789";
    bad.credentials = Some(dal::Credentials::source(
        dal::credentials::Lakebase::new(
            &lb.url(),
            dal::credentials::WorkspaceAuth::ClientCredentials {
                client_id: lb.config().client_id.clone(),
                client_secret: wrong_secret.to_owned().into(),
                token_url: None,
            },
            dal::credentials::LakebaseTarget::Autoscaling {
                endpoint: lb.config().endpoint.clone(),
            },
        )
        .unwrap(),
    ));
    secrets.push(wrong_secret.to_owned());
    shown.push(format!("{bad:?}"));
    let err = Connector::new(bad).await.unwrap_err();
    shown.push(format!("{err} {err:?} {}", chain(&err)));

    let wrong_password = "static-wrong-password-9876";
    secrets.push(wrong_password.to_owned());
    let config = pg.config("sec", &lb.config().role, wrong_password);
    shown.push(format!("{config:?}"));
    let static_connector = Connector::new(config).await.unwrap();
    let err = static_connector.connect().await.err().unwrap();
    shown.push(format!("{err} {err:?} {}", chain(&err)));
    let err = static_connector
        .diesel_pool()
        .await
        .unwrap()
        .get()
        .await
        .err()
        .unwrap();
    shown.push(format!("{err} {err:?} {}", chain(&err)));

    // Workload identity federation: an ID token from a file, and one from the GitHub
    // Actions-like service with its request token.
    let id_token = lb.id_token(&lb.token_url());
    secrets.push(id_token.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("id-token"), &id_token).unwrap();
    let [(_, request_url), (_, request_token)] = lb.github_actions_env();
    secrets.push(request_token.clone());
    for id_token in [
        dal::credentials::IdTokenSource::File(dir.path().join("id-token")),
        dal::credentials::IdTokenSource::GitHubActions {
            request_url,
            request_token: request_token.into(),
        },
    ] {
        let source = dal::credentials::Lakebase::new(
            &lb.url(),
            dal::credentials::WorkspaceAuth::Federated {
                client_id: Some(lb.config().client_id.clone()),
                id_token,
            },
            dal::credentials::LakebaseTarget::Autoscaling {
                endpoint: lb.config().endpoint.clone(),
            },
        )
        .unwrap();
        let token = source.fetch().await.unwrap();
        secrets.push(token.expose().to_owned());
        shown.push(format!("{source:?} {token:?}"));
    }

    // A URL with a password in it, valid and malformed.
    let url_password = "url-password-5555";
    secrets.push(url_password.to_owned());
    let from_url = Config::from_lookup(|k| {
        (k == "DATABASE_URL").then(|| format!("postgres://u:{url_password}@localhost/db"))
    })
    .unwrap();
    shown.push(format!("{from_url:?}"));
    let err = Config::from_lookup(|k| {
        (k == "DATABASE_URL").then(|| format!("postgres://u:{url_password}@[bad/db"))
    })
    .unwrap_err();
    shown.push(format!("{err} {err:?}"));

    // DSQL keys and tokens.
    let dsql_secret = "dsqlSecretAccessKeyEXAMPLE0000000000000";
    secrets.push(dsql_secret.to_owned());
    let dsql = Dsql::new(
        "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
        "admin",
        None,
    )
    .unwrap()
    .with_clock(Arc::new(Now))
    .with_static_credentials(
        "AKIDEXAMPLE",
        dsql_secret,
        Some("session-token-secret-42".into()),
    );
    secrets.push("session-token-secret-42".to_owned());
    let token = dsql.fetch().await.unwrap();
    secrets.push(token.expose().to_owned());
    shown.push(format!("{dsql:?} {token:?}"));

    // DSQL tokens through a connector: a login, and one refused (a token signed for
    // another region), with what the connector logs and answers for each.
    pg.create_token_role("sec_dsql").await.unwrap();
    let (key_id, key) = pg.dsql_access_keys();
    secrets.push(key.expose_secret().to_owned());
    let dsql_tokens = Arc::new(Mutex::new(Vec::new()));
    for (region, accepted) in [(dal::local::LOCAL_DSQL_REGION, true), ("eu-west-1", false)] {
        let source = Dsql::new(dal::local::LOCAL_DSQL_HOST, "sec_dsql", Some(region))
            .unwrap()
            .with_static_credentials(key_id.clone(), key.expose_secret(), None);
        let config = Config::new(dal::local::LOCAL_DSQL_HOST, "sec_dsql")
            .port(pg.port())
            .database("postgres")
            .ssl_root_cert(pg.ca_cert_path())
            .credentials(dal::Credentials::source(source))
            .strategy(TokenStrategy::Lazy);
        let dsql_connector = Connector::new(config).await.unwrap();
        let seen = Arc::clone(&dsql_tokens);
        dsql_connector.cache().on_refresh(move |t| {
            seen.lock().unwrap().push(t.expose().to_owned());
            true
        });
        match dsql_connector.connect().await {
            Ok((client, connection)) => {
                assert!(accepted, "a token signed for {region} logged in");
                tokio::spawn(connection);
                client.simple_query("SELECT 1").await.unwrap();
            }
            Err(e) => {
                assert!(!accepted && e.is_auth_failure(), "{e:?}");
                shown.push(format!("{e} {e:?}{}", chain(&e)));
            }
        }
        shown.push(format!("{dsql_connector:?}"));
        dsql_connector.shutdown().await;
    }
    let dsql_tokens = dsql_tokens.lock().unwrap().clone();
    assert!(dsql_tokens.len() >= 2, "{} DSQL tokens", dsql_tokens.len());
    secrets.extend(dsql_tokens);

    connector.shutdown().await;
    static_connector.shutdown().await;
    // The workspace token the connector called the credential API with.
    let workspace = lb.workspace_tokens();
    assert!(!workspace.is_empty(), "a workspace token was issued");
    secrets.extend(workspace);
    drop(lb);

    secrets.extend(tokens.lock().unwrap().iter().cloned());
    assert!(
        !tokens.lock().unwrap().is_empty(),
        "the token should have rotated"
    );
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("token fetched"), "the capture works");
    assert!(logs.lines().count() > 20, "TRACE output was captured");
    for secret in &secrets {
        assert!(!secret.is_empty());
        for (i, text) in shown.iter().enumerate() {
            assert!(
                !text.contains(secret.as_str()),
                "secret in shown text #{i}: {text}"
            );
        }
        // As text, and as the `Debug` of its bytes (`[100, 97, 108, ...]`).
        let bytes = secret.bytes().map(|b| b.to_string()).collect::<Vec<_>>();
        for form in [secret.clone(), bytes.join(", ")] {
            if let Some(line) = logs.lines().find(|l| l.contains(&form)) {
                panic!("a secret reached the logs: {line}");
            }
        }
    }
    assert!(
        !logs.contains("Bearer "),
        "an Authorization header reached the logs"
    );
    assert!(
        !logs.contains("Basic "),
        "an Authorization header reached the logs"
    );
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s} ({s:?})"));
        source = s.source();
    }
    out
}

/// The local server's sqlx options read no password file, as the connector's do not: sqlx
/// logs a malformed line of `~/.pgpass` whole, with the password in it.
#[test]
fn the_local_servers_sqlx_options_read_no_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, "*:*:*:hunter2-in-pgpass\n").unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    // SAFETY: before any runtime starts; nothing else of this test's process reads the
    // environment meanwhile.
    unsafe {
        std::env::set_var("PGPASSFILE", &passfile);
        std::env::remove_var("PGPASSWORD");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pg = runtime.block_on(tests::server());
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || drop(pg.sqlx_options("postgres")));
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        !log.contains("hunter2"),
        "the password file's line was logged: {log}"
    );
}
