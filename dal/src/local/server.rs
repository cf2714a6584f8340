//! Creating, starting and stopping a local cluster.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::binaries::{ServerUser, find_bindir};
use super::certs;
use super::error::{Error, Result};
use super::files::write_private;
use super::token_login::{TOKEN_GROUP, TokenLogins, Tokens};

/// The superuser every local cluster is created with.
const SUPERUSER: &str = "postgres";
/// How long a server may take to accept connections after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an administrative login may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a start is tried when another process took the chosen port meanwhile.
const PORT_ATTEMPTS: usize = 3;
/// The state file of the persistent development cluster.
const DEV_STATE: &str = "dal-dev.json";
/// The cluster's CA certificate, in its directory.
const CA_FILE: &str = "ca.crt";

/// Runs the server as a child of a small shell that stops it and removes the cluster's
/// directory as soon as its standard input closes: when the handle is dropped, or when the
/// process that started it exits, even if it is killed.
///
/// `$1` is the `postgres` binary, `$2` the directory to remove, the rest the server's arguments.
const WATCHDOG: &str = r#"
bin=$1; root=$2; shift 2
exec 3<&0
"$bin" "$@" </dev/null 3<&- &
pid=$!
{ read -r _ <&3; kill -INT "$pid" 2>/dev/null; } &
reader=$!
exec 3<&-
wait "$pid"
status=$?
kill "$reader" 2>/dev/null
rm -rf "$root"
exit "$status"
"#;

/// A PostgreSQL server started by this project, listening on `localhost`.
///
/// See the [module documentation](super) for the two modes. The handle of an ephemeral cluster
/// stops the server and removes its directory when dropped; the handle of the development
/// cluster leaves it running.
pub struct LocalPostgres {
    port: u16,
    password: SecretString,
    root: PathBuf,
    user: ServerUser,
    logins: TokenLogins,
    watchdog: Option<Watchdog>,
    /// The TLS of administrative connections: the cluster's CA only.
    admin_tls: Arc<rustls::ClientConfig>,
}

/// The shell that owns an ephemeral server, and what the server printed.
struct Watchdog {
    shell: Mutex<Child>,
    stdin: Option<ChildStdin>,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// Where to find a persistent cluster again: written only once the cluster is complete.
#[derive(serde::Serialize, serde::Deserialize)]
struct DevState {
    port: u16,
    superuser_password: String,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("port", &self.port)
            .field("superuser", &SUPERUSER)
            .field("password", &"** redacted **")
            .field("root", &self.root)
            .field("ephemeral", &self.watchdog.is_some())
            .finish()
    }
}

impl LocalPostgres {
    /// Creates and starts an ephemeral cluster in a new temporary directory.
    ///
    /// The cluster runs with fsync off and is removed when the handle is dropped or the
    /// process exits. Fails with [`Error::ServerBinariesNotFound`] when PostgreSQL is not
    /// installed.
    pub async fn start() -> Result<Self> {
        Self::start_with(false, None).await
    }

    /// Like [`start`](Self::start), a cluster whose messages are in `language` (gettext's
    /// `LANGUAGE`, such as `de`), as a server installed under a non-English locale sends
    /// them: for code that must not read the server's English. The SQLSTATEs are the same.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start). A language the installation has no translations for
    /// leaves the messages in English.
    pub async fn start_localized(language: &str) -> Result<Self> {
        Self::start_with(false, Some(language)).await
    }

    /// Like [`start`](Self::start), a cluster that passes for Lakebase the way the Lakebase
    /// partner guide tells them apart: `SHOW shared_preload_libraries` lists `neon` and
    /// `databricks_auth`, and every [token role](Self::create_token_role) may read it (plain
    /// PostgreSQL shows it to privileged roles only). The two libraries are stand-ins: links to
    /// PostgreSQL's own `auto_explain`, which does nothing unless configured.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start); [`Error::LocalServer`] when the installation has no
    /// `auto_explain` module.
    pub async fn start_lakebase_like() -> Result<Self> {
        let pg = Self::start_with(true, None).await?;
        let admin = pg.admin("postgres").await?;
        let sql: String = admin
            .query_one(
                "SELECT format('DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %L) \
                 THEN CREATE ROLE %I NOLOGIN; END IF; END $$; GRANT pg_read_all_settings TO %I', \
                 $1::text, $1::text, $1::text)",
                &[&TOKEN_GROUP],
            )
            .await?
            .get(0);
        admin.batch_execute(&sql).await?;
        Ok(pg)
    }

    async fn start_with(lakebase_like: bool, language: Option<&str>) -> Result<Self> {
        let bindir = find_bindir()?;
        let user = ServerUser::detect()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_ephemeral(&bindir, user, lakebase_like, language).await {
                Err(Started::PortTaken(_)) if attempt < PORT_ATTEMPTS => continue,
                Err(Started::PortTaken(e) | Started::Failed(e)) => return Err(e),
                Ok(pg) => return Ok(pg),
            }
        }
    }

    async fn start_ephemeral(
        bindir: &Path,
        user: ServerUser,
        lakebase_like: bool,
        language: Option<&str>,
    ) -> Result<Self, Started> {
        let dir = tempfile::Builder::new()
            .prefix("dal-pg-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir())(e))?;
        let root = dir.path().to_owned();
        let password = {
            let (bindir, root) = (bindir.to_owned(), root.clone());
            blocking(move || create_cluster(&bindir, &root, user)).await?
        };
        let logins = TokenLogins::open(&root, false)?;
        logins.write_hba(&root.join("data"))?;
        let port = free_port()?;
        let mut args: Vec<OsString> = vec!["-c".into(), WATCHDOG.into(), "dal-postgres".into()];
        args.push(bindir.join("postgres").into());
        args.push(root.clone().into());
        args.extend(server_args(&root, port, true));
        if lakebase_like {
            args.extend(lakebase_libraries(bindir, &root, user)?);
        }
        let mut shell = user.command("/bin/sh");
        if let Some(language) = language {
            // gettext reads LANGUAGE under any locale but C, which initdb's `--locale=C`
            // gives lc_messages; C.UTF-8 is C with UTF-8, built into glibc.
            args.extend(["-c".into(), "lc_messages=C.UTF-8".into()]);
            shell.env("LANGUAGE", language);
        }
        let mut shell = shell
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| Error::LocalServer {
                what: "cannot run /bin/sh to start the server".into(),
                source: Some(Box::new(e)),
            })?;
        // From here on the shell removes the directory.
        let _ = dir.keep();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = shell.stderr.take() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || drain_log(stderr, &log));
        }
        let stdin = shell.stdin.take();
        let pg = Self {
            port,
            password,
            admin_tls: certs::client_tls(&root.join(CA_FILE))?,
            root,
            user,
            logins,
            watchdog: Some(Watchdog {
                shell: Mutex::new(shell),
                stdin,
                log,
            }),
        };
        if let Some(w) = &pg.watchdog {
            pg.wait_ready(|| w.exited(), || w.log_tail()).await?;
        }
        Ok(pg)
    }

    /// Starts the persistent development cluster, creating it on first use, or returns the
    /// one already running.
    ///
    /// It lives under `target/dal-dev` of the enclosing Cargo workspace (`DAL_DEV_DIR`
    /// overrides the place) and keeps running after this process exits, until
    /// [`stop_dev`](Self::stop_dev). A directory left incomplete by an interrupted creation
    /// is removed and created anew.
    pub async fn dev() -> Result<Self> {
        Self::dev_in(dev_root(ServerUser::detect()?)?).await
    }

    /// Like [`dev`](Self::dev), with the cluster kept in `root`.
    pub async fn dev_in(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let bindir = find_bindir()?;
        let user = ServerUser::detect()?;
        let _lock = blocking({
            let root = root.clone();
            move || lock_dev(&root)
        })
        .await?;
        check_dev_root(&root, user)?;
        let (port, password) = blocking({
            let (bindir, root) = (bindir.clone(), root.clone());
            move || open_or_create_dev(&bindir, &root, user)
        })
        .await?;
        // Every process on this cluster verifies token logins, on one shared port.
        let logins = TokenLogins::open(&root, true)?;
        let hba_changed = logins.write_hba(&root.join("data"))?;
        let mut pg = Self {
            port,
            password,
            admin_tls: certs::client_tls(&root.join(CA_FILE))?,
            root,
            user,
            logins,
            watchdog: None,
        };
        let pid_file = pg.root.join("data").join("postmaster.pid");
        if let Some(pid) = read_pid(&pid_file).filter(|pid| is_alive(*pid)) {
            // Already running, perhaps still starting up.
            let log_tail = || read_log_from(&pg.root.join("server.log"), 0);
            pg.wait_ready(|| !is_alive(pid), log_tail)
                .await
                .map_err(Started::into_error)?;
            if hba_changed {
                // A cluster created before token logins: the new rule applies from now on.
                pg.admin_access()
                    .connect("postgres")
                    .await?
                    .batch_execute("SELECT pg_reload_conf()")
                    .await?;
            }
            return Ok(pg);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match pg.start_dev(&bindir).await {
                Err(Started::PortTaken(_)) if attempt < PORT_ATTEMPTS => {
                    pg.port = free_port()?;
                    write_dev_state(&pg.root, pg.port, &pg.password)?;
                }
                Err(Started::PortTaken(e) | Started::Failed(e)) => return Err(e),
                Ok(()) => return Ok(pg),
            }
        }
    }

    async fn start_dev(&self, bindir: &Path) -> Result<(), Started> {
        let log_path = self.root.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io(&log_path))?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log.try_clone().map_err(Error::io(&log_path))?;
        let mut server = self
            .user
            .command(bindir.join("postgres"))
            .args(server_args(&self.root, self.port, false))
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::LocalServer {
                what: format!("cannot run {}", bindir.join("postgres").display()),
                source: Some(Box::new(e)),
            })?;
        let ready = self
            .wait_ready(
                || !matches!(server.try_wait(), Ok(None)),
                || read_log_from(&log_path, log_len),
            )
            .await;
        // Reap the server when it stops while this process still runs; it outlives the thread.
        std::thread::spawn(move || server.wait());
        ready.map_err(|started| {
            let tail = read_log_from(&log_path, log_len);
            let what = format!(
                "the development cluster in {} did not start: {}; if it cannot recover, \
                 delete that directory and run again",
                self.root.display(),
                tail.trim()
            );
            match started {
                Started::PortTaken(_) => Started::PortTaken(Error::local(what)),
                Started::Failed(_) if is_port_conflict(&tail) => {
                    Started::PortTaken(Error::local(what))
                }
                Started::Failed(_) => Started::Failed(Error::local(what)),
            }
        })
    }

    /// Stops the persistent development cluster. Returns `false` when it was not running.
    /// Blocks the calling thread while a program is starting it (until its server is ready,
    /// so not on the thread of a runtime driving that start), and until the server has
    /// stopped.
    pub fn stop_dev() -> Result<bool> {
        Self::stop_dev_in(&dev_root(ServerUser::detect()?)?)
    }

    /// Whether the development cluster's server is running, without starting it.
    pub fn dev_is_running() -> Result<bool> {
        let user = ServerUser::detect()?;
        let root = dev_root(user)?;
        check_dev_root(&root, user)?;
        Ok(read_pid(&root.join("data").join("postmaster.pid")).is_some_and(is_alive))
    }

    /// Like [`stop_dev`](Self::stop_dev), for the cluster kept in `root`: `pg_ctl stop -m
    /// fast` (SIGINT), every session is ended and the server checkpoints before it exits.
    pub fn stop_dev_in(root: &Path) -> Result<bool> {
        Self::signal_dev_in(root, nix::sys::signal::Signal::SIGINT)
    }

    /// Stops the cluster kept in `root` as a crash would: `pg_ctl stop -m immediate`
    /// (SIGQUIT), sessions are cut without a goodbye and the next start recovers from the WAL.
    /// Returns `false` when it was not running.
    pub fn crash_dev_in(root: &Path) -> Result<bool> {
        Self::signal_dev_in(root, nix::sys::signal::Signal::SIGQUIT)
    }

    fn signal_dev_in(root: &Path, signal: nix::sys::signal::Signal) -> Result<bool> {
        // A process id planted by another user would be signalled as this one.
        check_dev_root(root, ServerUser::detect()?)?;
        if !root.exists() {
            return Ok(false);
        }
        // Not while a program starts it: that program holds the lock until the server is
        // ready, and would fail on a server stopped as it started.
        let _lock = lock_dev(root)?;
        let pid_file = root.join("data").join("postmaster.pid");
        let Some(pid) = read_pid(&pid_file).filter(|pid| is_alive(*pid)) else {
            return Ok(false);
        };
        nix::sys::signal::kill(pid, signal).map_err(|e| Error::LocalServer {
            what: format!("cannot stop the development cluster (pid {pid})"),
            source: Some(Box::new(e)),
        })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        // A shutdown removes the pid file last.
        while pid_file.exists() && is_alive(pid) {
            if Instant::now() > deadline {
                return Err(Error::local(format!(
                    "the development cluster (pid {pid}) did not stop within {}s",
                    READY_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(true)
    }

    /// The directory of the PostgreSQL programs this crate runs (`initdb`, `postgres`, and
    /// their siblings such as `pgbench`), found as [`start`](Self::start) finds it.
    ///
    /// # Errors
    ///
    /// When no installation is found: the message says how to install one or set `PG_BINDIR`.
    pub fn bin_dir() -> Result<PathBuf> {
        crate::local::binaries::find_bindir()
    }

    /// The host name to connect to; the server certificate is valid for it.
    pub fn host(&self) -> &str {
        "localhost"
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The signing key of the tokens this cluster checks at login, for the local services.
    pub(crate) fn tokens(&self) -> std::sync::Arc<Tokens> {
        self.logins.tokens()
    }

    /// How many token logins this process's verifier accepted and refused (logins of members
    /// of [`TOKEN_GROUP`](super::TOKEN_GROUP); other processes on the same development cluster
    /// count their own).
    pub fn token_logins(&self) -> (u64, u64) {
        self.logins.counts()
    }

    /// The superuser's name.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The superuser's password, generated when the cluster was created.
    pub fn superuser_password(&self) -> &SecretString {
        &self.password
    }

    /// The PEM file of the CA that signed the server certificate, for `sslrootcert`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join(CA_FILE)
    }

    /// The cluster's directory (data, CA, logs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the cluster is removed when this handle is dropped.
    pub fn is_ephemeral(&self) -> bool {
        self.watchdog.is_some()
    }

    /// The last lines the server printed (ephemeral clusters; the development cluster writes
    /// `server.log` in its directory).
    pub fn log_tail(&self) -> String {
        self.watchdog
            .as_ref()
            .map(|w| w.log_tail())
            .unwrap_or_default()
    }

    /// A connection as superuser to `database`, over TLS verified against the cluster's CA.
    pub async fn admin(&self, database: &str) -> Result<tokio_postgres::Client> {
        self.admin_access().connect(database).await
    }

    /// What administrative work needs, detached from this handle's lifetime.
    pub(crate) fn admin_access(&self) -> AdminAccess {
        AdminAccess {
            port: self.port,
            password: self.password.clone(),
            tls: Arc::clone(&self.admin_tls),
        }
    }

    /// Connection options for sqlx (and so SeaORM) as superuser to `database`, over TLS
    /// verified against the cluster's CA (`verify-full`).
    ///
    /// sqlx's `Debug` of the options shows the password: keep them out of logs. No password
    /// file is read (sqlx logs a malformed line of one whole).
    #[cfg(feature = "seaorm")]
    pub fn sqlx_options(&self, database: &str) -> sea_orm::sqlx::postgres::PgConnectOptions {
        use sea_orm::sqlx::postgres::{PgConnectOptions, PgSslMode};
        PgConnectOptions::new_without_pgpass()
            .host(self.host())
            .port(self.port)
            .username(SUPERUSER)
            .password(self.password.expose_secret())
            .database(database)
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(self.ca_cert_path())
    }

    /// A [`Config`](crate::Config) for `user` with `password` on `database` of this server,
    /// over TLS verified against the cluster's CA (`verify-full`).
    pub fn config(&self, database: &str, user: &str, password: &str) -> crate::Config {
        crate::Config::new(self.host(), user)
            .port(self.port)
            .database(database)
            .password(password)
            .ssl_mode(crate::SslMode::VerifyFull)
            .ssl_root_cert(self.ca_cert_path())
    }

    /// Like [`config`](Self::config), as the superuser.
    pub fn superuser_config(&self, database: &str) -> crate::Config {
        self.config(database, SUPERUSER, self.password.expose_secret())
    }

    /// Creates `database` unless it exists, owned by `owner` (a role) or by the superuser.
    pub async fn create_database(&self, database: &str, owner: Option<&str>) -> Result<()> {
        let admin = self.admin("postgres").await?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await?
            .is_some();
        if exists {
            return Ok(());
        }
        let sql: String = admin
            .query_one(
                "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)",
                &[&database, &owner.unwrap_or(SUPERUSER)],
            )
            .await?
            .get(0);
        match admin.batch_execute(&sql).await {
            // Created meanwhile by someone else: just as good. Two at once that both found
            // none meet in the catalog's unique index instead (`23505`).
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                Ok(())
            }
            other => other.map_err(Error::from),
        }
    }

    /// Makes `role` a token role: a member of [`TOKEN_GROUP`](super::TOKEN_GROUP) (created
    /// when missing), which logs in over TLS with the tokens of [`mint_token`](Self::mint_token)
    /// (and of the local credential services) instead of a password. Creates the role when it
    /// does not exist. Safe to call from several processes at once.
    pub async fn create_token_role(&self, role: &str) -> Result<()> {
        let mut client = self.admin("postgres").await?;
        let tx = changing_roles(&mut client).await?;
        for (name, attributes) in [(TOKEN_GROUP, "NOLOGIN"), (role, "LOGIN")] {
            let exists = tx
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
                .await?
                .is_some();
            if !exists {
                let sql: String = tx
                    .query_one(
                        "SELECT format('CREATE ROLE %I ' || $2::text, $1::text)",
                        &[&name, &attributes],
                    )
                    .await?
                    .get(0);
                tx.batch_execute(&sql).await?;
            }
        }
        // Granted once: again, the server's notice that it is already a member is noise in
        // the output of every program after the first.
        let member = tx
            .query_opt(
                "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                 JOIN pg_roles r ON r.oid = m.member WHERE g.rolname = $1 AND r.rolname = $2",
                &[&TOKEN_GROUP, &role],
            )
            .await?
            .is_some();
        if !member {
            let grant: String = tx
                .query_one(
                    "SELECT format('GRANT %I TO %I', $1::text, $2::text)",
                    &[&TOKEN_GROUP, &role],
                )
                .await?
                .get(0);
            tx.batch_execute(&grant).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// An Aurora DSQL token source for `user` (a [token role](Self::create_token_role)) whose
    /// tokens this cluster accepts at login: signed for [`LOCAL_DSQL_HOST`](super::LOCAL_DSQL_HOST)
    /// in [`LOCAL_DSQL_REGION`](super::LOCAL_DSQL_REGION) with the cluster's local AWS keys,
    /// `DbConnectAdmin` for `admin` and `DbConnect` for any other role, as on DSQL.
    #[cfg(feature = "dsql")]
    pub fn dsql_source(&self, user: &str) -> Result<crate::credentials::Dsql> {
        self.dsql_source_at(super::LOCAL_DSQL_HOST, super::LOCAL_DSQL_REGION, user)
    }

    /// The cluster's local AWS access key id and secret key, which sign the DSQL tokens it
    /// accepts: for a test's AWS credential files or credential service. Local only: they
    /// sign for nothing but this cluster.
    #[cfg(feature = "dsql")]
    pub fn dsql_access_keys(&self) -> (String, SecretString) {
        let (id, secret) = self.logins.tokens().dsql_keys();
        (id, SecretString::from(secret))
    }

    /// Like [`dsql_source`](Self::dsql_source), signed for `host` in `region`: the cluster
    /// accepts [`LOCAL_DSQL_HOST`](super::LOCAL_DSQL_HOST) in
    /// [`LOCAL_DSQL_REGION`](super::LOCAL_DSQL_REGION), and its multi-region peer
    /// [`LOCAL_DSQL_PEER_HOST`](super::LOCAL_DSQL_PEER_HOST) in
    /// [`LOCAL_DSQL_PEER_REGION`](super::LOCAL_DSQL_PEER_REGION).
    #[cfg(feature = "dsql")]
    pub(crate) fn dsql_source_at(
        &self,
        host: &str,
        region: &str,
        user: &str,
    ) -> Result<crate::credentials::Dsql> {
        let (id, secret) = self.logins.tokens().dsql_keys();
        let source = crate::credentials::Dsql::new(host, user, Some(region))?;
        Ok(source.with_static_credentials(id, secret, None))
    }

    /// Limits `role` to `limit` connections at once (`None`: no limit), as the cloud services
    /// limit connections: a login beyond it fails with SQLSTATE `53300`
    /// (`too_many_connections`), the code DSQL answers when its limits are reached.
    pub async fn set_connection_limit(&self, role: &str, limit: Option<u32>) -> Result<()> {
        let admin = self.admin("postgres").await?;
        let limit = limit.map_or(-1, i64::from);
        let sql: String = admin
            .query_one(
                "SELECT format('ALTER ROLE %I CONNECTION LIMIT %s', $1::text, $2::bigint)",
                &[&role, &limit],
            )
            .await?
            .get(0);
        admin.batch_execute(&sql).await?;
        Ok(())
    }

    /// Closes every connection of a [token role](Self::create_token_role) once it is `age`
    /// old, as Aurora DSQL closes connections after 60 minutes, until the returned guard is
    /// dropped. Connections are checked every quarter of `age` (at least every 50 ms), so one
    /// may live up to a quarter longer. Must be called within a Tokio runtime.
    pub fn limit_connection_age(&self, age: Duration) -> ConnectionAgeLimit {
        let admin = self.admin_access();
        let every = (age / 4).max(Duration::from_millis(50));
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Ok(client) = admin.connect("postgres").await else {
                    continue;
                };
                let closed = client
                    .query(
                        "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
                         WHERE a.backend_type = 'client backend' \
                           AND a.backend_start < now() - make_interval(secs => $1) \
                           AND pg_has_role(a.usesysid, $2::text, 'MEMBER')",
                        &[&age.as_secs_f64(), &TOKEN_GROUP],
                    )
                    .await;
                if let Ok(rows) = closed
                    && !rows.is_empty()
                {
                    tracing::debug!(
                        closed = rows.len(),
                        "connections past their age limit closed"
                    );
                }
            }
        });
        ConnectionAgeLimit(task)
    }

    /// A token that logs the token role `role` in until `expires_at`, as a credential
    /// service's would; tokens minted earlier stay valid until their own expiry.
    pub fn mint_token(&self, role: &str, expires_at: std::time::SystemTime) -> String {
        self.logins.tokens().mint(role, expires_at)
    }

    /// Creates the login role `role`, or updates it when it exists, with `password` valid
    /// until `valid_until` (forever when `None`). Safe to call from several processes at
    /// once: the last call's password holds.
    pub async fn create_role(
        &self,
        role: &str,
        password: &str,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let mut admin = self.admin("postgres").await?;
        let tx = changing_roles(&mut admin).await?;
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await?
            .is_some();
        if !exists {
            let sql: String = tx
                .query_one("SELECT format('CREATE ROLE %I LOGIN', $1::text)", &[&role])
                .await?
                .get(0);
            tx.batch_execute(&sql).await?;
        }
        set_password(&tx, role, password, valid_until).await?;
        Ok(tx.commit().await?)
    }

    /// Rotates `role`'s password: logins with the old one fail from now on, logins with the
    /// new one fail after `valid_until` (SQLSTATE `28P01` either way), and sessions already
    /// open keep working, just like a database token of Lakebase or Aurora DSQL.
    pub async fn rotate_password(
        &self,
        role: &str,
        password: &str,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<()> {
        self.admin_access()
            .rotate_password(role, password, valid_until)
            .await
    }

    /// Waits until the server lets the superuser in, or `exited` says it stopped.
    async fn wait_ready(
        &self,
        exited: impl FnMut() -> bool,
        log_tail: impl Fn() -> String,
    ) -> Result<(), Started> {
        let admin = move || async move { self.admin("postgres").await.map(drop) };
        await_ready(admin, exited, log_tail).await
    }
}

/// Waits until `ready` succeeds, or `exited` says the server stopped, for [`READY_TIMEOUT`]
/// at most; a server still not ready is reported with `ready`'s last error.
async fn await_ready<F: std::future::Future<Output = Result<()>>>(
    mut ready: impl FnMut() -> F,
    mut exited: impl FnMut() -> bool,
    log_tail: impl Fn() -> String,
) -> Result<(), Started> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if exited() {
            let tail = log_tail();
            let e = Error::local(format!("the server exited at start: {}", tail.trim()));
            return Err(if is_port_conflict(&tail) {
                Started::PortTaken(e)
            } else {
                Started::Failed(e)
            });
        }
        let last = match ready().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if tokio::time::Instant::now() > deadline {
            return Err(Started::Failed(Error::local(format!(
                "the server did not let the superuser in within {}s ({}): {}",
                READY_TIMEOUT.as_secs(),
                crate::error::ErrorChain(&last),
                log_tail().trim()
            ))));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops closing old connections when dropped; see [`LocalPostgres::limit_connection_age`].
#[derive(Debug)]
pub struct ConnectionAgeLimit(tokio::task::JoinHandle<()>);

impl Drop for ConnectionAgeLimit {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Superuser access to a running server, cheap to clone and free of the handle's lifetime.
#[derive(Clone)]
pub(crate) struct AdminAccess {
    port: u16,
    password: SecretString,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAccess")
            .field("port", &self.port)
            .field("password", &"** redacted **")
            .finish()
    }
}

impl AdminAccess {
    /// A connection as superuser to `database`, over TLS verified against the cluster's CA
    /// and with SCRAM channel binding: the password goes to no program but the cluster's
    /// server, whatever holds the port (the cluster's old port after a restart, say).
    pub(crate) async fn connect(&self, database: &str) -> Result<tokio_postgres::Client> {
        use tokio_postgres::config::{ChannelBinding, SslMode};
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(self.password.expose_secret())
            .dbname(database)
            .ssl_mode(SslMode::Require)
            .channel_binding(ChannelBinding::Require)
            .application_name("dal-local-admin");
        let tls =
            tokio_postgres_rustls::MakeRustlsConnect::new(rustls::ClientConfig::clone(&self.tls));
        let connect = config.connect(tls);
        // The whole handshake is bounded, not only the TCP connect: a program squatting on
        // the port could accept and never answer.
        let (client, connection) = tokio::time::timeout(ADMIN_TIMEOUT, connect)
            .await
            .map_err(|_| {
                Error::local(format!(
                    "no answer from 127.0.0.1:{} within {}s",
                    self.port,
                    ADMIN_TIMEOUT.as_secs()
                ))
            })??;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// See [`LocalPostgres::rotate_password`].
    pub(crate) async fn rotate_password(
        &self,
        role: &str,
        password: &str,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<()> {
        let mut admin = self.connect("postgres").await?;
        let tx = changing_roles(&mut admin).await?;
        set_password(&tx, role, password, valid_until).await?;
        Ok(tx.commit().await?)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Some(w) = &mut self.watchdog {
            // Closing the shell's input stops the server; the shell then removes the directory.
            drop(w.stdin.take());
            let deadline = Instant::now() + READY_TIMEOUT;
            while !w.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Watchdog {
    fn exited(&self) -> bool {
        let mut shell = self.shell.lock().unwrap_or_else(|e| e.into_inner());
        !matches!(shell.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Why a start failed: a port taken by another process is worth another try.
enum Started {
    PortTaken(Error),
    Failed(Error),
}

impl Started {
    fn into_error(self) -> Error {
        match self {
            Started::PortTaken(e) | Started::Failed(e) => e,
        }
    }
}

impl From<Error> for Started {
    fn from(e: Error) -> Self {
        Started::Failed(e)
    }
}

/// What the server wrote to `path` after its first `from` bytes.
fn read_log_from(path: &Path, from: u64) -> String {
    std::fs::read(path)
        .map(|all| {
            String::from_utf8_lossy(all.get(from as usize..).unwrap_or_default()).into_owned()
        })
        .unwrap_or_default()
}

fn is_port_conflict(log: &str) -> bool {
    log.contains("could not bind") || log.contains("Address already in use")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::LocalServer {
            what: "a setup task failed".into(),
            source: Some(Box::new(e)),
        })?
}

fn drain_log(stderr: impl std::io::Read, log: &Mutex<VecDeque<String>>) {
    const KEEP: usize = 200;
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == KEEP {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// Runs `initdb` in `root/data` and writes the TLS files; returns the superuser's password.
fn create_cluster(bindir: &Path, root: &Path, user: ServerUser) -> Result<SecretString> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    // Made here, or made by someone else since it was checked: checked again then.
    match std::fs::DirBuilder::new().mode(0o700).create(root) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_dev_root(root, user)?,
        made => made.map_err(Error::io(root))?,
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(root))?;
    user.own(root)?;

    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let pwfile = root.join("pwfile");
    write_private(&pwfile, password.as_bytes(), user)?;
    let data = root.join("data");
    let out = user
        .command(bindir.join("initdb"))
        .arg("-D")
        .arg(&data)
        .arg("-U")
        .arg(SUPERUSER)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args([
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ])
        .current_dir(root)
        .output();
    let _ = std::fs::remove_file(&pwfile);
    let out = out.map_err(|e| Error::LocalServer {
        what: format!("cannot run {}", bindir.join("initdb").display()),
        source: Some(Box::new(e)),
    })?;
    if !out.status.success() {
        return Err(Error::local(format!(
            "initdb failed in {}: {}",
            data.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }

    let certs = certs::generate()?;
    write_private(&data.join("server.crt"), certs.cert_pem.as_bytes(), user)?;
    write_private(&data.join("server.key"), certs.key_pem.as_bytes(), user)?;
    let ca = root.join(CA_FILE);
    std::fs::write(&ca, certs.ca_pem).map_err(Error::io(&ca))?;
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644))
        .map_err(Error::io(&ca))?;
    Ok(SecretString::from(password))
}

fn server_args(root: &Path, port: u16, ephemeral: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-D".into(), root.join("data").into()];
    args.extend(["-p".into(), port.to_string().into()]);
    let mut settings = vec![
        "listen_addresses=127.0.0.1",
        "unix_socket_directories=",
        "ssl=on",
        "max_connections=300",
    ];
    if ephemeral {
        settings.extend([
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ]);
    }
    for s in settings {
        args.extend(["-c".into(), s.into()]);
    }
    args
}

/// The settings that preload Lakebase's libraries by name: `neon` and `databricks_auth` in
/// `<root>/lib`, links to the installation's `auto_explain` module.
fn lakebase_libraries(bindir: &Path, root: &Path, user: ServerUser) -> Result<Vec<OsString>> {
    let module = bindir
        .parent()
        .map(|p| p.join("lib").join("auto_explain.so"))
        .filter(|m| m.is_file())
        .ok_or_else(|| {
            Error::local(format!(
                "no auto_explain.so next to {}: install PostgreSQL's contrib modules to pass for \
                 Lakebase",
                bindir.display()
            ))
        })?;
    let lib = root.join("lib");
    std::fs::create_dir_all(&lib).map_err(Error::io(&lib))?;
    // The server user's, so that it removes the directory with the cluster.
    user.own(&lib)?;
    for name in ["neon.so", "databricks_auth.so"] {
        let link = lib.join(name);
        std::os::unix::fs::symlink(&module, &link).map_err(Error::io(&link))?;
    }
    Ok(vec![
        "-c".into(),
        "shared_preload_libraries=neon,databricks_auth".into(),
        "-c".into(),
        format!("dynamic_library_path=$libdir:{}", lib.display()).into(),
    ])
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::LocalServer {
        what: "cannot find a free port on 127.0.0.1".into(),
        source: Some(Box::new(e)),
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::LocalServer {
            what: "cannot find a free port on 127.0.0.1".into(),
            source: Some(Box::new(e)),
        })?
        .port();
    Ok(port)
}

/// A transaction on `admin` that changes roles, one such at a time on the cluster (programs
/// sharing it create roles at once): two `CREATE ROLE` of one name that both found none
/// meet in the catalog's unique index (SQLSTATE `23505`), and two `ALTER ROLE` of one role
/// may fail with `tuple concurrently updated`.
async fn changing_roles(
    admin: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>> {
    let tx = admin.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&TOKEN_GROUP],
    )
    .await?;
    Ok(tx)
}

async fn set_password(
    admin: &tokio_postgres::Transaction<'_>,
    role: &str,
    password: &str,
    valid_until: Option<DateTime<Utc>>,
) -> Result<()> {
    let until = valid_until.map_or_else(|| "infinity".to_owned(), |t| t.to_rfc3339());
    // Only the SCRAM verifier travels: the statement (and any log of it) never holds the
    // token itself. ALTER ROLE takes no bind parameters: the server quotes the values.
    // A random salt from the OS (postgres-protocol), 4096 iterations as PostgreSQL's own.
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let sql: String = admin
        .query_one(
            "SELECT format('ALTER ROLE %I PASSWORD %L VALID UNTIL %L', $1::text, $2::text, $3::text)",
            &[&role, &verifier, &until],
        )
        .await?
        .get(0);
    admin.batch_execute(&sql).await?;
    Ok(())
}

/// Where the development cluster lives: `DAL_DEV_DIR`, else `target/dal-dev` of the enclosing
/// workspace, else the temporary directory; somewhere the server user can reach.
fn dev_root(user: ServerUser) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DAL_DEV_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(Error::config(
                "DAL_DEV_DIR",
                "must be an absolute path, such as /var/tmp/dal-dev",
            ));
        }
        return Ok(dir);
    }
    let cwd = std::env::current_dir().map_err(Error::io("."))?;
    let exe = std::env::current_exe().ok();
    let root = dev_root_from(
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from),
        &cwd,
        exe.as_deref(),
        |dir| user.can_reach(dir),
    );
    Ok(root)
}

/// Where the development cluster lives, the same however a program is started: in
/// `CARGO_TARGET_DIR`, else in the cargo target directory that holds the running program (the
/// nearest ancestor with cargo's `CACHEDIR.TAG`: `cargo run`, a test, or the binary run from
/// anywhere), else in the target directory of the workspace around `cwd`; each as `dal-dev`,
/// if the server's user can reach it. Else a directory of the system's temporary directory
/// named after `cwd`.
fn dev_root_from(
    cargo_target_dir: Option<PathBuf>,
    cwd: &Path,
    exe: Option<&Path>,
    can_reach: impl Fn(&Path) -> bool,
) -> PathBuf {
    let exe_target = || {
        exe?.ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    };
    let workspace_target = || {
        cwd.ancestors()
            .filter(|d| d.join("Cargo.lock").is_file())
            .last()
            .map(|ws| ws.join("target"))
    };
    let target = cargo_target_dir
        .map(|t| cwd.join(t))
        .or_else(exe_target)
        .or_else(workspace_target);
    match target.map(|t| t.join("dal-dev")) {
        Some(dir) if can_reach(&dir) => dir,
        _ => {
            let tag: String = cwd
                .to_string_lossy()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            std::env::temp_dir().join(format!("dal-dev{tag}"))
        }
    }
}

/// Refuses a development cluster's directory that another user owns, or that others may
/// write: its state (the superuser's password, the port, the token signing key) would be
/// theirs to plant, and a directory under the shared temporary one can be made by anyone
/// before this process makes it. (The files that hold secrets are the owner's alone.)
fn check_dev_root(root: &Path, user: ServerUser) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(root) else {
        return Ok(()); // created below, 0700
    };
    let own = nix::unistd::geteuid().as_raw();
    let server = user.switch_to.map(|(uid, _)| uid);
    if (meta.uid() == own || Some(meta.uid()) == server) && meta.mode() & 0o022 == 0 {
        return Ok(());
    }
    Err(Error::config(
        "DAL_DEV_DIR",
        format!(
            "{} belongs to another user or others may write to it (mode {:o}): remove it, or \
             set DAL_DEV_DIR to a directory of your own",
            root.display(),
            meta.mode() & 0o777
        ),
    ))
}

/// Serializes concurrent starts of the development cluster.
fn lock_dev(root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let parent = root.parent().unwrap_or(root);
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let path = root.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io(&path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        Error::LocalServer {
            what: format!("cannot lock {}", path.display()),
            source: Some(Box::new(e)),
        }
    })
}

fn open_or_create_dev(bindir: &Path, root: &Path, user: ServerUser) -> Result<(u16, SecretString)> {
    let state_path = root.join(DEV_STATE);
    // Written last, and whole (see `write_private`): a cluster without one never finished
    // its creation. One that cannot be read is not a reason to delete the data beside it.
    let state =
        match std::fs::read(&state_path) {
            Ok(bytes) => Some(serde_json::from_slice::<DevState>(&bytes).map_err(|e| {
                Error::LocalServer {
                    what: format!(
                        "cannot read the development cluster's state {}: repair it, or remove {} \
                     to start afresh without its data",
                        state_path.display(),
                        root.display()
                    ),
                    source: Some(Box::new(e)),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&state_path)(e)),
        }
        .filter(|_| root.join("data").join("PG_VERSION").is_file());
    if let Some(state) = state {
        let pid_file = root.join("data").join("postmaster.pid");
        if let Some(pid) = read_pid(&pid_file)
            && is_alive(pid)
            && !is_postgres(pid)
        {
            // The pid was reused by another program after a crash: the lock file is stale.
            let _ = std::fs::remove_file(&pid_file);
        }
        return Ok((state.port, SecretString::from(state.superuser_password)));
    }
    // Missing or incomplete: start afresh.
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(Error::io(root))?;
    }
    let password = create_cluster(bindir, root, user)?;
    let port = free_port()?;
    write_dev_state(root, port, &password)?;
    Ok((port, password))
}

fn write_dev_state(root: &Path, port: u16, password: &SecretString) -> Result<()> {
    let state = DevState {
        port,
        superuser_password: password.expose_secret().to_owned(),
    };
    let bytes = serde_json::to_vec_pretty(&state).map_err(|e| Error::LocalServer {
        what: "cannot encode the development cluster's state".into(),
        source: Some(Box::new(e)),
    })?;
    // Owned by the invoking user, readable by nobody else.
    write_private(
        &root.join(DEV_STATE),
        &bytes,
        ServerUser { switch_to: None },
    )
}

fn read_pid(pid_file: &Path) -> Option<nix::unistd::Pid> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
    Some(nix::unistd::Pid::from_raw(pid))
}

fn is_alive(pid: nix::unistd::Pid) -> bool {
    matches!(
        nix::sys::signal::kill(pid, None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    )
}

fn is_postgres(pid: nix::unistd::Pid) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| String::from_utf8_lossy(&cmd).contains("postgres"))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that never lets the superuser in (a wrong password, another program on the
    /// port) is reported with the last login's error: the message gave only the server's
    /// log, which may well say "ready to accept connections".
    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_lets_the_superuser_in_says_why() {
        let refused = || async {
            Err(Error::local(
                "password authentication failed for user \"postgres\" (28P01)",
            ))
        };
        let log = || "LOG:  database system is ready to accept connections".to_owned();
        let Err(Started::Failed(e)) = await_ready(refused, || false, log).await else {
            panic!("a server that lets no one in was ready");
        };
        let said = e.to_string();
        assert!(
            said.contains("28P01") && said.contains("ready to accept"),
            "{said}"
        );
    }

    /// A directory someone else made first (under the shared temporary directory, say) is
    /// not taken for the development cluster's.
    #[test]
    fn a_dev_directory_others_own_or_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = ServerUser { switch_to: None };
        let root = dir.path().join("dal-dev");
        assert!(
            check_dev_root(&root, me).is_ok(),
            "not there yet: created 0700"
        );
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_dev_root(&root, me).is_ok());
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_dev_root(&root, me).unwrap_err().to_string();
        assert!(err.contains("DAL_DEV_DIR") && err.contains("777"), "{err}");
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
            assert!(check_dev_root(&root, me).is_err(), "owned by nobody");
            let as_server = ServerUser {
                switch_to: Some((65534, 65534)),
            };
            assert!(
                check_dev_root(&root, as_server).is_ok(),
                "the server user's own"
            );
        }
    }

    /// A stop of the development cluster waits for a program that is starting it, which holds
    /// the cluster's lock until the server is ready. Before, the stop signalled a server that
    /// was starting, and the program failed with "the development cluster ... did not start
    /// ...; if it cannot recover, delete that directory".
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stop_waits_for_a_program_starting_the_development_cluster() {
        struct StoppedAtLast(PathBuf);
        impl Drop for StoppedAtLast {
            fn drop(&mut self) {
                let _ = LocalPostgres::stop_dev_in(&self.0);
                let _ = std::fs::remove_file(self.0.with_extension("lock"));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let _stopped = StoppedAtLast(root.clone());
        drop(LocalPostgres::dev_in(&root).await.unwrap());
        let starting = lock_dev(&root).unwrap();
        let stop = std::thread::spawn({
            let root = root.clone();
            move || LocalPostgres::stop_dev_in(&root)
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !stop.is_finished(),
            "the stop went ahead of the program starting the cluster"
        );
        drop(starting);
        assert!(stop.join().unwrap().unwrap(), "then it stops the server");
    }

    /// A program holding the cluster's port (its old port after a restart, or a port free a
    /// moment before the server took it) is never sent the superuser's password: the
    /// administrative connections stop at a server that will not do TLS, or whose certificate
    /// the cluster's CA did not sign. Without TLS, tokio-postgres answers a request for the
    /// password in clear text.
    #[tokio::test]
    async fn a_program_holding_the_clusters_port_is_never_sent_the_superuser_password() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, certs::generate().unwrap().ca_pem).unwrap();
        // A certificate for 127.0.0.1 from another CA, which anyone can make.
        let other = certs::generate().unwrap().server_config().unwrap();
        for tls in [None, Some(Arc::new(other))] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin = AdminAccess {
                port: listener.local_addr().unwrap().port(),
                password: SecretString::from("hunter2-superuser"),
                tls: certs::client_tls(&ca).unwrap(),
            };
            let with_tls = tls.is_some();
            let heard = tokio::spawn(squat(listener, tls));
            let outcome = admin.connect("postgres").await;
            let heard = String::from_utf8_lossy(&heard.await.unwrap()).into_owned();
            assert!(
                !heard.contains("hunter2"),
                "the program (TLS: {with_tls}) was sent the password"
            );
            assert!(
                outcome.is_err(),
                "connected to the program (TLS: {with_tls})"
            );
        }
    }

    /// Answers one connection as a server that asks for the password in clear text, with TLS
    /// if `tls` is given; what the client sent after the request.
    async fn squat(
        listener: tokio::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Vec<u8> {
        use tokio::io::AsyncWriteExt;
        let (mut socket, _) = listener.accept().await.unwrap();
        let Some(first) = untyped_message(&mut socket).await else {
            return Vec::new();
        };
        // SSLRequest's code, 80877103.
        if first != [0x04, 0xd2, 0x16, 0x2f] {
            return ask_for_password(socket, false).await;
        }
        match tls {
            None => {
                socket.write_all(b"N").await.unwrap();
                ask_for_password(socket, true).await
            }
            Some(config) => {
                socket.write_all(b"S").await.unwrap();
                match tokio_rustls::TlsAcceptor::from(config).accept(socket).await {
                    Ok(stream) => ask_for_password(stream, true).await,
                    Err(_) => Vec::new(),
                }
            }
        }
    }

    /// Reads the startup message if `startup` is still to come, asks for the password in
    /// clear text, and returns the client's next message.
    async fn ask_for_password<S>(mut stream: S, startup: bool) -> Vec<u8>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if startup && untyped_message(&mut stream).await.is_none() {
            return Vec::new();
        }
        // AuthenticationCleartextPassword.
        if stream
            .write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3])
            .await
            .is_err()
        {
            return Vec::new();
        }
        let mut head = [0; 5];
        if stream.read_exact(&mut head).await.is_err() {
            return Vec::new();
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0; len.saturating_sub(4).min(1 << 16)];
        let _ = stream.read_exact(&mut body).await;
        body
    }

    /// A message without a type byte (the startup message, SSLRequest): its body.
    async fn untyped_message<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let len = stream.read_u32().await.ok()? as usize;
        let mut body = vec![0; len.saturating_sub(4).min(1 << 16)];
        stream.read_exact(&mut body).await.ok()?;
        Some(body)
    }

    #[test]
    fn a_pid_planted_in_a_dev_directory_others_may_write_is_not_signalled() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dal-dev");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        // A process of this user's that the planted file names.
        let mut victim = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(
            root.join("data").join("postmaster.pid"),
            format!("{}\n", victim.id()),
        )
        .unwrap();
        let stopped = LocalPostgres::stop_dev_in(&root);
        let crashed = LocalPostgres::crash_dev_in(&root);
        let alive = victim.try_wait().unwrap().is_none();
        victim.kill().unwrap();
        victim.wait().unwrap();
        for outcome in [stopped, crashed] {
            let err = outcome.unwrap_err().to_string();
            assert!(err.contains("DAL_DEV_DIR"), "{err}");
        }
        assert!(alive, "the planted process was signalled");
    }

    #[test]
    fn the_dev_cluster_is_found_the_same_way_from_any_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let target = ws.join("target");
        std::fs::create_dir_all(target.join("debug/deps")).unwrap();
        std::fs::write(
            target.join("CACHEDIR.TAG"),
            "Signature: 8a477f597d28d172789f06886806bc55",
        )
        .unwrap();
        std::fs::write(ws.join("Cargo.lock"), "").unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let reach = |_: &Path| true;
        let expected = target.join("dal-dev");
        // A program or a test binary of the workspace, started from anywhere.
        for exe in ["debug/tour", "debug/deps/integration-0123"] {
            let exe = target.join(exe);
            assert_eq!(dev_root_from(None, &elsewhere, Some(&exe), reach), expected);
            assert_eq!(dev_root_from(None, &ws, Some(&exe), reach), expected);
        }
        // A program outside any target directory, started in the workspace.
        let outside = dir.path().join("bin/tool");
        assert_eq!(dev_root_from(None, &ws, Some(&outside), reach), expected);
        // CARGO_TARGET_DIR, relative to the working directory, comes first.
        assert_eq!(
            dev_root_from(
                Some("other".into()),
                &ws,
                Some(&target.join("debug/tour")),
                reach
            ),
            ws.join("other/dal-dev")
        );
        // Nowhere the server's user can reach: the system's temporary directory.
        let fallback = dev_root_from(None, &elsewhere, Some(&outside), reach);
        assert!(fallback.starts_with(std::env::temp_dir()), "{fallback:?}");
        let unreachable = dev_root_from(None, &ws, Some(&outside), |_: &Path| false);
        assert!(
            unreachable.starts_with(std::env::temp_dir()),
            "{unreachable:?}"
        );
    }
}
