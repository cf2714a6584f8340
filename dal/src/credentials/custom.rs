//! Any async closure returning a [`Token`] is a credential source, the
//! `() => Promise<string>` of the JavaScript drivers.

use std::future::Future;

use super::source::{BoxFuture, CredentialSource, Token};
use crate::error::{Error, Result};

impl<F, Fut, E> CredentialSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Token, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        let fut = self();
        Box::pin(async move {
            fut.await.map_err(|e| Error::Credential {
                source_kind: "custom",
                source: e.into(),
            })
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
