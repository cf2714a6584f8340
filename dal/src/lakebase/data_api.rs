//! A client of the Lakebase Data API: PostgREST-compatible HTTPS access to a database's
//! tables, authenticated with the database credentials of a [`TokenCache`], the same tokens
//! the pools log in with.
//!
//! The request syntax is PostgREST's (the Lakebase Data API documents itself as compatible
//! with the PostgREST specification): `GET /{table}?select=a,b&col=eq.v&order=a.desc&limit=n`,
//! `POST /{table}` with a JSON object or array, `PATCH` and `DELETE` with the same filters,
//! `Prefer: return=representation` to get the written rows back, and errors as
//! `{"code", "message", "details", "hint"}`.

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::{Method, Url};
use serde_json::Value;

use crate::credentials::lakebase::{
    build_client, endpoint_of, is_loopback, mask_secrets, parse_url, read_reply, sensitive_header,
};
use crate::error::{Error, Result, Setting};
use crate::token_cache::TokenCache;

/// A client of one database's Data API.
///
/// ```no_run
/// # async fn demo(connector: dal::Connector) -> dal::Result<()> {
/// use dal::lakebase::DataApi;
/// let api = DataApi::new(
///     "https://ep-cool-name-123456.database.us-east-1.cloud.databricks.com/api/2.0/workspace/1234/rest/databricks_postgres",
///     connector.cache().clone(),
/// )?;
/// let recent = api
///     .from("customers")
///     .select(&["id", "email"])
///     .eq("name", "Ada")
///     .order("created_at", false)
///     .limit(10)
///     .get()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DataApi {
    url: Url,
    cache: TokenCache,
    client: reqwest::Client,
    user_agent: String,
    timeout: std::time::Duration,
}

/// The largest answer read: a page of rows, not a table dump.
const MAX_ANSWER: usize = 64 << 20;

impl std::fmt::Debug for DataApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataApi")
            .field("url", &endpoint_of(&self.url))
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

impl DataApi {
    /// A client of the Data API at `url` (the database's REST URL, tables below it: the
    /// address the Lakebase UI shows on the Data API page of the project once it is enabled),
    /// sending the tokens of `cache` (such as [`Connector::cache`](crate::Connector::cache)) as
    /// bearer tokens. Requests time out after 30 s ([`with_timeout`](Self::with_timeout)).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::DataApiUrl`] when `url` is not `https` (`http` on
    /// loopback only) or carries a query.
    pub fn new(url: &str, cache: TokenCache) -> Result<Self> {
        let mut url = parse_url(url, Setting::DataApiUrl)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Error::config(
                Setting::DataApiUrl,
                "must be the database's REST URL, without a query",
            ));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Self {
            client: build_client(is_loopback(&url))?,
            url,
            cache,
            user_agent: concat!("dal/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: std::time::Duration::from_secs(30),
        })
    }

    /// The longest a request may take, from connecting to the last byte of the answer.
    /// Defaults to 30 s.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Names the product in the `User-Agent` of every request, as
    /// [`Lakebase::with_product`](crate::credentials::Lakebase::with_product) does.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for [`Setting::Product`] when `product` is not
    /// `<isv-name_product-name>/<product-version>`.
    pub fn with_product(mut self, product: &str) -> Result<Self> {
        crate::telemetry::check_product(product)?;
        self.user_agent = format!("{product} {}", concat!("dal/", env!("CARGO_PKG_VERSION")));
        Ok(self)
    }

    /// A request on `table`. Sending it fails with [`Error::Config`] for
    /// [`Setting::DataApiUrl`] when `table` is empty, `.` or `..`.
    pub fn from(&self, table: &str) -> DataQuery<'_> {
        DataQuery {
            api: self,
            table: table.to_owned(),
            params: Vec::new(),
        }
    }

    async fn send(
        &self,
        method: Method,
        table: &str,
        params: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Vec<Value>> {
        // Resolved away by the URL's path (to the Data API's own URL, or the one above it),
        // and the token would go there.
        if matches!(table, "" | "." | "..") {
            return Err(Error::config(
                Setting::DataApiUrl,
                format!("{table:?} names no table: give the table's name, such as \"customers\""),
            ));
        }
        let mut url = self
            .url
            .join(
                &percent_encoding::utf8_percent_encode(table, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            )
            .map_err(|e| {
                Error::config(
                    Setting::DataApiUrl,
                    format!("cannot name table {table:?}: {e}"),
                )
            })?;
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        let shown = endpoint_of(&url);
        // One more try with a new token when the service refuses the one sent (revoked, or
        // expired on the way).
        for attempt in 0..2 {
            let token = self.cache.token().await?;
            let bearer =
                sensitive_header(&format!("Bearer {}", token.expose())).ok_or_else(|| {
                    Error::config(Setting::DataApiUrl, "the token is not a valid header value")
                })?;
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, bearer)
                .header(ACCEPT, "application/json")
                .header(USER_AGENT, &self.user_agent);
            if let Some(body) = body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .header("Prefer", "return=representation")
                    .body(body.to_string());
            } else if method != Method::GET {
                request = request.header("Prefer", "return=representation");
            }
            let reply = read_reply(&shown, request, self.timeout, MAX_ANSWER).await?;
            let (status, bytes, retry_after) = (reply.status, reply.body, reply.retry_after);
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                self.cache.invalidate(&token);
                continue;
            }
            if status != reqwest::StatusCode::UNAUTHORIZED {
                self.cache.accepted();
            }
            let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if !status.is_success() {
                // Flattened, bounded and without the token: an HTML error page is no
                // message, and a service may echo what it was sent.
                let text = |k: &str, most: usize| {
                    json.get(k).and_then(Value::as_str).map(|v| {
                        mask_secrets(v, &[token.expose()])
                            .chars()
                            .map(|c| if c.is_control() { ' ' } else { c })
                            .take(most)
                            .collect::<String>()
                    })
                };
                let reason = status.canonical_reason().unwrap_or("unknown").to_owned();
                return Err(Error::Http {
                    endpoint: shown,
                    status: status.as_u16(),
                    code: text("code", 40).unwrap_or(reason),
                    message: text("message", 300).unwrap_or_default(),
                    retry_after,
                });
            }
            return Ok(match json {
                Value::Array(rows) => rows,
                Value::Null => Vec::new(),
                row => vec![row],
            });
        }
        unreachable!("the loop returns on its second pass")
    }
}

/// One request on a table, built in PostgREST's terms; run it with [`get`](Self::get),
/// [`insert`](Self::insert), [`update`](Self::update) or [`delete`](Self::delete).
#[derive(Debug, Clone)]
#[must_use = "a query does nothing until it is run"]
pub struct DataQuery<'a> {
    api: &'a DataApi,
    table: String,
    params: Vec<(String, String)>,
}

impl DataQuery<'_> {
    /// The columns to answer (`select=`); all by default.
    pub fn select(mut self, columns: &[&str]) -> Self {
        self.params.push(("select".into(), columns.join(",")));
        self
    }

    /// `column` compared with `value` by a PostgREST operator: `eq`, `neq`, `gt`, `gte`,
    /// `lt`, `lte`, `like`, `ilike` (`*` as wildcard), `is` (`null`, `true`, `false`) or `in`
    /// (`(a,b)`).
    pub fn filter(mut self, column: &str, operator: &str, value: &str) -> Self {
        self.params
            .push((column.to_owned(), format!("{operator}.{value}")));
        self
    }

    /// `column = value`.
    pub fn eq(self, column: &str, value: &str) -> Self {
        self.filter(column, "eq", value)
    }

    /// Sorted by `column`, ascending or descending; calls add further keys.
    pub fn order(mut self, column: &str, ascending: bool) -> Self {
        let term = format!("{column}.{}", if ascending { "asc" } else { "desc" });
        match self.params.iter_mut().find(|(k, _)| k == "order") {
            Some((_, order)) => {
                order.push(',');
                order.push_str(&term);
            }
            None => self.params.push(("order".into(), term)),
        }
        self
    }

    /// At most `n` rows.
    pub fn limit(mut self, n: u64) -> Self {
        self.params.push(("limit".into(), n.to_string()));
        self
    }

    /// Skips the first `n` rows.
    pub fn offset(mut self, n: u64) -> Self {
        self.params.push(("offset".into(), n.to_string()));
        self
    }

    /// The rows that match.
    ///
    /// # Errors
    ///
    /// [`Error::Http`] with the SQLSTATE or PostgREST code of a refused request (`42P01` for
    /// an unknown table, `42703` for an unknown column, `42501` when the role may not);
    /// [`Error::HttpTransport`] when the service cannot be reached; the token cache's errors.
    pub async fn get(self) -> Result<Vec<Value>> {
        self.api
            .send(Method::GET, &self.table, &self.params, None)
            .await
    }

    /// Inserts `rows` (an object or an array of objects); returns them as stored.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get); `23505` for a duplicate key.
    pub async fn insert(self, rows: &Value) -> Result<Vec<Value>> {
        self.api
            .send(Method::POST, &self.table, &self.params, Some(rows))
            .await
    }

    /// Sets the fields of `patch` on the rows that match; returns them as stored.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub async fn update(self, patch: &Value) -> Result<Vec<Value>> {
        self.api
            .send(Method::PATCH, &self.table, &self.params, Some(patch))
            .await
    }

    /// Deletes the rows that match; returns them.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    pub async fn delete(self) -> Result<Vec<Value>> {
        self.api
            .send(Method::DELETE, &self.table, &self.params, None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `GET {base}/notes` with `token` as the bearer.
    async fn get_notes(base: &str, token: &'static str) -> Result<Vec<Value>> {
        let source = move || async move {
            Ok::<_, std::io::Error>(crate::credentials::Token::new(token, None))
        };
        let cache = crate::TokenCache::new(
            std::sync::Arc::new(source),
            crate::TokenStrategy::Lazy,
            crate::CacheSettings::default(),
        );
        DataApi::new(base, cache).unwrap().from("notes").get().await
    }

    /// A service that echoes the bearer token in its error's code and message: the error dal
    /// returns carries neither (its `Display` and `Debug` reach logs).
    #[tokio::test]
    async fn a_data_api_error_that_echoes_the_token_does_not_carry_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/rest", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
            let token = headers["authorization"].to_str().unwrap()["Bearer ".len()..].to_owned();
            // The whole token, its start cut short, and its middle part alone (a JWT's claims).
            let claims = token.split('.').nth(1).unwrap().to_owned();
            let body = json!({
                "code": token[..24].to_owned(),
                "message": format!("refused {token}, claims {claims} (sent {}...)", &token[..30]),
            });
            (axum::http::StatusCode::BAD_REQUEST, axum::Json(body))
        });
        let _server = tokio::spawn(async move { axum::serve(listener, app).await });
        const JWT: &str =
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyIsImV4cCI6OTl9.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let err = get_notes(&base, JWT).await.unwrap_err();
        let shown = format!("{err} / {err:?}");
        assert!(shown.contains("refused"), "{shown}");
        assert!(
            shown.contains("claims ** redacted ** (sent ** redacted **...)"),
            "{shown}"
        );
        for part in JWT.as_bytes().windows(12) {
            let part = std::str::from_utf8(part).unwrap();
            assert!(!shown.contains(part), "{part} of the token leaked: {shown}");
        }
    }

    /// A service that asks for a pause (HTTP 429 or 503 with `Retry-After`) says how long in
    /// the error, as the credential sources' errors do.
    #[tokio::test]
    async fn a_data_api_busy_answer_keeps_its_retry_after() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/rest", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                [(axum::http::header::RETRY_AFTER, "5")],
                axum::Json(json!({ "code": "RATE_LIMITED", "message": "slow down" })),
            )
        });
        let _server = tokio::spawn(async move { axum::serve(listener, app).await });
        let err = get_notes(&base, "t").await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(
            err.retry_after(),
            Some(std::time::Duration::from_secs(5)),
            "{err:?}"
        );
    }
}
