//! Aurora DSQL: the password is an IAM auth token, a SigV4 presigned URL for the cluster's
//! host signed locally by the AWS SDK's generator, with no call to AWS.
//!
//! The signing keys come from the standard AWS credential chain, loaded on the first fetch and
//! kept until shortly before they expire, or from keys given in code.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_dsql::auth_token::{AuthTokenGenerator, Config as GeneratorConfig};
use aws_sdk_dsql::config::Region;
use aws_smithy_async::time::StaticTimeSource;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::sync::OnceCell;
use tracing::instrument::WithSubscriber;

use super::source::{BoxFuture, Clock, CredentialSource, SystemClock, Token};
use crate::error::{Error, Result, Setting};

/// The DSQL role that signs with `DbConnectAdmin`; every other role uses `DbConnect`.
const ADMIN_USER: &str = "admin";
/// The vendor's default token lifetime.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(900);
/// The vendor's documented maximum token lifetime (one week).
const MAX_EXPIRES_IN_SECS: u64 = 604_800;
/// DSQL cluster ids are 26 lowercase letters and digits.
const CLUSTER_ID_LEN: usize = 26;
/// Instance metadata and STS can stall; a token fetch must fail readably instead of hanging the
/// pool that waits for it.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(20);
/// Keys that expire sooner than this are reloaded first, so a fresh token is never cut short by
/// the keys that signed it.
const CREDENTIALS_REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Aurora DSQL IAM auth tokens for one cluster and one database role.
///
/// Each fetch signs a new token locally (no network call) that is valid for
/// [`with_expires_in`](Dsql::with_expires_in), 900 seconds by default. The signing keys come from
/// the standard AWS credential chain: the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), profiles in `~/.aws` (including
/// `credential_process`, and SSO profiles with the `dsql-sso` feature), web identity, and
/// container or instance metadata. The chain is loaded on the first fetch and its keys are
/// reused until five minutes before they expire.
///
/// ```no_run
/// use dal::credentials::{CredentialSource, Dsql};
/// # async fn run() -> dal::Result<()> {
/// let source = Dsql::new("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws", "admin", None)?;
/// let token = source.fetch().await?;
/// # Ok(()) }
/// ```
pub struct Dsql {
    host: String,
    region: String,
    admin: bool,
    expires_in: Duration,
    clock: Arc<dyn Clock>,
    keys: Keys,
    cached: Mutex<Option<Credentials>>,
}

enum Keys {
    /// The default chain, built on the first fetch.
    Chain(OnceCell<SharedCredentialsProvider>),
    /// Keys given in code (or, in tests, any provider).
    Given(SharedCredentialsProvider),
}

impl Dsql {
    /// A source of tokens for `user` on the cluster at `host`.
    ///
    /// `host` is the cluster endpoint, `{cluster-id}.dsql.{region}.on.aws`, or a bare 26-character
    /// cluster id, which is expanded with the region. Any other host name (a proxy, a private
    /// endpoint) is used as given and needs the region from elsewhere. The region is, in order:
    /// `region`, the one in `host`, then the `AWS_REGION` and `AWS_DEFAULT_REGION` environment
    /// variables. `user` `admin` gets `DbConnectAdmin` tokens, every other role `DbConnect`.
    ///
    /// # Errors
    /// [`Error::Config`] when the host or user is empty or malformed, when no region can be
    /// found, or when `region` contradicts the one in the host.
    pub fn new(host: &str, user: &str, region: Option<&str>) -> Result<Self> {
        Self::with_env(host, user, region, &|name| std::env::var(name).ok())
    }

    /// [`Dsql::new`] with the environment lookup passed in: `Config::from_lookup`'s, or a
    /// test's, so that it does not depend on the machine's variables.
    pub(crate) fn with_env(
        host: &str,
        user: &str,
        region: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        if user.is_empty() {
            return Err(Error::config(
                Setting::User,
                "the database role is empty; pass `admin` or the name of a custom role",
            ));
        }
        let (host, region) = resolve_endpoint(host, region, env)?;
        Ok(Self {
            host,
            region,
            admin: user == ADMIN_USER,
            expires_in: DEFAULT_EXPIRES_IN,
            clock: Arc::new(SystemClock),
            keys: Keys::Chain(OnceCell::new()),
            cached: Mutex::new(None),
        })
    }

    /// How long each token is valid, in whole seconds (a fraction of a second is dropped).
    /// Defaults to 900 seconds, the vendor's default.
    ///
    /// # Errors
    /// [`Error::Config`] unless it is between 1 and 604800 seconds (one week), the vendor's limits.
    pub fn with_expires_in(mut self, expires_in: Duration) -> Result<Self> {
        let secs = expires_in.as_secs();
        if !(1..=MAX_EXPIRES_IN_SECS).contains(&secs) {
            return Err(Error::config(
                Setting::DsqlTokenExpiresIn,
                format!(
                    "{secs} s is out of range; give between 1 and {MAX_EXPIRES_IN_SECS} seconds"
                ),
            ));
        }
        self.expires_in = Duration::from_secs(secs);
        Ok(self)
    }

    /// The clock that dates each signature. Defaults to [`SystemClock`].
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Signs with these keys instead of the AWS credential chain: for tests, and for programs
    /// that hold their keys themselves. Defaults to the chain.
    #[must_use]
    pub fn with_static_credentials(
        self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Self {
        let keys = Credentials::new(
            access_key_id,
            secret_access_key,
            session_token,
            None,
            "dal-static",
        );
        self.with_provider(SharedCredentialsProvider::new(keys))
    }

    fn with_provider(mut self, provider: SharedCredentialsProvider) -> Self {
        self.keys = Keys::Given(provider);
        *self.cached.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        self
    }

    /// The host name the tokens are signed for and clients connect to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The AWS region the tokens are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Whether the tokens are for the `admin` role (`DbConnectAdmin`).
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    async fn token(&self) -> Result<Token> {
        // SigV4 dates are whole seconds; signing at a whole second makes `expires_at` exact.
        let since_epoch = self
            .clock
            .now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| failure("the clock is before 1970", None))?;
        let signed_at = UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());

        let keys = self.keys(signed_at).await?;
        // A presigned URL stops working when the temporary keys that signed it expire.
        let expires_at = match keys.expiry() {
            Some(keys_expiry) => keys_expiry.min(signed_at + self.expires_in),
            None => signed_at + self.expires_in,
        };

        let generator = GeneratorConfig::builder()
            .hostname(self.host.as_str())
            .region(Region::new(self.region.clone()))
            .expires_in(self.expires_in.as_secs())
            .credentials(keys)
            .build()
            .map_err(|e| failure("cannot configure the token generator", Some(e)))?;
        let sdk_config = aws_config::SdkConfig::builder()
            .time_source(StaticTimeSource::new(signed_at))
            .build();
        let generator = AuthTokenGenerator::new(generator);
        // The signer traces its canonical request, session token included: nothing it
        // emits may reach the application's subscriber.
        let silent = tracing::subscriber::NoSubscriber::default();
        let signed = if self.admin {
            generator
                .db_connect_admin_auth_token(&sdk_config)
                .with_subscriber(silent)
                .await
        } else {
            generator
                .db_connect_auth_token(&sdk_config)
                .with_subscriber(silent)
                .await
        }
        .map_err(|e| failure("cannot sign the auth token", Some(e)))?;
        Ok(Token::new(signed.as_str(), Some(expires_at)))
    }

    /// The signing keys: the last ones while they stay valid, else fresh ones from the provider.
    async fn keys(&self, now: SystemTime) -> Result<Credentials> {
        if let Some(keys) = self.lock_cached().as_ref()
            && keys
                .expiry()
                .is_none_or(|expiry| expiry > now + CREDENTIALS_REFRESH_MARGIN)
        {
            return Ok(keys.clone());
        }
        let load = async {
            let provider = match &self.keys {
                Keys::Given(provider) => provider.clone(),
                Keys::Chain(chain) => chain
                    .get_or_init(|| default_chain(&self.region))
                    .await
                    .clone(),
            };
            provider.provide_credentials().await
        };
        // The providers' HTTP clients (STS, instance and container metadata, SSO) trace what
        // they receive, and those answers hold the keys: as with the signer, nothing they
        // emit may reach the application's subscriber. Their errors come back in ours.
        let load = load.with_subscriber(tracing::subscriber::NoSubscriber::default());
        let keys = tokio::time::timeout(CREDENTIALS_TIMEOUT, load)
            .await
            .map_err(|_| {
                failure(
                    format!(
                        "no AWS credentials within {} s; check that instance or container \
                         metadata and STS are reachable, or set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY",
                        CREDENTIALS_TIMEOUT.as_secs()
                    ),
                    None,
                )
            })?
            .map_err(|e| {
                let what = match e {
                    CredentialsError::CredentialsNotLoaded(_) => {
                        "no AWS credentials found; set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, configure a profile in ~/.aws, run with an IAM \
                         role, or call Dsql::with_static_credentials"
                    }
                    // The default chain ends with instance metadata: on a machine with none,
                    // its failure is what the chain reports.
                    _ => {
                        "the AWS credential provider failed; without an IAM role on this \
                         machine, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                         AWS_PROFILE to a profile in ~/.aws"
                    }
                };
                failure(what, Some(Box::new(e)))
            })?;
        *self.lock_cached() = Some(keys.clone());
        Ok(keys)
    }

    fn lock_cached(&self) -> std::sync::MutexGuard<'_, Option<Credentials>> {
        // The cached keys are replaced whole, so a panic elsewhere cannot leave them half-written.
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CredentialSource for Dsql {
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        Box::pin(self.token())
    }

    fn kind(&self) -> &'static str {
        "dsql"
    }
    fn target(&self) -> Option<crate::Target> {
        Some(crate::Target::Dsql)
    }
}

impl fmt::Debug for Dsql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dsql")
            .field("host", &self.host)
            .field("region", &self.region)
            .field("admin", &self.admin)
            .field("expires_in", &self.expires_in)
            .field(
                "credentials",
                &match self.keys {
                    Keys::Chain(_) => "default chain",
                    Keys::Given(_) => "** redacted **",
                },
            )
            .finish_non_exhaustive()
    }
}

/// The default AWS chain, with an HTTPS client on the workspace's ring provider so that the SDK
/// brings no crypto backend of its own.
async fn default_chain(region: &str) -> SharedCredentialsProvider {
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let chain = DefaultCredentialsChain::builder()
        .configure(ProviderConfig::default().with_http_client(http_client))
        // Given explicitly so the chain does not look for a region itself (instance metadata).
        .region(Region::new(region.to_owned()))
        .build()
        .await;
    SharedCredentialsProvider::new(chain)
}

/// The host to sign for and its region: from the arguments, else the environment.
fn resolve_endpoint(
    host: &str,
    region: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, String)> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err(Error::config(
            Setting::DsqlEndpoint,
            "the host is empty; give the cluster endpoint `{cluster-id}.dsql.{region}.on.aws` \
             or the cluster id",
        ));
    }
    if host.contains(['/', '?', '#', '@', ':'])
        || host.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        return Err(Error::config(
            Setting::DsqlEndpoint,
            "give the bare host name, without scheme, port, path, user or white space",
        ));
    }
    if host.contains(',') {
        return Err(Error::config(
            Setting::DsqlEndpoint,
            "names several endpoints: give one; a multi-region cluster's endpoints go to \
             Config::dsql_multi_region",
        ));
    }
    let given = match region.map(str::trim) {
        Some("") => {
            return Err(Error::config(
                Setting::DsqlRegion,
                "the region is empty; give one such as `us-east-1`, or None to take it from the host",
            ));
        }
        Some(region) => Some(region.to_ascii_lowercase()),
        None => None,
    };
    let in_host = region_of_host(&host);
    if let (Some(given), Some(in_host)) = (&given, in_host)
        && given != in_host
    {
        return Err(Error::config(
            Setting::DsqlRegion,
            format!(
                "region `{given}` contradicts `{in_host}` in the host; tokens would be refused, \
                 so drop the region or fix it"
            ),
        ));
    }
    let (region, from) = match given.or_else(|| in_host.map(str::to_owned)) {
        Some(region) => (region, None),
        None => ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .into_iter()
            .find_map(|var| {
                let region = env(var)?.trim().to_ascii_lowercase();
                (!region.is_empty()).then_some((region, Some(var)))
            })
            .ok_or_else(|| {
                Error::config(
                    Setting::DsqlRegion,
                    "no region: give the full endpoint `{cluster-id}.dsql.{region}.on.aws` \
                     as host (DSQL_ENDPOINT), the region (DSQL_REGION), or set AWS_REGION",
                )
            })?,
    };
    if !is_region(&region) {
        let from = from.map(|var| format!(" (from {var})")).unwrap_or_default();
        return Err(Error::config(
            Setting::DsqlRegion,
            format!("`{region}`{from} is not an AWS region name such as `us-east-1`"),
        ));
    }
    let host = if is_cluster_id(&host) {
        format!("{host}.dsql.{region}.on.aws")
    } else {
        host
    };
    Ok((host, region))
}

/// The region in a `{cluster-id}.dsql.{region}.on.aws` host name.
fn region_of_host(host: &str) -> Option<&str> {
    let rest = host.strip_suffix(".on.aws")?;
    let (id, region) = rest.split_once(".dsql.")?;
    (!id.is_empty() && is_region(region)).then_some(region)
}

fn is_region(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_cluster_id(s: &str) -> bool {
    s.len() == CLUSTER_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Why a token could not be made; it names no key and no token.
#[derive(Debug)]
struct DsqlFailure {
    what: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for DsqlFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for DsqlFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

fn failure(
    what: impl Into<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::Credential {
        source_kind: "dsql",
        source: Box::new(DsqlFailure {
            what: what.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::provider::future;

    use super::*;

    const CLUSTER: &str = "peccy.dsql.us-east-1.on.aws";
    /// 2024-08-27T00:00:00Z, the time of the SDK's public test vector.
    const VECTOR_TIME: u64 = 1_724_716_800;

    struct FixedClock(SystemTime);

    impl Clock for FixedClock {
        fn now(&self) -> SystemTime {
            self.0
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn at(secs: u64, nanos: u32) -> Arc<dyn Clock> {
        Arc::new(FixedClock(UNIX_EPOCH + Duration::new(secs, nanos)))
    }

    fn vector_source(user: &str) -> Dsql {
        Dsql::with_env(CLUSTER, user, Some("us-east-1"), &no_env)
            .unwrap()
            .with_expires_in(Duration::from_secs(450))
            .unwrap()
            .with_clock(at(VECTOR_TIME, 0))
            .with_static_credentials("akid", "secret", None)
    }

    fn config_setting(err: Error) -> Setting {
        match err {
            Error::Config { setting, .. } => setting,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn signs_the_public_test_vector() {
        let source = vector_source("app");
        assert!(!source.is_admin());
        let token = source.fetch().await.unwrap();
        assert_eq!(
            token.expose(),
            "peccy.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=akid%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request\
             &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
        );
        assert!(!token.expose().starts_with("https://"));
    }

    #[tokio::test]
    async fn signs_the_admin_test_vector() {
        let source = vector_source("admin");
        assert!(source.is_admin());
        let token = source.fetch().await.unwrap();
        assert_eq!(
            token.expose(),
            "peccy.dsql.us-east-1.on.aws/?Action=DbConnectAdmin&X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=akid%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request\
             &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=267cf8d04d84444f7a62d5bdb40c44bfc6cb13dd6c64fa7f772df6bbaa90fff1"
        );
    }

    #[tokio::test]
    async fn a_session_token_is_signed_into_the_url() {
        let source = vector_source("app").with_static_credentials(
            "akid",
            "secret",
            Some("session/token".into()),
        );
        let token = source.fetch().await.unwrap();
        assert!(
            token
                .expose()
                .contains("&X-Amz-Security-Token=session%2Ftoken"),
            "no session token in {}",
            token.expose()
        );
    }

    #[tokio::test]
    async fn expires_at_is_the_signing_second_plus_the_lifetime() {
        // Signing dates are whole seconds, so a clock between seconds signs at the second before.
        let source = Dsql::with_env(CLUSTER, "app", None, &no_env)
            .unwrap()
            .with_clock(at(VECTOR_TIME, 750_000_000))
            .with_static_credentials("akid", "secret", None);
        let token = source.fetch().await.unwrap();
        assert_eq!(
            token.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(VECTOR_TIME + 900))
        );
        assert!(token.expose().contains("&X-Amz-Expires=900&"));

        let token = vector_source("app").fetch().await.unwrap();
        assert_eq!(
            token.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(VECTOR_TIME + 450))
        );
    }

    #[tokio::test]
    async fn a_token_expires_no_later_than_its_keys() {
        let keys_expiry = UNIX_EPOCH + Duration::from_secs(VECTOR_TIME + 400);
        let keys = Credentials::new("akid", "secret", None, Some(keys_expiry), "test");
        let source = vector_source("app").with_provider(SharedCredentialsProvider::new(keys));
        let token = source.fetch().await.unwrap();
        assert_eq!(token.expires_at(), Some(keys_expiry));
    }

    /// A credential provider that counts its calls and answers from a fixed result.
    #[derive(Debug)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        keys: Option<Credentials>,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            future::ProvideCredentials::ready(self.keys.clone().ok_or_else(|| {
                CredentialsError::not_loaded("no providers in chain provided credentials")
            }))
        }
    }

    fn counting(calls: &Arc<AtomicUsize>, keys: Option<Credentials>) -> SharedCredentialsProvider {
        SharedCredentialsProvider::new(Counting {
            calls: calls.clone(),
            keys,
        })
    }

    #[tokio::test]
    async fn missing_keys_give_a_readable_error() {
        let calls = Arc::new(AtomicUsize::new(0));
        let source = vector_source("app").with_provider(counting(&calls, None));
        let err = source.fetch().await.unwrap_err();
        assert_eq!(err.to_string(), "the dsql credential source failed");
        let cause = std::error::Error::source(&err).unwrap();
        assert_eq!(
            cause.to_string(),
            "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             configure a profile in ~/.aws, run with an IAM role, or call \
             Dsql::with_static_credentials"
        );
        assert!(std::error::Error::source(cause).is_some());
    }

    /// A provider that failed (the chain's last, instance metadata, on a machine with none)
    /// says what would give keys, as none found does: it said only that the provider failed.
    #[tokio::test]
    async fn a_failed_provider_says_what_would_give_keys() {
        #[derive(Debug)]
        struct Failing;
        impl ProvideCredentials for Failing {
            fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
            where
                Self: 'a,
            {
                future::ProvideCredentials::ready(Err(CredentialsError::provider_error(
                    "failed to load IMDS session token",
                )))
            }
        }
        let source = vector_source("app").with_provider(SharedCredentialsProvider::new(Failing));
        let err = source.fetch().await.unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("AWS_ACCESS_KEY_ID"), "{cause}");
        assert!(cause.contains("AWS_PROFILE"), "{cause}");
    }

    #[tokio::test]
    async fn keys_are_reused_until_shortly_before_they_expire() {
        let calls = Arc::new(AtomicUsize::new(0));
        let expiry = UNIX_EPOCH + Duration::from_secs(VECTOR_TIME + 3600);
        let keys = Credentials::new("akid", "secret", Some("s".into()), Some(expiry), "test");
        let source = |now: u64| {
            vector_source("app")
                .with_provider(counting(&calls, Some(keys.clone())))
                .with_clock(at(now, 0))
        };
        let early = source(VECTOR_TIME);
        early.fetch().await.unwrap();
        early.fetch().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Within five minutes of the keys' expiry, every fetch asks the provider again.
        let late = source(VECTOR_TIME + 3600 - 299);
        late.fetch().await.unwrap();
        late.fetch().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_region_comes_from_the_host() {
        let source = Dsql::with_env(CLUSTER, "app", None, &no_env).unwrap();
        assert_eq!(source.host(), CLUSTER);
        assert_eq!(source.region(), "us-east-1");
        assert_eq!(source.kind(), "dsql");
    }

    #[test]
    fn a_cluster_id_expands_with_the_region() {
        let id = "abcdefghijklmnopqrstuvwxyz";
        let source = Dsql::with_env(id, "admin", Some("eu-west-1"), &no_env).unwrap();
        assert_eq!(
            source.host(),
            "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws"
        );
        assert_eq!(source.region(), "eu-west-1");
        assert!(source.is_admin());
    }

    #[test]
    fn the_region_falls_back_to_the_environment() {
        let env = |name: &str| (name == "AWS_DEFAULT_REGION").then(|| "ap-south-1".to_owned());
        let id = "abcdefghijklmnopqrstuvwxyz";
        let source = Dsql::with_env(id, "app", None, &env).unwrap();
        assert_eq!(source.region(), "ap-south-1");
        assert_eq!(
            source.host(),
            "abcdefghijklmnopqrstuvwxyz.dsql.ap-south-1.on.aws"
        );

        // AWS_REGION wins over AWS_DEFAULT_REGION, and the host over both.
        let env = |name: &str| match name {
            "AWS_REGION" => Some("us-west-2".to_owned()),
            _ => Some("ap-south-1".to_owned()),
        };
        assert_eq!(
            Dsql::with_env(id, "app", None, &env).unwrap().region(),
            "us-west-2"
        );
        assert_eq!(
            Dsql::with_env(CLUSTER, "app", None, &env).unwrap().region(),
            "us-east-1"
        );
    }

    #[test]
    fn a_missing_region_is_a_config_error() {
        let err = Dsql::with_env("abcdefghijklmnopqrstuvwxyz", "app", None, &no_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting DSQL_REGION: no region: give the full endpoint \
             `{cluster-id}.dsql.{region}.on.aws` as host (DSQL_ENDPOINT), the region \
             (DSQL_REGION), or set AWS_REGION"
        );
        let err = Dsql::with_env("proxy.internal", "app", None, &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlRegion);
    }

    #[test]
    fn bad_endpoints_are_config_errors() {
        let err = Dsql::with_env(CLUSTER, "app", Some("eu-west-1"), &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlRegion);
        let err = Dsql::with_env(CLUSTER, "app", Some(""), &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlRegion);
        let err = Dsql::with_env(&format!("https://{CLUSTER}"), "app", None, &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlEndpoint);
        let err = Dsql::with_env("", "app", Some("us-east-1"), &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlEndpoint);
        // Two endpoints, or white space inside one: named as given, whether or not a region
        // is found (with one, the connector named PGHOST, which never applies to DSQL).
        let two = format!("{CLUSTER},abcdefghijklmnopqrstuvwxyz.dsql.us-east-2.on.aws");
        for (host, region) in [
            (two.as_str(), None),
            (two.as_str(), Some("us-east-1")),
            ("a\tb", Some("us-east-1")),
        ] {
            let err = Dsql::with_env(host, "app", region, &no_env).unwrap_err();
            assert_eq!(config_setting(err), Setting::DsqlEndpoint, "{host:?}");
        }
        let err = Dsql::with_env(CLUSTER, "", None, &no_env).unwrap_err();
        assert_eq!(config_setting(err), Setting::User);
    }

    #[test]
    fn expiry_is_checked_against_the_vendor_limits() {
        let source = || Dsql::with_env(CLUSTER, "app", None, &no_env).unwrap();
        for bad in [0, 604_801] {
            let err = source()
                .with_expires_in(Duration::from_secs(bad))
                .unwrap_err();
            assert_eq!(config_setting(err), Setting::DsqlTokenExpiresIn);
        }
        let err = source()
            .with_expires_in(Duration::from_millis(999))
            .unwrap_err();
        assert_eq!(config_setting(err), Setting::DsqlTokenExpiresIn);
        for good in [1, 900, 604_800] {
            let source = source().with_expires_in(Duration::from_secs(good)).unwrap();
            assert_eq!(source.expires_in, Duration::from_secs(good));
        }
    }

    #[test]
    fn debug_never_shows_keys() {
        let source = vector_source("admin").with_static_credentials(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI",
            Some("FwoGZXIvYXdzEXAMPLE".into()),
        );
        assert_eq!(
            format!("{source:?}"),
            "Dsql { host: \"peccy.dsql.us-east-1.on.aws\", region: \"us-east-1\", admin: true, \
             expires_in: 450s, credentials: \"** redacted **\", .. }"
        );
        let chain = Dsql::with_env(CLUSTER, "app", None, &no_env).unwrap();
        assert_eq!(
            format!("{chain:?}"),
            "Dsql { host: \"peccy.dsql.us-east-1.on.aws\", region: \"us-east-1\", admin: false, \
             expires_in: 900s, credentials: \"default chain\", .. }"
        );
    }
}
