//! The kinds of server dal knows.

/// What kind of server the connector talks to; it chooses defaults (TLS, pool lifetimes,
/// `search_path`, migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// PostgreSQL, or anything else speaking its protocol.
    Postgres,
    /// Databricks Lakebase.
    Lakebase,
    /// Amazon Aurora DSQL.
    Dsql,
}

impl std::fmt::Display for Target {
    /// The product's name: `PostgreSQL`, `Databricks Lakebase` or `Aurora DSQL`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Postgres => "PostgreSQL",
            Target::Lakebase => "Databricks Lakebase",
            Target::Dsql => "Aurora DSQL",
        })
    }
}
