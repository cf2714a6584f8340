//! The example programs as processes, against a test server with the local Lakebase
//! service in front of it, configured through the environment as a user would.
//!
//! The programs are built by `cargo test --workspace` (they are integration-tested in their
//! own crate too); these tests find them next to the test executable.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dal::local::{LocalLakebase, LocalPostgres};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// The path of an example program, built into the same profile directory as this test.
fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the profile directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the example programs first with `cargo build -p examples --bins` \
         (`cargo test --workspace` and `cargo nextest run --workspace` build them)",
        path.display()
    );
    path
}

/// A running example program; killed when dropped, so that no test leaves one behind.
struct Program {
    name: &'static str,
    child: tokio::process::Child,
    stdout: mpsc::UnboundedReceiver<(Instant, String)>,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr until the program closes it; `wait` lets it finish.
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Program {
    /// Starts `name` with only `vars` in its environment, in an empty directory (no `.env`).
    fn start(name: &'static str, vars: &[(&str, String)]) -> Self {
        Self::start_with_args(name, vars, &[])
    }

    /// Like [`start`](Self::start), with command-line arguments.
    fn start_with_args(name: &'static str, vars: &[(&str, String)], args: &[&str]) -> Self {
        Self::launch(name, vars, args, None)
    }

    /// Like [`start`](Self::start), with a `.env` file of `contents` in its directory.
    fn start_with_env_file(name: &'static str, contents: &str) -> Self {
        Self::launch(name, &[], &[], Some(contents))
    }

    fn launch(
        name: &'static str,
        vars: &[(&str, String)],
        args: &[&str],
        env_file: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Some(contents) = env_file {
            std::fs::write(dir.path().join(".env"), contents).unwrap();
        }
        let mut child = tokio::process::Command::new(program(name))
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        let (tx, stdout) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send((Instant::now(), line));
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self {
            name,
            child,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
            seen: Vec::new(),
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The one `error: ` line the program printed on stderr; fails unless there is exactly one.
    fn the_error_line(&self) -> String {
        let stderr = self.stderr();
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{}", self.output());
        errors[0].to_owned()
    }

    /// Takes in the stdout lines the program printed so far.
    fn read_stdout(&mut self) {
        while let Ok((_, line)) = self.stdout.try_recv() {
            self.seen.push(line);
        }
    }

    fn output(&self) -> String {
        format!(
            "{} stdout:\n{}\nstderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr()
        )
    }

    /// The next stdout line starting with `prefix`, and when it was read.
    async fn line(&mut self, prefix: &str, within: Duration) -> (Instant, String) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stdout.recv()).await {
                Ok(Some((at, line))) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return (at, line);
                    }
                }
                Ok(None) => {
                    // Let stderr catch up before reporting it.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    panic!("no line {prefix:?} before the end: {}", self.output());
                }
                Err(_) => panic!("no line {prefix:?} within {within:?}: {}", self.output()),
            }
        }
    }

    /// Every stdout line until the program closes it.
    async fn rest(&mut self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some((_, line))) = tokio::time::timeout_at(deadline, self.stdout.recv()).await
        {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    async fn wait(&mut self, within: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("did not exit within {within:?}: {}", self.output()),
        };
        // The program has exited: its stderr ends as soon as the reader has caught up.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }
}

/// The variables a Lakebase user sets, pointing at the local service and the test server.
fn lakebase_env(
    pg: &LocalPostgres,
    lb: &LocalLakebase,
    database: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("DATABRICKS_HOST", lb.url()),
        ("DATABRICKS_CLIENT_ID", lb.config().client_id.clone()),
        (
            "DATABRICKS_CLIENT_SECRET",
            lb.config().client_secret.clone(),
        ),
        ("LAKEBASE_ENDPOINT", lb.config().endpoint.clone()),
        ("PGHOST", "localhost".into()),
        ("PGPORT", pg.port().to_string()),
        ("PGDATABASE", database.into()),
        ("PGSSLROOTCERT", pg.ca_cert_path().display().to_string()),
        ("RUST_LOG", "info".into()),
    ]
}

/// Sends a request and returns the status and JSON body.
async fn call(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("the request reaches web_app");
    let status = response.status();
    let text = response.text().await.expect("a body");
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

fn assert_error(got: (StatusCode, Value), status: StatusCode, code: &str) -> Value {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"], code, "{}", got.1);
    assert!(got.1["message"].is_string(), "{}", got.1);
    assert_eq!(
        got.1.as_object().map(|o| o.len()),
        Some(2),
        "one fixed shape: {}",
        got.1
    );
    got.1
}

#[tokio::test(flavor = "multi_thread")]
async fn web_app_serves_both_orms_and_its_errors_while_tokens_rotate() {
    let pg = tests::server().await;
    let ttl = Duration::from_secs(2);
    let lb = tests::lakebase(&pg, "web", ttl).await;
    let mut env = lakebase_env(&pg, &lb, "web");
    env.push(("PORT", "0".into()));
    let secret = lb.config().client_secret.clone();
    let mut app = Program::start("web_app", &env);
    let (_, line) = app.line("listening on ", Duration::from_secs(60)).await;
    let base = line["listening on ".len()..].trim().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    let http = tests::http();
    let url = |path: &str| format!("{base}{path}");

    let health = call(http.get(url("/healthz"))).await;
    assert_eq!(health.0, StatusCode::OK, "{}", health.1);
    assert_eq!(health.1["status"], "ok");
    assert_eq!(health.1["token"]["strategy"], "Eager");
    let mut expiries = vec![health.1["token"]["expires_at"].clone()];
    assert!(expiries[0].is_string(), "{}", health.1);

    // Work through both ORMs for three token lives: the token rotates at least twice.
    let started = Instant::now();
    let mut customers = Vec::new();
    let mut n = 0;
    while started.elapsed() < ttl * 3 + Duration::from_millis(500) {
        n += 1;
        let email = format!("c{n}-{}@example.com", fastrand::u32(..));
        let (status, created) = call(
            http.post(url("/customers"))
                .json(&json!({"email": email, "name": format!("Customer {n}")})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["email"], email.as_str());
        let id = created["id"].as_str().unwrap().to_owned();

        let (status, order) = call(http.post(url("/orders")).json(&json!({
            "customer_id": id,
            "items": [
                {"sku": "PEN", "quantity": 2, "unit_price_cents": 150},
                {"sku": "INK", "quantity": 1, "unit_price_cents": 700},
            ],
        })))
        .await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        assert_eq!(order["total_cents"], 1000);
        assert_eq!(order["items"].as_array().unwrap().len(), 2);

        let (status, read) =
            call(http.get(url(&format!("/orders/{}", order["id"].as_str().unwrap())))).await;
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(read, order);
        let (status, read) = call(http.get(url(&format!("/customers/{id}")))).await;
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(read["orders"][0]["id"], order["id"]);
        assert_eq!(read["orders"][0]["total_cents"], 1000);
        customers.push((id, email));

        let (status, health) = call(http.get(url("/healthz"))).await;
        assert_eq!(status, StatusCode::OK, "{health}");
        let expiry = health["token"]["expires_at"].clone();
        if expiries.last() != Some(&expiry) {
            expiries.push(expiry);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        expiries.len() >= 3,
        "the token should have rotated at least twice: {expiries:?}"
    );

    let (status, report) = call(http.get(url("/reports/sales"))).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let top = report["top_customers"].as_array().unwrap();
    assert_eq!(top.len(), customers.len().min(10), "{report}");
    assert_eq!(top[0]["total_cents"], 1000);

    // Error paths.
    let (id, email) = customers[0].clone();
    let new_customer = |body: Value| call(http.post(url("/customers")).json(&body));
    let dup = new_customer(json!({"email": email, "name": "Again"})).await;
    assert_error(dup, StatusCode::CONFLICT, "conflict");
    let bad_json = call(
        http.post(url("/customers"))
            .header("content-type", "application/json")
            .body("{\"email\": \"x@example.com\", \"name\": "),
    )
    .await;
    assert_error(bad_json, StatusCode::BAD_REQUEST, "bad_request");
    let missing_field = new_customer(json!({"email": "y@example.com"})).await;
    let message = assert_error(missing_field, StatusCode::BAD_REQUEST, "bad_request");
    // A fixed message, not the parser's wording.
    assert_eq!(
        message["message"],
        "the body lacks a field, or a field has the wrong type"
    );
    let case = new_customer(json!({"email": email.to_uppercase(), "name": "Shouting"})).await;
    assert_error(case, StatusCode::CONFLICT, "conflict");
    let nul = new_customer(json!({"email": "nul@example.com", "name": "A\u{0}B"})).await;
    assert_error(nul, StatusCode::BAD_REQUEST, "bad_request");
    // 150 characters of two bytes each: within the 200-character limit.
    let accents = new_customer(json!({"email": "e@example.com", "name": "é".repeat(150)})).await;
    assert_eq!(accents.0, StatusCode::CREATED, "{}", accents.1);
    let long = new_customer(json!({"email": "l@example.com", "name": "é".repeat(201)})).await;
    assert_error(long, StatusCode::BAD_REQUEST, "bad_request");
    let huge_sku = call(http.post(url("/orders")).json(&json!({
        "customer_id": id,
        "items": [{"sku": "X".repeat(100_000), "quantity": 1, "unit_price_cents": 1}],
    })))
    .await;
    assert_error(huge_sku, StatusCode::BAD_REQUEST, "bad_request");
    let not_email = new_customer(json!({"email": "nope", "name": "N"})).await;
    assert_error(not_email, StatusCode::BAD_REQUEST, "bad_request");
    let unknown = uuid::Uuid::now_v7();
    let missing = call(http.get(url(&format!("/customers/{unknown}")))).await;
    assert_error(missing, StatusCode::NOT_FOUND, "not_found");
    let missing = call(http.get(url(&format!("/orders/{unknown}")))).await;
    assert_error(missing, StatusCode::NOT_FOUND, "not_found");
    let not_uuid = call(http.get(url("/orders/42"))).await;
    assert_error(not_uuid, StatusCode::BAD_REQUEST, "bad_request");
    let no_customer = call(http.post(url("/orders")).json(&json!({
        "customer_id": unknown.to_string(),
        "items": [{"sku": "PEN", "quantity": 1, "unit_price_cents": 1}],
    })))
    .await;
    assert_error(no_customer, StatusCode::NOT_FOUND, "not_found");
    let zero = call(http.post(url("/orders")).json(&json!({
        "customer_id": id,
        "items": [{"sku": "PEN", "quantity": 0, "unit_price_cents": 1}],
    })))
    .await;
    assert_error(zero, StatusCode::BAD_REQUEST, "bad_request");
    let route = call(http.get(url("/nowhere"))).await;
    assert_error(route, StatusCode::NOT_FOUND, "not_found");

    // The health report: pools, token expiry and counts, never a secret.
    let (status, health) = call(http.get(url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        health["token"]["fetches"].as_u64().unwrap() >= 3,
        "{health}"
    );
    assert_eq!(health["token"]["source"], "lakebase");
    assert!(
        health["pools"]["diesel"]["connections"].as_u64().unwrap() >= 1,
        "{health}"
    );
    assert!(
        health["pools"]["seaorm"]["connections"].as_u64().unwrap() >= 1,
        "{health}"
    );
    assert!(!health.to_string().contains(&secret));

    // Prometheus metrics: pool and token figures after these requests.
    let metrics = http.get(url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
    );
    let metrics = metrics.text().await.unwrap();
    for name in [
        "dal_token_refreshes_total",
        "dal_token_remaining_seconds",
        "dal_connections_opened_total",
        "dal_pool_connections",
        "dal_query_seconds",
    ] {
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }
    assert!(!metrics.contains(&secret));

    // Unreachable database: 503 with a fixed message, and the health check says so.
    drop(pg);
    let (status, body) = call(http.get(url("/healthz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable");
    let (status, body) = call(http.get(url("/reports/sales"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");

    // SIGTERM drains and stops.
    let pid = nix::unistd::Pid::from_raw(app.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = app.wait(Duration::from_secs(15)).await;
    let out = app.rest(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}: {}", app.output());
    assert_eq!(
        out.last().map(String::as_str),
        Some("stopped"),
        "{}",
        app.output()
    );
    let logs = app.stderr();
    assert!(logs.contains("token fetched"), "{logs}");
    assert!(logs.contains("finished processing request"), "{logs}");
    assert!(
        !logs.contains(&secret),
        "the client secret leaked into the logs"
    );
}

/// The bytes waiting in the receive queue of the server's end of the loopback TCP connection
/// from `client_port` to `server_port`, as Linux's `/proc/net/tcp` shows them.
fn unread_by_server(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (fields.get(1)?, fields.get(2)?, fields.get(4)?);
        (port(local)? == server_port && port(remote)? == client_port)
            .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

/// SIGTERM drains the requests in flight for `SHUTDOWN_GRACE_SECS`, then stops without the
/// rest: a client that sent half a request held the app (and its pools) open for as long as
/// it kept its connection.
#[tokio::test(flavor = "multi_thread")]
async fn web_app_stops_after_its_grace_whatever_a_client_holds_open() {
    use tokio::io::AsyncWriteExt;
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "grace", Duration::from_secs(30)).await;
    let mut env = lakebase_env(&pg, &lb, "grace");
    env.extend([("PORT", "0".into()), ("SHUTDOWN_GRACE_SECS", "1".into())]);
    let mut app = Program::start("web_app", &env);
    let (_, line) = app.line("listening on ", Duration::from_secs(60)).await;
    let address = line["listening on http://".len()..].trim().to_owned();
    let mut half = tokio::net::TcpStream::connect(&address).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Signalled only once the app has read those bytes: before, the connection is idle,
    // and the drain closes it at once.
    let (app_port, our_port) = (
        half.peer_addr().unwrap().port(),
        half.local_addr().unwrap().port(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while unread_by_server(app_port, our_port) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the app never read the half request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = nix::unistd::Pid::from_raw(app.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = app.wait(Duration::from_secs(60)).await;
    let out = app.rest(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}: {}", app.output());
    assert!(
        out.iter()
            .any(|l| l.starts_with("requests still open after 1s")),
        "{}",
        app.output()
    );
    assert_eq!(
        out.last().map(String::as_str),
        Some("stopped"),
        "{}",
        app.output()
    );
    drop(half);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shot_exits_at_once_after_its_result() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "once", Duration::from_secs(30)).await;
    let mut script = Program::start("one_shot", &lakebase_env(&pg, &lb, "once"));
    let (printed, line) = script.line("result: ", Duration::from_secs(60)).await;
    assert!(
        line.contains(&format!("user {}", lb.config().role)),
        "{line}"
    );
    let status = script.wait(Duration::from_secs(10)).await;
    let after = printed.elapsed();
    assert!(status.success(), "{status}: {}", script.output());
    assert!(
        after < Duration::from_secs(2),
        "exited {after:?} after its result"
    );
    assert_eq!(lb.credential_requests(), 1, "one connection, one token");
}

/// Parses `<what> N (+d)` out of `line`: the total and the change.
fn count(line: &str, what: &str) -> (u64, u64) {
    let number = |s: &str| -> u64 {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("a number after {what:?} in {line}"))
    };
    let at = line
        .find(what)
        .unwrap_or_else(|| panic!("{what:?} in {line}"))
        + what.len();
    let rest = &line[at..];
    let total = number(rest);
    let plus = rest
        .find("(+")
        .unwrap_or_else(|| panic!("a change after {what:?} in {line}"));
    (total, number(&rest[plus + 2..]))
}

#[tokio::test(flavor = "multi_thread")]
async fn background_task_fetches_tokens_only_when_it_connects() {
    let pg = tests::server().await;
    // Tokens live 2 s, so that each login has about that long to finish once its token is
    // fetched, even on a busy machine.
    let ttl = Duration::from_secs(2);
    let lb = tests::lakebase(&pg, "job", ttl).await;
    let mut env = lakebase_env(&pg, &lb, "job");
    env.extend([
        ("BACKGROUND_QUERIES", "6".to_owned()),
        ("BACKGROUND_IDLE_MS", "2300..2800".to_owned()),
        // Longer than one pause and shorter than two: the second query reuses the first
        // one's connection, and a later one opens another.
        ("BACKGROUND_CONNECTION_LIFETIME_SECS", "4".to_owned()),
    ]);
    let mut job = Program::start("background_task", &env);
    job.line("background task: ", Duration::from_secs(60)).await;
    let mut reused = 0;
    let mut last = (0, 0);
    for n in 1..=6 {
        let (_, line) = job
            .line(&format!("query {n} "), Duration::from_secs(10))
            .await;
        let (fetched, fetched_now) = count(&line, "tokens fetched ");
        let (opened, opened_now) = count(&line, "connections opened ");
        // Every pause outlasts the token: a fetch is due whenever a connection opens, and
        // only then.
        assert_eq!(fetched_now, opened_now, "{line}");
        assert_eq!(
            (fetched, opened),
            (last.0 + fetched_now, last.1 + opened_now),
            "{line}"
        );
        if opened_now == 0 {
            reused += 1;
        }
        last = (fetched, opened);
    }
    let status = job.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", job.output());
    assert!(
        last.1 >= 2,
        "the job should have reconnected: {}",
        job.output()
    );
    assert!(
        reused >= 1,
        "a query should have reused its connection: {}",
        job.output()
    );
}

/// Two runs of the migration command, or two web apps that migrate as they start, at once on
/// a new database (two replicas deploying): both read what is pending before either has
/// applied anything, and without a lock the second fails on a table the first created
/// (`pg_type_typname_nsp_index`). Each holds the migration lock from before that read, so
/// the second waits for the first and then finds nothing pending: both succeed.
#[tokio::test(flavor = "multi_thread")]
async fn two_migration_runs_at_once_both_succeed() {
    let pg = tests::server().await;
    for (database, program, args) in [
        ("twice_cli", "migration", &["up"][..]),
        ("twice_app", "web_app", &[][..]),
    ] {
        let password = tests::owned_database(&pg, database).await;
        let url = format!(
            "postgres://{database}:{password}@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            pg.ca_cert_path().display()
        );
        let env = [("DATABASE_URL", url), ("PORT", "0".to_owned())];
        let mut status = Program::start_with_args("migration", &env, &["status"]);
        assert!(
            status.wait(Duration::from_secs(120)).await.success(),
            "{}",
            status.output()
        );

        // The migration table held, so that a run that read what is pending stops at its
        // first record, with its first migration's tables created and not committed.
        let admin = pg.admin(database).await.unwrap();
        admin
            .batch_execute("BEGIN; LOCK TABLE seaql_migrations IN EXCLUSIVE MODE")
            .await
            .unwrap();
        let mut runs = [
            Program::start_with_args(program, &env, args),
            Program::start_with_args(program, &env, args),
        ];
        // Both runs wait: one for the table, the other for the first (its lock, or without
        // one, the first's uncommitted table). Read from another session: one in a
        // transaction sees the same statistics throughout.
        let watch = pg.admin(database).await.unwrap();
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND usename = current_database() \
                       AND wait_event_type = 'Lock'";
        let deadline = Instant::now() + Duration::from_secs(120);
        while watch
            .query_one(waiting, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "{program}: the two runs never both waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        admin.batch_execute("COMMIT").await.unwrap();
        for run in &mut runs {
            if program == "web_app" {
                run.line("listening on ", Duration::from_secs(120)).await;
            } else {
                let status = run.wait(Duration::from_secs(120)).await;
                assert!(status.success(), "{}", run.output());
            }
        }
        // The command line says why a run waits.
        if program == "migration" {
            runs.iter_mut().for_each(Program::read_stdout);
            assert!(
                runs.iter()
                    .any(|run| run.output().contains("holds the migration lock; waiting")),
                "{}\n---\n{}",
                runs[0].output(),
                runs[1].output()
            );
        }
        let applied: i64 = admin
            .query_one("SELECT count(*) FROM seaql_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(applied, 3, "{program}");
    }
}

/// The migration command names the server it could not reach, and the error line says
/// what to fix: a wrong port, a private CA without `PGSSLROOTCERT`.
#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_server_and_the_fix() {
    let pg = tests::server().await;
    let password = tests::app_database(&pg, "errs").await;
    let (_closed, closed) = tests::closed_port();
    let url = |port: u16, query: &str| {
        format!("postgres://errs:{password}@localhost:{port}/errs?{query}")
    };
    let ca = format!("sslrootcert={}", pg.ca_cert_path().display());
    let cases = [
        (
            url(closed, &format!("sslmode=verify-full&{ca}")),
            vec![format!(
                "cannot migrate localhost:{closed} (database errs, user errs)"
            )],
        ),
        (
            // verify-full against the local CA without naming it.
            url(pg.port(), "sslmode=verify-full"),
            vec![
                "PGSSLROOTCERT".to_owned(),
                format!("localhost:{}", pg.port()),
                "UnknownIssuer".to_owned(),
            ],
        ),
    ];
    for (url, expected) in cases {
        let mut p =
            Program::start_with_args("migration", &[("DATABASE_URL", url.clone())], &["status"]);
        let status = p.wait(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "{}", p.output());
        let error = p.the_error_line();
        for part in expected {
            assert!(error.contains(&part), "{part:?} in {error}");
        }
        assert!(!p.stderr().contains(&password), "{}", p.output());
    }
}

/// Without `PGHOST` and `PGUSER`, a Lakebase endpoint's host and the signed-in user are
/// looked up as the migration command connects: one that cannot sign in names the
/// database, not an empty `:5432` and user.
#[tokio::test(flavor = "multi_thread")]
async fn a_lakebase_migration_that_cannot_sign_in_names_the_database() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "nameless", Duration::from_secs(30)).await;
    let env: Vec<(&str, String)> = lakebase_env(&pg, &lb, "nameless")
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "PGHOST" | "PGUSER"))
        .map(|(k, v)| match k {
            "DATABRICKS_CLIENT_SECRET" => (k, "dose-wrong-secret".to_owned()),
            _ => (k, v),
        })
        .collect();
    let mut p = Program::start_with_args("migration", &env, &["status"]);
    let status = p.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", p.output());
    let error = p.the_error_line();
    // The user is the service principal's client id, filled in from the credentials.
    assert!(
        error.contains(&format!(
            "cannot migrate database nameless (user {}): ",
            lb.config().client_id
        )),
        "{}",
        p.output()
    );
}

/// A `.env` that cannot be read ends each program with one line that names it and the
/// variable whose line is malformed, and never shows the line dotenvy quotes, which may hold
/// a password.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_env_file_ends_with_one_line_that_shows_no_value() {
    let env_file = "PGHOST=127.0.0.1\nPGPASSWORD=s3cret pw\nPGUSER=app\n";
    for name in ["one_shot", "web_app", "background_task", "tour"] {
        let mut p = Program::start_with_env_file(name, env_file);
        let status = p.wait(Duration::from_secs(30)).await;
        p.rest(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(1), "{}", p.output());
        let error = p.the_error_line();
        assert!(error.contains("cannot read .env"), "{error}");
        assert!(error.contains("PGPASSWORD"), "{error}");
        let stderr = p.stderr();
        assert!(
            !stderr.contains("s3cret") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// What `.env.example` says of a value holding `$`: in single quotes it is kept as written;
/// in double quotes, `$s1word` is taken for a variable (unset here, so empty) and the login
/// is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_password_with_a_dollar_in_single_quotes_in_env_logs_in() {
    let pg = tests::server().await;
    pg.create_role("dollar", "pa$s1word", None).await.unwrap();
    pg.create_database("dollar", Some("dollar")).await.unwrap();
    for (quoted, logs_in) in [("'pa$s1word'", true), ("\"pa$s1word\"", false)] {
        let env_file = format!(
            "PGHOST=localhost\nPGPORT={}\nPGUSER=dollar\nPGDATABASE=dollar\n\
             PGSSLMODE=verify-full\nPGSSLROOTCERT='{}'\nPGPASSWORD={quoted}\n",
            pg.port(),
            pg.ca_cert_path().display()
        );
        let mut doctor = Program::start_with_env_file("doctor", &env_file);
        doctor.rest(Duration::from_secs(120)).await;
        let status = doctor.wait(Duration::from_secs(60)).await;
        assert_eq!(status.success(), logs_in, "{quoted}: {}", doctor.output());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_end_with_one_line() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "bad", Duration::from_secs(30)).await;
    let mut env = lakebase_env(&pg, &lb, "bad");
    for (k, v) in &mut env {
        if *k == "DATABRICKS_CLIENT_SECRET" {
            *v = "dose-wrong-secret".into();
        }
    }
    for name in ["one_shot", "web_app", "background_task", "tour"] {
        let mut p = Program::start(name, &env);
        let status = p.wait(Duration::from_secs(30)).await;
        p.rest(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(1), "{}", p.output());
        let error = p.the_error_line();
        assert!(
            error.contains("cannot get a database credential"),
            "{error}"
        );
        assert!(error.contains("401"), "{error}");
        // The host it called, not only the path.
        assert!(error.contains(&lb.url()), "{error}");
        let stderr = p.stderr();
        assert!(
            !stderr.contains("dose-wrong-secret") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }

    // The credential service down.
    lb.set_down(true);
    let mut p = Program::start("one_shot", &lakebase_env(&pg, &lb, "bad"));
    let status = p.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", p.output());
    let error = p.the_error_line();
    assert!(error.contains("503"), "{error}");
}

/// A new database `database`, owned by a role of that name, with the first migration
/// (`customers`) applied; the URL the migration command reaches it by, over TLS.
async fn customers_migrated(pg: &LocalPostgres, database: &str) -> String {
    use migration::MigratorTrait;
    let password = tests::owned_database(pg, database).await;
    let connector = dal::Connector::new(pg.config(database, database, &password))
        .await
        .unwrap();
    let db = tests::migration_db(&connector).await;
    migration::Migrator::up(&db, Some(1))
        .await
        .expect("customers");
    connector.shutdown().await;
    format!(
        "postgres://{database}:{password}@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pg.ca_cert_path().display()
    )
}

/// A write of the service's to `customers`, through `admin`; how long it waited behind the
/// migration (`which`: stopped, killed), which it prints. Fails after a minute.
async fn service_write(admin: &tokio_postgres::Client, which: &str) -> Duration {
    let started = Instant::now();
    let written = tokio::time::timeout(
        Duration::from_secs(60),
        admin.execute(
            "INSERT INTO customers (id, email, name) \
             VALUES (gen_random_uuid(), 'after@example.com', 'after')",
            &[],
        ),
    )
    .await;
    let waited = started.elapsed();
    println!(
        "a write waited {} ms behind the {which} migration",
        waited.as_millis()
    );
    written
        .unwrap_or_else(|_| panic!("the write waited a minute behind the {which} migration"))
        .unwrap();
    waited
}

/// A migration whose client stops midway (a frozen container, a debugger, a network cut
/// without a reset) while its transaction holds locks on the service's tables: the server
/// ends that transaction after a bound, so the service's writes wait seconds, not until the
/// client comes back. Before, a write to `customers` waited as long as the client was stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_whose_client_stops_midway_holds_the_service_up_for_seconds_only() {
    use nix::sys::signal::{Signal, kill};
    let pg = tests::server().await;
    let database = "frozen";
    let url = customers_migrated(&pg, database).await;
    let admin = pg.admin(database).await.unwrap();
    let watch = pg.admin(database).await.unwrap();
    // The migration table held: the run creates the orders tables (its foreign key locks
    // `customers`), then waits to record the migration.
    let hold = "BEGIN; LOCK TABLE seaql_migrations IN EXCLUSIVE MODE";
    admin.batch_execute(hold).await.unwrap();
    let mut run = Program::start_with_args("migration", &[("DATABASE_URL", url)], &["up"]);
    let pid = nix::unistd::Pid::from_raw(run.child.id().unwrap() as i32);
    let state = "SELECT coalesce(wait_event_type, ''), state FROM pg_stat_activity \
                 WHERE datname = current_database() AND usename = current_database() \
                 AND state <> 'idle'";
    let deadline = Instant::now() + Duration::from_secs(120);
    // Stopped while it waits, then let through: its backend takes the lock, records the
    // migration and waits for the client's COMMIT. A try whose lock timeout fired first has
    // nothing locked: the client goes on to its next try, and is stopped again.
    loop {
        assert!(Instant::now() < deadline, "{}", run.output());
        let rows = watch.query(state, &[]).await.unwrap();
        let waiting = rows.iter().any(|row| row.get::<_, String>(0) == "Lock");
        if !waiting {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        kill(pid, Signal::SIGSTOP).unwrap();
        admin.batch_execute("COMMIT").await.unwrap();
        let holding = loop {
            let rows = watch.query(state, &[]).await.unwrap();
            let states: Vec<String> = rows.iter().map(|row| row.get(1)).collect();
            if states.iter().any(|s| s == "idle in transaction") {
                break true;
            }
            if states.iter().any(|s| s == "idle in transaction (aborted)") || states.is_empty() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if holding {
            break;
        }
        admin.batch_execute(hold).await.unwrap();
        kill(pid, Signal::SIGCONT).unwrap();
    }
    // The service writes to `customers` while the client stays stopped.
    let waited = service_write(&admin, "stopped").await;
    kill(pid, Signal::SIGCONT).unwrap();
    // The server ends the stopped migration's transaction after its idle timeout (10 s).
    assert!(
        waited < Duration::from_secs(20),
        "the write waited {waited:?} behind the stopped migration"
    );
    run.wait(Duration::from_secs(120)).await;
}

/// A migration whose process is killed during a long statement, its transaction holding a
/// lock on the service's table: the server finds the client gone within seconds and ends the
/// transaction, so the service's writes go on. PostgreSQL reads a client's socket only
/// between statements: before, the statement ran to its end with the lock held (here an event
/// trigger's ten-minute sleep after the `ALTER TABLE` that adds `orders`' foreign key,
/// which locks `customers`; a large table's index build is the same).
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_killed_during_a_long_statement_holds_the_service_up_for_seconds_only() {
    use nix::sys::signal::{Signal, kill};
    let pg = tests::server().await;
    let database = "killed";
    let url = customers_migrated(&pg, database).await;
    let admin = pg.admin(database).await.unwrap();
    admin
        .batch_execute(
            "CREATE FUNCTION linger() RETURNS event_trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF current_user = 'killed' THEN PERFORM pg_sleep(600); END IF; END $$; \
             CREATE EVENT TRIGGER linger ON ddl_command_end WHEN TAG IN ('ALTER TABLE') \
             EXECUTE FUNCTION linger()",
        )
        .await
        .unwrap();
    let mut run = Program::start_with_args("migration", &[("DATABASE_URL", url)], &["up"]);
    let sleeping = "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() \
                    AND usename = current_database() AND wait_event = 'PgSleep'";
    let deadline = Instant::now() + Duration::from_secs(120);
    while admin.query(sleeping, &[]).await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline && run.child.try_wait().unwrap().is_none(),
            "the migration never reached its long statement: {}",
            run.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kill(
        nix::unistd::Pid::from_raw(run.child.id().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    run.wait(Duration::from_secs(60)).await;
    service_write(&admin, "killed").await;
}

/// Two programs started at the same moment on a new embedded default (a service and its
/// migration, say), in each flavour: both find it ready. The first to set up its database
/// and roles must not fail the second, which sets up the same ones.
#[tokio::test(flavor = "multi_thread")]
async fn programs_started_together_on_a_new_embedded_default_both_run() {
    for flavor in ["lakebase", "dsql"] {
        let dev = tests::DevCluster::new();
        let env = vec![
            ("DAL_DEV_DIR", dev.path().display().to_string()),
            ("DAL_LOCAL", flavor.into()),
        ];
        let mut programs: Vec<_> = (0..3).map(|_| Program::start("one_shot", &env)).collect();
        for program in &mut programs {
            let status = program.wait(Duration::from_secs(300)).await;
            assert!(status.success(), "DAL_LOCAL={flavor}: {}", program.output());
        }
    }
}

/// Programs on the embedded default at once, each with its own credential service: none
/// refuses another's tokens, because every token logs in until its own expiry.
#[tokio::test(flavor = "multi_thread")]
async fn programs_sharing_the_embedded_default_never_refuse_each_others_tokens() {
    let dev = tests::DevCluster::new();
    let env = vec![
        ("DAL_DEV_DIR", dev.path().display().to_string()),
        ("DAL_LOCAL_TOKEN_TTL_SECS", "5".into()),
        ("DAL_POOL_MAX_LIFETIME_SECS", "2".into()),
        ("PORT", "0".into()),
        ("RUST_LOG", "info".into()),
    ];
    let mut app = Program::start("web_app", &env);
    let (_, line) = app.line("listening on ", Duration::from_secs(120)).await;
    let base = line["listening on ".len()..].trim().to_owned();
    let http = tests::http();

    let (mut requests, mut failed, mut others) = (0, Vec::new(), 0);
    let started = Instant::now();
    let mut round = 0;
    // Three token lives, connections renewed every 2 s, a second program every round.
    while started.elapsed() < Duration::from_secs(15) {
        round += 1;
        let mut other = if round % 2 == 0 {
            Program::start("one_shot", &env)
        } else {
            Program::start_with_args("migration", &env, &["status"])
        };
        let burst = fastrand::usize(1..=10);
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..burst {
            let request = http.post(format!("{base}/customers")).json(&json!({
                "email": format!("r{round}-{i}-{}@example.com", fastrand::u32(..)),
                "name": "Concurrent",
            }));
            calls.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        while let Some(outcome) = calls.join_next().await {
            requests += 1;
            match outcome.expect("the request task") {
                Ok(StatusCode::CREATED) => {}
                other => failed.push(format!("{other:?}")),
            }
        }
        let status = other.wait(Duration::from_secs(120)).await;
        assert!(status.success(), "{}", other.output());
        assert!(!other.stderr().contains("refused"), "{}", other.output());
        others += 1;
    }
    println!(
        "requests {requests}, failed {}, other programs {others}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", app.output());
    assert!(
        !app.stderr().contains("refused the token"),
        "{}",
        app.output()
    );
}

/// `DAL_LOCAL=dsql`: the embedded default behaves like Aurora DSQL, and the tour and the
/// migration command run on it with IAM tokens that really log in.
#[tokio::test(flavor = "multi_thread")]
async fn the_tour_and_the_migrations_run_on_the_local_dsql_flavour() {
    let dev = tests::DevCluster::new();
    let env = vec![
        ("DAL_DEV_DIR", dev.path().display().to_string()),
        ("DAL_LOCAL", "dsql".into()),
        ("RUST_LOG", "info".into()),
    ];
    let mut tour = Program::start("tour", &env);
    let lines = tour.rest(Duration::from_secs(300)).await;
    let status = tour.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", tour.output());
    let text = lines.join("\n");
    assert!(
        text.contains("user admin, Aurora DSQL-style IAM tokens"),
        "{text}"
    );
    assert!(
        text.contains("savepoint skipped (Aurora DSQL has no SAVEPOINT)"),
        "{text}"
    );
    assert!(text.contains("(dsql source, Eager strategy)"), "{text}");

    let mut status_cmd = Program::start_with_args("migration", &env, &["status"]);
    let lines = status_cmd.rest(Duration::from_secs(120)).await;
    assert!(
        status_cmd.wait(Duration::from_secs(60)).await.success(),
        "{}",
        status_cmd.output()
    );
    let applied = lines.iter().filter(|l| l.ends_with("Applied")).count();
    assert_eq!(applied, 3, "{}", status_cmd.output());
}

/// The tour says what it did, and its log says nothing more: the migrations it applied on the
/// first run ("up to date" after), one `token fetched` line per fetch the summary counts, no
/// server notice about the migration table, and no token talk for a static password.
#[tokio::test(flavor = "multi_thread")]
async fn the_tour_reports_what_it_did_and_nothing_else() {
    let dev = tests::DevCluster::new();
    let env = vec![
        ("DAL_DEV_DIR", dev.path().display().to_string()),
        ("RUST_LOG", "info".into()),
    ];
    for (run, migrations) in [
        (1, "migrations: applied 3 migrations"),
        (2, "migrations: up to date"),
    ] {
        let mut tour = Program::start("tour", &env);
        let lines = tour.rest(Duration::from_secs(300)).await;
        assert!(
            tour.wait(Duration::from_secs(60)).await.success(),
            "{}",
            tour.output()
        );
        assert!(
            lines.iter().any(|l| l == migrations),
            "run {run}: {}",
            tour.output()
        );
        let logs = tour.stderr();
        assert!(!logs.contains("seaql_migrations"), "run {run}: {logs}");
        let summary = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("tokens fetched "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("run {run}: no count: {}", tour.output()));
        assert_eq!(
            logs.matches("token fetched").count(),
            summary,
            "run {run}: {}",
            tour.output()
        );
    }

    let pg = tests::server().await;
    let password = tests::app_database(&pg, "static_tour").await;
    let url = format!(
        "postgres://static_tour:{password}@localhost:{}/static_tour?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pg.ca_cert_path().display()
    );
    let env = vec![("DATABASE_URL", url), ("RUST_LOG", "info".into())];
    let mut tour = Program::start("tour", &env);
    let lines = tour.rest(Duration::from_secs(300)).await;
    assert!(
        tour.wait(Duration::from_secs(60)).await.success(),
        "{}",
        tour.output()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.trim() == "credentials: a static password"),
        "{}",
        tour.output()
    );
    assert!(!tour.stderr().contains("token"), "{}", tour.output());
}

/// `doctor` passes on the embedded default, with `application_name` as the server reports it
/// for each pool kind, and fails with one clear line on a wrong password, an unknown CA and an
/// unreachable host.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_a_deployment_in_one_step() {
    let dev = tests::DevCluster::new();
    let mut doctor = Program::start(
        "doctor",
        &[("DAL_DEV_DIR", dev.path().display().to_string())],
    );
    let lines = doctor.rest(Duration::from_secs(300)).await;
    let status = doctor.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", doctor.output());
    let text = lines.join("\n");
    for line in [
        "ok    target: Databricks Lakebase",
        "ok    credentials: lakebase source, token valid for",
        "ok    TLS: sslmode verify-full; the server reports TLSv1.3",
        "ok    certificate: subject ",
        "ok    server: PostgreSQL 15",
        "ok    search_path:",
        "ok    application_name (SeaORM pool): dal/",
        "ok    application_name (Diesel pool): dal/",
        "ok    application_name (tokio-postgres pool): dal/",
        "all checks passed",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }

    let pg = tests::server().await;
    let password = tests::app_database(&pg, "doc").await;
    let (_closed, closed) = tests::closed_port();
    let url = |password: &str, port: u16, ca: bool| {
        let mut url = format!("postgres://doc:{password}@localhost:{port}/doc?sslmode=verify-full");
        if ca {
            url.push_str(&format!("&sslrootcert={}", pg.ca_cert_path().display()));
        }
        url
    };
    for (case, given, url, expected) in [
        (
            "wrong password",
            "not-the-password",
            url("not-the-password", pg.port(), true),
            "28P01",
        ),
        (
            "unknown CA",
            password.as_str(),
            url(&password, pg.port(), false),
            "PGSSLROOTCERT",
        ),
        (
            "unreachable host",
            password.as_str(),
            url(&password, closed, true),
            "Connection refused",
        ),
    ] {
        let mut doctor = Program::start("doctor", &[("DATABASE_URL", url)]);
        let lines = doctor.rest(Duration::from_secs(120)).await;
        let status = doctor.wait(Duration::from_secs(60)).await;
        assert_eq!(status.code(), Some(1), "{case}: {}", doctor.output());
        let failed: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(failed.len(), 1, "{case}: {}", doctor.output());
        assert!(failed[0].contains(expected), "{case}: {}", failed[0]);
        assert!(
            failed[0].contains("connection to localhost:"),
            "{case}: {}",
            failed[0]
        );
        assert!(
            !doctor.output().contains(given),
            "{case}: the password shows in {}",
            doctor.output()
        );
    }
}

impl Program {
    /// Waits until stderr holds `text` (the program reports as it goes).
    async fn stderr_contains(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {within:?}: {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A long-running job outlives a credential outage longer than its token: the turns during
/// the outage fail and say so, the job goes on, and it finishes its work once the service is
/// back.
#[tokio::test(flavor = "multi_thread")]
async fn background_task_outlives_a_credential_outage() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "outage_job", Duration::from_secs(1)).await;
    let mut env = lakebase_env(&pg, &lb, "outage_job");
    env.extend([
        ("BACKGROUND_QUERIES", "8".to_owned()),
        ("BACKGROUND_IDLE_MS", "300..600".to_owned()),
        ("BACKGROUND_CONNECTION_LIFETIME_SECS", "1".to_owned()),
    ]);
    let mut job = Program::start("background_task", &env);
    job.line("query 1 ", Duration::from_secs(60)).await;
    lb.set_down(true);
    job.stderr_contains("trying again at the next turn", Duration::from_secs(120))
        .await;
    lb.set_down(false);
    let status = job.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "{status}: {}", job.output());
    let done = job.rest(Duration::from_secs(5)).await.join("\n");
    assert!(done.contains("done: 8 queries ("), "{}", job.output());
    assert!(!done.contains("(0 failed)"), "{}", job.output());
}

/// `/healthz` opens a new connection: when the database refuses the service's credentials it
/// says so (503, `credentials_refused`), and says ok again once they are accepted.
#[tokio::test(flavor = "multi_thread")]
async fn web_app_health_says_when_the_credentials_are_refused() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "health", Duration::from_secs(60)).await;
    let mut env = lakebase_env(&pg, &lb, "health");
    env.push(("PORT", "0".into()));
    let mut app = Program::start("web_app", &env);
    let (_, line) = app.line("listening on ", Duration::from_secs(60)).await;
    let base = line["listening on ".len()..].trim().to_owned();
    let http = tests::http();
    let health = || call(http.get(format!("{base}/healthz")));
    let (status, body) = health().await;
    assert_eq!(
        (status, &body["database"]),
        (StatusCode::OK, &json!("reachable")),
        "{body}"
    );

    // The role no longer logs in with tokens: the server refuses them.
    let admin = pg.admin("postgres").await.unwrap();
    let role = lb.config().role.clone();
    admin
        .batch_execute(&format!(r#"REVOKE dal_token_login FROM "{role}""#))
        .await
        .unwrap();
    let (status, body) = health().await;
    assert_eq!(
        (status, &body["database"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("credentials_refused")
        ),
        "{body}"
    );
    admin
        .batch_execute(&format!(r#"GRANT dal_token_login TO "{role}""#))
        .await
        .unwrap();
    let (status, body) = health().await;
    assert_eq!(
        (status, &body["database"]),
        (StatusCode::OK, &json!("reachable")),
        "{body}"
    );
}

/// `dsql_check` migrates a scratch database on the local DSQL endpoint: clean with
/// `DsqlMigrator` (exit 0); with the plain `Migrator` it lists each thing DSQL refuses and
/// exits 1, so that a CI step fails.
#[tokio::test(flavor = "multi_thread")]
async fn dsql_check_lists_what_dsql_would_refuse() {
    let mut check = Program::start("dsql_check", &[]);
    let lines = check.rest(Duration::from_secs(300)).await;
    let status = check.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{}", check.output());
    assert_eq!(
        lines,
        ["migration::DsqlMigrator: the schema migrated with nothing Aurora DSQL refuses"],
        "{}",
        check.output()
    );

    let mut check = Program::start_with_args("dsql_check", &[], &["--plain"]);
    let lines = check.rest(Duration::from_secs(300)).await;
    let status = check.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1), "{}", check.output());
    let text = lines.join("\n");
    for finding in [
        "migration::Migrator: 3 thing(s) Aurora DSQL refuses:",
        "  - foreign keys: ",
        "  - more than one DDL statement in a transaction: ",
        "  - DDL and DML in one transaction: ",
    ] {
        assert!(
            text.contains(finding),
            "{finding:?} missing: {}",
            check.output()
        );
    }
}

/// A local IAM Identity Center portal: answers `GetRoleCredentials` for the bearer token
/// `token` with `keys`, as `portal.sso.<region>.amazonaws.com` does. Returns its port and the
/// number of credential requests it answered.
async fn sso_portal(
    token: &'static str,
    keys: (String, String),
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (keys, count) = (keys.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request).to_lowercase();
                let authorized = head.starts_with("get /federation/credentials?")
                    && head.contains("account_id=123456789012")
                    && head.contains("role_name=dsqladmin")
                    && head.contains(&format!("x-amz-sso_bearer_token: {token}"));
                let (status, body) = if authorized {
                    count.fetch_add(1, Ordering::SeqCst);
                    let expiration =
                        (chrono::Utc::now() + chrono::Duration::hours(1)).timestamp_millis();
                    let body = json!({"roleCredentials": {
                        "accessKeyId": keys.0,
                        "secretAccessKey": keys.1,
                        "sessionToken": "local-session-token",
                        "expiration": expiration,
                    }});
                    ("200 OK", body.to_string())
                } else {
                    let body = json!({"message": "Session token not found or invalid"});
                    ("401 Unauthorized", body.to_string())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (port, served)
}

/// DSQL tokens signed with the keys of an AWS profile: one with keys in the shared credentials
/// file, and one that signs in through IAM Identity Center (the `dsql-sso` feature), whose
/// portal the SDK reaches at `AWS_ENDPOINT_URL_SSO` (here a local one). `doctor` passes with
/// each, from the environment alone.
#[tokio::test(flavor = "multi_thread")]
async fn dsql_tokens_are_signed_with_aws_profile_keys_sso_included() {
    use secrecy::ExposeSecret;
    let pg = crate::dsql::dsql_cluster().await;
    let (id, secret) = pg.dsql_access_keys();
    let keys = (id, secret.expose_secret().to_owned());
    let (portal, served) = sso_portal("local-sso-bearer", keys.clone()).await;
    let home = tempfile::tempdir().unwrap();
    let aws = home.path().join(".aws");
    std::fs::create_dir_all(aws.join("sso/cache")).unwrap();
    std::fs::write(
        aws.join("config"),
        "[profile keys]\nregion = us-east-1\n\n\
         [profile sso]\nregion = us-east-1\n\
         sso_start_url = https://dal-local.awsapps.com/start\nsso_region = us-east-1\n\
         sso_account_id = 123456789012\nsso_role_name = DsqlAdmin\n",
    )
    .unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[keys]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            keys.0, keys.1
        ),
    )
    .unwrap();
    // The SDK's cached sign-in, named by the SHA-1 of the start URL.
    std::fs::write(
        aws.join("sso/cache/f141ae134925505ec5941e70d481fb4a1c3c35e3.json"),
        json!({
            "accessToken": "local-sso-bearer",
            "expiresAt": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "region": "us-east-1",
            "startUrl": "https://dal-local.awsapps.com/start",
        })
        .to_string(),
    )
    .unwrap();
    for profile in ["keys", "sso"] {
        let env = [
            ("HOME", home.path().display().to_string()),
            ("AWS_PROFILE", profile.to_owned()),
            ("AWS_CONFIG_FILE", aws.join("config").display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                aws.join("credentials").display().to_string(),
            ),
            ("AWS_ENDPOINT_URL_SSO", format!("http://127.0.0.1:{portal}")),
            // Nothing may look for instance metadata, which is not on 127.0.0.1.
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("DSQL_ENDPOINT", dal::local::LOCAL_DSQL_HOST.to_owned()),
            ("AWS_REGION", dal::local::LOCAL_DSQL_REGION.to_owned()),
            ("PGPORT", pg.port().to_string()),
            ("PGDATABASE", "dsql".to_owned()),
            ("PGSSLROOTCERT", pg.ca_cert_path().display().to_string()),
            // Everything the SDK's credential providers trace, with the answers they read.
            ("RUST_LOG", "trace".to_owned()),
        ];
        let mut doctor = Program::start("doctor", &env);
        let lines = doctor.rest(Duration::from_secs(120)).await;
        let status = doctor.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "profile {profile}: {}", doctor.output());
        let output = doctor.output();
        for (secret, what) in [
            (keys.1.as_str(), "the secret access key"),
            ("local-session-token", "the session token"),
            ("local-sso-bearer", "the SSO bearer token"),
        ] {
            assert!(!output.contains(secret), "profile {profile} logged {what}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("ok    credentials: dsql source")),
            "profile {profile}: {}",
            doctor.output()
        );
    }
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the SSO profile's keys came from the portal"
    );
}

/// `DATABRICKS_AUTH_TYPE=databricks-cli`: workspace tokens come from the Databricks CLI's login
/// (`databricks auth token --host <host>`), here a stand-in `databricks` on `PATH` that prints
/// the CLI's JSON. `doctor` passes from the environment alone; a CLI that fails names the fix.
#[tokio::test(flavor = "multi_thread")]
async fn the_databricks_cli_login_signs_in() {
    use std::os::unix::fs::PermissionsExt;
    const PAT: &str = "dapi-from-the-cli-login";
    let pg = tests::server().await;
    let config = dal::local::LocalLakebaseConfig::new()
        .with_pat(PAT)
        .with_token_ttl(Duration::from_secs(60));
    let lb = LocalLakebase::start(&pg, config).await.unwrap();
    pg.create_database("cli", Some(&lb.config().role))
        .await
        .unwrap();
    let bin = tempfile::tempdir().unwrap();
    let cli = |script: &str| {
        let path = bin.path().join("databricks");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let expiry = (chrono::Utc::now() + chrono::Duration::minutes(50))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    cli(&format!(
        "#!/bin/sh\n\
         if [ \"$1 $2 $3 $4\" = \"auth token --host {host}\" ]; then\n\
           printf '{{\"access_token\": \"%s\", \"token_type\": \"Bearer\", \"expiry\": \"%s\"}}\\n' '{PAT}' '{expiry}'\n\
         else\n\
           echo \"Error: unexpected arguments: $*\" >&2; exit 1\n\
         fi\n",
        host = lb.url()
    ));
    let mut env: Vec<(&str, String)> = lakebase_env(&pg, &lb, "cli")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("DATABRICKS_CLIENT_"))
        .collect();
    // No PGUSER: the user the CLI's token belongs to, from the current user API.
    env.extend([
        ("DATABRICKS_AUTH_TYPE", "databricks-cli".to_owned()),
        ("PATH", bin.path().display().to_string()),
    ]);
    let mut doctor = Program::start("doctor", &env);
    doctor.rest(Duration::from_secs(120)).await;
    let status = doctor.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", doctor.output());
    assert!(
        !doctor.output().contains(PAT),
        "the token leaked: {}",
        doctor.output()
    );
    assert!(
        doctor.stderr().contains(&format!(
            "database user looked up user={}",
            lb.config().role
        )),
        "{}",
        doctor.output()
    );

    // Not logged in: the CLI's own reason, and what to run.
    cli(
        "#!/bin/sh\necho 'Error: cannot load Databricks config file: default auth: cannot configure default credentials' >&2\nexit 1\n",
    );
    let mut doctor = Program::start("doctor", &env);
    let lines = doctor.rest(Duration::from_secs(120)).await.join("\n");
    let status = doctor.wait(Duration::from_secs(60)).await;
    assert!(!status.success());
    assert!(
        lines.contains("cannot configure default credentials")
            && lines.contains("databricks auth login --host"),
        "{}",
        doctor.output()
    );
}

/// `LAKEBASE_ENDPOINT` alone names the database: without `PGHOST` the host comes from the
/// endpoint API (`status.hosts.host`), and without `PGUSER` the user is the service principal
/// that signed in, as the vendors' own helpers do. The tour runs from that.
#[tokio::test(flavor = "multi_thread")]
async fn lakebase_endpoint_alone_runs_the_tour() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "alone", Duration::from_secs(60)).await;
    let env: Vec<(&str, String)> = lakebase_env(&pg, &lb, "alone")
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "PGHOST" | "PGUSER"))
        .collect();
    let mut tour = Program::start("tour", &env);
    let lines = tour.rest(Duration::from_secs(300)).await;
    let status = tour.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", tour.output());
    let expected = format!(
        "target: Databricks Lakebase at the endpoint's host:{}, database alone, user {}",
        pg.port(),
        lb.config().client_id
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&expected)),
        "{expected:?} missing: {}",
        tour.output()
    );
    assert!(
        tour.stderr()
            .contains("database host looked up host=localhost"),
        "{}",
        tour.output()
    );
}

/// The variables of a service principal that federates an ID token instead of holding a
/// secret: `lakebase_env` without `DATABRICKS_CLIENT_SECRET`.
fn federated_env(
    pg: &LocalPostgres,
    lb: &LocalLakebase,
    database: &str,
) -> Vec<(&'static str, String)> {
    lakebase_env(pg, lb, database)
        .into_iter()
        .filter(|(k, _)| *k != "DATABRICKS_CLIENT_SECRET")
        .collect()
}

/// Runs `doctor` with `env` and returns whether it passed, and its output.
async fn doctor(env: &[(&str, String)]) -> (bool, String) {
    let mut doctor = Program::start("doctor", env);
    doctor.rest(Duration::from_secs(120)).await;
    let status = doctor.wait(Duration::from_secs(60)).await;
    (status.success(), doctor.output())
}

/// `env-oidc`: an OIDC ID token in `DATABRICKS_OIDC_TOKEN` is traded for a workspace token
/// (RFC 8693 token exchange, no client secret); the service principal is the database user.
/// One for another audience is refused with the service's reason.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_token_in_the_environment_signs_in() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "envoidc", Duration::from_secs(60)).await;
    let id_token = lb.id_token(&lb.token_url());
    let mut env = federated_env(&pg, &lb, "envoidc");
    env.retain(|(k, _)| *k != "PGUSER");
    env.push(("DATABRICKS_OIDC_TOKEN", id_token.clone()));
    let (passed, output) = doctor(&env).await;
    assert!(passed, "{output}");
    assert!(lb.oauth_requests() >= 1, "no token exchange: {output}");
    assert!(!output.contains(&id_token), "the ID token leaked: {output}");

    env.retain(|(k, _)| *k != "DATABRICKS_OIDC_TOKEN");
    env.push((
        "DATABRICKS_OIDC_TOKEN",
        lb.id_token("https://elsewhere.example"),
    ));
    let (passed, output) = doctor(&env).await;
    assert!(!passed, "{output}");
    assert!(output.contains("audience"), "{output}");
}

/// `file-oidc`: the ID token is read from `DATABRICKS_OIDC_TOKEN_FILEPATH`, as a projected
/// Kubernetes service account token would be.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_token_file_signs_in() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "fileoidc", Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{}\n", lb.id_token(&lb.token_url()))).unwrap();
    let mut env = federated_env(&pg, &lb, "fileoidc");
    env.push(("DATABRICKS_OIDC_TOKEN_FILEPATH", path.display().to_string()));
    let (passed, output) = doctor(&env).await;
    assert!(passed, "{output}");
    assert!(lb.oauth_requests() >= 1, "no token exchange: {output}");

    std::fs::remove_file(&path).unwrap();
    let (passed, output) = doctor(&env).await;
    assert!(!passed, "{output}");
    assert!(
        output.contains("DATABRICKS_OIDC_TOKEN_FILEPATH"),
        "{output}"
    );
}

/// `github-oidc`: in a GitHub Actions job (`ACTIONS_ID_TOKEN_REQUEST_URL` and `_TOKEN`), the ID
/// token is asked for with the token endpoint as its audience and traded, chosen without
/// `DATABRICKS_AUTH_TYPE` as the SDKs detect it.
#[tokio::test(flavor = "multi_thread")]
async fn a_github_actions_job_signs_in() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "ghoidc", Duration::from_secs(60)).await;
    let mut env = federated_env(&pg, &lb, "ghoidc");
    env.extend(lb.github_actions_env());
    let request_token = lb.config().actions_request_token.clone();
    let (passed, output) = doctor(&env).await;
    assert!(passed, "{output}");
    assert!(lb.oauth_requests() >= 1, "no token exchange: {output}");
    assert!(
        !output.contains(&request_token),
        "the request token leaked: {output}"
    );
}

/// `external-browser` (U2M): the first run prints the login address (headless, `BROWSER=none`)
/// and waits; a browser-less client follows it to the loopback redirect; the run then
/// connects as the user. The refresh token lands in a file of mode 0600 in a directory of
/// mode 0700, never in the output; the next run logs in with it and no browser; once it is
/// revoked, the run asks for a login again.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_logs_in_with_a_browser_once() {
    use std::os::unix::fs::PermissionsExt;
    const USER: &str = "someone@example.com";
    let pg = tests::server().await;
    let config = dal::local::LocalLakebaseConfig::new()
        .with_role(USER)
        .with_token_ttl(Duration::from_secs(60))
        .with_user_login();
    let lb = LocalLakebase::start(&pg, config).await.unwrap();
    pg.create_database("u2m", Some(USER)).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = lakebase_env(&pg, &lb, "u2m")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("DATABRICKS_CLIENT_"))
        .chain([
            ("DATABRICKS_AUTH_TYPE", "external-browser".to_owned()),
            ("BROWSER", "none".to_owned()),
            ("HOME", home.path().display().to_string()),
        ])
        .collect();
    // Every log line, so that the absence of tokens below means something.
    let mut env: Vec<(&str, String)> = env.into_iter().filter(|(k, _)| *k != "RUST_LOG").collect();
    env.push(("RUST_LOG", "trace".to_owned()));
    let browser = tests::http();
    // One run that logs in through the printed address.
    let login = async |env: &[(&str, String)]| {
        let mut doctor = Program::start("doctor", env);
        let deadline = Instant::now() + Duration::from_secs(120);
        let address = loop {
            let stderr = doctor.stderr();
            if let Some(line) = stderr.lines().find(|l| l.contains("/oidc/v1/authorize?")) {
                break line.trim().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no login address: {}",
                doctor.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let page = browser.get(&address).send().await.unwrap();
        assert_eq!(
            page.url().port(),
            Some(8020),
            "redirected to {}",
            page.url()
        );
        let text = page.text().await.unwrap();
        assert!(text.contains("You are logged in"), "{text}");
        doctor.rest(Duration::from_secs(120)).await;
        let status = doctor.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "{}", doctor.output());
        doctor.output()
    };
    let output = login(&env).await;
    assert!(
        output.contains(&format!("database user looked up user={USER}")),
        "{output}"
    );
    let dir = home.path().join(".cache/dal");
    // The token cache file, and the lock programs sharing it take in turn (empty).
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let extensions: Vec<_> = files.iter().map(|f| f.extension().unwrap()).collect();
    assert_eq!(extensions, ["json", "lock"], "{files:?}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files[0]), 0o600);
    assert_eq!(mode(&files[1]), 0o600);
    assert_eq!(std::fs::metadata(&files[1]).unwrap().len(), 0);
    assert_eq!(mode(&dir), 0o700);
    let cached: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let refresh_token = cached["refresh_token"].as_str().unwrap().to_owned();
    assert!(
        !output.contains(&refresh_token),
        "the refresh token leaked: {output}"
    );
    assert!(
        !output.contains("Bearer "),
        "an Authorization header leaked: {output}"
    );
    assert!(
        output.contains("TRACE"),
        "TRACE lines were printed: {output}"
    );

    // The next run: the refresh token, no login.
    let (passed, output) = doctor(&env).await;
    assert!(passed, "{output}");
    assert!(!output.contains("/oidc/v1/authorize?"), "{output}");
    let cached: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let rotated = cached["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(
        rotated, refresh_token,
        "the rotated refresh token was not kept"
    );

    // Revoked: a new login.
    lb.revoke(&rotated);
    let output = login(&env).await;
    assert!(output.contains("logging in again"), "{output}");
}

/// `pat` and `oauth-m2m` from the environment: a personal access token alone signs in as its
/// user (looked up); with both configured, `DATABRICKS_AUTH_TYPE` picks, and without it they
/// are refused, as the Databricks SDKs refuse them.
#[tokio::test(flavor = "multi_thread")]
async fn a_personal_access_token_or_a_service_principal_signs_in_as_chosen() {
    const PAT: &str = "dapi-personal-access-token-0123";
    let pg = tests::server().await;
    let config = dal::local::LocalLakebaseConfig::new()
        .with_pat(PAT)
        .with_token_ttl(Duration::from_secs(60));
    let lb = LocalLakebase::start(&pg, config).await.unwrap();
    pg.create_database("patm2m", Some(&lb.config().role))
        .await
        .unwrap();
    let both: Vec<(&str, String)> = lakebase_env(&pg, &lb, "patm2m")
        .into_iter()
        .chain([("DATABRICKS_TOKEN", PAT.to_owned())])
        .collect();
    // Both configured, nothing chosen: refused, naming the choice, before any call.
    let (passed, output) = doctor(&both).await;
    assert!(
        !passed && output.contains("DATABRICKS_AUTH_TYPE"),
        "{output}"
    );
    assert_eq!(lb.oauth_requests(), 0, "{output}");
    assert!(!output.contains(PAT), "the token leaked: {output}");
    // The personal access token, chosen: no OAuth call.
    let mut chosen = both.clone();
    chosen.push(("DATABRICKS_AUTH_TYPE", "pat".to_owned()));
    let (passed, output) = doctor(&chosen).await;
    assert!(passed, "{output}");
    assert_eq!(lb.oauth_requests(), 0, "{output}");
    assert!(!output.contains(PAT), "the token leaked: {output}");
    // The service principal, chosen.
    let mut chosen = both.clone();
    chosen.push(("DATABRICKS_AUTH_TYPE", "oauth-m2m".to_owned()));
    let (passed, output) = doctor(&chosen).await;
    assert!(passed, "{output}");
    assert!(lb.oauth_requests() >= 1, "{output}");
    assert!(
        !output.contains(&lb.config().client_secret),
        "the secret leaked: {output}"
    );
    // The token alone, without PGUSER: its user, looked up.
    let alone: Vec<(&str, String)> = both
        .into_iter()
        .filter(|(k, _)| !k.starts_with("DATABRICKS_CLIENT_") && *k != "PGUSER")
        .collect();
    let (passed, output) = doctor(&alone).await;
    assert!(passed, "{output}");
    assert!(
        output.contains(&format!(
            "database user looked up user={}",
            lb.config().role
        )),
        "{output}"
    );
}

/// The load benchmark refuses settings it cannot honour before it starts anything: a client
/// count its server cannot take, an output file it cannot write (which it found only after
/// the whole run, and lost the results with). `--help` describes the options.
#[tokio::test]
async fn the_load_benchmark_refuses_bad_settings_before_it_runs() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(program("load"))
            .args(args)
            .output()
            .expect("the load benchmark runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            stderr,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stderr, _) = run(&["--clients", "8,65"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--clients takes counts from 1 to 64"),
        "{stderr}"
    );
    let (code, stderr, stdout) = run(&["--quick", "--json", "/proc/dal-load.json"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("load: --json /proc/dal-load.json: cannot be written"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "it ran before it refused: {stdout}");
    let (code, _, stdout) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--clients L"), "{stdout}");
}
