//! Reading a [`Config`] from the environment variables users already have: libpq's `PG*`,
//! `DATABASE_URL`, Databricks unified auth (`DATABRICKS_*`, `~/.databrickscfg`) and the
//! Aurora DSQL endpoint. Every error names the variable at fault.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[cfg(any(feature = "lakebase", feature = "dsql"))]
use super::settings::Credentials;
use super::settings::{Config, PoolSettings};
use super::url::from_url;
use crate::error::{Error, Result, Setting};

/// The variables that name a database. When none of them is set, programs may fall back to a
/// local database (the examples and the migration command use the embedded default), unless
/// Databricks credentials are set (`DATABRICKS_AUTH_TYPE`, `DATABRICKS_TOKEN`,
/// `DATABRICKS_CLIENT_ID`, `DATABRICKS_CLIENT_SECRET`, `DATABRICKS_OIDC_TOKEN_FILEPATH`,
/// `DATABRICKS_CONFIG_PROFILE`): they mean Lakebase, and the error names what is missing
/// (see [`Config::env_names_a_database`]).
pub const DATABASE_VARIABLES: [&str; 6] = [
    "DATABASE_URL",
    "PGHOST",
    "DATABRICKS_HOST",
    "LAKEBASE_ENDPOINT",
    "LAKEBASE_INSTANCE",
    "DSQL_ENDPOINT",
];

/// Databricks credentials: set without any of [`DATABASE_VARIABLES`], they mean Lakebase (and
/// an error naming what is missing), never a silent fallback to a local database. Beside a
/// database variable they are left alone: Databricks tools set them for their own use.
const DATABRICKS_CREDENTIAL_VARIABLES: [&str; 6] = [
    "DATABRICKS_AUTH_TYPE",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
    "DATABRICKS_OIDC_TOKEN_FILEPATH",
    "DATABRICKS_CONFIG_PROFILE",
];

#[cfg(feature = "lakebase")]
impl crate::credentials::Lakebase {
    /// The Lakebase credential source the environment describes, as [`Config::from_env`]
    /// builds it (Databricks unified auth, `LAKEBASE_ENDPOINT` or `LAKEBASE_INSTANCE`, and
    /// `DAL_PRODUCT`): for the [`Management`](crate::lakebase::Management) API of the same
    /// workspace, say.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the setting that is missing or malformed.
    pub fn from_env() -> Result<Self> {
        Env(&var).lakebase_source().map(|(source, _)| source)
    }
}

impl Config {
    /// Whether the process environment names a database: any of [`DATABASE_VARIABLES`] is
    /// set and not empty, or Databricks credentials are (`DATABRICKS_AUTH_TYPE`,
    /// `DATABRICKS_TOKEN`, `DATABRICKS_CLIENT_ID`, ...), which mean Lakebase.
    pub fn env_names_a_database() -> bool {
        DATABASE_VARIABLES
            .iter()
            .chain(&DATABRICKS_CREDENTIAL_VARIABLES)
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
    }

    /// Reads the configuration from the process environment; see `.env.example` for every
    /// variable. Which credentials are used:
    ///
    /// - `DATABASE_URL`, or `PGHOST` with `PGPASSWORD`: a static password;
    /// - `DATABRICKS_HOST` (or a `~/.databrickscfg` profile) with `LAKEBASE_ENDPOINT` or
    ///   `LAKEBASE_INSTANCE`: Lakebase credentials. As in the Databricks SDKs, the profile
    ///   `DATABRICKS_CONFIG_PROFILE` names fills what the environment leaves unset, except
    ///   that its credential (token, OAuth secret, CLI login) goes to its own workspace
    ///   alone, where the SDKs would send it to `DATABRICKS_HOST`; with none named,
    ///   `[DEFAULT]` is read only when the environment has no workspace host or credential;
    /// - `DSQL_ENDPOINT`: Aurora DSQL IAM tokens (needs the `dsql` feature).
    ///
    /// Conflicting settings (say a static password and Lakebase credentials) are an error.
    /// As in libpq, what `DATABASE_URL` gives wins, and the `PG*` variables fill only what
    /// it leaves out; a URL parameter dal does not apply (`options`, `channel_binding`,
    /// `keepalives`, ...) is refused, not ignored, and so is one given twice. `PGHOST` applies
    /// to a static password and to Lakebase, never to DSQL, whose endpoint is the host its
    /// tokens are signed for.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(var)
    }

    /// Like [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let env = Env(&get);
        let names_a_database = DATABASE_VARIABLES.iter().any(|v| env.get(v).is_some());
        let lakebase = env.get("DATABRICKS_HOST").is_some()
            || env.get("LAKEBASE_ENDPOINT").is_some()
            || env.get("LAKEBASE_INSTANCE").is_some()
            || (!names_a_database
                && DATABRICKS_CREDENTIAL_VARIABLES
                    .iter()
                    .any(|v| env.get(v).is_some()));
        let dsql = env.get("DSQL_ENDPOINT").is_some();
        let url = env.get("DATABASE_URL");
        let conflict = |a: Setting, b: &str| {
            Error::config(
                a,
                format!("conflicts with {b}: set the variables of one kind of credentials only"),
            )
        };
        if lakebase && dsql {
            return Err(conflict(
                Setting::DsqlEndpoint,
                "DATABRICKS_HOST/LAKEBASE_*",
            ));
        }
        if let Some(url) = url {
            if lakebase {
                return Err(conflict(Setting::DatabaseUrl, "DATABRICKS_HOST/LAKEBASE_*"));
            }
            if dsql {
                return Err(conflict(Setting::DatabaseUrl, "DSQL_ENDPOINT"));
            }
            // libpq reads a variable only for what the URL leaves out: the URL's host, user,
            // port and TLS settings win over PGHOST, PGUSER, PGPORT, PGSSLMODE...
            let mut defaults = env.libpq(Config::new(
                env.get("PGHOST").unwrap_or_default(),
                env.get("PGUSER").unwrap_or_default(),
            ))?;
            if let Some(database) = env.get("PGDATABASE") {
                defaults.database = database;
            }
            return env.dal(from_url(&url, env.get("PGPASSWORD"), defaults)?);
        }
        if (lakebase || dsql) && env.get("PGPASSWORD").is_some() {
            let other = if dsql {
                "DSQL_ENDPOINT"
            } else {
                "DATABRICKS_HOST/LAKEBASE_*"
            };
            return Err(conflict(Setting::Password, other));
        }
        let config = if lakebase {
            env.lakebase()?
        } else if dsql {
            env.dsql()?
        } else {
            let host = env.require(Setting::Host, "the database host, or set DATABASE_URL")?;
            let user = env.require(Setting::User, "the database user, or set DATABASE_URL")?;
            let password = env.require(
                Setting::Password,
                "the password; or set DATABASE_URL, Lakebase (DATABRICKS_HOST and \
                 LAKEBASE_ENDPOINT) or DSQL (DSQL_ENDPOINT) settings",
            )?;
            let mut config = Config::new(host, user).password(password);
            if let Some(db) = env.get("PGDATABASE") {
                config.database = db;
            }
            config
        };
        env.dal(env.libpq(config)?)
    }
}

/// A variable of the process environment, unless empty. A value that is not UTF-8 is read
/// with U+FFFD for its invalid bytes, so that it fails as that setting's value (a file not
/// found, a mode not known, a password refused), never as if it were not set: a
/// `PGSSLROOTCERT` so skipped would leave `require` unverified.
fn var(name: &str) -> Option<String> {
    text(std::env::var_os(name))
}

fn text(value: Option<std::ffi::OsString>) -> Option<String> {
    value
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn require(&self, setting: Setting, what: &str) -> Result<String> {
        self.get(setting.name())
            .ok_or_else(|| Error::config(setting, format!("is not set: {what}")))
    }

    fn parse<T: FromStr>(&self, setting: Setting, expected: &str) -> Result<Option<T>> {
        self.get(setting.name())
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| Error::config(setting, format!("{v:?} is not {expected}")))
            })
            .transpose()
    }

    /// libpq's connection variables that apply whatever the credentials. `PGHOST` and
    /// `PGUSER` are read by each kind of credentials where they apply: an IAM token is
    /// signed for the DSQL endpoint's host. `PGHOSTADDR` changes only the address dialled,
    /// as in libpq: TLS is still checked against the host name.
    fn libpq(&self, mut config: Config) -> Result<Config> {
        if let Some(addr) = self.parse(Setting::HostAddr, "an IP address")? {
            config.hostaddr = Some(addr);
        }
        if let Some(port) =
            self.parse::<std::num::NonZeroU16>(Setting::Port, "a port number (1-65535)")?
        {
            config.port = port.get();
        }
        if let Some(mode) = self.get("PGSSLMODE") {
            config.ssl_mode = Some(
                mode.parse()
                    .map_err(|reason: String| Error::config(Setting::SslMode, reason))?,
            );
        }
        if let Some(path) = self.get("PGSSLROOTCERT") {
            config.ssl_root_cert = Some(PathBuf::from(path));
        }
        if let Some(name) = self.get("PGAPPNAME") {
            config.application_name = name;
        }
        match self.parse::<u64>(Setting::ConnectTimeout, "a number of seconds")? {
            // libpq reads 0 as no limit, under which a connect to a host that drops packets
            // would wait for ever.
            Some(0) => {
                return Err(Error::config(
                    Setting::ConnectTimeout,
                    "is 0, which libpq reads as no limit and dal does not allow (a connect \
                     could hang): set a number of seconds, such as 10, or leave it unset",
                ));
            }
            Some(secs) => config.connect_timeout = Duration::from_secs(secs),
            None => {}
        }
        Ok(config)
    }

    /// dal's own settings, and the pool's defaults for the target.
    fn dal(&self, mut config: Config) -> Result<Config> {
        if let Some(product) = self.get("DAL_PRODUCT") {
            let product = product.trim();
            crate::telemetry::check_product(product)?;
            config.product = Some(product.to_owned());
        }
        if let Some(host) = self.get("DAL_READ_ONLY_HOST") {
            config.read_only_host = Some(host.trim().to_owned());
        }
        if let Some(path) = self.get("DAL_SEARCH_PATH") {
            config.search_path = Some(path);
        }
        // 0, PostgreSQL's "no timeout", sends none: the server's own setting applies.
        if let Some(ms) = self
            .parse::<u64>(Setting::StatementTimeout, "a number of milliseconds")?
            .filter(|&ms| ms > 0)
        {
            config.statement_timeout = Some(Duration::from_millis(ms));
        }
        if let Some(s) = self.get("DAL_TOKEN_STRATEGY") {
            config.strategy = s
                .parse()
                .map_err(|reason: String| Error::config(Setting::TokenStrategy, reason))?;
        }
        // The target's defaults, so that one variable changes one setting of them.
        let target = config.resolved_target()?;
        let mut pool = PoolSettings::for_target(target).to_builder();
        if let Some(n) = self.parse::<u32>(Setting::PoolMaxSize, "a whole number")? {
            pool = pool.max_size(n);
        }
        if let Some(n) = self.parse::<u32>(Setting::PoolMinIdle, "a whole number")? {
            pool = pool.min_idle(n);
        }
        if let Some(lifetime) = self.seconds(Setting::PoolMaxLifetime)? {
            pool = pool.max_lifetime(lifetime);
        }
        if let Some(timeout) = self.seconds(Setting::PoolIdleTimeout)? {
            pool = pool.idle_timeout(timeout);
        }
        config.pool = pool.build()?;
        Ok(config)
    }

    /// A duration in seconds, fractions allowed; `0` means none (`Some(None)`).
    fn seconds(&self, setting: Setting) -> Result<Option<Option<Duration>>> {
        let expected = "a number of seconds, such as 300 or 1.5 (0: never)";
        let Some(secs) = self.parse::<f64>(setting, expected)? else {
            return Ok(None);
        };
        let duration = Duration::try_from_secs_f64(secs).map_err(|_| {
            let given = self.get(setting.name()).unwrap_or_default();
            Error::config(setting, format!("{given:?} is not {expected}"))
        })?;
        Ok(Some((!duration.is_zero()).then_some(duration)))
    }

    #[cfg(feature = "lakebase")]
    fn lakebase(&self) -> Result<Config> {
        let (source, default_user) = self.lakebase_source()?;
        // Without PGHOST, the connector looks the host up from the endpoint or instance.
        let db_host = self.get("PGHOST").unwrap_or_default();
        // Without PGUSER: the service principal's id, else the user the workspace token
        // belongs to, which the connector looks up (the current user API).
        let user = self.get("PGUSER").or(default_user).unwrap_or_default();
        Ok(Config::new(db_host, user)
            .database(
                self.get("PGDATABASE")
                    .unwrap_or_else(|| "databricks_postgres".into()),
            )
            .credentials(Credentials::source(source)))
    }

    /// The Lakebase credential source the Databricks variables describe, and the user it
    /// signs in as when that is known without a call (a service principal's id).
    #[cfg(feature = "lakebase")]
    fn lakebase_source(&self) -> Result<(crate::credentials::Lakebase, Option<String>)> {
        use crate::credentials::{IdTokenSource, Lakebase, LakebaseTarget, WorkspaceAuth};
        use secrecy::SecretString;

        let profile = self.databricks_profile()?;
        let pick = |var: &str, key: &str| self.get(var).or_else(|| profile.get(key));
        let host = pick("DATABRICKS_HOST", "host").ok_or_else(|| {
            Error::config(
                Setting::DatabricksHost,
                "is not set: the workspace URL, such as https://my-workspace.cloud.databricks.com",
            )
        })?;
        let target = match (self.get("LAKEBASE_ENDPOINT"), self.get("LAKEBASE_INSTANCE")) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    Setting::LakebaseEndpoint,
                    "conflicts with LAKEBASE_INSTANCE: set the Autoscaling endpoint path or the \
                     Provisioned instance name, not both",
                ));
            }
            (Some(endpoint), None) => LakebaseTarget::Autoscaling { endpoint },
            (None, Some(instance)) => LakebaseTarget::Provisioned { instance },
            (None, None) => {
                return Err(Error::config(
                    Setting::LakebaseEndpoint,
                    "is not set: the Autoscaling endpoint path \
                     (projects/<project>/branches/<branch>/endpoints/<endpoint>), or set \
                     LAKEBASE_INSTANCE to a Provisioned instance name",
                ));
            }
        };
        let client_id = pick("DATABRICKS_CLIENT_ID", "client_id");
        let client_secret = pick("DATABRICKS_CLIENT_SECRET", "client_secret");
        let token = pick("DATABRICKS_TOKEN", "token");
        let oidc_env = self
            .get("DATABRICKS_OIDC_TOKEN_ENV")
            .unwrap_or_else(|| "DATABRICKS_OIDC_TOKEN".to_owned());
        if !crate::credentials::lakebase::is_variable_name(&oidc_env) {
            return Err(Error::config(
                Setting::DatabricksOidcToken,
                crate::credentials::lakebase::NOT_A_VARIABLE_NAME,
            ));
        }
        let oidc_file = pick("DATABRICKS_OIDC_TOKEN_FILEPATH", "oidc_token_filepath");
        let github = (
            self.get("ACTIONS_ID_TOKEN_REQUEST_URL"),
            self.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
        );
        // Chosen, as the Databricks SDKs let `auth_type` choose; else the one configured, in
        // the SDKs' order. A token and a service principal both set are refused, as the SDKs
        // refuse them ("more than one authorization method configured: oauth and pat").
        let auth_type = match pick("DATABRICKS_AUTH_TYPE", "auth_type") {
            Some(chosen) => chosen.trim().to_owned(),
            None if token.is_some() && (client_id.is_some() || client_secret.is_some()) => {
                return Err(Error::config(
                    Setting::DatabricksAuthType,
                    "is not set, and both a personal access token (DATABRICKS_TOKEN) and a \
                     service principal (DATABRICKS_CLIENT_ID, DATABRICKS_CLIENT_SECRET) are: set \
                     it to pat, oauth-m2m (or env-oidc, file-oidc, github-oidc for a service \
                     principal's federated token), or unset one (the Databricks SDKs refuse \
                     this too: more than one authorization method configured)",
                ));
            }
            None if token.is_some() => "pat".to_owned(),
            None if client_id.is_some() && client_secret.is_some() => "oauth-m2m".to_owned(),
            None if self.get(&oidc_env).is_some() => "env-oidc".to_owned(),
            None if oidc_file.is_some() => "file-oidc".to_owned(),
            None if client_id.is_some() && github.0.is_some() && github.1.is_some() => {
                "github-oidc".to_owned()
            }
            None if client_secret.is_some() => {
                return Err(Error::config(
                    Setting::DatabricksClientId,
                    "is not set, but DATABRICKS_CLIENT_SECRET is: set both for a service principal",
                ));
            }
            None if client_id.is_some() => {
                return Err(Error::config(
                    Setting::DatabricksClientSecret,
                    "is not set, but DATABRICKS_CLIENT_ID is: set both for a service principal, \
                     or give it an OIDC ID token to federate (DATABRICKS_OIDC_TOKEN, \
                     DATABRICKS_OIDC_TOKEN_FILEPATH, or GitHub Actions' id-token permission)",
                ));
            }
            None => {
                return Err(Error::config(
                    Setting::DatabricksClientId,
                    "is not set: set DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (service \
                     principal) or DATABRICKS_TOKEN, name a ~/.databrickscfg profile with \
                     DATABRICKS_CONFIG_PROFILE, or set DATABRICKS_AUTH_TYPE (databricks-cli, \
                     external-browser, env-oidc, file-oidc, github-oidc)",
                ));
            }
        };
        let missing = |setting: Setting, why: &str| {
            Error::config(
                setting,
                format!("is not set, but DATABRICKS_AUTH_TYPE={auth_type} needs it: {why}"),
            )
        };
        // A named profile's credential is for the profile's own workspace, and must go to no
        // other (the Databricks SDKs would send it to the environment's host).
        let foreign_profile = |whose: &str| {
            let (Some(name), Some(theirs)) =
                (self.get("DATABRICKS_CONFIG_PROFILE"), profile.get("host"))
            else {
                return Ok(());
            };
            if !crate::credentials::lakebase::other_workspaces(&theirs, &host) {
                return Ok(());
            }
            // Each as its scheme, host and port: a user name or password in either is not
            // shown.
            let shown =
                |url: &str| crate::credentials::lakebase::workspace_origin(url).unwrap_or_default();
            let (host, theirs) = (shown(&host), shown(&theirs));
            Err(Error::config(
                Setting::DatabricksHost,
                format!(
                    "is {host}, but {whose} profile [{name}], which is for {theirs}: the \
                     credential would go to another workspace; unset DATABRICKS_HOST, name the \
                     profile of {host}, or set its credential in the environment"
                ),
            ))
        };
        let federated = |id_token: IdTokenSource| WorkspaceAuth::Federated {
            client_id: client_id.clone(),
            id_token,
        };
        let auth = match auth_type.as_str() {
            "pat" => {
                if self.get("DATABRICKS_TOKEN").is_none() && profile.get("token").is_some() {
                    foreign_profile("the personal access token is from")?;
                }
                WorkspaceAuth::Pat(SecretString::from(token.ok_or_else(|| {
                    missing(Setting::DatabricksToken, "a personal access token")
                })?))
            }
            "oauth-m2m" => {
                if self.get("DATABRICKS_CLIENT_SECRET").is_none()
                    && profile.get("client_secret").is_some()
                {
                    foreign_profile("the OAuth secret is from")?;
                }
                match (client_id.clone(), client_secret) {
                    (Some(id), Some(secret)) => WorkspaceAuth::ClientCredentials {
                        client_id: id,
                        client_secret: SecretString::from(secret),
                        token_url: self.get("DATABRICKS_TOKEN_URL"),
                    },
                    (None, _) => {
                        return Err(missing(
                            Setting::DatabricksClientId,
                            "the service principal's application id",
                        ));
                    }
                    (Some(_), None) => {
                        return Err(missing(
                            Setting::DatabricksClientSecret,
                            "the service principal's OAuth secret",
                        ));
                    }
                }
            }
            "databricks-cli" => {
                // `databricks auth token --profile <p>` signs in to the profile's own
                // workspace.
                foreign_profile("the Databricks CLI signs in with")?;
                WorkspaceAuth::DatabricksCli {
                    profile: self.get("DATABRICKS_CONFIG_PROFILE"),
                }
            }
            "external-browser" => WorkspaceAuth::ExternalBrowser {
                client_id: client_id.clone(),
                open_browser: self.get("BROWSER").as_deref() != Some("none"),
            },
            "env-oidc" => {
                if self.get(&oidc_env).is_none() {
                    return Err(Error::config(
                        Setting::DatabricksOidcToken,
                        format!("{oidc_env} is not set: it must hold the OIDC ID token"),
                    ));
                }
                federated(IdTokenSource::Env(oidc_env))
            }
            "file-oidc" => {
                if self.get("DATABRICKS_OIDC_TOKEN_FILEPATH").is_none()
                    && profile.get("oidc_token_filepath").is_some()
                {
                    foreign_profile("the ID token's file is from")?;
                }
                federated(IdTokenSource::File(
                    oidc_file
                        .ok_or_else(|| {
                            missing(Setting::DatabricksOidcTokenFilepath, "the ID token's file")
                        })?
                        .into(),
                ))
            }
            "github-oidc" => {
                if client_id.is_none() {
                    return Err(missing(
                        Setting::DatabricksClientId,
                        "the service principal whose federation policy trusts the workflow",
                    ));
                }
                let (request_url, request_token) = match github {
                    (Some(url), Some(token)) => (url, token),
                    (url, _) => {
                        let setting = if url.is_none() {
                            Setting::ActionsIdTokenRequestUrl
                        } else {
                            Setting::ActionsIdTokenRequestToken
                        };
                        return Err(missing(
                            setting,
                            "GitHub sets it in jobs with `permissions: id-token: write`",
                        ));
                    }
                };
                federated(IdTokenSource::GitHubActions {
                    request_url,
                    request_token: SecretString::from(request_token),
                })
            }
            other => {
                return Err(Error::config(
                    Setting::DatabricksAuthType,
                    format!(
                        "{other:?} is not supported: use pat, oauth-m2m, databricks-cli, \
                         external-browser, env-oidc, file-oidc or github-oidc"
                    ),
                ));
            }
        };
        // A service principal logs in as its application id.
        let default_user = match &auth {
            WorkspaceAuth::ClientCredentials { client_id, .. }
            | WorkspaceAuth::Federated {
                client_id: Some(client_id),
                ..
            } => Some(client_id.clone()),
            _ => None,
        };
        let mut source = Lakebase::new(&host, auth, target)?;
        if let Some(id) = self.get("DATABRICKS_WORKSPACE_ID") {
            source = source.with_workspace_id(id)?;
        }
        if let Some(product) = self.get("DAL_PRODUCT") {
            source = source.with_product(product.trim())?;
        }
        if let Some(path) = self.get("DATABRICKS_CLI_PATH") {
            source = source.with_cli_path(path);
        }
        if let Some(url) = self.get("DATABRICKS_DISCOVERY_URL") {
            source = source.with_discovery_url(url.trim())?;
        }
        if let Some(audience) = self.get("DATABRICKS_TOKEN_AUDIENCE") {
            source = source.with_token_audience(audience);
        }
        if let Some(url) = self.get("DATABRICKS_TOKEN_URL") {
            source = source.with_token_url(url.trim())?;
        }
        if let Some(secs) =
            self.parse::<u64>(Setting::LakebaseCredentialTtl, "a whole number of seconds")?
        {
            source = source.with_ttl(Duration::from_secs(secs))?;
        }
        Ok((source, default_user))
    }

    #[cfg(not(feature = "lakebase"))]
    fn lakebase(&self) -> Result<Config> {
        Err(Error::config(
            Setting::DatabricksHost,
            "or LAKEBASE_* is set, but dal was built without its `lakebase` feature; enable it \
             in Cargo.toml",
        ))
    }

    #[cfg(feature = "lakebase")]
    /// The `~/.databrickscfg` profile named by `DATABRICKS_CONFIG_PROFILE` (or `DEFAULT`),
    /// when the file exists. With no profile named, a workspace host or credential in the
    /// environment means the file is not read, as the Databricks SDKs do (Python's
    /// `Config._known_file_config_loader`): a `[DEFAULT]` token never goes to a host from
    /// the environment, nor a token from the environment to the file's host.
    fn databricks_profile(&self) -> Result<Profile> {
        const DIRECT: [&str; 5] = [
            "DATABRICKS_HOST",
            "DATABRICKS_TOKEN",
            "DATABRICKS_CLIENT_ID",
            "DATABRICKS_CLIENT_SECRET",
            "DATABRICKS_OIDC_TOKEN_ENV",
        ];
        let named = self.get("DATABRICKS_CONFIG_PROFILE");
        if named.is_none() && DIRECT.iter().any(|var| self.get(var).is_some()) {
            return Ok(Profile::default());
        }
        let home = self.get("HOME").map(PathBuf::from);
        let path = match self.get("DATABRICKS_CONFIG_FILE") {
            // `~/` is the home directory, as the Databricks SDKs expand it.
            Some(file) => match (file.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => Some(home.join(rest)),
                _ => Some(PathBuf::from(file)),
            },
            None => home.map(|home| home.join(".databrickscfg")),
        };
        let text = match path.as_deref().map(crate::setting_file::read_to_string) {
            Some(Ok(text)) => text,
            read if named.is_some() => {
                let why = match read {
                    Some(Err(e)) => format!(" ({e})"),
                    _ => String::new(),
                };
                return Err(Error::config(
                    Setting::DatabricksConfigProfile,
                    format!(
                        "names a profile, but the config file {} cannot be read{why}; set \
                         DATABRICKS_CONFIG_FILE",
                        path.map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                ));
            }
            _ => return Ok(Profile::default()),
        };
        let section = named.clone().unwrap_or_else(|| "DEFAULT".into());
        let profile = Profile::parse(&text, &section);
        if named.is_some() && profile.0.is_empty() {
            return Err(Error::config(
                Setting::DatabricksConfigProfile,
                format!("there is no profile [{section}] in the config file"),
            ));
        }
        Ok(profile)
    }

    #[cfg(feature = "dsql")]
    fn dsql(&self) -> Result<Config> {
        let endpoint = self.require(Setting::DsqlEndpoint, "the cluster endpoint")?;
        let user = self.get("PGUSER").unwrap_or_else(|| "admin".into());
        // A full endpoint names its region, which signs its tokens: the service's own
        // AWS_REGION fills in only for a host without one (a bare cluster id). DSQL_REGION,
        // set for DSQL alone, must agree with the endpoint.
        let region = self.get("DSQL_REGION");
        let lookup = |name: &str| self.get(name);
        let mut source =
            crate::credentials::Dsql::with_env(&endpoint, &user, region.as_deref(), &lookup)?;
        if let Some(secs) = self.parse::<u64>(Setting::DsqlTokenExpiresIn, "a number of seconds")? {
            source = source.with_expires_in(Duration::from_secs(secs))?;
        }
        Ok(Config::new(source.host(), user)
            .database(self.get("PGDATABASE").unwrap_or_else(|| "postgres".into()))
            .credentials(Credentials::source(source)))
    }

    #[cfg(not(feature = "dsql"))]
    fn dsql(&self) -> Result<Config> {
        Err(Error::config(
            Setting::DsqlEndpoint,
            "is set, but dal was built without its `dsql` feature; enable it in Cargo.toml",
        ))
    }
}

/// One section of a `~/.databrickscfg` INI file.
#[cfg(feature = "lakebase")]
#[derive(Default)]
struct Profile(Vec<(String, String)>);

#[cfg(feature = "lakebase")]
impl Profile {
    /// The keys of `section` in `text`, read as the Databricks SDKs read the file (Python's
    /// `configparser`, Go's `go-ini`): a header's name stands up to its last `]`, whatever
    /// follows it. A leading byte order mark is no part of the first line, as in `go-ini`
    /// (Python's reader, with its default encoding, refuses such a file).
    fn parse(text: &str, section: &str) -> Self {
        let mut current = String::new();
        let mut keys = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line
                .strip_prefix('[')
                .and_then(|l| l.rsplit_once(']'))
                .map(|(name, _)| name)
            {
                current = name.trim().to_owned();
            } else if current == section
                && let Some((k, v)) = line.split_once('=')
            {
                keys.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Self(keys)
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Target;
    use crate::tls::SslMode;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| vars.get(k).cloned())
    }

    fn setting(vars: &[(&str, &str)]) -> String {
        match config(vars) {
            Err(Error::Config { setting, .. }) => setting.name().to_owned(),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[cfg(not(feature = "lakebase"))]
    #[test]
    fn lakebase_settings_without_the_feature_say_how_to_enable_it() {
        let err = config(&[("DATABRICKS_HOST", "https://ws.cloud.databricks.com")]).unwrap_err();
        assert!(err.to_string().contains("`lakebase` feature"), "{err}");
    }

    #[cfg(feature = "lakebase")]
    const LAKEBASE: [(&str, &str); 5] = [
        ("DATABRICKS_HOST", "https://ws.cloud.databricks.com"),
        ("DATABRICKS_CLIENT_ID", "sp-id"),
        ("DATABRICKS_CLIENT_SECRET", "sp-secret"),
        ("LAKEBASE_ENDPOINT", "projects/p/branches/b/endpoints/e"),
        ("PGHOST", "ep-x.database.us-east-1.cloud.databricks.com"),
    ];

    /// A service principal's id, which is also the database user, holds no white space or
    /// control character: one (a newline from a secret made from a file) is named as
    /// `DATABRICKS_CLIENT_ID`, where it was reported as `PGUSER`, a variable never set.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_client_id_with_white_space_in_it_is_named() {
        for id in ["sp-id\n", "sp id", "sp-id\r"] {
            let mut v = LAKEBASE.to_vec();
            v[1] = ("DATABRICKS_CLIENT_ID", id);
            assert_eq!(setting(&v), "DATABRICKS_CLIENT_ID", "{id:?}");
        }
    }

    /// Basic authentication ends the client id at its first ':', and the secret's newline
    /// (a secret made from a file) went to the token endpoint, whose `invalid_client` named
    /// neither: both are named, and the secret is not shown.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_client_id_with_a_colon_or_a_secret_with_white_space_is_named() {
        let mut v = LAKEBASE.to_vec();
        v[1] = ("DATABRICKS_CLIENT_ID", "sp:id");
        assert_eq!(setting(&v), "DATABRICKS_CLIENT_ID");
        for secret in ["sp-secret\n", "sp secret", "\tsp-secret"] {
            let mut v = LAKEBASE.to_vec();
            v[2] = ("DATABRICKS_CLIENT_SECRET", secret);
            let err = config(&v).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Config {
                        setting: Setting::DatabricksClientSecret,
                        ..
                    }
                ),
                "{secret:?}: {err}"
            );
            assert!(!err.to_string().contains(secret.trim()), "{err}");
        }
    }

    /// `DATABRICKS_WORKSPACE_ID` goes into a header of every credential call: a value that
    /// is not a workspace's number (a newline from a secret made from a file, say) is named
    /// at startup, where it made every call fail as an unreachable service.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_workspace_id_that_is_no_number_is_named() {
        for id in ["1234\n5", "12 34", "ws-1234"] {
            let mut v = LAKEBASE.to_vec();
            v.push(("DATABRICKS_WORKSPACE_ID", id));
            assert_eq!(setting(&v), "DATABRICKS_WORKSPACE_ID", "{id:?}");
        }
        let mut v = LAKEBASE.to_vec();
        v.push(("DATABRICKS_WORKSPACE_ID", " 1234567890123456 "));
        config(&v).unwrap();
    }

    /// `DATABRICKS_AUTH_TYPE` chooses among configured credentials, or the CLI's login.
    #[cfg(feature = "lakebase")]
    #[test]
    fn databricks_auth_type_chooses() {
        let mut v = LAKEBASE.to_vec();
        v.push(("DATABRICKS_AUTH_TYPE", "databricks-cli"));
        v.push(("PGUSER", "me@example.com"));
        assert_eq!(config(&v).unwrap().user, "me@example.com");
        // Without PGUSER the connector looks the user up (with the service principal's
        // secret chosen, its id would be the user).
        v.pop();
        assert_eq!(config(&v).unwrap().user, "");
        let last = v.len() - 1;
        v[last] = ("DATABRICKS_AUTH_TYPE", "azure-cli");
        assert_eq!(setting(&v), "DATABRICKS_AUTH_TYPE");
        // Chosen, but what it needs is missing: the missing setting is named.
        v[last] = ("DATABRICKS_AUTH_TYPE", "pat");
        assert_eq!(setting(&v), "DATABRICKS_TOKEN");
        v[last] = ("DATABRICKS_AUTH_TYPE", "env-oidc");
        assert_eq!(setting(&v), "DATABRICKS_OIDC_TOKEN");
        v[last] = ("DATABRICKS_AUTH_TYPE", "file-oidc");
        assert_eq!(setting(&v), "DATABRICKS_OIDC_TOKEN_FILEPATH");
        v[last] = ("DATABRICKS_AUTH_TYPE", "github-oidc");
        assert_eq!(setting(&v), "ACTIONS_ID_TOKEN_REQUEST_URL");
        v[last] = ("DATABRICKS_AUTH_TYPE", "external-browser");
        assert!(config(&v).is_ok());
    }

    /// A personal access token and a service principal's id both set, and no
    /// `DATABRICKS_AUTH_TYPE` to choose, are refused, as the Databricks SDKs refuse them
    /// ("validate: more than one authorization method configured: oauth and pat"): the token
    /// won without a word, and the connection logged in as the token's owner instead of the
    /// service principal.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_token_and_a_service_principal_without_a_choice_are_refused() {
        let mut v = LAKEBASE.to_vec();
        v.push(("DATABRICKS_TOKEN", "dapi-token"));
        let err = config(&v).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid setting DATABRICKS_AUTH_TYPE")
                && err.contains("pat")
                && err.contains("oauth-m2m"),
            "{err}"
        );
        assert!(
            !err.contains("dapi-token") && !err.contains("sp-secret"),
            "{err}"
        );
        for chosen in ["pat", "oauth-m2m"] {
            let mut v = v.clone();
            v.push(("DATABRICKS_AUTH_TYPE", chosen));
            config(&v).unwrap();
        }
        // The id alone counts as the service principal's too.
        v.retain(|(k, _)| *k != "DATABRICKS_CLIENT_SECRET");
        assert_eq!(setting(&v), "DATABRICKS_AUTH_TYPE");
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn federation_is_detected_as_the_sdks_do() {
        let base: Vec<(&str, &str)> = LAKEBASE
            .iter()
            .copied()
            .filter(|(k, _)| *k != "DATABRICKS_CLIENT_SECRET")
            .collect();
        let user = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.clone();
            v.extend_from_slice(extra);
            config(&v).map(|c| c.user)
        };
        // An ID token next to the client id (env-oidc, file-oidc, github-oidc): the service
        // principal is the user.
        let file = std::env::temp_dir().join(format!("dal-oidc-{}", std::process::id()));
        std::fs::write(&file, "eyJ.x.y").unwrap();
        let file: &'static str = file.display().to_string().leak();
        for extra in [
            &[("DATABRICKS_OIDC_TOKEN", "eyJ.x.y")][..],
            &[("DATABRICKS_OIDC_TOKEN_FILEPATH", file)],
            &[
                (
                    "ACTIONS_ID_TOKEN_REQUEST_URL",
                    "https://pipelines.example/token?x=1",
                ),
                ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "gh-secret"),
            ],
        ] {
            assert_eq!(user(extra).unwrap(), "sp-id", "{extra:?}");
        }
        // An insecure GitHub token service is refused, by name.
        let mut v = base.clone();
        v.extend([
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                "http://pipelines.example/token",
            ),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "gh-secret"),
        ]);
        assert_eq!(setting(&v), "ACTIONS_ID_TOKEN_REQUEST_URL");
        // A client id alone is a service principal without its secret.
        assert_eq!(setting(&base), "DATABRICKS_CLIENT_SECRET");
        // A token file that is not there is told at once, before any call.
        let mut v = base.clone();
        v.push(("DATABRICKS_OIDC_TOKEN_FILEPATH", "/nonexistent/token"));
        assert_eq!(setting(&v), "DATABRICKS_OIDC_TOKEN_FILEPATH");
        let _ = std::fs::remove_file(file);
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn databricks_credentials_alone_mean_lakebase_not_a_silent_fallback() {
        for var in [
            "DATABRICKS_TOKEN",
            "DATABRICKS_CLIENT_ID",
            "DATABRICKS_AUTH_TYPE",
        ] {
            assert_eq!(setting(&[(var, "x")]), "DATABRICKS_HOST", "{var}");
        }
        // Beside a database they are another tool's business.
        let c = config(&[
            ("DATABRICKS_TOKEN", "dapi-for-the-cli"),
            ("DATABASE_URL", "postgres://u:p@db.example.com/shop"),
        ])
        .unwrap();
        assert_eq!(c.host, "db.example.com");
    }

    #[test]
    fn a_database_url_gives_a_static_password_config() {
        let c = config(&[(
            "DATABASE_URL",
            "postgres://app:p%40ss@db.example.com:6543/shop?sslmode=verify-full&application_name=x",
        )])
        .unwrap();
        assert_eq!(c.address(), ("db.example.com", 6543, "app", "shop"));
        assert_eq!(c.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(c.application_name, "x");
        assert_eq!(
            format!("{:?}", c.credentials),
            "Some(Password(** redacted **))"
        );
    }

    /// libpq reads a variable only for what the connection string leaves out: leftover
    /// `PG*` variables neither redirect a URL's password nor weaken its TLS.
    #[test]
    fn a_database_url_wins_over_the_libpq_variables() {
        let leftovers = [
            ("PGHOST", "elsewhere"),
            ("PGPORT", "7000"),
            ("PGUSER", "someone"),
            ("PGDATABASE", "other"),
            ("PGSSLMODE", "disable"),
            ("PGSSLROOTCERT", "/tmp/other.pem"),
            ("PGAPPNAME", "other"),
            ("PGHOSTADDR", "10.9.9.9"),
        ];
        let mut vars = vec![(
            "DATABASE_URL",
            "postgres://app:pw@db.example.com:6543/shop?sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&application_name=x&hostaddr=10.0.0.1",
        )];
        vars.extend(leftovers);
        let c = config(&vars).unwrap();
        assert_eq!(c.address(), ("db.example.com", 6543, "app", "shop"));
        assert_eq!(c.ssl_mode, Some(SslMode::VerifyFull));
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.application_name, "x");
        assert_eq!(c.hostaddr, Some([10, 0, 0, 1].into()));
        // What the URL leaves out, they give.
        vars[0].1 = "postgres://app:pw@db.example.com";
        let c = config(&vars).unwrap();
        assert_eq!(c.address(), ("db.example.com", 7000, "app", "other"));
        assert_eq!(c.ssl_mode, Some(SslMode::Disable));
        assert_eq!(c.application_name, "other");
        assert_eq!(c.hostaddr, Some([10, 9, 9, 9].into()));
    }

    /// As in libpq, `PGHOST` and `PGUSER` give the host and the user a URL leaves out.
    #[test]
    fn pghost_and_pguser_fill_what_a_database_url_leaves_out() {
        let c = config(&[
            ("DATABASE_URL", "postgres://db.example.com/shop"),
            ("PGUSER", "app"),
            ("PGPASSWORD", "pw"),
        ])
        .unwrap();
        assert_eq!(c.address(), ("db.example.com", 5432, "app", "shop"));
        let c = config(&[
            ("DATABASE_URL", "postgres://:pw@/shop"),
            ("PGHOST", "db.example.com"),
            ("PGUSER", "app"),
        ])
        .unwrap();
        assert_eq!(c.address(), ("db.example.com", 5432, "app", "shop"));
        for (url, missing) in [
            ("postgres:///shop", "has no host, and PGHOST is not set"),
            (
                "postgres://db.example.com/shop",
                "has no user name, and PGUSER is not set",
            ),
        ] {
            let e = config(&[("DATABASE_URL", url), ("PGPASSWORD", "pw")]).unwrap_err();
            assert!(e.to_string().contains(missing), "{url}: {e}");
        }
    }

    /// A URL's empty host (`@:6543`) is a host left out, and a bad value that `PGHOST` or
    /// `PGUSER` fills in is named by that variable, not by the URL.
    #[tokio::test]
    async fn what_pghost_and_pguser_fill_in_is_theirs() {
        let c = config(&[
            ("DATABASE_URL", "postgres://app:pw@:6543/shop"),
            ("PGHOST", "db.example.com"),
        ])
        .unwrap();
        assert_eq!(c.address(), ("db.example.com", 6543, "app", "shop"));
        let c = config(&[
            ("DATABASE_URL", "postgres://db.example.com/shop"),
            ("PGUSER", "app\tadmin"),
            ("PGPASSWORD", "pw"),
        ])
        .unwrap();
        let e = crate::Connector::new(c).await.unwrap_err();
        assert!(e.to_string().starts_with("invalid setting PGUSER"), "{e}");
    }

    /// An IAM token is signed for the DSQL endpoint's host and goes to no other: a leftover
    /// `PGHOST` does not redirect it.
    #[cfg(feature = "dsql")]
    #[test]
    fn a_leftover_pghost_does_not_redirect_dsql_tokens() {
        let c = config(&[
            (
                "DSQL_ENDPOINT",
                "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws",
            ),
            ("PGHOST", "elsewhere"),
        ])
        .unwrap();
        assert_eq!(c.host, "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws");
    }

    #[test]
    fn libpq_variables_give_a_static_password_config() {
        let c = config(&[
            ("PGHOST", "h"),
            ("PGUSER", "u"),
            ("PGPASSWORD", "p"),
            ("PGPORT", "5433"),
            ("PGAPPNAME", "svc/1"),
            ("DAL_TOKEN_STRATEGY", "lazy"),
            ("DAL_POOL_MAX_LIFETIME_SECS", "1.5"),
            ("DAL_POOL_IDLE_TIMEOUT_SECS", "0"),
        ])
        .unwrap();
        assert_eq!((c.port, c.application_name.as_str()), (5433, "svc/1"));
        assert_eq!(c.pool.max_lifetime(), Some(Duration::from_millis(1500)));
        assert_eq!(c.pool.idle_timeout(), None);
        assert_eq!(c.strategy, crate::TokenStrategy::Lazy);
        assert_eq!(c.resolved_target().unwrap(), Target::Postgres);
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn lakebase_settings_default_the_user_database_and_target() {
        let c = config(&LAKEBASE).unwrap();
        assert_eq!(c.user, "sp-id");
        assert_eq!(c.database, "databricks_postgres");
        assert_eq!(c.resolved_target().unwrap(), Target::Lakebase);
        assert!(!format!("{c:?}").contains("sp-secret"));
    }

    /// A value that is not UTF-8 fails as that setting's value, never as if it were unset:
    /// an unreadable `PGSSLROOTCERT` so skipped left `require` unverified.
    #[test]
    fn a_value_that_is_not_utf8_is_not_taken_for_unset() {
        use std::os::unix::ffi::OsStringExt;
        let path = text(Some(std::ffi::OsString::from_vec(
            b"/etc/ca-\xff.pem".to_vec(),
        )));
        assert_eq!(path.as_deref(), Some("/etc/ca-\u{fffd}.pem"));
        let c = config(&[
            ("PGHOST", "h"),
            ("PGUSER", "u"),
            ("PGPASSWORD", "p"),
            ("PGSSLMODE", "require"),
            ("PGSSLROOTCERT", path.as_deref().unwrap()),
        ])
        .unwrap();
        match crate::Connector::build(c) {
            Err(Error::Config { setting, .. }) => assert_eq!(setting, Setting::SslRootCert),
            other => panic!("expected PGSSLROOTCERT refused, got {:?}", other.map(drop)),
        }
    }

    #[test]
    fn a_statement_timeout_of_zero_sends_none() {
        let base = [("PGHOST", "h"), ("PGUSER", "u"), ("PGPASSWORD", "p")];
        let timeout = |ms| {
            let mut v = base.to_vec();
            v.push(("DAL_STATEMENT_TIMEOUT_MS", ms));
            config(&v).unwrap().statement_timeout
        };
        assert_eq!(timeout("0"), None);
        assert_eq!(timeout("1500"), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn malformed_values_name_their_variable() {
        let base = [("PGHOST", "h"), ("PGUSER", "u"), ("PGPASSWORD", "p")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            setting(&v)
        };
        assert_eq!(with(("PGPORT", "54x32")), "PGPORT");
        assert_eq!(with(("PGPORT", "0")), "PGPORT");
        assert_eq!(with(("PGCONNECT_TIMEOUT", "soon")), "PGCONNECT_TIMEOUT");
        // libpq's "no limit" would let a connect hang.
        assert_eq!(with(("PGCONNECT_TIMEOUT", "0")), "PGCONNECT_TIMEOUT");
        assert_eq!(with(("PGSSLMODE", "verify_full")), "PGSSLMODE");
        assert_eq!(
            with(("DAL_TOKEN_STRATEGY", "sometimes")),
            "DAL_TOKEN_STRATEGY"
        );
        assert_eq!(with(("DAL_POOL_MAX_SIZE", "0")), "DAL_POOL_MAX_SIZE");
        assert_eq!(with(("DAL_POOL_MIN_IDLE", "11")), "DAL_POOL_MIN_IDLE");
        for bad in ["-1", "soon", "NaN", "inf", "1e300"] {
            assert_eq!(
                with(("DAL_POOL_MAX_LIFETIME_SECS", bad)),
                "DAL_POOL_MAX_LIFETIME_SECS"
            );
            assert_eq!(
                with(("DAL_POOL_IDLE_TIMEOUT_SECS", bad)),
                "DAL_POOL_IDLE_TIMEOUT_SECS"
            );
        }
        // Quoted as given, not as 301 digits.
        let err = config(&[
            ("PGHOST", "h"),
            ("PGUSER", "u"),
            ("PGPASSWORD", "p"),
            ("DAL_POOL_MAX_LIFETIME_SECS", "1e300"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"1e300\" is not a number of seconds"),
            "{err}"
        );
        assert_eq!(setting(&[("PGHOST", "h"), ("PGUSER", "u")]), "PGPASSWORD");
        assert_eq!(
            setting(&[("DATABASE_URL", "mysql://u:p@h/db")]),
            "DATABASE_URL"
        );
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn conflicting_credentials_are_refused() {
        let mut v = LAKEBASE.to_vec();
        v.push(("PGPASSWORD", "static"));
        assert_eq!(setting(&v), "PGPASSWORD");
        let mut v = LAKEBASE.to_vec();
        v.push(("DATABASE_URL", "postgres://u:p@h/db"));
        assert_eq!(setting(&v), "DATABASE_URL");
        let mut v = LAKEBASE.to_vec();
        v.push(("DSQL_ENDPOINT", "abc.dsql.us-east-1.on.aws"));
        assert_eq!(setting(&v), "DSQL_ENDPOINT");
        let mut v = LAKEBASE.to_vec();
        v.push(("LAKEBASE_INSTANCE", "inst"));
        assert_eq!(setting(&v), "LAKEBASE_ENDPOINT");
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn lakebase_mistakes_name_their_variable() {
        let mut v = LAKEBASE.to_vec();
        v[3] = ("LAKEBASE_ENDPOINT", "projects/p/endpoints/e");
        assert_eq!(setting(&v), "LAKEBASE_ENDPOINT");
        let v: Vec<_> = LAKEBASE
            .iter()
            .copied()
            .filter(|(k, _)| *k != "DATABRICKS_CLIENT_SECRET")
            .collect();
        assert_eq!(setting(&v), "DATABRICKS_CLIENT_SECRET");
        let mut v = LAKEBASE.to_vec();
        v[0] = ("DATABRICKS_HOST", "ftp://ws");
        assert_eq!(setting(&v), "DATABRICKS_HOST");
    }

    #[cfg(feature = "lakebase")]
    #[test]
    fn a_databrickscfg_profile_supplies_workspace_credentials() {
        let dir = tempfile_dir();
        let path = dir.join("databrickscfg");
        std::fs::write(
            &path,
            "[DEFAULT]\nhost = https://other\n\n[prod]\nhost = https://ws.cloud.databricks.com\nclient_id = from-file\nclient_secret = s\n",
        )
        .unwrap();
        let c = config(&[
            ("DATABRICKS_CONFIG_FILE", path.to_str().unwrap()),
            ("DATABRICKS_CONFIG_PROFILE", "prod"),
            ("LAKEBASE_INSTANCE", "inst"),
            ("PGHOST", "instance-1.database.cloud.databricks.com"),
        ])
        .unwrap();
        assert_eq!(c.user, "from-file");
        let missing = setting(&[
            ("DATABRICKS_CONFIG_FILE", path.to_str().unwrap()),
            ("DATABRICKS_CONFIG_PROFILE", "staging"),
            ("LAKEBASE_INSTANCE", "inst"),
        ]);
        assert_eq!(missing, "DATABRICKS_CONFIG_PROFILE");
        // `~/` is the home directory, as the Databricks SDKs expand it (`.env.example` writes
        // it so, and a `.env` file is not read by a shell).
        let c = config(&[
            ("HOME", dir.to_str().unwrap()),
            ("DATABRICKS_CONFIG_FILE", "~/databrickscfg"),
            ("DATABRICKS_CONFIG_PROFILE", "prod"),
            ("LAKEBASE_INSTANCE", "inst"),
            ("PGHOST", "instance-1.database.cloud.databricks.com"),
        ])
        .unwrap();
        assert_eq!(c.user, "from-file");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A section header is read as the Databricks SDKs read it (Python's `configparser`, Go's
    /// `go-ini`): the name is what stands up to its last `]`, with a comment after it; and, as
    /// `go-ini` reads it, a file may begin with a byte order mark (as PowerShell writes one).
    /// Read as a line that
    /// is no header, `[prod] ; production` put prod's token in the section above it, the
    /// `[DEFAULT]` of another workspace's host.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_section_header_is_read_with_a_comment_after_it_and_a_byte_order_mark_before() {
        let text = "[DEFAULT]\nhost = https://dev\n[prod] ; production\nhost = https://prod\ntoken = dapi-prod\n";
        let default = Profile::parse(text, "DEFAULT");
        assert_eq!(default.get("token"), None);
        assert_eq!(default.get("host").as_deref(), Some("https://dev"));
        let prod = Profile::parse(text, "prod");
        assert_eq!(prod.get("token").as_deref(), Some("dapi-prod"));
        assert_eq!(prod.get("host").as_deref(), Some("https://prod"));
        let marked = Profile::parse("\u{feff}[DEFAULT]\nhost = h\n", "DEFAULT");
        assert_eq!(marked.get("host").as_deref(), Some("h"));
    }

    /// As the Databricks SDKs do (Python's `_known_file_config_loader`): with no profile
    /// named, a host or a credential in the environment means the config file is not read,
    /// so a `[DEFAULT]` token never goes to a host from the environment, nor an environment
    /// token to the file's host.
    #[cfg(feature = "lakebase")]
    #[test]
    fn the_default_profile_is_not_mixed_with_a_host_or_credential_from_the_environment() {
        let dir = tempfile_dir();
        let path = dir.join("databrickscfg");
        std::fs::write(
            &path,
            "[DEFAULT]\nhost = https://prod.cloud.databricks.com\ntoken = dapi-from-file\n",
        )
        .unwrap();
        let file = ("DATABRICKS_CONFIG_FILE", path.to_str().unwrap());
        let instance = ("LAKEBASE_INSTANCE", "inst");
        // The file's token is not sent to the environment's host.
        let other_host = ("DATABRICKS_HOST", "https://other.example");
        assert_eq!(
            setting(&[file, instance, other_host]),
            "DATABRICKS_CLIENT_ID"
        );
        // Nor an environment token to the file's host.
        let env_token = ("DATABRICKS_TOKEN", "dapi-from-env");
        assert_eq!(setting(&[file, instance, env_token]), "DATABRICKS_HOST");
        // With nothing in the environment, [DEFAULT] serves; named, it fills what the
        // environment left unset, but its token goes to no other host.
        assert!(config(&[file, instance]).is_ok());
        let named = ("DATABRICKS_CONFIG_PROFILE", "DEFAULT");
        assert_eq!(
            setting(&[file, instance, other_host, named]),
            "DATABRICKS_HOST"
        );
        assert!(config(&[file, instance, other_host, named, env_token]).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A named profile's credential is for the profile's own workspace: `databricks auth
    /// token --profile prod` answers with prod's token, and prod's `token` or
    /// `client_secret` is prod's. Each went to `DATABRICKS_HOST` when that named another
    /// workspace: the two must agree, unless the environment gives the credential too.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_named_profiles_credential_goes_to_no_other_host() {
        let dir = tempfile_dir();
        let path = dir.join("databrickscfg");
        // As an Azure workspace's profile may be written, with the workspace id.
        std::fs::write(
            &path,
            "[prod]\nhost = https://prod.cloud.databricks.com/?o=123\n\
             [prod-pat]\nhost = https://prod.cloud.databricks.com\ntoken = dapi-prod\n\
             [prod-m2m]\nhost = https://prod.cloud.databricks.com\nclient_id = sp\n\
             client_secret = prod-secret\n",
        )
        .unwrap();
        let with = |profile, host, more: &[(&'static str, &'static str)]| {
            let mut vars = vec![
                ("DATABRICKS_CONFIG_FILE", path.to_str().unwrap()),
                ("DATABRICKS_CONFIG_PROFILE", profile),
                ("DATABRICKS_HOST", host),
                ("LAKEBASE_INSTANCE", "inst"),
                ("PGHOST", "instance-1.database.cloud.databricks.com"),
                ("PGUSER", "me@example.com"),
            ];
            vars.extend_from_slice(more);
            config(&vars)
        };
        let cli = [("DATABRICKS_AUTH_TYPE", "databricks-cli")];
        for (profile, more) in [("prod", &cli[..]), ("prod-pat", &[]), ("prod-m2m", &[])] {
            match with(profile, "https://dev.cloud.databricks.com", more) {
                Err(Error::Config { setting, reason }) => {
                    assert_eq!(setting, Setting::DatabricksHost, "{profile}");
                    assert!(
                        reason.contains("https://prod.cloud.databricks.com")
                            && reason.contains(&format!("[{profile}]")),
                        "{profile}: {reason}"
                    );
                    assert!(!reason.contains("prod-secret") && !reason.contains("dapi-prod"));
                }
                other => panic!(
                    "{profile}: expected DATABRICKS_HOST refused, got {:?}",
                    other.map(drop)
                ),
            }
            // The same workspace, written another way.
            for same in [
                "https://prod.cloud.databricks.com",
                "prod.cloud.databricks.com",
                "https://PROD.cloud.databricks.com/",
                "https://prod.cloud.databricks.com:443",
            ] {
                assert!(with(profile, same, more).is_ok(), "{profile}: {same}");
            }
        }
        // Neither host's user name or password, if one has any, is shown.
        let err = with(
            "prod-pat",
            "https://me:dapiLEAK@dev.cloud.databricks.com",
            &[],
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("profile [prod-pat]") && !err.contains("dapiLEAK"),
            "{err}"
        );
        // A credential the environment gives is the environment's host's.
        let dev = "https://dev.cloud.databricks.com";
        assert!(with("prod-pat", dev, &[("DATABRICKS_TOKEN", "dapi-dev")]).is_ok());
        assert!(
            with(
                "prod-m2m",
                dev,
                &[("DATABRICKS_CLIENT_SECRET", "dev-secret")]
            )
            .is_ok()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `DATABRICKS_OIDC_TOKEN_ENV` names a variable: one that holds something else (the ID
    /// token itself, put where its variable's name belongs) is refused without being shown.
    #[cfg(feature = "lakebase")]
    #[test]
    fn an_id_token_where_its_variables_name_belongs_is_not_shown() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvIn0.c2lnbmF0dXJl";
        let err = config(&[
            ("DATABRICKS_HOST", "https://ws.cloud.databricks.com"),
            ("LAKEBASE_INSTANCE", "inst"),
            ("DATABRICKS_CLIENT_ID", "sp"),
            ("DATABRICKS_AUTH_TYPE", "env-oidc"),
            ("DATABRICKS_OIDC_TOKEN_ENV", jwt),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("DATABRICKS_OIDC_TOKEN_ENV") && !err.contains("eyJzdWIi"),
            "{err}"
        );
    }

    /// A Databricks config file larger than any is refused, its size named, and read no
    /// further than the bound.
    #[cfg(feature = "lakebase")]
    #[test]
    fn a_config_file_larger_than_any_is_refused() {
        let file = crate::setting_file::tests::SparseFile::too_large();
        let err = config(&[
            ("DATABRICKS_CONFIG_FILE", file.0.to_str().unwrap()),
            ("DATABRICKS_CONFIG_PROFILE", "dev"),
            ("LAKEBASE_INSTANCE", "inst"),
        ])
        .unwrap_err();
        let Error::Config { setting, reason } = &err else {
            panic!("expected a config error, got {err:?}");
        };
        assert_eq!(*setting, Setting::DatabricksConfigProfile);
        assert!(reason.contains("more than 16 MiB"), "{reason}");
    }

    #[cfg(feature = "lakebase")]
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dal-env-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[cfg(feature = "dsql")]
    #[test]
    fn dsql_needs_a_region() {
        assert_eq!(
            setting(&[("DSQL_ENDPOINT", "abcdefghijklmnopqrstuvwxyz")]),
            "DSQL_REGION"
        );
        // Host names are case-insensitive: a full endpoint in capitals still names its region.
        let c = config(&[(
            "DSQL_ENDPOINT",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ.DSQL.EU-WEST-1.ON.AWS",
        )])
        .unwrap();
        assert_eq!(c.host, "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws");
        let c = config(&[
            ("DSQL_ENDPOINT", "abcdefghijklmnopqrstuvwxyz"),
            ("AWS_REGION", "eu-west-1"),
        ])
        .unwrap();
        assert_eq!(c.host, "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws");
        assert_eq!(
            (c.user.as_str(), c.resolved_target().unwrap()),
            ("admin", Target::Dsql)
        );
    }

    /// A service's own `AWS_REGION` does not contradict a full endpoint in another region:
    /// the endpoint's region signs its tokens. `DSQL_REGION`, set for DSQL alone, must match.
    #[cfg(feature = "dsql")]
    #[test]
    fn the_endpoints_region_wins_over_aws_region() {
        let endpoint = "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws";
        for ambient in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            let c = config(&[("DSQL_ENDPOINT", endpoint), (ambient, "us-east-1")]).unwrap();
            assert_eq!(c.host, endpoint);
        }
        assert_eq!(
            setting(&[("DSQL_ENDPOINT", endpoint), ("DSQL_REGION", "us-east-1")]),
            "DSQL_REGION"
        );
        // For a bare cluster id the region comes from AWS_REGION, and a bad one says so.
        let bare = [
            ("DSQL_ENDPOINT", "abcdefghijklmnopqrstuvwxyz"),
            ("AWS_REGION", "Mars 1"),
        ];
        let e = config(&bare).unwrap_err().to_string();
        assert!(
            e.contains("`mars 1` (from AWS_REGION) is not an AWS region"),
            "{e}"
        );
    }

    #[test]
    fn dal_product_is_checked_and_kept() {
        let mut v = vec![("DATABASE_URL", "postgres://u:p@h/db")];
        v.push(("DAL_PRODUCT", " acme_orders/2.1 "));
        assert_eq!(
            config(&v).unwrap().product.as_deref(),
            Some("acme_orders/2.1")
        );
        v[1] = ("DAL_PRODUCT", "acme orders");
        assert_eq!(setting(&v), "DAL_PRODUCT");
    }

    /// A DSQL pool keeps DSQL's lifetimes when a variable changes another pool setting.
    #[cfg(feature = "dsql")]
    #[test]
    fn dsql_pools_start_from_dsqls_defaults() {
        let c = config(&[
            (
                "DSQL_ENDPOINT",
                "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws",
            ),
            ("DAL_POOL_MAX_SIZE", "20"),
        ])
        .unwrap();
        assert_eq!(c.pool.max_size(), 20);
        assert_eq!(c.pool.max_lifetime(), Some(Duration::from_secs(55 * 60)));
        assert_eq!(c.pool.idle_timeout(), Some(Duration::from_secs(600)));
    }
}
