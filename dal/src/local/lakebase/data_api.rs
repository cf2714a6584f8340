//! A PostgREST-compatible subset of the Lakebase Data API over the cluster's tables, at
//! `<url>/data-api/{database}/{table}`: each request logs in to PostgreSQL as the configured
//! role with the bearer token as its password (a database credential, checked by the cluster
//! as any login), so PostgreSQL decides what the role may do, as behind the real service.
//!
//! The subset, in PostgREST's own syntax: `GET` with `select=a,b`, filters `col=op.value`
//! (`eq`, `neq`, `gt`, `gte`, `lt`, `lte`, `like`, `ilike` with `*` as wildcard, `is.null`,
//! `is.true`, `is.false`, `in.(a,b)`), `order=col.asc,col.desc`, `limit`, `offset`; `POST` of
//! an object or an array of objects; `PATCH` and `DELETE` with filters. Writes answer the rows
//! with `Prefer: return=representation`. Errors are PostgREST's shape,
//! `{"code": <SQLSTATE>, "message", "details", "hint"}`, tables of the `public` schema only.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_postgres::types::ToSql;

use super::Shared;

/// `<url>/data-api/{database}/{table}`, any method.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    Path((database, table)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            "PGRST301",
            "No bearer token was sent",
        );
    };
    let client = match login(&shared, &database, token.trim()).await {
        Ok(client) => client,
        Err(response) => return *response,
    };
    let representation = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.contains("return=representation"));
    let params: Vec<(String, String)> = query
        .as_deref()
        .map(|q| {
            reqwest::Url::parse(&format!("http://localhost/?{q}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    match run(&client, &method, &table, &params, &body).await {
        Ok(rows) => {
            let status = match method {
                Method::POST => StatusCode::CREATED,
                _ => StatusCode::OK,
            };
            if method == Method::GET || representation {
                (status, [(header::CONTENT_TYPE, "application/json")], rows).into_response()
            } else {
                status.into_response()
            }
        }
        Err(response) => *response,
    }
}

type Failure = Box<Response>;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "code": code, "message": message, "details": null, "hint": null });
    (status, axum::Json(body)).into_response()
}

fn fail(status: StatusCode, code: &str, message: &str) -> Failure {
    Box::new(error(status, code, message))
}

/// A PostgreSQL error as PostgREST answers it.
fn from_db(e: &tokio_postgres::Error) -> Failure {
    let Some(db) = e.as_db_error() else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "PGRST000",
            "the database cannot be reached",
        );
    };
    let code = db.code().code();
    let status = match code {
        "42501" => StatusCode::FORBIDDEN,
        "23505" | "23503" => StatusCode::CONFLICT,
        "42P01" => StatusCode::NOT_FOUND,
        c if c.starts_with("28") => StatusCode::UNAUTHORIZED,
        c if c.starts_with("22") || c.starts_with("23") || c.starts_with("42") => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    fail(status, code, db.message())
}

/// A session as the role, the token as its password.
async fn login(
    shared: &Shared,
    database: &str,
    token: &str,
) -> Result<tokio_postgres::Client, Failure> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(std::net::IpAddr::from([127, 0, 0, 1]))
        .port(shared.cluster.port)
        .user(&shared.config.role)
        .password(token)
        .dbname(database)
        .application_name("lakebase-data-api")
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls =
        tokio_postgres_rustls::MakeRustlsConnect::new((*shared.cluster.client_config).clone());
    match config.connect(tls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        // The login's reason stays in the server's log, as a real service keeps it.
        Err(e)
            if e.as_db_error()
                .is_some_and(|d| d.code().code().starts_with("28")) =>
        {
            Err(fail(
                StatusCode::UNAUTHORIZED,
                "PGRST301",
                "The token was refused: expired, revoked or not a credential of this role",
            ))
        }
        Err(e) => Err(from_db(&e)),
    }
}

/// `"name"`, quoted as PostgreSQL quotes identifiers.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One request as one statement; the rows as a JSON array.
async fn run(
    client: &tokio_postgres::Client,
    method: &Method,
    table: &str,
    params: &[(String, String)],
    body: &[u8],
) -> Result<String, Failure> {
    let columns: HashMap<String, String> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relname = $1 AND c.relkind IN ('r', 'v', 'p') \
             AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(|e| from_db(&e))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    if columns.is_empty() {
        return Err(fail(
            StatusCode::NOT_FOUND,
            "42P01",
            &format!("relation \"public.{table}\" does not exist"),
        ));
    }
    let column = |name: &str| -> Result<&String, Failure> {
        columns.get(name).ok_or_else(|| {
            fail(
                StatusCode::BAD_REQUEST,
                "42703",
                &format!("column {table}.{name} does not exist"),
            )
        })
    };
    let target = format!("public.{}", ident(table));
    let mut values: Vec<String> = Vec::new();
    let mut conditions: Vec<String> = Vec::new();
    let (mut select, mut order, mut limit, mut offset) =
        ("*".to_owned(), String::new(), String::new(), String::new());
    for (key, value) in params {
        match key.as_str() {
            "select" => {
                let names: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| column(c).map(|_| ident(c)))
                    .collect::<Result<_, _>>()?;
                if !names.is_empty() {
                    select = names.join(", ");
                }
            }
            "order" => {
                let mut terms = Vec::new();
                for term in value.split(',') {
                    let mut parts = term.split('.');
                    let name = parts.next().unwrap_or_default();
                    column(name)?;
                    let direction = match parts.next() {
                        None | Some("asc") => "ASC",
                        Some("desc") => "DESC",
                        Some(_) => {
                            return Err(fail(
                                StatusCode::BAD_REQUEST,
                                "PGRST100",
                                "order takes asc or desc",
                            ));
                        }
                    };
                    terms.push(format!("{} {direction}", ident(name)));
                }
                order = format!(" ORDER BY {}", terms.join(", "));
            }
            "limit" | "offset" => {
                let n: u64 = value.parse().map_err(|_| {
                    fail(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        &format!("{key} must be a number"),
                    )
                })?;
                if key == "limit" {
                    limit = format!(" LIMIT {n}");
                } else {
                    offset = format!(" OFFSET {n}");
                }
            }
            name => {
                let kind = column(name)?;
                let (op, operand) = value.split_once('.').ok_or_else(|| {
                    fail(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        "a filter is column=operator.value",
                    )
                })?;
                // Qualified: an update's row source has the same column names.
                let col = format!("{target}.{}", ident(name));
                let mut param = |v: &str| {
                    values.push(v.to_owned());
                    format!("${}", values.len())
                };
                let condition = match op {
                    "eq" | "neq" | "gt" | "gte" | "lt" | "lte" => {
                        let sql_op = match op {
                            "eq" => "=",
                            "neq" => "<>",
                            "gt" => ">",
                            "gte" => ">=",
                            "lt" => "<",
                            _ => "<=",
                        };
                        format!("{col} {sql_op} {}::text::{kind}", param(operand))
                    }
                    "like" | "ilike" => format!(
                        "{col}::text {} {}",
                        op.to_uppercase(),
                        param(&operand.replace('*', "%"))
                    ),
                    "is" => match operand {
                        "null" => format!("{col} IS NULL"),
                        "true" => format!("{col} IS TRUE"),
                        "false" => format!("{col} IS FALSE"),
                        _ => {
                            return Err(fail(
                                StatusCode::BAD_REQUEST,
                                "PGRST100",
                                "is takes null, true or false",
                            ));
                        }
                    },
                    "in" => {
                        let list = operand
                            .strip_prefix('(')
                            .and_then(|l| l.strip_suffix(')'))
                            .ok_or_else(|| {
                                fail(StatusCode::BAD_REQUEST, "PGRST100", "in takes (a,b,...)")
                            })?;
                        let items: Vec<String> = list
                            .split(',')
                            .map(|v| format!("{}::text::{kind}", param(v.trim())))
                            .collect();
                        format!("{col} IN ({})", items.join(", "))
                    }
                    _ => {
                        return Err(fail(
                            StatusCode::BAD_REQUEST,
                            "PGRST100",
                            &format!("unsupported operator {op}"),
                        ));
                    }
                };
                conditions.push(condition);
            }
        }
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let json_of = |from: &str| {
        format!("SELECT coalesce(json_agg(row_to_json(t)), '[]')::text FROM ({from}) t")
    };
    // A data-modifying statement must be the top level's own WITH.
    let written = |dml: &str| {
        format!("WITH w AS ({dml}) SELECT coalesce(json_agg(row_to_json(w)), '[]')::text FROM w")
    };
    let sql = match *method {
        Method::GET => json_of(&format!(
            "SELECT {select} FROM {target}{filter}{order}{limit}{offset}"
        )),
        Method::POST | Method::PATCH => {
            let json: Value = serde_json::from_slice(body).map_err(|_| {
                fail(
                    StatusCode::BAD_REQUEST,
                    "PGRST102",
                    "the body is not valid JSON",
                )
            })?;
            let first = match &json {
                Value::Array(rows) => rows.first().cloned().unwrap_or(Value::Null),
                row => row.clone(),
            };
            let Value::Object(first) = first else {
                return Err(fail(
                    StatusCode::BAD_REQUEST,
                    "PGRST102",
                    "the body must be an object or an array of objects",
                ));
            };
            let names: Vec<String> = first
                .keys()
                .map(|c| column(c).map(|_| ident(c)))
                .collect::<Result<_, _>>()?;
            let rows = match json {
                Value::Array(_) => json.to_string(),
                row => Value::Array(vec![row]).to_string(),
            };
            values.push(rows);
            let rows = format!("${}", values.len());
            let listed = names.join(", ");
            if *method == Method::POST {
                written(&format!(
                    "INSERT INTO {target} ({listed}) SELECT {listed} FROM \
                     json_populate_recordset(null::{target}, {rows}::text::json) RETURNING *"
                ))
            } else {
                let set: Vec<String> = names.iter().map(|c| format!("{c} = r.{c}")).collect();
                written(&format!(
                    "UPDATE {target} SET {} FROM \
                     json_populate_recordset(null::{target}, {rows}::text::json) r{filter} \
                     RETURNING {target}.*",
                    set.join(", ")
                ))
            }
        }
        Method::DELETE => written(&format!("DELETE FROM {target}{filter} RETURNING *")),
        _ => {
            return Err(fail(
                StatusCode::METHOD_NOT_ALLOWED,
                "PGRST117",
                "unsupported method",
            ));
        }
    };
    let args: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let row = client
        .query_one(&sql, &args)
        .await
        .map_err(|e| from_db(&e))?;
    Ok(row.get(0))
}
