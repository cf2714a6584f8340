//! A client of Lakebase Autoscaling's Management API (`/api/2.0/postgres/*`: projects,
//! branches, endpoints and their long-running operations), authenticated as the credential
//! source is, and a branch per test on top of it.
//!
//! Paths, query parameters and shapes are those of the Databricks REST API reference for the
//! `postgres` service (as the Databricks SDKs call it): `POST {parent}/branches?branch_id=`
//! with `{"spec": {"source_branch": ...}}`, `POST {branch}/endpoints?endpoint_id=` with
//! `{"spec": {"endpoint_type": ...}}`, `DELETE {name}`, each answering an operation
//! (`{"name", "done", "response" | "error"}`) read back with `GET {operation name}`.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{Value, json};

use crate::config::{Config, Credentials};
use crate::credentials::lakebase::{
    Lakebase, LakebaseTarget, WORKSPACE_ID_HEADER, endpoint_of, malformed, parse_json, parse_url,
    resource_path,
};
use crate::error::{Error, ErrorChain, Result, Setting};

/// Lists are read a page at a time, following `next_page_token`, up to this many pages.
const MAX_PAGES: usize = 100;
/// The longest pause between two reads of a running operation.
const MAX_POLL: Duration = Duration::from_secs(2);

/// A Lakebase Autoscaling branch: `projects/{project}/branches/{branch}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Branch {
    /// Its resource name.
    pub name: String,
    /// `status.current_state`: `INIT`, `READY`, `ARCHIVED`, ...
    pub state: Option<String>,
    /// Whether it is the project's default branch.
    pub default: bool,
    /// The branch it was created from, if any.
    pub source_branch: Option<String>,
}

/// A compute endpoint of a branch: `projects/{p}/branches/{b}/endpoints/{e}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// Its resource name: what [`LakebaseTarget::Autoscaling`] takes.
    pub name: String,
    /// `status.hosts.host`: the host to connect to.
    pub host: Option<String>,
    /// Whether it is the branch's read-write endpoint (else a read-only one).
    pub read_write: bool,
    /// `status.current_state`: `ACTIVE`, `IDLE`, `INIT`, ...
    pub state: Option<String>,
}

/// A long-running operation, as the create and delete calls answer it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Operation {
    /// Its resource name, `.../operations/{id}`.
    pub name: String,
    /// Whether it has finished.
    pub done: bool,
    /// What it answered when done: the created resource, or an empty object.
    pub response: Option<Value>,
    /// Why it failed: `(error_code, message)`.
    pub error: Option<(String, String)>,
}

/// A client of the Lakebase Autoscaling Management API of the credential source's workspace,
/// with its workspace token and `User-Agent`.
///
/// ```no_run
/// # async fn demo(source: dal::credentials::Lakebase) -> dal::Result<()> {
/// use dal::lakebase::Management;
/// let api = Management::new(source);
/// for branch in api.list_branches("projects/shop").await? {
///     println!("{} {:?}", branch.name, branch.state);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Management {
    lakebase: Arc<Lakebase>,
}

impl Management {
    /// A client authenticated as `lakebase` is.
    pub fn new(lakebase: Lakebase) -> Self {
        Self {
            lakebase: Arc::new(lakebase),
        }
    }

    /// The projects' resource names, `projects/{project}`.
    ///
    /// # Errors
    ///
    /// [`Error::Http`] for an answer other than 2xx; [`Error::HttpTransport`] when the API
    /// cannot be reached or answers something else than the documented shape.
    pub async fn list_projects(&self) -> Result<Vec<String>> {
        let items = self.list("projects", "projects").await?;
        Ok(items.iter().filter_map(|p| text(p, "/name")).collect())
    }

    /// The branches of `project` (`projects/{project}`).
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects).
    pub async fn list_branches(&self, project: &str) -> Result<Vec<Branch>> {
        let items = self
            .list(&format!("{}/branches", check(project, 2)?), "branches")
            .await?;
        Ok(items.iter().map(branch).collect())
    }

    /// One branch, by resource name.
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects); [`Error::Http`] 404 when it does not exist.
    pub async fn get_branch(&self, name: &str) -> Result<Branch> {
        let value = self.call(Method::GET, check(name, 4)?, &[], None).await?;
        Ok(branch(&value))
    }

    /// Starts creating branch `branch_id` of `project` from `source_branch` (the project's
    /// default branch when `None`); [`wait`](Self::wait) for it to be ready.
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects).
    pub async fn create_branch(
        &self,
        project: &str,
        branch_id: &str,
        source_branch: Option<&str>,
    ) -> Result<Operation> {
        let mut spec = json!({});
        if let Some(source) = source_branch {
            spec["source_branch"] = check(source, 4)?.into();
        }
        let path = format!("{}/branches", check(project, 2)?);
        let value = self
            .call(
                Method::POST,
                &path,
                &[("branch_id", branch_id)],
                Some(json!({ "spec": spec })),
            )
            .await?;
        operation(&path, &value)
    }

    /// Starts deleting a branch (and its endpoints).
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects).
    pub async fn delete_branch(&self, name: &str) -> Result<Operation> {
        let value = self
            .call(Method::DELETE, check(name, 4)?, &[], None)
            .await?;
        operation(name, &value)
    }

    /// The endpoints of `branch`.
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects).
    pub async fn list_endpoints(&self, branch: &str) -> Result<Vec<Endpoint>> {
        let items = self
            .list(&format!("{}/endpoints", check(branch, 4)?), "endpoints")
            .await?;
        Ok(items.iter().map(endpoint).collect())
    }

    /// One endpoint, by resource name.
    ///
    /// # Errors
    ///
    /// As [`get_branch`](Self::get_branch).
    pub async fn get_endpoint(&self, name: &str) -> Result<Endpoint> {
        let value = self.call(Method::GET, check(name, 6)?, &[], None).await?;
        Ok(endpoint(&value))
    }

    /// Starts creating endpoint `endpoint_id` of `branch`: the read-write one (a branch has at
    /// most one) or a read-only one.
    ///
    /// # Errors
    ///
    /// As [`list_projects`](Self::list_projects).
    pub async fn create_endpoint(
        &self,
        branch: &str,
        endpoint_id: &str,
        read_write: bool,
    ) -> Result<Operation> {
        let kind = if read_write {
            "ENDPOINT_TYPE_READ_WRITE"
        } else {
            "ENDPOINT_TYPE_READ_ONLY"
        };
        let path = format!("{}/endpoints", check(branch, 4)?);
        let value = self
            .call(
                Method::POST,
                &path,
                &[("endpoint_id", endpoint_id)],
                Some(json!({ "spec": { "endpoint_type": kind } })),
            )
            .await?;
        operation(&path, &value)
    }

    /// Reads `operation` until it is done, pausing longer each time (up to 2 s), for at most
    /// `timeout`; returns its response.
    ///
    /// # Errors
    ///
    /// [`Error::HttpTransport`] naming the operation when it failed (with the service's code
    /// and message) or is still running after `timeout`; the errors of the read itself.
    pub async fn wait(&self, operation: Operation, timeout: Duration) -> Result<Value> {
        // A timeout past the clock's range is none.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut pause = Duration::from_millis(50);
        let mut current = operation;
        loop {
            if current.done {
                return match current.error {
                    None => Ok(current.response.unwrap_or(Value::Null)),
                    Some((code, message)) => Err(self.failed(
                        &current.name,
                        format!("the operation failed: {code}: {message}"),
                    )),
                };
            }
            if deadline.is_some_and(|deadline| tokio::time::Instant::now() + pause > deadline) {
                return Err(self.failed(
                    &current.name,
                    format!("the operation is still running after {timeout:?}"),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
            let value = self
                .call(Method::GET, check(&current.name, 0)?, &[], None)
                .await?;
            current = self::operation(&current.name, &value)?;
        }
    }

    fn failed(&self, name: &str, what: String) -> Error {
        Error::HttpTransport {
            endpoint: format!("{}/api/2.0/postgres/{name}", self.lakebase.host),
            what,
            source: None,
        }
    }

    /// Every item under `key` of a list, page after page.
    async fn list(&self, path: &str, key: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let query: Vec<(&str, &str)> = token
                .as_deref()
                .map(|t| vec![("page_token", t)])
                .unwrap_or_default();
            let page = self.call(Method::GET, path, &query, None).await?;
            if let Some(list) = page.get(key).and_then(Value::as_array) {
                items.extend(list.iter().cloned());
            }
            token = text(&page, "/next_page_token").filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        Ok(items)
    }

    /// One authorized call of `/api/2.0/postgres/{path}`; the JSON answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value> {
        let lakebase = &self.lakebase;
        let mut url = parse_url(
            &format!("{}/api/2.0/postgres/{}", lakebase.host, resource_path(path)),
            Setting::DatabricksHost,
        )?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let shown = endpoint_of(&url);
        let auth = lakebase.authorization().await?;
        let mut request = lakebase
            .client
            .request(method, url)
            .header(AUTHORIZATION, auth.header)
            .header(ACCEPT, "application/json");
        if let Some(id) = &auth.workspace_id {
            request = request.header(WORKSPACE_ID_HEADER, id);
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let reply = lakebase.send(&shown, request).await?;
        if !reply.status.is_success() {
            return Err(lakebase.http_error(&shown, &reply, auth.access_token.as_ref()));
        }
        parse_json(&shown, &reply.body)
    }
}

/// Checks that `name` is a resource name of `segments` non-empty segments (any number for 0).
fn check(name: &str, segments: usize) -> Result<&str> {
    let parts: Vec<&str> = name.split('/').collect();
    let well_formed = parts
        .iter()
        .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && (segments == 0 || parts.len() == segments);
    if well_formed {
        Ok(name)
    } else {
        Err(Error::config(
            Setting::LakebaseEndpoint,
            format!("{name:?} is not a resource name such as projects/<project>/branches/<branch>"),
        ))
    }
}

fn text(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn branch(value: &Value) -> Branch {
    Branch {
        name: text(value, "/name").unwrap_or_default(),
        state: text(value, "/status/current_state"),
        default: value
            .pointer("/status/default")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        source_branch: text(value, "/status/source_branch")
            .or_else(|| text(value, "/spec/source_branch")),
    }
}

fn endpoint(value: &Value) -> Endpoint {
    let kind = text(value, "/status/endpoint_type").or_else(|| text(value, "/spec/endpoint_type"));
    Endpoint {
        name: text(value, "/name").unwrap_or_default(),
        host: text(value, "/status/hosts/host"),
        read_write: kind.as_deref() != Some("ENDPOINT_TYPE_READ_ONLY"),
        state: text(value, "/status/current_state"),
    }
}

fn operation(path: &str, value: &Value) -> Result<Operation> {
    let name =
        text(value, "/name").ok_or_else(|| malformed(path, "the answer is not an operation"))?;
    let error = value.get("error").filter(|e| !e.is_null()).map(|e| {
        (
            text(e, "/error_code").unwrap_or_else(|| "UNKNOWN".into()),
            text(e, "/message").unwrap_or_default(),
        )
    });
    Ok(Operation {
        name,
        done: value.get("done").and_then(Value::as_bool).unwrap_or(false),
        response: value.get("response").cloned(),
        error,
    })
}

/// A branch (with a read-write endpoint) that lives as long as a test: created from a source
/// branch, ready when [`create`](Self::create) returns, deleted by [`delete`](Self::delete).
///
/// Dropped without `delete`, or with its creation or deletion dropped half way (a timeout
/// around it, a test that panicked), it deletes the branch on a thread of its own, which
/// outlives the runtime but not the process, and logs a warning: call `delete` to know it
/// happened. A test binary whose last test leaves its branch so may end before the deletion
/// is sent (the test harness exits once the tests are done): delete the branches a run left
/// by their name, `test-<12 hex digits>` ([`Management::list_branches`],
/// [`Management::delete_branch`]).
///
/// ```no_run
/// # async fn demo(source: dal::credentials::Lakebase, base: dal::Config) -> dal::Result<()> {
/// use dal::lakebase::{Management, TemporaryBranch};
/// let api = Management::new(source);
/// let branch = TemporaryBranch::create(&api, "projects/shop", None).await?;
/// let connector = dal::Connector::new(branch.config(&base)?).await?;
/// // ... migrate and test against the branch's copy of the data ...
/// connector.shutdown().await;
/// branch.delete().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TemporaryBranch {
    owned: Owned,
    endpoint: Endpoint,
}

/// A branch this process asked for, deleted when dropped unless its deletion is under way.
#[derive(Debug)]
struct Owned {
    api: Management,
    branch: String,
    /// The service took the deletion (or never created the branch).
    deleted: bool,
}

/// How long creating or deleting a branch may take.
const BRANCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Deletes `branch`, trying again for up to [`BRANCH_TIMEOUT`] while the service cannot take
/// the deletion yet (a branch still being created, say) or cannot be reached; gone already
/// (HTTP 404) is done.
async fn delete_in_time(api: &Management, branch: &str) {
    let deadline = tokio::time::Instant::now() + BRANCH_TIMEOUT;
    let mut pause = Duration::from_secs(1);
    loop {
        let failed = match api.delete_branch(branch).await {
            Ok(op) => match api.wait(op, BRANCH_TIMEOUT).await {
                Ok(_) => return,
                Err(e) => e,
            },
            Err(Error::Http { status: 404, .. }) => return,
            Err(e) => e,
        };
        if tokio::time::Instant::now() + pause > deadline {
            tracing::warn!(%branch, error = %ErrorChain(&failed), "a temporary branch could not be deleted; delete it by hand");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

impl TemporaryBranch {
    /// Creates `test-<random>` in `project` from `source_branch` (the default branch when
    /// `None`) with a read-write endpoint `primary`, and waits until both are ready (up to
    /// 5 minutes each). A branch that does not get ready, or whose endpoint cannot be
    /// created, is deleted again.
    ///
    /// # Errors
    ///
    /// Those of [`Management::create_branch`], [`Management::create_endpoint`] and
    /// [`Management::wait`].
    pub async fn create(
        api: &Management,
        project: &str,
        source_branch: Option<&str>,
    ) -> Result<Self> {
        // What fails before the request is sent fails here, with no branch to delete.
        check(project, 2)?;
        source_branch.map(|source| check(source, 4)).transpose()?;
        api.lakebase.authorization().await?;
        let id = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let branch = format!("{project}/branches/{id}");
        // From before the request: one that fails on the way back, or is dropped, may have
        // created the branch.
        let mut owned = Owned {
            api: api.clone(),
            branch: branch.clone(),
            deleted: false,
        };
        let created = match api.create_branch(project, &id, source_branch).await {
            Ok(created) => created,
            Err(e) => {
                // A request lost on the way may have created it, and so may one answered with
                // a server error (a gateway that gave up waiting answers 504 for a request
                // the service went on to carry out); any other answer says it did not.
                owned.deleted = !matches!(
                    e,
                    Error::HttpTransport { .. } | Error::Http { status: 500.., .. }
                );
                return Err(e);
            }
        };
        let endpoint = async {
            api.wait(created, BRANCH_TIMEOUT).await?;
            let created = api.create_endpoint(&branch, "primary", true).await?;
            api.wait(created, BRANCH_TIMEOUT).await?;
            api.get_endpoint(&format!("{branch}/endpoints/primary"))
                .await
        }
        .await;
        match endpoint {
            Ok(endpoint) => Ok(Self { owned, endpoint }),
            Err(e) => {
                // Whatever the deletion's outcome, the error to report is the creation's.
                let _ = owned.delete().await;
                Err(e)
            }
        }
    }

    /// The branch's resource name.
    pub fn branch(&self) -> &str {
        &self.owned.branch
    }

    /// Its read-write endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `base` pointed at this branch: the endpoint's host, and credentials for the endpoint
    /// from the same workspace authentication. The database, user and every other setting
    /// stay: a branch has the same databases and roles as its source.
    ///
    /// # Errors
    ///
    /// [`Error::HttpTransport`] when the endpoint has no host yet.
    pub fn config(&self, base: &Config) -> Result<Config> {
        let api = &self.owned.api;
        let host =
            self.endpoint.host.clone().ok_or_else(|| {
                api.failed(&self.endpoint.name, "the endpoint has no host".into())
            })?;
        let source = api.lakebase.for_target(LakebaseTarget::Autoscaling {
            endpoint: self.endpoint.name.clone(),
        })?;
        let mut config = base.clone();
        config.host = host;
        config.hostaddr = None;
        config.credentials = Some(Credentials::source(source));
        Ok(config)
    }

    /// Deletes the branch and its endpoint, and waits until it is gone.
    ///
    /// # Errors
    ///
    /// Those of [`Management::delete_branch`] and [`Management::wait`].
    pub async fn delete(mut self) -> Result<()> {
        self.owned.delete().await
    }
}

impl Owned {
    async fn delete(&mut self) -> Result<()> {
        let op = self.api.delete_branch(&self.branch).await?;
        // Under way: the service finishes it however this future ends.
        self.deleted = true;
        self.api.wait(op, BRANCH_TIMEOUT).await.map(drop)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        tracing::warn!(branch = %self.branch, "a temporary branch was not deleted; deleting it in the background");
        let (api, branch) = (self.api.clone(), self.branch.clone());
        // A thread with a runtime of its own: the caller's may be ending (a test that
        // panicked), and would drop a task spawned on it.
        let deleting = move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(delete_in_time(&api, &branch));
        };
        let spawned = std::thread::Builder::new()
            .name("dal-branch-delete".into())
            .spawn(deleting);
        if let Err(e) = spawned {
            tracing::warn!(branch = %self.branch, error = %e, "cannot start the deletion of a temporary branch");
        }
    }
}
