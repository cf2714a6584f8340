//! Any async closure returning a [`Token`] is a credential source, the
//! `() => Promise<string>` of the JavaScript drivers.

use std::future::Future;
use std::time::Duration;

use super::source::{BoxFuture, CredentialSource, Token};
use crate::error::{Error, Result};

/// How long a closure may take to give a token: the cache fetches one token at a time, and
/// once the token expires every new connection waits for that fetch. A closure with no answer
/// by then fails the attempt, and the cache tries again within its
/// [`attempts`](crate::CacheSettings::attempts). The built-in sources bound their own
/// requests; a source that needs longer (an interactive login) implements
/// [`CredentialSource`] itself.
pub const CUSTOM_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A closure's fetch, bounded by [`CUSTOM_FETCH_TIMEOUT`].
impl<F, Fut, E> CredentialSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Token, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        let fut = self();
        Box::pin(async move {
            let failed = |source| Error::Credential {
                source_kind: "custom",
                source,
            };
            tokio::time::timeout(CUSTOM_FETCH_TIMEOUT, fut)
                .await
                .map_err(|_| {
                    failed(format!("no token within {}s", CUSTOM_FETCH_TIMEOUT.as_secs()).into())
                })?
                .map_err(|e| failed(e.into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closure_is_a_source() {
        let source = || async { Ok::<_, std::io::Error>(Token::new("t", None)) };
        assert_eq!(source.fetch().await.unwrap().expose(), "t");
        let failing = || async { Err::<Token, _>(std::io::Error::other("vault down")) };
        let err = failing.fetch().await.unwrap_err();
        assert_eq!(err.to_string(), "the custom credential source failed");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "vault down"
        );
    }
}
