//! What every source shares: the [`Token`] it produces, the [`CredentialSource`] trait, and
//! the [`Clock`] that tells tokens' expiry.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use crate::error::Result;
use crate::target::Target;

/// A boxed future, as returned by [`CredentialSource::fetch`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A database password and when it stops being accepted at login.
///
/// It has no `Display`, and its `Debug` shows only the expiry; [`Token::expose`] is the one way
/// to read the secret.
#[derive(Clone)]
pub struct Token {
    secret: SecretString,
    expires_at: Option<SystemTime>,
}

impl Token {
    /// A token that expires at `expires_at` (`None`: it never expires, like a static password).
    pub fn new(secret: impl Into<String>, expires_at: Option<SystemTime>) -> Self {
        Self {
            secret: SecretString::from(secret.into()),
            expires_at,
        }
    }

    /// The secret itself, to hand to the driver.
    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// When logins with this token start failing; `None` if never.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"** redacted **")
            .field("expires_at", &self.expires_at.map(Utc))
            .finish()
    }
}

/// A time shown as UTC, as chrono shows it; one past chrono's range (a custom source's
/// "never", say) as the standard library does, where chrono's conversion would panic.
struct Utc(SystemTime);

impl fmt::Debug for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since_epoch = self.0.duration_since(SystemTime::UNIX_EPOCH).ok();
        let utc = since_epoch.and_then(|d| {
            chrono::DateTime::from_timestamp(i64::try_from(d.as_secs()).ok()?, d.subsec_nanos())
        });
        match utc {
            Some(utc) => write!(f, "{utc:?}"),
            None => write!(f, "{:?}", self.0),
        }
    }
}

/// Something that produces database tokens.
///
/// Implemented by the built-in sources and, through a blanket impl, by any
/// `Fn() -> impl Future<Output = Result<Token, E>>` closure, the `() => Promise<string>` of
/// the JavaScript drivers:
///
/// ```
/// use dal::credentials::{CredentialSource, Token};
/// let source = || async { Ok::<_, std::io::Error>(Token::new("from-my-vault", None)) };
/// # fn takes(_: impl CredentialSource) {}
/// takes(source);
/// ```
pub trait CredentialSource: Send + Sync + 'static {
    /// Fetches a new token. Called by the cache, never more than once at a time, and waited
    /// for without a bound of its own: once the token expires every new connection waits for
    /// this fetch, so bound it (a closure's is bounded by
    /// [`CUSTOM_FETCH_TIMEOUT`](crate::credentials::CUSTOM_FETCH_TIMEOUT)). A panic in it
    /// fails that fetch with [`Error::Credential`](crate::Error::Credential), not retried
    /// at once and logged at error level; the cache's next fetch calls it again.
    fn fetch(&self) -> BoxFuture<'_, Result<Token>>;

    /// A short name for logs and metrics, such as `lakebase`.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// The kind of server whose tokens this source makes, when only one kind accepts them:
    /// [`Target::Lakebase`] for Lakebase credentials, [`Target::Dsql`] for DSQL tokens. The
    /// connector takes its target from here unless [`Config::target`](crate::Config::target)
    /// names it, and refuses a configuration where the two disagree. Defaults to `None`: any
    /// server (the host name then tells the target, see
    /// [`Config::resolved_target`](crate::Config::resolved_target)).
    fn target(&self) -> Option<Target> {
        None
    }

    /// The database host these credentials are for, when the source can look it up (a
    /// Lakebase endpoint or instance, from the workspace's API): the connector asks when its
    /// configuration has no host. Defaults to `None`.
    fn database_host(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }

    /// The database user these credentials log in as, when the source can look it up (the
    /// Databricks user a workspace token belongs to): the connector asks when its
    /// configuration has no user. Defaults to `None`.
    fn database_user(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
}

/// The time source of the cache and the token generators; replace it in tests.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let token = Token::new("hunter2", Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            format!("{token:?}"),
            "Token { secret: \"** redacted **\", expires_at: Some(1970-01-01T00:00:00Z) }"
        );
        // Past chrono's range: shown, not a panic.
        let far = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 60);
        let shown = format!("{:?}", Token::new("hunter2", Some(far)));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
