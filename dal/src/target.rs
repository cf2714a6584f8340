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

impl Target {
    /// The kind of server `host` names, by the vendors' host patterns: Lakebase Autoscaling
    /// `ep-...database.<region>.cloud.databricks.com`, Provisioned
    /// `instance-...database.cloud.databricks.com` or `...database.azuredatabricks.net`, Aurora
    /// DSQL `<cluster-id>.dsql.<region>.on.aws` (and `.dsql-<suffix>.` variants). `None` for
    /// any other host, which may still be either behind a proxy or a private endpoint.
    ///
    /// ```
    /// use dal::Target;
    /// assert_eq!(Target::of_host("ep-cool-1.database.us-east-1.cloud.databricks.com"), Some(Target::Lakebase));
    /// assert_eq!(Target::of_host("abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws"), Some(Target::Dsql));
    /// assert_eq!(Target::of_host("db.example.com"), None);
    /// ```
    pub fn of_host(host: &str) -> Option<Target> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let databricks = [".cloud.databricks.com", ".azuredatabricks.net"]
            .iter()
            .any(|suffix| host.ends_with(suffix));
        if databricks && host.contains(".database.") {
            Some(Target::Lakebase)
        } else if host.ends_with(".on.aws") && host.contains(".dsql") {
            Some(Target::Dsql)
        } else {
            None
        }
    }

    /// Whether `shared_preload_libraries` (as `SHOW shared_preload_libraries` answers it)
    /// lists Lakebase's libraries, `neon` or `databricks_auth`: the Lakebase partner guide's
    /// other way to tell Lakebase from plain PostgreSQL.
    pub fn is_lakebase_preload(shared_preload_libraries: &str) -> bool {
        shared_preload_libraries
            .split(',')
            .map(|l| l.trim().trim_matches('"'))
            .any(|l| l == "neon" || l == "databricks_auth")
    }
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn hosts_and_libraries_tell_the_platform() {
        for (host, target) in [
            (
                "ep-x-1.database.us-east-1.cloud.databricks.com",
                Some(Target::Lakebase),
            ),
            (
                "instance-0f.database.cloud.databricks.com",
                Some(Target::Lakebase),
            ),
            (
                "instance-0f.database.azuredatabricks.net.",
                Some(Target::Lakebase),
            ),
            (
                "EP-X.DATABASE.US-EAST-1.CLOUD.DATABRICKS.COM",
                Some(Target::Lakebase),
            ),
            ("my-workspace.cloud.databricks.com", None),
            ("abc.dsql.us-east-1.on.aws", Some(Target::Dsql)),
            ("abc.dsql-fnh4.us-east-1.on.aws", Some(Target::Dsql)),
            ("database.example.com", None),
            ("localhost", None),
        ] {
            assert_eq!(Target::of_host(host), target, "{host}");
        }
        assert!(Target::is_lakebase_preload("neon, databricks_auth"));
        assert!(Target::is_lakebase_preload(
            "pg_stat_statements,databricks_auth"
        ));
        assert!(!Target::is_lakebase_preload(""));
        assert!(!Target::is_lakebase_preload("neonx, pg_stat_statements"));
    }
}
