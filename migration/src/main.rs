//! The migration command line: `cargo run -p migration -- up | down | status | fresh | refresh | reset`.
//!
//! Connects through dal with the same settings and token cache as the services: `DATABASE_URL`,
//! libpq's `PG*` variables, Lakebase or DSQL settings (also read from a `.env` file; see
//! `.env.example`). With none of them set, it uses the embedded default: the local
//! development PostgreSQL with Lakebase-style tokens from the local credential service.
//! On a DSQL target, each migration runs outside a transaction, one DDL statement at a time.
//! Elsewhere `up` tries a migration that gave up on a lock again (see
//! [`migration::LOCK_RETRY_PAUSES`]).
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::time::Duration;

use dal::{Config, Connector, PoolSettings, Target};
use migration::MigrationLock;
use sea_orm_migration::cli::run_cli_with_custom_connection;
use sea_orm_migration::sea_orm::DatabaseConnection;

#[tokio::main]
async fn main() {
    // sea-orm-migration reads `.env` too, but only once it parsed the command line, and
    // goes on after a malformed one, with every setting after its bad line unset.
    if let Err(unreadable) = migration::env_file::load() {
        fail(&*BoxError::from(unreadable));
    }
    // Not UTF-8: clap, which runs the command, refuses it with its usage.
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    if let Some(refused) = unapplied(&args) {
        fail(&*BoxError::from(refused));
    }
    // What clap refuses (a misspelt command) is refused with its usage before anything
    // starts; help and the version are printed the same way, and show no setting's value
    // (sea-orm-migration's options read DATABASE_URL, password and all).
    if let Err(e) = parse(&args) {
        e.exit();
    }
    if !needs_database(&args) {
        // Scaffolding a migration: nothing to connect to, so no configuration is read and
        // no local service starts.
        let unused = async || Err(sea_orm_migration::DbErr::Custom("no connection".into()));
        return run_cli_with_custom_connection(migration::Migrator, unused).await;
    }
    let configured = Config::env_names_a_database();
    let (config, stack) = match load(configured).await {
        Ok(pair) => pair,
        Err(e) => fail(&*e),
    };
    let dsql = match config.resolved_target() {
        Ok(target) => target == Target::Dsql,
        Err(e) => fail(&e),
    };
    // A Lakebase endpoint's host, and a browser login's user, are looked up as it connects.
    let (database, port) = (&config.database, config.port);
    let server = match (config.host.as_str(), config.user.as_str()) {
        ("", "") => format!("database {database}"),
        ("", user) => format!("database {database} (user {user})"),
        (host, "") => format!("{host}:{port} (database {database})"),
        (host, user) => format!("{host}:{port} (database {database}, user {user})"),
    };
    // Held until the command is done: the lock, and the connector, whose token cache keeps
    // the sqlx pool's token fresh should it open its connection again.
    let lock = std::sync::Mutex::new(None);
    let connect = async || -> Result<DatabaseConnection, sea_orm_migration::DbErr> {
        match connect(config).await {
            Ok((db, held)) => {
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
                Ok(db)
            }
            Err(e) => fail(&Unreachable { server, source: e }),
        }
    };
    if dsql {
        run_cli_with_custom_connection(migration::DsqlMigrator, connect).await;
    } else {
        run_cli_with_custom_connection(migration::Migrator, connect).await;
    }
    drop(lock);
    drop(stack);
}

/// Parses `args` as sea-orm-migration's command line does, with the values of the variables
/// its options read hidden from the help.
fn parse(args: &[String]) -> Result<(), clap::Error> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    use sea_orm_migration::cli::Cli;
    let hidden = |arg: clap::Arg| arg.hide_env_values(true);
    let matches = Cli::command()
        .mut_args(hidden)
        .mut_subcommands(|command| command.mut_args(hidden))
        .try_get_matches_from(
            std::iter::once("migration".to_owned()).chain(args.iter().cloned()),
        )?;
    Cli::from_arg_matches(&matches).map(drop)
}

/// sea-orm-migration's options that this command does not apply (it connects with dal's
/// settings), and why, if `args` or the environment give one.
fn unapplied(args: &[String]) -> Option<String> {
    let given = |short: &str, long: &str| {
        args.iter().any(|a| {
            a == long
                || a.starts_with(&format!("{long}="))
                || (a.starts_with(short) && !a.starts_with("--"))
        })
    };
    if given("-u", "--database-url") {
        return Some(
            "-u/--database-url is not applied: this command connects with dal's settings; \
             set DATABASE_URL (or the PG*, Lakebase or DSQL variables) instead"
                .into(),
        );
    }
    if given("-s", "--database-schema") || std::env::var_os("DATABASE_SCHEMA").is_some() {
        return Some(
            "-s/--database-schema (DATABASE_SCHEMA) is not applied: this command connects with \
             dal's settings; set DAL_SEARCH_PATH to the schema instead"
                .into(),
        );
    }
    None
}

/// Whether the command line asks for something that needs the database: not
/// sea-orm-migration's `init` and `generate` (help and the version never get here).
fn needs_database(args: &[String]) -> bool {
    let first = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(String::as_str);
    !matches!(first, Some("init" | "generate"))
}

/// The configuration, and the embedded default's services when they are used.
async fn load(configured: bool) -> Result<(Config, Option<dal::local::DevStack>), BoxError> {
    if configured {
        return Ok((Config::from_env()?, None));
    }
    let stack = dal::local::DevStack::from_env(Duration::from_secs(30)).await?;
    eprintln!("No database configured: using {}", stack.describe());
    Ok((stack.config()?, Some(stack)))
}

/// The connection the command runs on; the migration lock, taken first (see
/// [`MigrationLock`]: every command that connects holds it, so `status` waits for a run in
/// progress too); and the connector.
async fn connect(
    config: Config,
) -> dal::Result<(DatabaseConnection, (Option<MigrationLock>, Connector))> {
    // One connection: migrations run one statement at a time.
    let config = config.pool(PoolSettings::builder().max_size(1).build()?);
    let connector = Connector::new(config).await?;
    // Connects at once: a server that cannot be reached fails now, with the cause, rather
    // than with a pool timeout inside the first migration.
    let lock = MigrationLock::acquire(&connector).await?;
    if lock.is_none() {
        drop(connector.connect().await?);
    }
    let db = DatabaseConnection::from(connector.sqlx_pool().await?);
    Ok((db, (lock, connector)))
}

/// A connection that could not be opened, with the server it was for.
#[derive(Debug)]
struct Unreachable {
    server: String,
    source: dal::Error,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot migrate {}", self.server)
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Any error of dal or of its local services.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn fail(e: &(dyn std::error::Error + 'static)) -> ! {
    let mut message = format!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    std::process::exit(1);
}
