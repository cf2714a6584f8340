//! A web service on the eager token strategy: customers through SeaORM, orders with their
//! items through Diesel, each write in a transaction of dal's (`connector.transactions()`:
//! run again for up to 5 s after a conflict, SQLSTATE `40001`, which Aurora DSQL raises at
//! COMMIT under a concurrent write or a migration), a sales report in raw SQL through a tokio-postgres
//! pool, and `GET /healthz` with pool state and token expiry.
//!
//! ```text
//! cargo run -p examples --bin web_app            # PORT=3000 BIND=127.0.0.1 by default
//! curl -s localhost:3000/customers -H 'content-type: application/json' \
//!      -d '{"email":"ada@example.com","name":"Ada"}'
//! ```
//!
//! Errors are JSON, `{"error": "<code>", "message": "..."}`: 400 for bad input, 404 for a
//! missing row, 409 for a duplicate, 503 when the database cannot be reached or refuses the
//! service's credentials (code `credentials_refused`). `/healthz` opens a new connection, so it
//! says whether one can be opened now: its `database` is `reachable`, `unreachable`,
//! `credentials_refused` or `failing` (any other refusal, logged). Messages are fixed: never a driver's or a parser's
//! text. Text fields are counted in characters, bounded, and refuse control characters;
//! e-mail addresses are compared without case. `GET /metrics` serves dal's metrics in the
//! Prometheus text format. SIGINT or SIGTERM drains the requests in flight for up to
//! `SHUTDOWN_GRACE_SECS` (20 s by default; a second signal ends the wait), then stops the
//! token refresher and closes the pools.
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dal::diesel::prelude::{BelongingToDsl, ExpressionMethods, QueryDsl, SelectableHelper};
use dal::diesel_async::RunQueryDsl;
use dal::{Connector, DieselPool, PgClientPool, RetryPolicy, TokenStrategy, Transactions, TxMode};
use entity::models::{NewOrder, Order, OrderItem};
use entity::schema::{customers, order_items, orders};
use entity::{customer, order};
use sea_orm::{ActiveModelTrait, DbErr, EntityTrait, ModelTrait, Set, SqlErr};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use uuid::Uuid;

#[tokio::main]
async fn main() {
    examples::logging::init();
    examples::exit::on_error(run().await);
}

async fn run() -> anyhow::Result<()> {
    let addr = listen_addr()?;
    let grace = shutdown_grace()?;
    let database = examples::Database::from_env().await?;
    let result = serve(&database, addr, grace).await;
    database.close().await;
    result
}

/// How long the requests in flight may take to finish once the app is told to stop:
/// `SHUTDOWN_GRACE_SECS`, 20 s by default (within the 30 s Kubernetes waits before it kills
/// a pod). A client that sent half a request, or a query on a connection that died without a
/// word, would otherwise hold the app open without end.
fn shutdown_grace() -> anyhow::Result<Duration> {
    match std::env::var("SHUTDOWN_GRACE_SECS") {
        Err(_) => Ok(Duration::from_secs(20)),
        Ok(secs) => secs.trim().parse().map(Duration::from_secs).map_err(|_| {
            anyhow::anyhow!(
                "invalid setting SHUTDOWN_GRACE_SECS: {secs:?} is not a whole number of seconds"
            )
        }),
    }
}

/// `BIND` (an address, or an address and port) and `PORT`; 127.0.0.1:3000 by default.
fn listen_addr() -> anyhow::Result<SocketAddr> {
    let var = |name| {
        std::env::var(name)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    let mut addr = match var("BIND") {
        None => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3000),
        Some(bind) => bind
            .trim()
            .parse::<SocketAddr>()
            .or_else(|_| {
                bind.trim()
                    .parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 3000))
            })
            .map_err(|_| {
                anyhow::anyhow!(
                    "invalid setting BIND: {bind:?} is not an IP address such as 127.0.0.1 \
                     or 0.0.0.0:8080"
                )
            })?,
    };
    if let Some(port) = var("PORT") {
        addr.set_port(port.trim().parse().map_err(|_| {
            anyhow::anyhow!("invalid setting PORT: {port:?} is not a port number (0-65535)")
        })?);
    }
    Ok(addr)
}

async fn serve(
    database: &examples::Database,
    addr: SocketAddr,
    grace: Duration,
) -> anyhow::Result<()> {
    // dal's counters, gauges and histograms, rendered by `GET /metrics`.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let config = database.config().strategy(TokenStrategy::Eager);
    let connector = examples::target::connector(config.clone()).await?;
    examples::target::check(&connector, &config).await?;
    examples::migrate::up(&connector).await?;
    let app = App {
        db: connector.seaorm().await?,
        diesel: connector.diesel_pool().await?,
        pg: connector.postgres_pool().await?,
        // A request's writes are tried again for up to 5 s: conflicts pass in milliseconds,
        // and a database out of reach is answered 503 after one acquire timeout, not after
        // the default 20 s of retries.
        tx: connector.transactions().with_policy(
            RetryPolicy::builder()
                .max_elapsed(Some(Duration::from_secs(5)))
                .build()?,
        ),
        connector: connector.clone(),
        metrics,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set by PORT and BIND)"))?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let told = std::sync::Arc::clone(&stopping);
    // Listening for the signals before the address is shown, so that no signal sent once it
    // is ends the program without its drain.
    let stopped = examples::signal::stopped();
    println!("listening on http://{local}");
    let serving = axum::serve(listener, router(app)).with_graceful_shutdown(async move {
        stopped.await;
        println!("shutting down: draining requests");
        told.notify_one();
    });
    let result = tokio::select! {
        served = serving.into_future() => served.context("serving HTTP"),
        () = async {
            stopping.notified().await;
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = examples::signal::stopped() => {}
            }
        } => {
            println!("requests still open after {grace:?}: stopping without them");
            Ok(())
        }
    };
    // Requests are drained and the router with its pools is dropped: stop the rest.
    connector.shutdown().await;
    println!("stopped");
    result
}

#[derive(Clone)]
struct App {
    connector: Connector,
    tx: Transactions,
    db: dal::SeaOrmPool,
    diesel: DieselPool,
    pg: PgClientPool,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .route("/customers", post(create_customer))
        .route("/customers/{id}", get(get_customer))
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/reports/sales", get(sales_report))
        .fallback(|| async { ApiError::NotFound("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(app)
}

// ---- errors ---------------------------------------------------------------------------

/// What a request can fail with; each maps to a status and a fixed, safe message.
#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    NotFound(&'static str),
    MethodNotAllowed,
    Conflict(&'static str),
    Unavailable,
    CredentialsRefused,
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.into()),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed".into(),
            ),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m.into()),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database cannot be reached; try again later".into(),
            ),
            ApiError::CredentialsRefused => (
                StatusCode::SERVICE_UNAVAILABLE,
                "credentials_refused",
                "the database refused this service's credentials; try again later".into(),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
        };
        (status, Json(json!({"error": code, "message": message}))).into_response()
    }
}

/// Logs the cause (the body gets a fixed message) and classifies it.
fn unavailable_or_internal(
    unavailable: bool,
    cause: &(dyn std::error::Error + 'static),
) -> ApiError {
    let cause = examples::exit::one_line(cause);
    if unavailable {
        tracing::warn!(error = %cause, "database unavailable");
        ApiError::Unavailable
    } else {
        tracing::error!(error = %cause, "request failed");
        ApiError::Internal
    }
}

impl From<dal::Error> for ApiError {
    fn from(e: dal::Error) -> Self {
        if e.is_auth_failure() {
            tracing::warn!(error = %examples::exit::one_line(&e), "credentials refused");
            return ApiError::CredentialsRefused;
        }
        // Taking a connection fails only when none can be opened.
        unavailable_or_internal(true, &e)
    }
}

impl From<DbErr> for ApiError {
    fn from(e: DbErr) -> Self {
        if let Some(SqlErr::UniqueConstraintViolation(_)) = e.sql_err() {
            return ApiError::Conflict("a row with the same key exists already");
        }
        let unavailable = match &e {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
            DbErr::Query(sea_orm::RuntimeErr::SqlxError(s))
            | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(s)) => !matches!(
                &**s,
                sea_orm::sqlx::Error::Database(_)
                    | sea_orm::sqlx::Error::RowNotFound
                    | sea_orm::sqlx::Error::ColumnDecode { .. }
                    | sea_orm::sqlx::Error::Decode(_)
            ),
            _ => false,
        };
        let e = dal::Error::from(e);
        if e.is_auth_failure() {
            tracing::warn!(error = %examples::exit::one_line(&e), "credentials refused");
            return ApiError::CredentialsRefused;
        }
        unavailable_or_internal(unavailable, &e)
    }
}

impl From<dal::diesel::result::Error> for ApiError {
    fn from(e: dal::diesel::result::Error) -> Self {
        use dal::diesel::result::{DatabaseErrorKind as Kind, Error};
        match &e {
            Error::NotFound => ApiError::NotFound("not found"),
            Error::DatabaseError(Kind::UniqueViolation, _) => {
                ApiError::Conflict("a row with the same key exists already")
            }
            Error::DatabaseError(Kind::ForeignKeyViolation, _) => {
                ApiError::NotFound("customer not found")
            }
            Error::DatabaseError(Kind::CheckViolation, _) => {
                ApiError::BadRequest("a value is out of range".into())
            }
            Error::DatabaseError(Kind::ClosedConnection, _) | Error::BrokenTransactionManager => {
                unavailable_or_internal(true, &e)
            }
            _ => unavailable_or_internal(false, &e),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        // No SQLSTATE: the connection itself failed.
        unavailable_or_internal(e.code().is_none(), &e)
    }
}

/// A JSON body whose rejection (malformed JSON, wrong fields, no JSON content type) is a 400.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(ApiError::BadRequest(
                match rejection {
                    JsonRejection::MissingJsonContentType(_) => {
                        "the content type must be application/json"
                    }
                    JsonRejection::JsonSyntaxError(_) => "the body is not valid JSON",
                    JsonRejection::JsonDataError(_) => {
                        "the body lacks a field, or a field has the wrong type"
                    }
                    _ => "the body cannot be read",
                }
                .into(),
            )),
        }
    }
}

/// A text field, trimmed: 1 to `max` characters (not bytes), no control characters
/// (PostgreSQL cannot store NUL in text; the others are refused alike).
fn text<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, ApiError> {
    let value = value.trim();
    if value.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{field} must not contain control characters"
        )));
    }
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(ApiError::BadRequest(format!(
            "{field} must be 1 to {max} characters"
        )));
    }
    Ok(value)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a UUID")))
}

fn rfc3339(t: impl Into<chrono::DateTime<chrono::Utc>>) -> String {
    t.into()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

// ---- health ---------------------------------------------------------------------------

async fn healthz(State(app): State<App>) -> Response {
    // A new connection, not a pooled one: healthy means a connection can be opened now, with
    // the token the pools would use.
    let probe = async {
        let (client, connection) = app.connector.connect().await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await?;
        Ok::<(), dal::Error>(())
    };
    let database = match tokio::time::timeout(Duration::from_secs(15), probe).await {
        Ok(Ok(())) => "reachable",
        Ok(Err(e)) => {
            tracing::warn!(error = %examples::exit::one_line(&e), "health check failed");
            if e.is_auth_failure() {
                "credentials_refused"
            } else if e.is_connection_failure() {
                "unreachable"
            } else {
                // Answered, and refused otherwise: no such database, a credential service
                // failing, a role that may not log in.
                "failing"
            }
        }
        Err(_) => {
            tracing::warn!("health check failed: no answer within 15 s");
            "unreachable"
        }
    };
    let reachable = database == "reachable";
    let cache = app.connector.cache();
    let expires_at = cache.expires_at();
    let seconds_left = expires_at.map(|at| {
        at.duration_since(SystemTime::now())
            .map_or(0, |d| d.as_secs())
    });
    let (seaorm, diesel, pg) = (app.db.health(), app.diesel.state(), app.pg.state());
    let body = json!({
        "status": if reachable { "ok" } else { "unavailable" },
        "database": database,
        "target": format!("{:?}", app.connector.target()),
        "token": {
            "source": cache.source_kind(),
            "strategy": format!("{:?}", cache.strategy()),
            "expires_at": expires_at.map(rfc3339),
            "seconds_left": seconds_left,
            "fetches": cache.fetches(),
            "failed_refreshes": cache.failures(),
        },
        "pools": {
            "seaorm": {"connections": seaorm.connections, "idle": seaorm.idle},
            "diesel": {"connections": diesel.connections, "idle": diesel.idle_connections},
            "postgres": {"connections": pg.connections, "idle": pg.idle_connections},
        },
        "connections_opened": app.connector.connections_opened(),
    });
    let status = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// dal's metrics in the Prometheus text format (names in dal's `telemetry` docs: token
/// refreshes and lifetime, connections opened, refused logins, pool sizes and waits, query and
/// transaction counts). The pool gauges are read at each scrape.
async fn prometheus(State(app): State<App>) -> Response {
    let _ = app.connector.health();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

// ---- customers: SeaORM ----------------------------------------------------------------

#[derive(Deserialize)]
struct NewCustomerBody {
    email: String,
    name: String,
}

fn customer_json(c: &customer::Model) -> Value {
    json!({"id": c.id.to_string(), "email": c.email, "name": c.name, "created_at": rfc3339(c.created_at)})
}

async fn create_customer(
    State(app): State<App>,
    Body(body): Body<NewCustomerBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Compared without case: Ada@Example.com and ada@example.com are one customer.
    let email = text("email", &body.email, 320)?.to_lowercase();
    let name = text("name", &body.name, 200)?;
    if !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(ApiError::BadRequest(
            "email must be an e-mail address".into(),
        ));
    }
    let new = customer::ActiveModel {
        id: Set(Uuid::now_v7()),
        email: Set(email),
        name: Set(name.to_owned()),
        ..Default::default()
    };
    let created = app
        .tx
        .seaorm(&app.db, TxMode::new(), |txn| {
            let new = new.clone();
            Box::pin(async move { Ok(new.insert(txn).await?) })
        })
        .await
        .map_err(|e| match e {
            dal::Error::SeaOrm(e) => match e.sql_err() {
                Some(SqlErr::UniqueConstraintViolation(_)) => {
                    ApiError::Conflict("a customer with this email exists already")
                }
                _ => e.into(),
            },
            e => e.into(),
        })?;
    Ok((StatusCode::CREATED, Json(customer_json(&created))))
}

async fn get_customer(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let found = customer::Entity::find_by_id(id)
        .one(&app.db)
        .await?
        .ok_or(ApiError::NotFound("customer not found"))?;
    let placed = found.find_related(order::Entity).all(&app.db).await?;
    let mut body = customer_json(&found);
    body["orders"] = placed
        .iter()
        .map(|o| {
            json!({
                "id": o.id.to_string(),
                "status": sea_orm::ActiveEnum::to_value(&o.status),
                "total_cents": o.total_cents,
            })
        })
        .collect();
    Ok(Json(body))
}

// ---- orders: Diesel, in a transaction ---------------------------------------------------

#[derive(Deserialize)]
struct NewOrderBody {
    customer_id: String,
    items: Vec<NewItemBody>,
}

#[derive(Deserialize)]
struct NewItemBody {
    sku: String,
    quantity: i32,
    unit_price_cents: i64,
}

fn order_json(o: &Order, items: &[OrderItem]) -> Value {
    json!({
        "id": o.id.to_string(),
        "customer_id": o.customer_id.to_string(),
        "status": o.status,
        "total_cents": o.total_cents,
        "placed_at": rfc3339(o.placed_at),
        "items": items.iter().map(|i| json!({
            "line_no": i.line_no,
            "sku": i.sku,
            "quantity": i.quantity,
            "unit_price_cents": i.unit_price_cents,
        })).collect::<Vec<_>>(),
    })
}

/// Why an order was refused when its customer is not there.
const NO_CUSTOMER: &str = "customer not found";

async fn create_order(
    State(app): State<App>,
    Body(body): Body<NewOrderBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let customer_id = parse_id(&body.customer_id)?;
    if body.items.is_empty() || body.items.len() > 100 {
        return Err(ApiError::BadRequest("an order holds 1 to 100 items".into()));
    }
    let mut total: i64 = 0;
    let mut items = Vec::with_capacity(body.items.len());
    let order_id = Uuid::now_v7();
    for (n, item) in body.items.into_iter().enumerate() {
        let sku = text(&format!("item {}: sku", n + 1), &item.sku, 64)?.to_owned();
        if item.quantity <= 0 || item.unit_price_cents < 0 {
            return Err(ApiError::BadRequest(format!(
                "item {}: quantity must be positive and unit_price_cents not negative",
                n + 1
            )));
        }
        total = i64::from(item.quantity)
            .checked_mul(item.unit_price_cents)
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| ApiError::BadRequest("the order total is too large".into()))?;
        items.push(OrderItem {
            order_id,
            line_no: n as i32 + 1,
            sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        });
    }
    // Run again after a conflict: the same rows each time, the order's id chosen above.
    let (order, items) = app
        .tx
        .diesel(&app.diesel, TxMode::new(), |tx| {
            let items = items.clone();
            Box::pin(async move {
                let known: i64 = customers::table
                    .filter(customers::id.eq(customer_id))
                    .count()
                    .get_result(tx)
                    .await?;
                if known == 0 {
                    return Err(dal::Error::abort(NO_CUSTOMER));
                }
                let order: Order = dal::diesel::insert_into(orders::table)
                    .values(NewOrder {
                        id: order_id,
                        customer_id,
                        status: "pending",
                        total_cents: total,
                    })
                    .returning(Order::as_returning())
                    .get_result(tx)
                    .await?;
                let items: Vec<OrderItem> = dal::diesel::insert_into(order_items::table)
                    .values(&items)
                    .returning(OrderItem::as_returning())
                    .get_results(tx)
                    .await?;
                Ok((order, items))
            })
        })
        .await
        .map_err(|e| match e {
            dal::Error::Aborted(_) => ApiError::NotFound(NO_CUSTOMER),
            dal::Error::Diesel(e) => e.into(),
            e => e.into(),
        })?;
    Ok((StatusCode::CREATED, Json(order_json(&order, &items))))
}

async fn get_order(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = app.diesel.get().await?;
    let order: Order = orders::table
        .find(id)
        .select(Order::as_select())
        .first(&mut *conn)
        .await
        .map_err(|e| match e {
            dal::diesel::result::Error::NotFound => ApiError::NotFound("order not found"),
            e => e.into(),
        })?;
    let items: Vec<OrderItem> = OrderItem::belonging_to(&order)
        .select(OrderItem::as_select())
        .order(order_items::line_no)
        .load(&mut *conn)
        .await?;
    Ok(Json(order_json(&order, &items)))
}

// ---- report: raw SQL through tokio-postgres -------------------------------------------

async fn sales_report(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let client = app.pg.get().await?;
    // Prepared once per connection, then run without a Parse round trip.
    let report = client
        .prepare_cached(
            "SELECT c.id::text, c.email, count(o.id), coalesce(sum(o.total_cents), 0)::bigint \
             FROM customers c JOIN orders o ON o.customer_id = c.id \
             GROUP BY c.id, c.email ORDER BY 4 DESC, 2 LIMIT 10",
        )
        .await?;
    let rows = client.query(&report, &[]).await?;
    let top: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "customer_id": r.get::<_, String>(0),
                "email": r.get::<_, String>(1),
                "orders": r.get::<_, i64>(2),
                "total_cents": r.get::<_, i64>(3),
            })
        })
        .collect();
    Ok(Json(json!({"top_customers": top})))
}
