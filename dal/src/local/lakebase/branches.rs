//! The local service's model of Lakebase Autoscaling's projects, branches and endpoints (the
//! `/api/2.0/postgres/*` Management API), on one PostgreSQL cluster:
//!
//! - the project is the one of the configured endpoint; its default branch is that endpoint's
//!   branch, whose data is the configured database;
//! - a new branch is a copy of its source branch's database (`CREATE DATABASE ... TEMPLATE`,
//!   retried while the source has sessions, which PostgreSQL requires);
//! - a branch's endpoint listens on a loopback address of its own (`127.0.0.2` to `127.0.0.63`)
//!   with the cluster's port, terminates TLS with the cluster's certificate, and forwards each
//!   session to the branch's database: a client asks for the same database name on every
//!   branch, as on Lakebase, and gets that branch's data;
//! - creating and deleting are long-running operations (`.../operations/{id}`), done in the
//!   background, as the real API answers them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Shared, api_error, rfc3339, unauthenticated};
use crate::local::server::AdminAccess;

/// How long a branch waits for its source database to have no sessions before the copy
/// fails, as a real operation fails after its own deadline.
const COPY_DEADLINE: Duration = Duration::from_secs(60);
/// PostgreSQL's SSLRequest, GSSENCRequest and CancelRequest codes (protocol 3.0).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// What the model needs of the cluster, kept from start.
pub(super) struct Cluster {
    pub(super) admin: AdminAccess,
    pub(super) port: u16,
    pub(super) server_tls: tokio_rustls::TlsAcceptor,
    pub(super) client_tls: tokio_rustls::TlsConnector,
    pub(super) client_config: Arc<rustls::ClientConfig>,
}

#[derive(Default)]
pub(super) struct Model {
    branches: BTreeMap<String, BranchModel>,
    endpoints: BTreeMap<String, EndpointModel>,
    operations: HashMap<String, Value>,
}

struct BranchModel {
    database: String,
    default: bool,
    state: &'static str,
    source: Option<String>,
    created: String,
}

struct EndpointModel {
    host: String,
    read_write: bool,
    /// Stops the endpoint's listener and sessions when dropped.
    _serving: Option<tokio::task::AbortHandle>,
}

impl Drop for EndpointModel {
    fn drop(&mut self) {
        if let Some(task) = &self._serving {
            task.abort();
        }
    }
}

impl Model {
    /// The default branch and its endpoint, from the configuration.
    pub(super) fn new(endpoint: &str, database: &str) -> Self {
        let branch = parent_of(endpoint).to_owned();
        let mut model = Self::default();
        model.branches.insert(
            branch,
            BranchModel {
                database: database.to_owned(),
                default: true,
                state: "READY",
                source: None,
                created: rfc3339(chrono::Utc::now()),
            },
        );
        model.endpoints.insert(
            endpoint.to_owned(),
            EndpointModel {
                host: super::DATABASE_HOST.to_owned(),
                read_write: true,
                _serving: None,
            },
        );
        model
    }

    /// Whether `endpoint` exists.
    pub(super) fn has_endpoint(&self, endpoint: &str) -> bool {
        self.endpoints.contains_key(endpoint)
    }

    fn branch_json(&self, name: &str) -> Option<Value> {
        let b = self.branches.get(name)?;
        Some(json!({
            "name": name,
            "parent": parent_of(name),
            "branch_id": name.rsplit('/').next(),
            "create_time": b.created,
            "spec": { "source_branch": b.source },
            "status": { "current_state": b.state, "default": b.default, "source_branch": b.source },
        }))
    }

    fn endpoint_json(&self, name: &str) -> Option<Value> {
        let e = self.endpoints.get(name)?;
        let kind = if e.read_write {
            "ENDPOINT_TYPE_READ_WRITE"
        } else {
            "ENDPOINT_TYPE_READ_ONLY"
        };
        Some(json!({
            "name": name,
            "parent": parent_of(name),
            "spec": { "endpoint_type": kind },
            "status": {
                "current_state": "ACTIVE",
                "endpoint_type": kind,
                "endpoint_id": name.rsplit('/').next(),
                "hosts": { "host": e.host },
            },
        }))
    }
}

fn parent_of(name: &str) -> &str {
    name.rsplitn(3, '/').nth(2).unwrap_or_default()
}

/// A resource id as the API takes it: 1-63 lowercase letters, digits and hyphens, starting
/// with a letter.
fn is_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Model> {
    shared.model.lock().unwrap_or_else(|e| e.into_inner())
}

fn not_found(what: &str, name: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        &format!("{what} '{name}' does not exist."),
    )
}

/// What the service answers for a path it has no API at.
fn no_api(method: &str, name: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "ENDPOINT_NOT_FOUND",
        &format!("No API found for '{method} /api/2.0/postgres/{name}'"),
    )
}

fn invalid(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

/// `GET /api/2.0/postgres/{name}`: a project, branch, endpoint or operation, or a list.
pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    let parts: Vec<&str> = name.split('/').collect();
    let model = lock(&shared);
    let project = parent_of(&shared.config.endpoint)
        .rsplitn(3, '/')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let listed = |key: &str, items: Vec<Value>| Json(json!({ key: items })).into_response();
    match parts.as_slice() {
        ["projects"] => listed("projects", vec![json!({ "name": project })]),
        ["projects", _] if name == project => Json(json!({ "name": project })).into_response(),
        ["projects", _, "branches"] => {
            let prefix = format!("{name}/");
            let items = model
                .branches
                .keys()
                .filter(|b| b.starts_with(&prefix))
                .filter_map(|b| model.branch_json(b))
                .collect();
            listed("branches", items)
        }
        ["projects", _, "branches", _] => model
            .branch_json(&name)
            .map_or_else(|| not_found("Branch", &name), |b| Json(b).into_response()),
        ["projects", _, "branches", _, "endpoints"] => {
            let prefix = format!("{name}/");
            let items = model
                .endpoints
                .keys()
                .filter(|e| e.starts_with(&prefix))
                .filter_map(|e| model.endpoint_json(e))
                .collect();
            listed("endpoints", items)
        }
        ["projects", _, "branches", _, "endpoints", _] => model
            .endpoint_json(&name)
            .map_or_else(|| not_found("Endpoint", &name), |e| Json(e).into_response()),
        [.., "operations", _] => model.operations.get(&name).cloned().map_or_else(
            || not_found("Operation", &name),
            |o| Json(o).into_response(),
        ),
        ["projects", ..] => not_found("Resource", &name),
        _ => no_api("GET", &name),
    }
}

/// `POST /api/2.0/postgres/projects/{p}/branches?branch_id=` and
/// `POST .../branches/{b}/endpoints?endpoint_id=`: operations.
pub(super) async fn post(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Option<Json<Value>>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    let body = body.map(|Json(b)| b).unwrap_or(Value::Null);
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["projects", _, "branches"] => {
            let Some(id) = query.get("branch_id").filter(|id| is_id(id)) else {
                return invalid(
                    "branch_id is required: 1-63 lowercase letters, digits and hyphens, \
                     starting with a letter",
                );
            };
            create_branch(&shared, &name, id, &body)
        }
        ["projects", _, "branches", _, "endpoints"] => {
            let Some(id) = query.get("endpoint_id").filter(|id| is_id(id)) else {
                return invalid(
                    "endpoint_id is required: 1-63 lowercase letters, digits and hyphens, \
                     starting with a letter",
                );
            };
            create_endpoint(&shared, &name, id, &body).await
        }
        _ => no_api("POST", &name),
    }
}

/// `DELETE /api/2.0/postgres/projects/{p}/branches/{b}` (and its endpoints): operations.
pub(super) async fn delete(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if !shared.authorized(&headers) {
        return unauthenticated();
    }
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["projects", _, "branches", _] => delete_branch(&shared, &name),
        ["projects", _, "branches", _, "endpoints", _] => {
            let removed = lock(&shared).endpoints.remove(&name);
            match removed {
                None => not_found("Endpoint", &name),
                Some(_) => {
                    let op = operation(&shared, &name);
                    finish(&shared, &op, Ok(json!({})));
                    Json(lock(&shared).operations[&op].clone()).into_response()
                }
            }
        }
        _ => no_api("DELETE", &name),
    }
}

/// Registers a running operation on `resource` and returns its name.
fn operation(shared: &Shared, resource: &str) -> String {
    let name = format!("{resource}/operations/{}", uuid::Uuid::new_v4().simple());
    lock(shared).operations.insert(
        name.clone(),
        json!({ "name": name, "done": false, "metadata": { "resource": resource } }),
    );
    name
}

/// Marks an operation done, with its response or error.
fn finish(shared: &Shared, op: &str, outcome: Result<Value, String>) {
    let mut model = lock(shared);
    if let Some(o) = model.operations.get_mut(op) {
        o["done"] = true.into();
        match outcome {
            Ok(response) => o["response"] = response,
            Err(message) => {
                o["error"] = json!({ "error_code": "FAILED_PRECONDITION", "message": message });
            }
        }
    }
}

fn create_branch(shared: &Arc<Shared>, project_branches: &str, id: &str, body: &Value) -> Response {
    let name = format!("{project_branches}/{id}");
    let project = project_branches
        .strip_suffix("/branches")
        .unwrap_or_default()
        .to_owned();
    let (op, source_db, database) = {
        let mut model = lock(shared);
        if model.branches.contains_key(&name) {
            return api_error(
                StatusCode::CONFLICT,
                "ALREADY_EXISTS",
                &format!("Branch '{name}' already exists."),
            );
        }
        let source = match body.pointer("/spec/source_branch").and_then(Value::as_str) {
            Some(source) => source.to_owned(),
            None => match model
                .branches
                .iter()
                .find(|(b, m)| m.default && parent_of(b) == project)
            {
                Some((b, _)) => b.clone(),
                None => return not_found("Project", &project),
            },
        };
        let Some(parent) = model.branches.get(&source).filter(|b| b.state == "READY") else {
            return not_found("Branch", &source);
        };
        let source_db = parent.database.clone();
        let database: String = format!("{}__{id}", model.branches[&source].database)
            .chars()
            .take(63)
            .collect();
        model.branches.insert(
            name.clone(),
            BranchModel {
                database: database.clone(),
                default: false,
                state: "INIT",
                source: Some(source),
                created: rfc3339(chrono::Utc::now()),
            },
        );
        drop(model);
        (operation(shared, &name), source_db, database)
    };
    let task_shared = Arc::clone(shared);
    let task_op = op.clone();
    tokio::spawn(async move {
        let outcome = copy_database(&task_shared.cluster.admin, &source_db, &database).await;
        let outcome = match outcome {
            Ok(()) => {
                let ready = {
                    let mut model = lock(&task_shared);
                    match model.branches.get_mut(&name) {
                        Some(b) if b.state == "INIT" => {
                            b.state = "READY";
                            model.branch_json(&name)
                        }
                        _ => None,
                    }
                };
                match ready {
                    Some(branch) => Ok(branch),
                    // Deleted while its copy was made: the copy goes too.
                    None => {
                        let dropped = drop_database(&task_shared, &database).await;
                        Err(dropped.err().unwrap_or_else(|| {
                            format!("the branch {name} was deleted while it was created")
                        }))
                    }
                }
            }
            Err(message) => {
                lock(&task_shared).branches.remove(&name);
                Err(message)
            }
        };
        finish(&task_shared, &task_op, outcome);
    });
    Json(lock(shared).operations[&op].clone()).into_response()
}

/// `CREATE DATABASE <database> TEMPLATE <source>`, owned as the source is, retried while the
/// source has sessions (SQLSTATE `55006`).
async fn copy_database(admin: &AdminAccess, source: &str, database: &str) -> Result<(), String> {
    let client = admin.connect("postgres").await.map_err(|e| e.to_string())?;
    let sql: String = client
        .query_one(
            "SELECT format('CREATE DATABASE %I TEMPLATE %I OWNER %I', $1::text, $2::text, \
             pg_get_userbyid(datdba)) FROM pg_database WHERE datname = $2",
            &[&database, &source],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|e| format!("the source database {source} cannot be read: {e}"))?;
    let deadline = tokio::time::Instant::now() + COPY_DEADLINE;
    let mut pause = Duration::from_millis(20);
    loop {
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("cannot copy the source branch's data: {e}")),
        }
    }
}

fn delete_branch(shared: &Arc<Shared>, name: &str) -> Response {
    let database = {
        let mut model = lock(shared);
        let Some(branch) = model.branches.get(name) else {
            return not_found("Branch", name);
        };
        if branch.default {
            return invalid("The default branch cannot be deleted.");
        }
        if model
            .branches
            .values()
            .any(|b| b.source.as_deref() == Some(name))
        {
            return invalid("A branch with child branches cannot be deleted.");
        }
        let database = branch.database.clone();
        // Its endpoints stop at once: their listeners and sessions end.
        let prefix = format!("{name}/endpoints/");
        model.endpoints.retain(|e, _| !e.starts_with(&prefix));
        if let Some(b) = model.branches.get_mut(name) {
            b.state = "DELETED";
        }
        database
    };
    let op = operation(shared, name);
    let task_shared = Arc::clone(shared);
    let task_op = op.clone();
    let name = name.to_owned();
    tokio::spawn(async move {
        let dropped = drop_database(&task_shared, &database).await;
        if dropped.is_ok() {
            lock(&task_shared).branches.remove(&name);
        }
        finish(&task_shared, &task_op, dropped.map(|()| json!({})));
    });
    Json(lock(shared).operations[&op].clone()).into_response()
}

/// `DROP DATABASE IF EXISTS <database> WITH (FORCE)`.
async fn drop_database(shared: &Shared, database: &str) -> Result<(), String> {
    let client = shared
        .cluster
        .admin
        .connect("postgres")
        .await
        .map_err(|e| e.to_string())?;
    let sql: String = client
        .query_one(
            "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text)",
            &[&database],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    client.batch_execute(&sql).await.map_err(|e| e.to_string())
}

async fn create_endpoint(
    shared: &Arc<Shared>,
    endpoints: &str,
    id: &str,
    body: &Value,
) -> Response {
    let name = format!("{endpoints}/{id}");
    let branch = parent_of(&name).to_owned();
    let read_write = body.pointer("/spec/endpoint_type").and_then(Value::as_str)
        != Some("ENDPOINT_TYPE_READ_ONLY");
    let database = {
        let model = lock(shared);
        let Some(b) = model.branches.get(&branch).filter(|b| b.state == "READY") else {
            return not_found("Branch", &branch);
        };
        if model.endpoints.contains_key(&name) {
            return api_error(
                StatusCode::CONFLICT,
                "ALREADY_EXISTS",
                &format!("Endpoint '{name}' already exists."),
            );
        }
        let prefix = format!("{branch}/endpoints/");
        if read_write
            && model
                .endpoints
                .iter()
                .any(|(e, m)| e.starts_with(&prefix) && m.read_write)
        {
            return invalid("A branch can only have one READ_WRITE endpoint.");
        }
        b.database.clone()
    };
    let Some((listener, host)) = bind_branch_host(shared.cluster.port).await else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RESOURCE_EXHAUSTED",
            "No loopback address is free for another endpoint.",
        );
    };
    let serving = tokio::spawn(serve(listener, Arc::clone(shared), database, read_write));
    lock(shared).endpoints.insert(
        name.clone(),
        EndpointModel {
            host,
            read_write,
            _serving: Some(serving.abort_handle()),
        },
    );
    let op = operation(shared, &name);
    let response = lock(shared).endpoint_json(&name).unwrap_or_default();
    finish(shared, &op, Ok(response));
    Json(lock(shared).operations[&op].clone()).into_response()
}

/// A listener on the first free `127.0.0.<n>:<port>` of the branch hosts.
async fn bind_branch_host(port: u16) -> Option<(TcpListener, String)> {
    for n in crate::local::certs::BRANCH_HOSTS {
        let addr = SocketAddr::from(([127, 0, 0, n], port));
        if let Ok(listener) = TcpListener::bind(addr).await {
            return Some((listener, addr.ip().to_string()));
        }
    }
    None
}

/// Serves an endpoint: each session goes to `database`. Sessions run on by themselves until
/// either side ends them (deleting a branch drops its database, which ends them).
async fn serve(listener: TcpListener, shared: Arc<Shared>, database: String, read_write: bool) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: a pause, not a spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        let database = database.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(client, &shared.cluster, &database, read_write).await {
                tracing::debug!(error = %e, "a branch endpoint session ended");
            }
        });
    }
}

/// One session: TLS with the client, its startup packet sent on with the branch's database,
/// then both directions copied.
async fn forward(
    mut tcp: TcpStream,
    cluster: &Cluster,
    database: &str,
    read_write: bool,
) -> std::io::Result<()> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    // The first packet in clear: TLS asked for (GSSAPI encryption refused first, as a
    // server without it does), or a cancel request, passed on as it is.
    loop {
        let len = tcp.read_u32().await?;
        match tcp.read_u32().await? {
            SSL_REQUEST => break,
            GSSENC_REQUEST => tcp.write_all(b"N").await?,
            CANCEL_REQUEST if len == 16 => {
                let mut keys = [0u8; 8];
                tcp.read_exact(&mut keys).await?;
                let mut upstream = TcpStream::connect(("127.0.0.1", cluster.port)).await?;
                upstream.write_all(&16u32.to_be_bytes()).await?;
                upstream.write_all(&CANCEL_REQUEST.to_be_bytes()).await?;
                return upstream.write_all(&keys).await;
            }
            // TLS is mandatory, as on Lakebase.
            _ => return Err(invalid("a session without TLS")),
        }
    }
    tcp.write_all(b"S").await?;
    let mut client = cluster.server_tls.accept(tcp).await?;
    let len = client.read_u32().await?;
    if !(8..=10_000).contains(&len) {
        return Err(invalid("a startup packet of an unexpected size"));
    }
    let mut packet = vec![0; len as usize - 4];
    client.read_exact(&mut packet).await?;
    let code = u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
    if code == CANCEL_REQUEST && len == 16 {
        // A cancel request inside TLS: on to the server as it is.
        let mut server = upstream_tls(cluster).await?;
        server.write_all(&len.to_be_bytes()).await?;
        return server.write_all(&packet).await;
    }
    if code >> 16 != 3 {
        return Err(invalid("not a protocol 3 startup packet"));
    }
    let (version, params) = packet.split_at(4);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut parts = params.split(|b| *b == 0);
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        if k.is_empty() {
            break;
        }
        fields.push((
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    // Every name a client asks for is the branch's copy: one database per branch here.
    fields.retain(|(k, _)| k != "database");
    fields.push(("database".into(), database.to_owned()));
    if !read_write {
        const READ_ONLY: &str = "-c default_transaction_read_only=on";
        match fields.iter_mut().find(|(k, _)| k == "options") {
            Some((_, options)) => *options = format!("{options} {READ_ONLY}"),
            None => fields.push(("options".into(), READ_ONLY.into())),
        }
    }
    let mut rewritten = version.to_vec();
    for (k, v) in &fields {
        rewritten.extend_from_slice(k.as_bytes());
        rewritten.push(0);
        rewritten.extend_from_slice(v.as_bytes());
        rewritten.push(0);
    }
    rewritten.push(0);
    let mut server = upstream_tls(cluster).await?;
    server
        .write_all(&(rewritten.len() as u32 + 4).to_be_bytes())
        .await?;
    server.write_all(&rewritten).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// A TLS session with the cluster, opened as a client that asks for TLS first.
async fn upstream_tls(
    cluster: &Cluster,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut upstream = TcpStream::connect(("127.0.0.1", cluster.port)).await?;
    upstream.write_all(&8u32.to_be_bytes()).await?;
    upstream.write_all(&SSL_REQUEST.to_be_bytes()).await?;
    if upstream.read_u8().await? != b'S' {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the cluster refused TLS",
        ));
    }
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
    cluster.client_tls.connect(name, upstream).await
}
