//! Checks a deployment in one step: reads the same settings as every program and prints one
//! checked line per fact, as the Lakebase partner guide's validation asks.
//!
//! ```text
//! cargo run -p examples --bin doctor
//! ```
//!
//! Lines: the target and how it was chosen; the credential source and the token's expiry
//! (never the token); TLS (mode, and the protocol version and cipher the server reports for
//! the session) and the server certificate's subject, issuer and expiry; the server version; whether the server looks like Lakebase or Aurora DSQL;
//! `search_path`; and `application_name` as the server reports it in `pg_stat_activity` for
//! a connection of each pool kind. A failed check prints `FAIL` with the cause, and the exit
//! code is 1.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::process::ExitCode;
use std::time::SystemTime;

use dal::diesel::QueryableByName;
use dal::diesel_async::RunQueryDsl;
use dal::sea_orm::{ConnectionTrait, DbBackend, Statement};
use dal::{Config, Connector, PoolSettings, Target};

/// The query that names a session's `application_name` from the server's side.
const APPLICATION_NAME: &str =
    "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()";

#[tokio::main]
async fn main() -> ExitCode {
    examples::logging::init();
    let mut report = Report::default();
    run(&mut report).await;
    if report.failed {
        ExitCode::FAILURE
    } else {
        println!("all checks passed");
        ExitCode::SUCCESS
    }
}

#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn ok(&self, what: &str, detail: impl std::fmt::Display) {
        println!("ok    {what}: {detail}");
    }

    fn fail(&mut self, what: &str, cause: &(dyn std::error::Error + 'static)) {
        self.failed = true;
        println!("FAIL  {what}: {}", examples::exit::one_line(cause));
    }

    fn fail_text(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.failed = true;
        println!("FAIL  {what}: {detail}");
    }
}

async fn run(report: &mut Report) {
    let database = match examples::Database::from_env().await {
        Ok(database) => database,
        Err(e) => return report.fail("settings", e.as_ref()),
    };
    let config = database.config();
    check(report, &config).await;
    database.close().await;
}

async fn check(report: &mut Report, config: &Config) {
    let implied = match &config.credentials {
        Some(dal::Credentials::Source(source)) => source.target(),
        _ => None,
    };
    let how = if config.target.is_some() {
        "set explicitly"
    } else if implied.is_some() {
        "from the credential settings"
    } else if Target::of_host(&config.host).is_some() {
        "from the host name"
    } else {
        "the default"
    };
    let target = match config.resolved_target() {
        Ok(target) => target,
        Err(e) => return report.fail("target", &e),
    };
    report.ok("target", format_args!("{target} ({how})"));
    let connector = match Connector::new(config.clone()).await {
        Ok(connector) => connector,
        Err(e) => return report.fail("credentials", &e),
    };
    checks(report, config, &connector, target).await;
    connector.shutdown().await;
}

async fn checks(report: &mut Report, config: &Config, connector: &Connector, target: Target) {
    let (client, connection) = match connector.connect().await {
        Ok(pair) => pair,
        Err(e) => {
            let what = format!(
                "connection to {}:{} as {}",
                config.host, config.port, config.user
            );
            return report.fail(&what, &e);
        }
    };
    let session = tokio::spawn(connection);
    let cache = connector.cache();
    match cache.expires_at() {
        Some(at) => {
            let left = at
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs());
            report.ok(
                "credentials",
                format_args!(
                    "{} source, token valid for {left} s more",
                    cache.source_kind()
                ),
            );
        }
        None => report.ok(
            "credentials",
            format_args!("{} source, no expiry", cache.source_kind()),
        ),
    }
    let ssl_mode = connector.ssl_mode();
    match certificate(connector).await {
        Ok(Some(subject)) => report.ok("certificate", subject),
        Ok(None) => report.ok("certificate", "none: no TLS"),
        Err(e) => report.fail("certificate", e.as_ref()),
    }
    match client
        .query_opt(
            "SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
            &[],
        )
        .await
    {
        Ok(Some(row)) => report.ok(
            "TLS",
            format_args!(
                "sslmode {ssl_mode}; the server reports {} with {}",
                row.get::<_, String>(0),
                row.get::<_, String>(1)
            ),
        ),
        Ok(None) => report.fail_text(
            "TLS",
            format_args!("sslmode {ssl_mode}, but the session is not encrypted"),
        ),
        Err(e) => report.fail("TLS", &e),
    }
    let facts = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('search_path')",
            &[],
        )
        .await;
    match facts {
        Ok(row) => {
            let (version, search_path): (String, String) = (row.get(0), row.get(1));
            report.ok("server", format_args!("PostgreSQL {version}"));
            report.ok("search_path", search_path);
        }
        Err(e) => report.fail("server", &e),
    }
    // Readable by privileged roles only on plain PostgreSQL; Lakebase shows it to all.
    let preload = client
        .query_one("SHOW shared_preload_libraries", &[])
        .await
        .map(|row| row.get::<_, String>(0))
        .unwrap_or_default();
    report.ok("platform", platform(config, target, &preload));
    drop(client);
    let _ = session.await;
    application_names(report, config, connector).await;
}

/// The subject, issuer and expiry of the certificate the server presents, checked as the
/// connector's connections check it.
async fn certificate(connector: &Connector) -> anyhow::Result<Option<String>> {
    let Some(chain) = connector.server_certificates().await? else {
        return Ok(None);
    };
    let leaf = chain
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the server sent no certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)?;
    Ok(Some(format!(
        "subject {}, issuer {}, valid until {}",
        cert.subject(),
        cert.issuer(),
        cert.validity().not_after
    )))
}

/// Lakebase or Aurora DSQL, as the partner guides tell them apart: the host name, and for
/// Lakebase the server's preloaded libraries (`neon`, `databricks_auth`).
fn platform(config: &Config, target: Target, preload: &str) -> String {
    let seen = match Target::of_host(&config.host) {
        Some(Target::Dsql) => "Aurora DSQL (host name)",
        Some(_) => "Lakebase (host name)",
        None if Target::is_lakebase_preload(preload) => "Lakebase (shared_preload_libraries)",
        None => "plain PostgreSQL",
    };
    format!("{seen}; dal targets {target}")
}

/// `application_name` as the server reports it for one connection of each pool kind.
async fn application_names(report: &mut Report, config: &Config, connector: &Connector) {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = dal::diesel::sql_types::Text)]
        application_name: String,
    }
    let one = match PoolSettings::builder().max_size(1).build() {
        Ok(one) => one,
        Err(e) => return report.fail("pools", &e),
    };
    let expected = &config.application_name;
    let seaorm = async {
        let db = connector.seaorm_with(&one).await?;
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                APPLICATION_NAME,
            ))
            .await?
            .ok_or_else(|| dal::Error::abort("no row"))?;
        let name: String = row.try_get_by_index(0)?;
        Ok::<String, dal::Error>(name)
    };
    let diesel = async {
        let pool = connector.diesel_pool_with(&one).await?;
        let mut conn = pool.get().await?;
        let row: Name = dal::diesel::sql_query(APPLICATION_NAME)
            .get_result(&mut *conn)
            .await?;
        Ok::<String, dal::Error>(row.application_name)
    };
    let postgres = async {
        let pool = connector.postgres_pool_with(&one).await?;
        let client = pool.get().await?;
        let row = client.query_one(APPLICATION_NAME, &[]).await?;
        Ok::<String, dal::Error>(row.get::<_, String>(0))
    };
    let (seaorm, diesel, postgres) = tokio::join!(seaorm, diesel, postgres);
    for (kind, seen) in [
        ("SeaORM", seaorm),
        ("Diesel", diesel),
        ("tokio-postgres", postgres),
    ] {
        let what = format!("application_name ({kind} pool)");
        match seen {
            Ok(name) if &name == expected => report.ok(&what, name),
            Ok(name) => report.fail_text(
                &what,
                format_args!("the server reports {name:?}, the settings say {expected:?}"),
            ),
            Err(e) => report.fail(&what, &e),
        }
    }
}
