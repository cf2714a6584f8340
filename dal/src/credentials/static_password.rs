//! A fixed password.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use super::source::{BoxFuture, CredentialSource, Token};
use crate::error::Result;

/// A fixed password, for PostgreSQL roles with a password of their own.
pub struct StaticPassword(SecretString);

impl StaticPassword {
    /// A source that always returns `password`.
    pub fn new(password: impl Into<String>) -> Self {
        Self(SecretString::from(password.into()))
    }
}

impl fmt::Debug for StaticPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticPassword(** redacted **)")
    }
}

impl CredentialSource for StaticPassword {
    fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
        let token = Token::new(self.0.expose_secret(), None);
        Box::pin(async move { Ok(token) })
    }

    fn kind(&self) -> &'static str {
        "static"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        assert_eq!(
            format!("{:?}", StaticPassword::new("hunter2")),
            "StaticPassword(** redacted **)"
        );
    }
}
