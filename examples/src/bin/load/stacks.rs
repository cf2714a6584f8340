//! The stacks under test. Each answers one request, pgbench's select-only transaction
//! (`SELECT abalance FROM pgbench_accounts WHERE aid = $1`, a random account), with one
//! checkout of its pool; the plain ones are the pools a user would build without dal. The
//! drivers with no pool at all (a connection of its own for each caller) are the ceiling a
//! pool can come near: the gap between them and pgbench is the driver's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dal::diesel::prelude::*;
use dal::diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use dal::diesel_async::{AsyncPgConnection, RunQueryDsl};
use dal::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionSession, TransactionTrait,
};
use dal::{Connector, PoolSettings};
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use tokio_postgres_rustls::MakeRustlsConnect;

/// pgbench's select-only query.
pub const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// Accounts in a scale-1 pgbench database.
pub const ACCOUNTS: i32 = 100_000;

dal::diesel::table! {
    pgbench_accounts (aid) {
        aid -> Integer,
        abalance -> Integer,
    }
}

/// Where the benchmark database is, and who logs in.
#[derive(Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: String,
    /// The CA that signed the server's certificate: every stack verifies it (`verify-full`).
    pub ca: std::path::PathBuf,
}

impl Server {
    /// The same login for dal.
    pub fn dal_config(&self) -> dal::Config {
        dal::Config::new(&self.host, &self.user)
            .port(self.port)
            .database(&self.database)
            .ssl_mode(dal::SslMode::VerifyFull)
            .ssl_root_cert(&self.ca)
            .password(&self.password)
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(&self.user)
            .password(&self.password)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        config
    }
}

/// TLS for the plain tokio-postgres and Diesel pools, trusting `ca` only.
fn rustls_connect(ca: &Path) -> anyhow::Result<MakeRustlsConnect> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).context("read the CA")? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A tokio-postgres connection over the plain stacks' TLS, not yet driven.
type PlainConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// Opens `n` tokio-postgres connections as the plain stacks do, one TLS configuration for
/// all: the drivers alone keep them, one per caller.
async fn connect_plain(
    server: &Server,
    n: usize,
) -> anyhow::Result<Vec<(tokio_postgres::Client, PlainConnection)>> {
    let (config, tls) = (server.pg_config(), rustls_connect(&server.ca)?);
    let mut opened = Vec::with_capacity(n);
    for _ in 0..n {
        opened.push(config.connect(tls.clone()).await?);
    }
    Ok(opened)
}

type DieselPlainPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;
type PgPlainPool = bb8::Pool<bb8_postgres::PostgresConnectionManager<MakeRustlsConnect>>;

/// One stack, with its pool built and warm.
pub enum Stack {
    SeaOrmDal(dal::SeaOrmPool),
    SeaOrmPlain(DatabaseConnection),
    DieselDal(dal::DieselPool),
    DieselPlain(DieselPlainPool),
    PgDal(dal::PgClientPool),
    PgPlain(PgPlainPool),
    /// A connection per caller, each behind a mutex that only its caller locks.
    DieselNoPool(Vec<tokio::sync::Mutex<AsyncPgConnection>>),
    /// A client per caller, with the query prepared on it once.
    PgNoPool(Vec<(tokio_postgres::Client, tokio_postgres::Statement)>),
    /// A stack (a dal pool, or a driver alone) on each of a set of single-threaded runtimes.
    PerCore(PerCore),
}

/// Which stack, as the table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    SeaOrmDal,
    SeaOrmPlain,
    DieselDal,
    DieselPlainDefaults,
    DieselPlainLike,
    PgDal,
    PgPlain,
    DieselDalPerCore,
    PgDalPerCore,
    DieselNoPool,
    PgNoPool,
    DieselNoPoolPerCore,
    PgNoPoolPerCore,
    Pgbench,
    PgbenchOneThread,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::SeaOrmDal,
        Kind::SeaOrmPlain,
        Kind::DieselDal,
        Kind::DieselPlainDefaults,
        Kind::DieselPlainLike,
        Kind::PgDal,
        Kind::PgPlain,
        Kind::DieselDalPerCore,
        Kind::PgDalPerCore,
        Kind::DieselNoPool,
        Kind::PgNoPool,
        Kind::DieselNoPoolPerCore,
        Kind::PgNoPoolPerCore,
        Kind::Pgbench,
        Kind::PgbenchOneThread,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::SeaOrmDal => "SeaORM via dal",
            Kind::SeaOrmPlain => "SeaORM, plain (sqlx defaults)",
            Kind::DieselDal => "Diesel via dal",
            Kind::DieselPlainDefaults => "Diesel, plain bb8 (defaults)",
            Kind::DieselPlainLike => "Diesel, plain bb8 (dal's settings)",
            Kind::PgDal => "tokio-postgres via dal (prepare_cached)",
            Kind::PgPlain => "tokio-postgres, plain bb8 (query_typed)",
            Kind::DieselDalPerCore => "Diesel via dal, a runtime and pool per core",
            Kind::PgDalPerCore => "tokio-postgres via dal, a runtime and pool per core",
            Kind::DieselNoPool => "Diesel, no pool (a connection per caller)",
            Kind::PgNoPool => "tokio-postgres, no pool (a client per caller)",
            Kind::DieselNoPoolPerCore => "Diesel, no pool, a runtime per core",
            Kind::PgNoPoolPerCore => "tokio-postgres, no pool, a runtime per core",
            Kind::Pgbench => "pgbench -S -M prepared (a thread per runtime worker)",
            Kind::PgbenchOneThread => "pgbench -S -M prepared (one thread, its default)",
        }
    }

    /// Whether the stack is a driver with no pool.
    pub fn driver_alone(self) -> bool {
        matches!(
            self.per_core().unwrap_or(self),
            Kind::DieselNoPool | Kind::PgNoPool
        )
    }

    /// pgbench's threads for `clients` clients, if the stack is pgbench: as many as the
    /// clients' runtime has workers (so that both sides may use as many cores), or pgbench's
    /// default of one.
    pub fn pgbench_threads(self, clients: usize) -> Option<usize> {
        match self {
            Kind::Pgbench => {
                let workers = tokio::runtime::Handle::current().metrics().num_workers();
                Some(clients.min(workers))
            }
            Kind::PgbenchOneThread => Some(1),
            _ => None,
        }
    }

    /// The stack each core runs, if the stack is one runtime per core (as pgbench's threads
    /// each keep their own connections).
    pub fn per_core(self) -> Option<Kind> {
        match self {
            Kind::DieselDalPerCore => Some(Kind::DieselDal),
            Kind::PgDalPerCore => Some(Kind::PgDal),
            Kind::DieselNoPoolPerCore => Some(Kind::DieselNoPool),
            Kind::PgNoPoolPerCore => Some(Kind::PgNoPool),
            _ => None,
        }
    }

    /// Whether the stack is pgbench, a program rather than a pool.
    pub fn is_pgbench(self) -> bool {
        matches!(self, Kind::Pgbench | Kind::PgbenchOneThread)
    }

    /// Whether the stack is a reference with no goal of its own (a driver alone, pgbench
    /// with one thread, plain Diesel with bb8's defaults): left out of quick runs.
    pub fn reference(self) -> bool {
        self.driver_alone() || matches!(self, Kind::PgbenchOneThread | Kind::DieselPlainDefaults)
    }
}

impl Stack {
    /// Builds the pool of `kind` (not pgbench) and opens `warm` connections (a stack with no
    /// pool opens `warm` and keeps them, one per caller). The dal stacks need `connector`;
    /// the like-for-like plain ones take its pool settings (or the defaults).
    pub async fn build(
        kind: Kind,
        server: &Server,
        connector: Option<&Connector>,
        warm: usize,
    ) -> anyhow::Result<Self> {
        let defaults = PoolSettings::default();
        let settings = connector.map_or(&defaults, Connector::pool_settings);
        Self::build_with(kind, server, connector, settings, warm).await
    }

    /// [`build`](Self::build), with `settings` for every pool instead of the connector's.
    async fn build_with(
        kind: Kind,
        server: &Server,
        connector: Option<&Connector>,
        settings: &PoolSettings,
        warm: usize,
    ) -> anyhow::Result<Self> {
        let dal = || connector.context("the dal stacks need a connector");
        let stack = match kind {
            Kind::SeaOrmDal => Stack::SeaOrmDal(dal()?.seaorm_with(settings).await?),
            Kind::SeaOrmPlain => {
                use dal::sea_orm::sqlx::postgres::{PgConnectOptions, PgSslMode};
                let (server, ca) = (server.clone(), server.ca.clone());
                // What a SeaORM user writes: a URL, and SeaORM's defaults otherwise.
                let mut options = dal::sea_orm::ConnectOptions::new(format!(
                    "postgres://{}@{}:{}/{}",
                    server.user, server.host, server.port, server.database
                ));
                options.map_sqlx_postgres_opts(move |o: PgConnectOptions| {
                    o.password(&server.password)
                        .ssl_mode(PgSslMode::VerifyFull)
                        .ssl_root_cert(&ca)
                });
                Stack::SeaOrmPlain(dal::sea_orm::Database::connect(options).await?)
            }
            Kind::DieselDal => Stack::DieselDal(dal()?.diesel_pool_with(settings).await?),
            Kind::DieselPlainDefaults | Kind::DieselPlainLike => {
                let tls = rustls_connect(&server.ca)?;
                let config = server.pg_config();
                let mut manager_config = ManagerConfig::default();
                manager_config.custom_setup = Box::new(move |_url| {
                    let (config, tls) = (config.clone(), tls.clone());
                    async move {
                        let (client, connection) = config.connect(tls).await.map_err(|e| {
                            dal::diesel::ConnectionError::BadConnection(e.to_string())
                        })?;
                        AsyncPgConnection::try_from_client_and_connection(client, connection).await
                    }
                    .boxed()
                });
                // The URL is only a label here: the setup above connects.
                let manager = AsyncDieselConnectionManager::new_with_config(
                    "postgres://benchmark",
                    manager_config,
                );
                let builder = bb8::Pool::builder();
                let builder = if kind == Kind::DieselPlainLike {
                    like_dal(builder, settings)
                } else {
                    builder
                };
                Stack::DieselPlain(builder.build(manager).await?)
            }
            Kind::PgDal => Stack::PgDal(dal()?.postgres_pool_with(settings).await?),
            Kind::PgPlain => {
                let manager = bb8_postgres::PostgresConnectionManager::new(
                    server.pg_config(),
                    rustls_connect(&server.ca)?,
                );
                Stack::PgPlain(
                    like_dal(bb8::Pool::builder(), settings)
                        .build(manager)
                        .await?,
                )
            }
            Kind::DieselNoPool => {
                let mut conns = Vec::with_capacity(warm);
                for (client, connection) in connect_plain(server, warm).await? {
                    let conn =
                        AsyncPgConnection::try_from_client_and_connection(client, connection)
                            .await?;
                    conns.push(tokio::sync::Mutex::new(conn));
                }
                return Ok(Stack::DieselNoPool(conns));
            }
            Kind::PgNoPool => {
                let mut clients = Vec::with_capacity(warm);
                for (client, connection) in connect_plain(server, warm).await? {
                    tokio::spawn(connection);
                    let select = client.prepare(QUERY).await?;
                    clients.push((client, select));
                }
                return Ok(Stack::PgNoPool(clients));
            }
            Kind::DieselDalPerCore
            | Kind::PgDalPerCore
            | Kind::DieselNoPoolPerCore
            | Kind::PgNoPoolPerCore => {
                let cores = tokio::runtime::Handle::current().metrics().num_workers();
                return Ok(Stack::PerCore(
                    PerCore::start(kind, server, dal()?, cores, warm).await?,
                ));
            }
            Kind::Pgbench | Kind::PgbenchOneThread => {
                anyhow::bail!("pgbench is a program, not a pool")
            }
        };
        stack.warm(warm).await?;
        Ok(stack)
    }

    /// Opens the `n` connections a run will use, so that no run pays for logins.
    async fn warm(&self, n: usize) -> anyhow::Result<()> {
        let warmers: Vec<_> = (0..n)
            .map(|i| self.hold(i as i32 + 1, Duration::from_millis(200)))
            .collect();
        for outcome in futures_util::future::join_all(warmers).await {
            outcome?;
        }
        Ok(())
    }

    /// One request for account `aid`, from the `caller`th caller (a stack with no pool uses
    /// that caller's connection).
    pub fn request(&self, caller: usize, aid: i32) -> BoxFuture<'_, anyhow::Result<i32>> {
        match self {
            Stack::SeaOrmDal(db) => Box::pin(seaorm_select(db, aid)),
            Stack::SeaOrmPlain(db) => Box::pin(seaorm_select(db, aid)),
            Stack::DieselDal(pool) => Box::pin(async move {
                let mut conn = pool.get().await?;
                Ok(diesel_select(&mut conn, aid).await?)
            }),
            Stack::DieselPlain(pool) => Box::pin(async move {
                let mut conn = pool.get().await?;
                Ok(diesel_select(&mut conn, aid).await?)
            }),
            Stack::PgDal(pool) => Box::pin(async move {
                let client = pool.get().await?;
                let select = client.prepare_cached(QUERY).await?;
                let row = client.query_one(&select, &[&aid]).await?;
                Ok(row.get(0))
            }),
            Stack::PgPlain(pool) => Box::pin(async move {
                let client = pool.get().await?;
                pg_select(&client, aid).await
            }),
            Stack::DieselNoPool(conns) => Box::pin(async move {
                let mut conn = conns[caller % conns.len()].lock().await;
                Ok(diesel_select(&mut conn, aid).await?)
            }),
            Stack::PgNoPool(clients) => Box::pin(async move {
                let (client, select) = &clients[caller % clients.len()];
                let row = client.query_one(select, &[&aid]).await?;
                Ok(row.get(0))
            }),
            Stack::PerCore(_) => Box::pin(async {
                anyhow::bail!("a stack per core answers on its own runtimes (PerCore::on_each)")
            }),
        }
    }

    /// A request that keeps its connection for `hold` (to open one connection per caller).
    async fn hold(&self, aid: i32, hold: Duration) -> anyhow::Result<()> {
        match self {
            Stack::SeaOrmDal(db) => seaorm_hold(db, hold).await?,
            Stack::SeaOrmPlain(db) => seaorm_hold(db, hold).await?,
            Stack::DieselDal(pool) => {
                let mut conn = pool.get().await?;
                diesel_select(&mut conn, aid).await?;
                tokio::time::sleep(hold).await;
            }
            Stack::DieselPlain(pool) => {
                let mut conn = pool.get().await?;
                diesel_select(&mut conn, aid).await?;
                tokio::time::sleep(hold).await;
            }
            Stack::PgDal(pool) => {
                let client = pool.get().await?;
                pg_select(&client, aid).await?;
                tokio::time::sleep(hold).await;
            }
            Stack::PgPlain(pool) => {
                let client = pool.get().await?;
                pg_select(&client, aid).await?;
                tokio::time::sleep(hold).await;
            }
            // Open from the start, one per caller; a stack per core warms on each core.
            Stack::DieselNoPool(_) | Stack::PgNoPool(_) | Stack::PerCore(_) => {}
        }
        Ok(())
    }

    /// Connections the pool opened itself so far (bb8's count), for dal's stacks: with
    /// connections replaced ahead of their lifetime, one a request may have waited for.
    pub fn opened_by_pool(&self) -> Option<u64> {
        let state = match self {
            Stack::SeaOrmDal(db) => db.state(),
            Stack::DieselDal(pool) => pool.state(),
            Stack::PgDal(pool) => pool.state(),
            _ => return None,
        };
        Some(state.statistics.connections_created)
    }

    /// Closes the pool's connections.
    pub async fn close(self) {
        match self {
            Stack::SeaOrmPlain(db) => drop(db.close().await),
            Stack::PerCore(cores) => cores.close().await,
            _ => {}
        }
    }
}

/// A stack on each of `cores` threads, each a single-threaded tokio runtime with a pool
/// of its own, from one connector, sized to its share of the connector's pool settings (or
/// with its share of the connections, for a driver alone):
/// pgbench's arrangement, whose threads each keep their own connections, and that of servers
/// that run a runtime per core. The runtimes run the work sent to them ([`on_each`]).
///
/// [`on_each`]: PerCore::on_each
pub struct PerCore {
    cores: Vec<Core>,
}

/// One core's thread, and the way to send it work.
struct Core {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    thread: std::thread::JoinHandle<()>,
}

/// Work for one core: given its stack, a future to run on its runtime.
type Job = Box<dyn FnOnce(Arc<Stack>) -> BoxFuture<'static, ()> + Send>;

impl PerCore {
    /// Starts `cores` threads, each with the stack of `kind` (a per-core kind) from
    /// `connector`, and opens `warm` connections across them.
    async fn start(
        kind: Kind,
        server: &Server,
        connector: &Connector,
        cores: usize,
        warm: usize,
    ) -> anyhow::Result<Self> {
        let each = kind.per_core().context("not a stack per core")?;
        let all = connector.pool_settings();
        let share = |n: u32| n.div_ceil(cores as u32);
        let settings = all
            .to_builder()
            .max_size(share(all.max_size()))
            .min_idle(share(all.min_idle()))
            .build()?;
        // Threads named for their stack (`diesel-core-0`), so that `perf report --comms` and
        // `top -H` tell the stacks' threads apart.
        let driver = match each {
            Kind::DieselDal => "diesel",
            Kind::PgDal => "postgres",
            Kind::DieselNoPool => "diesel-alone",
            _ => "pg-alone",
        };
        let mut started = Vec::with_capacity(cores);
        for core in 0..cores {
            let (server, connector) = (server.clone(), connector.clone());
            let settings = settings.clone();
            let (ready, is_ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
            let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
            let warm = warm.div_ceil(cores);
            let thread = std::thread::Builder::new()
                .name(format!("{driver}-core-{core}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => return drop(ready.send(Err(e.into()))),
                    };
                    runtime.block_on(async move {
                        let built =
                            Stack::build_with(each, &server, Some(&connector), &settings, warm);
                        let stack = match built.await {
                            Ok(stack) => Arc::new(stack),
                            Err(e) => return drop(ready.send(Err(e))),
                        };
                        let _ = ready.send(Ok(()));
                        while let Some(job) = queue.recv().await {
                            job(Arc::clone(&stack)).await;
                        }
                        if let Ok(stack) = Arc::try_unwrap(stack) {
                            Box::pin(stack.close()).await;
                        }
                    });
                })
                .context("start a core's thread")?;
            started.push((Core { jobs, thread }, is_ready));
        }
        let mut cores = Vec::with_capacity(started.len());
        for (core, is_ready) in started {
            is_ready.await.context("a core's thread ended")??;
            cores.push(core);
        }
        Ok(PerCore { cores })
    }

    /// How many cores (threads, runtimes and pools).
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Runs `job(core, stack)` on every core's runtime, with its stack; the outputs, in the
    /// order of the cores.
    pub async fn on_each<T: Send + 'static>(
        &self,
        job: impl Fn(usize, Arc<Stack>) -> BoxFuture<'static, T> + Send + Sync + 'static,
    ) -> anyhow::Result<Vec<T>> {
        let job = Arc::new(job);
        let mut replies = Vec::with_capacity(self.cores.len());
        for (i, core) in self.cores.iter().enumerate() {
            let (reply, replied) = tokio::sync::oneshot::channel();
            let job = Arc::clone(&job);
            core.jobs
                .send(Box::new(move |stack| {
                    Box::pin(async move { drop(reply.send(job(i, stack).await)) })
                }))
                .map_err(|_| anyhow::anyhow!("core {i}'s thread ended"))?;
            replies.push(replied);
        }
        let mut outputs = Vec::with_capacity(replies.len());
        for replied in replies {
            outputs.push(replied.await.context("a core's thread ended")?);
        }
        Ok(outputs)
    }

    /// Closes the pools and ends the threads.
    async fn close(self) {
        for Core { jobs, thread } in self.cores {
            drop(jobs);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// pgbench's select through SeaORM.
async fn seaorm_select(db: &impl ConnectionTrait, aid: i32) -> anyhow::Result<i32> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            QUERY,
            [aid.into()],
        ))
        .await?
        .context("no such account")?;
    Ok(row.try_get_by_index(0)?)
}

/// A SeaORM transaction that keeps its connection for `hold`.
async fn seaorm_hold<C: TransactionTrait>(db: &C, hold: Duration) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    txn.execute_unprepared("SELECT 1").await?;
    tokio::time::sleep(hold).await;
    txn.commit().await?;
    Ok(())
}

/// bb8's builder with dal's pool settings: the like-for-like baseline.
fn like_dal<M: bb8::ManageConnection>(
    builder: bb8::Builder<M>,
    settings: &PoolSettings,
) -> bb8::Builder<M> {
    builder
        .max_size(settings.max_size())
        .min_idle(Some(settings.min_idle()))
        .max_lifetime(settings.max_lifetime())
        .idle_timeout(settings.idle_timeout())
        .connection_timeout(settings.acquire_timeout())
        .test_on_check_out(true)
}

async fn diesel_select(conn: &mut AsyncPgConnection, aid: i32) -> QueryResult<i32> {
    pgbench_accounts::table
        .find(aid)
        .select(pgbench_accounts::abalance)
        .get_result(conn)
        .await
}

/// One round trip: Parse, Bind and Execute together (`query_typed`), the plain pool's best
/// (it has no statement cache; the dal stack runs a statement from `prepare_cached`).
async fn pg_select(client: &tokio_postgres::Client, aid: i32) -> anyhow::Result<i32> {
    let rows = client
        .query_typed(QUERY, &[(&aid, tokio_postgres::types::Type::INT4)])
        .await?;
    let row = <[tokio_postgres::Row]>::first(&rows).context("no such account")?;
    Ok(row.get(0))
}
