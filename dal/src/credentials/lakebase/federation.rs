//! Workload identity federation: an OIDC ID token from the environment, a file or GitHub
//! Actions, traded for a workspace token at the workspace's token endpoint (RFC 8693 token
//! exchange), as the Databricks SDKs' `env-oidc`, `file-oidc` and `github-oidc` do it.

use std::fmt;
use std::path::PathBuf;

use reqwest::header::{ACCEPT, AUTHORIZATION};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{KIND, Lakebase, parse_json, parse_url, sensitive_header};
use crate::error::{Error, Result, Setting};

/// The grant of an RFC 8693 token exchange.
pub(super) const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The type of the token traded: a JWT, as every OIDC ID token is.
pub(super) const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// Where the OIDC ID token of workload identity federation comes from. A new one is read
/// each time the workspace token is renewed, so that rotated ID tokens are picked up.
#[derive(Clone)]
#[non_exhaustive]
pub enum IdTokenSource {
    /// The environment variable of this name (`DATABRICKS_OIDC_TOKEN`, or the one
    /// `DATABRICKS_OIDC_TOKEN_ENV` names): Databricks' `env-oidc`.
    Env(String),
    /// This file, read whole (at most 16 MiB) and trimmed (`DATABRICKS_OIDC_TOKEN_FILEPATH`):
    /// `file-oidc`, such as a Kubernetes projected service account token.
    File(PathBuf),
    /// The GitHub Actions ID token service: `GET <ACTIONS_ID_TOKEN_REQUEST_URL>&audience=<aud>`
    /// with `Authorization: Bearer <ACTIONS_ID_TOKEN_REQUEST_TOKEN>`, answering
    /// `{"value": "<jwt>"}`: `github-oidc`.
    GitHubActions {
        /// `ACTIONS_ID_TOKEN_REQUEST_URL`.
        request_url: String,
        /// `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
        request_token: SecretString,
    },
}

/// Why a name given for the variable that holds the ID token is refused; the name is not
/// shown: in its place may be the ID token itself.
pub(crate) const NOT_A_VARIABLE_NAME: &str = "DATABRICKS_OIDC_TOKEN_ENV must name the \
    environment variable that holds the ID token (letters, digits and '_', not starting with a \
    digit); what it holds is not shown, as it may be the token itself";

/// Whether `name` has the shape of an environment variable's name, as shells write them.
pub(crate) fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255
}

impl IdTokenSource {
    /// Databricks' `auth_type` of federation with this source.
    pub(super) fn auth_type(&self) -> &'static str {
        match self {
            IdTokenSource::Env(_) => "env-oidc",
            IdTokenSource::File(_) => "file-oidc",
            IdTokenSource::GitHubActions { .. } => "github-oidc",
        }
    }

    /// Checks what can be checked before the first call.
    pub(super) fn validate(&self) -> Result<()> {
        match self {
            IdTokenSource::Env(name) if !is_variable_name(name) => Err(Error::config(
                Setting::DatabricksOidcToken,
                NOT_A_VARIABLE_NAME,
            )),
            IdTokenSource::File(path) if path.as_os_str().is_empty() => Err(Error::config(
                Setting::DatabricksOidcTokenFilepath,
                "must not be empty",
            )),
            // There at the start, as the SDKs check; read again at each renewal.
            IdTokenSource::File(path) => match std::fs::metadata(path) {
                Ok(m) if m.is_file() => Ok(()),
                Ok(_) => Err(Error::config(
                    Setting::DatabricksOidcTokenFilepath,
                    format!("{} is not a file", path.display()),
                )),
                Err(e) => Err(Error::config(
                    Setting::DatabricksOidcTokenFilepath,
                    format!("cannot read {}: {e}", path.display()),
                )),
            },
            IdTokenSource::GitHubActions {
                request_url,
                request_token,
            } => {
                parse_url(request_url, Setting::ActionsIdTokenRequestUrl)?;
                if request_token.expose_secret().is_empty() {
                    return Err(Error::config(
                        Setting::ActionsIdTokenRequestToken,
                        "must not be empty",
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for IdTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdTokenSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            IdTokenSource::File(path) => f.debug_tuple("File").field(path).finish(),
            IdTokenSource::GitHubActions { request_url, .. } => f
                .debug_struct("GitHubActions")
                // The URL carries the run's identity in its query; the path says enough.
                .field(
                    "request_url",
                    &reqwest::Url::parse(request_url)
                        .map(|u| super::endpoint_of(&u))
                        .unwrap_or_default(),
                )
                .field("request_token", &super::REDACTED)
                .finish(),
        }
    }
}

impl Lakebase {
    /// A new ID token for `audience` from `source`.
    pub(super) async fn id_token(
        &self,
        source: &IdTokenSource,
        audience: &str,
    ) -> Result<SecretString> {
        let token = match source {
            IdTokenSource::Env(name) => std::env::var(name).map_err(|_| {
                Error::config(
                    Setting::DatabricksOidcToken,
                    format!("{name} is not set (or not Unicode): it must hold the OIDC ID token"),
                )
            })?,
            IdTokenSource::File(path) => {
                let file = path.clone();
                tokio::task::spawn_blocking(move || crate::setting_file::read_to_string(&file))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .map_err(|e| {
                        Error::config(
                            Setting::DatabricksOidcTokenFilepath,
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
            }
            IdTokenSource::GitHubActions {
                request_url,
                request_token,
            } => {
                let mut url = parse_url(request_url, Setting::ActionsIdTokenRequestUrl)?;
                url.query_pairs_mut().append_pair("audience", audience);
                let shown = super::endpoint_of(&url);
                let header = sensitive_header(&format!("Bearer {}", request_token.expose_secret()))
                    .ok_or_else(|| {
                        Error::config(
                            Setting::ActionsIdTokenRequestToken,
                            super::PAT_HEADER_REASON,
                        )
                    })?;
                let request = self
                    .client
                    .get(url)
                    .header(AUTHORIZATION, header)
                    .header(ACCEPT, "application/json");
                let reply = self.send(&shown, request).await?;
                if !reply.status.is_success() {
                    return Err(self.http_error(&shown, &reply, Some(request_token)));
                }
                parse_json(&shown, &reply.body)?
                    .get("value")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| super::malformed(&shown, "the answer has no value"))?
            }
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(match source {
                IdTokenSource::Env(name) => {
                    Error::config(Setting::DatabricksOidcToken, format!("{name} is empty"))
                }
                IdTokenSource::File(path) => Error::config(
                    Setting::DatabricksOidcTokenFilepath,
                    format!("{} is empty", path.display()),
                ),
                IdTokenSource::GitHubActions { .. } => Error::Credential {
                    source_kind: KIND,
                    source: "the GitHub Actions ID token service answered an empty token".into(),
                },
            });
        }
        Ok(SecretString::from(token.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ID token file larger than any (swapped for another file after the start) is
    /// refused as `DATABRICKS_OIDC_TOKEN_FILEPATH`'s, and read no further than the bound.
    #[tokio::test]
    async fn an_id_token_file_larger_than_any_is_refused() {
        let file = crate::setting_file::tests::SparseFile::too_large();
        let source = IdTokenSource::File(file.0.clone());
        let lakebase = Lakebase::new(
            "https://ws.example",
            super::super::WorkspaceAuth::Federated {
                client_id: Some("sp".into()),
                id_token: source.clone(),
            },
            super::super::LakebaseTarget::Provisioned {
                instance: "inst".into(),
            },
        )
        .unwrap();
        match lakebase.id_token(&source, "aud").await {
            Err(Error::Config { setting, reason }) => {
                assert_eq!(setting, Setting::DatabricksOidcTokenFilepath);
                assert!(reason.contains("more than 16 MiB"), "{reason}");
            }
            other => panic!("expected the file refused, got {:?}", other.map(drop)),
        }
    }

    #[test]
    fn debug_shows_neither_the_request_token_nor_the_query() {
        let source = IdTokenSource::GitHubActions {
            request_url: "https://pipelines.example/idtoken?run=secret-run".into(),
            request_token: SecretString::from("gh-request-token"),
        };
        let shown = format!("{source:?}");
        assert!(
            shown.contains("https://pipelines.example/idtoken"),
            "{shown}"
        );
        assert!(
            !shown.contains("gh-request-token") && !shown.contains("secret-run"),
            "{shown}"
        );
    }
}
