//! The PostgreSQL server the project starts itself: cleanup, token-like password expiry, and
//! the persistent development cluster.

use std::time::Duration;

use chrono::Utc;
use dal::local::LocalPostgres;

#[tokio::test]
async fn an_ephemeral_cluster_is_removed_on_drop() {
    let pg = tests::server().await;
    let root = pg.root().to_owned();
    let port = pg.port();
    assert!(root.join("data").is_dir());
    assert!(pg.ca_cert_path().is_file());
    pg.admin("postgres").await.expect("connect");
    drop(pg);
    assert!(!root.exists(), "{} left behind", root.display());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the server still listens on {port}"
    );
}

#[tokio::test]
async fn a_rotated_password_behaves_like_a_short_lived_token() {
    let pg = tests::server().await;
    pg.create_role(
        "app",
        "token-1",
        Some(Utc::now() + chrono::Duration::minutes(5)),
    )
    .await
    .unwrap();
    let session = tests::login(&pg, "app", "token-1")
        .await
        .expect("login with token-1");

    // Valid for 5 s: time for the two logins below on a busy machine.
    let until = Utc::now() + chrono::Duration::seconds(5);
    pg.rotate_password("app", "token-2", Some(until))
        .await
        .unwrap();
    tests::assert_auth_failure(tests::login(&pg, "app", "token-1").await);
    tests::login(&pg, "app", "token-2")
        .await
        .expect("login with token-2");

    let left = (until - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(500)).await;
    tests::assert_auth_failure(tests::login(&pg, "app", "token-2").await);
    // Postgres checks the password only at login: the open session goes on.
    let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// Programs that create the same login role, or set its password, at once all succeed,
/// and the role ends with one of their passwords. Two `CREATE ROLE` of one name that both
/// found none meet in the catalog's unique index (SQLSTATE `23505`), and two `ALTER ROLE`
/// of one role may fail with `tuple concurrently updated`. Before, such runs failed with
/// the first.
#[tokio::test]
async fn the_same_role_created_or_given_a_password_at_once_succeeds_for_all() {
    let pg = tests::server().await;
    for round in 0..4 {
        let role = format!("together_{round}");
        let passwords: Vec<_> = (0..8).map(|i| format!("pw-{round}-{i}")).collect();
        let created = futures_util::future::join_all(
            passwords.iter().map(|pw| pg.create_role(&role, pw, None)),
        )
        .await;
        let rotated = futures_util::future::join_all(
            passwords
                .iter()
                .map(|pw| pg.rotate_password(&role, pw, None)),
        )
        .await;
        for (i, result) in created.into_iter().chain(rotated).enumerate() {
            result.unwrap_or_else(|e| panic!("{role}, call {i}: {e}"));
        }
        let mut logged_in = 0;
        for pw in &passwords {
            logged_in += usize::from(tests::login(&pg, &role, pw).await.is_ok());
        }
        assert_eq!(logged_in, 1, "{role}: one of the passwords holds");
    }
}

#[tokio::test]
async fn the_superuser_password_is_never_printed() {
    let pg = tests::server().await;
    let debug = format!("{pg:?}");
    assert!(debug.contains("** redacted **"), "{debug}");
    let password = secrecy::ExposeSecret::expose_secret(pg.superuser_password()).to_owned();
    assert!(!debug.contains(&password), "{debug}");
}

/// The server's processes run as another OS user when the program runs as root, and that user
/// can read their environment (`/proc/PID/environ`): they get only what PostgreSQL needs, none
/// of the program's credentials (`AWS_SECRET_ACCESS_KEY`, `DATABRICKS_CLIENT_SECRET`, ...).
#[tokio::test]
async fn the_server_inherits_no_environment_beyond_what_it_needs() {
    let pg = tests::server().await;
    let pid_file = pg.root().join("data").join("postmaster.pid");
    let pids = std::fs::read_to_string(&pid_file).unwrap();
    let pid = pids.lines().next().unwrap().trim();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            entry.split('=').next().unwrap_or_default().to_owned()
        })
        .collect();
    assert!(names.iter().any(|name| name == "PATH"), "{names:?}");
    // Of this program's environment: the shell that watches the server sets some of its own
    // (PWD; bash, SHLVL and _ as well).
    let needed = |name: &str| {
        let shell = ["PWD", "SHLVL", "_"];
        let server = [
            "PATH",
            "LANG",
            "LANGUAGE",
            "TZ",
            "TMPDIR",
            "LD_LIBRARY_PATH",
        ];
        shell.contains(&name) || server.contains(&name) || name.starts_with("LC_")
    };
    let ours: Vec<String> = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    let more: Vec<_> = names
        .iter()
        .filter(|name| ours.contains(name) && !needed(name))
        .collect();
    assert!(more.is_empty(), "the server inherited {more:?}");
}

#[tokio::test]
async fn the_dev_cluster_persists_restarts_and_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    // As root the server runs as another user, who must be able to reach the directory.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = parent.path().join("cluster");

    let pg = LocalPostgres::dev_in(&root)
        .await
        .expect("create the dev cluster");
    assert!(!pg.is_ephemeral());
    pg.create_database("kept", None).await.unwrap();
    let port = pg.port();
    drop(pg);

    // Still running after its handle is gone, and found again.
    let pg = LocalPostgres::dev_in(&root)
        .await
        .expect("reuse the dev cluster");
    assert_eq!(pg.port(), port);
    pg.admin("kept").await.expect("the database survived");

    // Stopped by a command, then started on demand with its data; a taken port is replaced.
    assert!(LocalPostgres::stop_dev_in(&root).unwrap());
    assert!(!LocalPostgres::stop_dev_in(&root).unwrap());
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let pg = LocalPostgres::dev_in(&root)
        .await
        .expect("restart the dev cluster");
    assert_ne!(pg.port(), port);
    pg.admin("kept")
        .await
        .expect("the database survived a restart");
    drop(squatter);
    assert!(LocalPostgres::stop_dev_in(&root).unwrap());

    // A state file that cannot be read (a crash in the middle of rewriting it, say) is named,
    // and the cluster's data is kept.
    let state = root.join("dal-dev.json");
    std::fs::write(&state, b"").unwrap();
    let err = LocalPostgres::dev_in(&root).await.map(drop).unwrap_err();
    assert!(err.to_string().contains("dal-dev.json"), "{err}");
    assert!(
        root.join("data").join("PG_VERSION").is_file(),
        "the data is gone"
    );

    // A cluster whose creation never finished (no state file) is created afresh.
    std::fs::remove_file(root.join("dal-dev.json")).unwrap();
    let pg = LocalPostgres::dev_in(&root)
        .await
        .expect("recreate the dev cluster");
    assert!(
        pg.admin("kept").await.is_err(),
        "the old data should be gone"
    );
    assert!(LocalPostgres::stop_dev_in(&root).unwrap());
}

/// Two programs on one development cluster each answer token logins, at an address of its
/// own: when the first ends, the next login is checked by the second at once. Before, the
/// second stood by and took over within a tenth of a second, and a login in between was
/// refused (SQLSTATE 28000).
#[tokio::test]
async fn token_logins_go_on_at_once_when_the_program_answering_them_ends() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;
    let parent = tempfile::tempdir().unwrap();
    // As root the server runs as another user, who must be able to reach the directory.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = parent.path().join("cluster");
    let first = LocalPostgres::dev_in(&root).await.expect("the dev cluster");
    let second = LocalPostgres::dev_in(&root)
        .await
        .expect("the dev cluster, again");
    second.create_token_role("taker").await.unwrap();
    let login = |pg: &LocalPostgres| {
        let token = pg.mint_token("taker", SystemTime::now() + Duration::from_secs(60));
        let config = pg.config("postgres", "taker", &token);
        async move {
            let connector = dal::Connector::new(config).await?;
            let (client, connection) = connector.connect().await?;
            tokio::spawn(connection);
            client
                .batch_execute("SELECT 1")
                .await
                .map_err(dal::Error::Database)
        }
    };
    login(&second).await.expect("a login while both answer");
    // The first program's verifier ends with it: wait until its address refuses.
    let port = ldap_port(&root);
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first verifier never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..5 {
        login(&second)
            .await
            .expect("a login right after the first program ended");
    }
    assert!(LocalPostgres::stop_dev_in(&root).unwrap());
}

/// The port the token verifiers of the cluster in `root` listen on.
fn ldap_port(root: &std::path::Path) -> u16 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("token-logins.json")).unwrap()).unwrap();
    state["ldap_port"].as_u64().unwrap() as u16
}

/// The platforms' limits as knobs: a connection limit answered with SQLSTATE 53300, and a
/// maximum connection age after which the server closes the connection (DSQL's 60 minutes).
#[tokio::test]
async fn connection_limits_and_ages_behave_as_the_platforms_document() {
    let pg = tests::server().await;
    pg.create_token_role("lim").await.unwrap();
    let token = pg.mint_token(
        "lim",
        std::time::SystemTime::now() + Duration::from_secs(600),
    );
    pg.set_connection_limit("lim", Some(1)).await.unwrap();
    let held = tests::login(&pg, "lim", &token)
        .await
        .expect("the first connection");
    let err = tests::login(&pg, "lim", &token)
        .await
        .expect_err("over the limit");
    assert_eq!(err.sqlstate(), Some("53300"), "{err:?}");
    assert!(!err.is_auth_failure(), "{err:?}");
    drop(held);
    pg.set_connection_limit("lim", None).await.unwrap();

    let _limit = pg.limit_connection_age(Duration::from_millis(500));
    let connector = dal::Connector::new(pg.config("postgres", "lim", &token))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (client, connection) = connector.connect().await.unwrap();
    // The server ends the connection: its task finishes (bounded only against a hang).
    tokio::time::timeout(Duration::from_secs(120), connection)
        .await
        .expect("the server closes the connection")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(client.is_closed());
}
