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

    /// A closure that never answers fails its attempt after a bound, and the cache tries
    /// again: it held the cache's one fetch at a time, so once the token expired every new
    /// connection waited for it (failing after the connect timeout) until the process
    /// restarted, however soon the service behind the closure came back.
    #[tokio::test(start_paused = true)]
    async fn a_closure_that_never_answers_gives_up_and_is_tried_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&calls);
        let source = move || {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(Token::new("second", None))
            }
        };
        let cache = crate::token_cache::TokenCache::new(
            std::sync::Arc::new(source),
            crate::TokenStrategy::Lazy,
            crate::CacheSettings::default(),
        );
        let token = tokio::time::timeout(std::time::Duration::from_secs(600), cache.token())
            .await
            .expect("a token within ten minutes")
            .unwrap();
        assert_eq!(token.expose(), "second");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

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
