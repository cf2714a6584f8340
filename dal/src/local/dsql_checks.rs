//! What Aurora DSQL refuses that PostgreSQL accepts, checked on a local database with
//! PostgreSQL's own mechanisms: event triggers on DDL, a statement trigger on every table, and
//! transaction-local settings that count what a transaction did.
//!
//! The list is [`DSQL_UNSUPPORTED`], kept as data: the PostgreSQL features that the Aurora
//! DSQL user guide lists as unsupported ("Unsupported PostgreSQL features in Aurora DSQL",
//! "Asynchronous indexes", "Sequences and identity columns") and that a schema change can meet.
//! DSQL's list shrinks over time: a feature DSQL gains is one entry to delete. Not checked,
//! because PostgreSQL runs no trigger for them: `SAVEPOINT`, advisory locks, `ALTER SYSTEM`,
//! `VACUUM`, `CREATE DATABASE` and `CREATE TABLESPACE`.
//!
//! A refusal is SQLSTATE `0A000` (`feature_not_supported`) with a message naming the feature
//! and what to do instead; in [report mode](DsqlChecks::Report) it is a warning, and the
//! session keeps a list of what it met ([`DSQL_FINDINGS_SQL`], [`dsql_findings`]).

use super::error::Result;
use super::server::LocalPostgres;

/// One PostgreSQL feature Aurora DSQL refuses, and where the local checks find it.
#[derive(Debug, Clone, Copy)]
pub struct Unsupported {
    /// The feature, as the refusal names it.
    pub feature: &'static str,
    /// What to do instead on DSQL.
    pub instead: &'static str,
    /// Where the check looks.
    pub check: Check,
}

/// Where a check of [`DSQL_UNSUPPORTED`] looks.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// A DDL command, by its command tag (`CREATE TRIGGER`), before it runs.
    Command(&'static [&'static str]),
    /// An object a DDL command created or altered: an SQL condition on `r`, the command's
    /// row of `pg_event_trigger_ddl_commands()` (`r.objid`, `r.object_type`,
    /// `r.command_tag`), checked after it ran.
    Object(&'static str),
    /// The shape of a transaction: counted DDL and writes (built into the triggers).
    Transaction,
    /// `TRUNCATE`, seen by the statement trigger of every table.
    Truncate,
}

/// What Aurora DSQL refuses, as data: the PostgreSQL features the Aurora DSQL user guide lists
/// as unsupported ("Unsupported PostgreSQL features in Aurora DSQL", "Asynchronous indexes",
/// "Sequences and identity columns") that a schema change or a transaction can meet. A feature
/// DSQL gains is one entry to delete.
pub const DSQL_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        feature: "foreign keys",
        instead: "check references in the application",
        check: Check::Object(
            "r.object_type = 'table' AND EXISTS (SELECT 1 FROM pg_constraint c \
             WHERE c.conrelid = r.objid AND c.contype = 'f')",
        ),
    },
    Unsupported {
        feature: "exclusion constraints",
        instead: "check the rule in the application",
        check: Check::Object(
            "r.object_type = 'table' AND EXISTS (SELECT 1 FROM pg_constraint c \
             WHERE c.conrelid = r.objid AND c.contype = 'x')",
        ),
    },
    Unsupported {
        feature: "temporary tables",
        instead: "use a regular table, or keep the rows in the application",
        check: Check::Object(
            "r.object_type = 'table' AND EXISTS (SELECT 1 FROM pg_class c \
             WHERE c.oid = r.objid AND c.relpersistence = 't')",
        ),
    },
    Unsupported {
        feature: "partitioned and inherited tables",
        instead: "use one table",
        check: Check::Object(
            "r.object_type = 'table' AND (EXISTS (SELECT 1 FROM pg_class c \
             WHERE c.oid = r.objid AND (c.relkind = 'p' OR c.relispartition)) \
             OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = r.objid))",
        ),
    },
    Unsupported {
        feature: "jsonb columns",
        instead: "store json or text, and cast to jsonb in queries",
        check: Check::Object(
            "r.object_type = 'table' AND EXISTS (SELECT 1 FROM pg_attribute a \
             WHERE a.attrelid = r.objid AND a.atttypid = 'jsonb'::regtype \
             AND NOT a.attisdropped)",
        ),
    },
    Unsupported {
        feature: "SERIAL columns",
        instead: "use UUID keys (gen_random_uuid()), or an identity column with CACHE 1 or \
                  at least 65536",
        check: Check::Object(
            "r.object_type = 'sequence' AND EXISTS (SELECT 1 FROM pg_depend d \
             WHERE d.classid = 'pg_class'::regclass AND d.objid = r.objid \
             AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 \
             AND d.deptype = 'a')",
        ),
    },
    Unsupported {
        feature: "sequences with a CACHE other than 1 or at least 65536",
        instead: "give the sequence or identity column CACHE 1 or CACHE 65536",
        check: Check::Object(
            "r.object_type = 'sequence' AND EXISTS (SELECT 1 FROM pg_sequence s \
             WHERE s.seqrelid = r.objid AND s.seqcache <> 1 AND s.seqcache < 65536)",
        ),
    },
    Unsupported {
        feature: "functions in languages other than SQL",
        instead: "write the function in SQL, or move the logic to the application",
        check: Check::Object(
            "r.object_type IN ('function', 'procedure') AND EXISTS (SELECT 1 FROM pg_proc p \
             JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = r.objid \
             AND l.lanname <> 'sql')",
        ),
    },
    Unsupported {
        feature: "a synchronous CREATE INDEX on a table with rows",
        instead: "use CREATE INDEX ASYNC",
        check: Check::Object(
            "r.command_tag = 'CREATE INDEX' AND dal_dsql.has_rows((SELECT i.indrelid \
             FROM pg_index i WHERE i.indexrelid = r.objid))",
        ),
    },
    Unsupported {
        feature: "triggers, extensions, materialized views, types and CREATE TABLE AS",
        instead: "do the work in the application, or with plain tables and views",
        check: Check::Command(&[
            "CREATE TRIGGER",
            "CREATE EXTENSION",
            "CREATE MATERIALIZED VIEW",
            "CREATE TYPE",
            "CREATE TABLE AS",
            "SELECT INTO",
        ]),
    },
    Unsupported {
        feature: "more than one DDL statement in a transaction",
        instead: "commit after each DDL statement: migrations must run outside a \
                  transaction, as migration::DsqlMigrator does",
        check: Check::Transaction,
    },
    Unsupported {
        feature: "DDL and DML in one transaction",
        instead: "run the DDL in a transaction of its own: migrations must run outside a \
                  transaction, as migration::DsqlMigrator does",
        check: Check::Transaction,
    },
    Unsupported {
        feature: "TRUNCATE",
        instead: "use DELETE",
        check: Check::Truncate,
    },
];

/// What the checks do with an unsupported feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsqlChecks {
    /// Refuse it, as DSQL does: SQLSTATE `0A000`.
    Enforce,
    /// Let it through with a warning, and add it to the session's findings
    /// ([`DSQL_FINDINGS_SQL`]), to list every incompatibility at once.
    Report,
}

impl LocalPostgres {
    /// Makes `database` refuse what Aurora DSQL refuses ([`DSQL_UNSUPPORTED`]), or report it
    /// (`checks`). Installs schema `dal_dsql`, two event triggers, and a statement trigger on
    /// every table, present and future, and runs its transactions at repeatable read, as DSQL
    /// does (a write that conflicts fails with SQLSTATE `40001`). Safe to run again (to
    /// change the mode).
    ///
    /// # Errors
    ///
    /// [`Error::LocalServer`](super::Error::LocalServer) when the server refuses the
    /// installation.
    pub async fn enable_dsql_checks(&self, database: &str, checks: DsqlChecks) -> Result<()> {
        let mut admin = self.admin(database).await?;
        let install = install_sql();
        let version = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            install.hash(&mut hasher);
            format!("dal_dsql {:016x}", hasher.finish())
        };
        // One installation at a time (programs sharing the development cluster start
        // together), and none when this one is in place.
        let tx = admin.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('dal_dsql'))", &[])
            .await?;
        let installed: Option<String> = tx
            .query_opt(
                "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace \
                 WHERE nspname = 'dal_dsql'",
                &[],
            )
            .await?
            .and_then(|row| row.get(0));
        if installed.as_deref() != Some(version.as_str()) {
            // Marked while the checks stand aside (the comment is DDL too).
            let mark = format!(
                "COMMENT ON SCHEMA dal_dsql IS {};\nRESET dal_dsql.internal;",
                literal(&version)
            );
            tx.batch_execute(&install.replace("RESET dal_dsql.internal;", &mark))
                .await?;
        }
        let mode = match checks {
            DsqlChecks::Enforce => "enforce",
            DsqlChecks::Report => "report",
        };
        // DSQL runs every transaction at repeatable read: a write to a row changed since the
        // transaction began fails with SQLSTATE 40001 (optimistic concurrency), where read
        // committed, PostgreSQL's default, waits and overwrites.
        let sql: String = tx
            .query_one(
                "SELECT format('ALTER DATABASE %1$I SET dal_dsql.mode = %2$L; \
                 ALTER DATABASE %1$I SET default_transaction_isolation = %3$L', \
                 $1::text, $2::text, 'repeatable read')",
                &[&database, &mode],
            )
            .await?
            .get(0);
        tx.batch_execute(&sql).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Reads what a session met in [report mode](DsqlChecks::Report): one row, one text column
/// `found`, the features one per line. Run it on the same connection (session) as the work
/// it reports on, then read the column with [`dsql_findings`].
pub const DSQL_FINDINGS_SQL: &str =
    "SELECT coalesce(current_setting('dal_dsql.found', true), '') AS found";

/// The unsupported features in `found` (the column of [`DSQL_FINDINGS_SQL`]), in the order
/// met, each once, as they appear in [`DSQL_UNSUPPORTED`].
pub fn dsql_findings(found: &str) -> Vec<&'static Unsupported> {
    let mut out: Vec<&'static Unsupported> = Vec::new();
    for line in found.lines() {
        if let Some(rule) = DSQL_UNSUPPORTED.iter().find(|r| r.feature == line)
            && !out.iter().any(|seen| seen.feature == rule.feature)
        {
            out.push(rule);
        }
    }
    out
}

/// A PL/pgSQL string literal of `text`.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `PERFORM dal_dsql.refuse(...)` for `rule`.
fn refuse(rule: &Unsupported) -> String {
    format!(
        "PERFORM dal_dsql.refuse({}, {});",
        literal(rule.feature),
        literal(rule.instead)
    )
}

/// The rule of the transaction check about `feature`.
fn transaction_rule(feature: &str) -> &'static Unsupported {
    DSQL_UNSUPPORTED
        .iter()
        .find(|r| r.feature == feature)
        .expect("a transaction rule of DSQL_UNSUPPORTED")
}

/// The installation script: functions and triggers generated from [`DSQL_UNSUPPORTED`].
fn install_sql() -> String {
    let mut commands = String::new();
    let mut objects = String::new();
    let mut truncate = String::new();
    for rule in DSQL_UNSUPPORTED {
        match rule.check {
            Check::Command(tags) => {
                let tags: Vec<String> = tags.iter().map(|t| literal(t)).collect();
                commands.push_str(&format!(
                    "IF tg_tag IN ({}) THEN {} END IF;\n",
                    tags.join(", "),
                    refuse(rule)
                ));
            }
            Check::Object(condition) => {
                objects.push_str(&format!("IF {condition} THEN {} END IF;\n", refuse(rule)));
            }
            Check::Truncate => truncate = refuse(rule),
            Check::Transaction => {}
        }
    }
    let two_ddl = refuse(transaction_rule(
        "more than one DDL statement in a transaction",
    ));
    let mixed = refuse(transaction_rule("DDL and DML in one transaction"));
    format!(
        r#"
SET client_min_messages = warning;
SET dal_dsql.internal = 'on';
CREATE SCHEMA IF NOT EXISTS dal_dsql;
GRANT USAGE ON SCHEMA dal_dsql TO PUBLIC;

-- Refuses (or, in report mode, notes) one unsupported feature.
CREATE OR REPLACE FUNCTION dal_dsql.refuse(feature text, instead text) RETURNS void
LANGUAGE plpgsql AS $f$
BEGIN
  IF current_setting('dal_dsql.mode', true) = 'report' THEN
    PERFORM set_config('dal_dsql.found',
      concat_ws(E'\n', nullif(current_setting('dal_dsql.found', true), ''), feature), false);
    RAISE WARNING 'Aurora DSQL does not support %: %', feature, instead;
  ELSE
    RAISE EXCEPTION 'Aurora DSQL does not support %: %', feature, instead
      USING ERRCODE = 'feature_not_supported';
  END IF;
END $f$;

CREATE OR REPLACE FUNCTION dal_dsql.has_rows(t regclass) RETURNS boolean
LANGUAGE plpgsql AS $f$
DECLARE found boolean;
BEGIN
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', t) INTO found;
  RETURN found;
END $f$;

-- DDL statements of this transaction so far, in a transaction-local setting.
CREATE OR REPLACE FUNCTION dal_dsql.ddl_count() RETURNS int LANGUAGE sql AS $f$
  SELECT coalesce(nullif(current_setting('dal_dsql.ddl', true), ''), '0')::int
$f$;

CREATE OR REPLACE FUNCTION dal_dsql.on_ddl_start() RETURNS event_trigger
LANGUAGE plpgsql AS $f$
DECLARE n int := dal_dsql.ddl_count();
BEGIN
  IF current_setting('dal_dsql.internal', true) = 'on' THEN RETURN; END IF;
{commands}
  IF n > 0 THEN
    {two_ddl}
  ELSIF current_setting('dal_dsql.dml', true) = 'on' THEN
    {mixed}
  END IF;
  PERFORM set_config('dal_dsql.ddl', (n + 1)::text, true);
END $f$;

-- Attaches the statement trigger that sees writes and TRUNCATE to a table.
CREATE OR REPLACE FUNCTION dal_dsql.watch(t regclass) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE before text := coalesce(current_setting('dal_dsql.internal', true), '');
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t AND tgname = 'dal_dsql_dml') THEN
    PERFORM set_config('dal_dsql.internal', 'on', true);
    EXECUTE format('CREATE TRIGGER dal_dsql_dml BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE '
      'ON %s FOR EACH STATEMENT EXECUTE FUNCTION dal_dsql.on_dml()', t);
    PERFORM set_config('dal_dsql.internal', before, true);
  END IF;
END $f$;

CREATE OR REPLACE FUNCTION dal_dsql.on_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql AS $f$
DECLARE r record;
BEGIN
  IF current_setting('dal_dsql.internal', true) = 'on' THEN RETURN; END IF;
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
{objects}
    IF r.object_type = 'table' AND r.command_tag = 'CREATE TABLE' THEN
      PERFORM dal_dsql.watch(r.objid::regclass);
    END IF;
  END LOOP;
END $f$;

CREATE OR REPLACE FUNCTION dal_dsql.on_dml() RETURNS trigger
LANGUAGE plpgsql AS $f$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    {truncate}
  ELSIF dal_dsql.ddl_count() > 0 THEN
    {mixed}
  END IF;
  -- A write, whether or not it matches a row: DDL may not follow in this transaction.
  PERFORM set_config('dal_dsql.dml', 'on', true);
  RETURN NULL;
END $f$;

DROP EVENT TRIGGER IF EXISTS dal_dsql_ddl_start;
CREATE EVENT TRIGGER dal_dsql_ddl_start ON ddl_command_start
  EXECUTE FUNCTION dal_dsql.on_ddl_start();
DROP EVENT TRIGGER IF EXISTS dal_dsql_ddl_end;
CREATE EVENT TRIGGER dal_dsql_ddl_end ON ddl_command_end
  EXECUTE FUNCTION dal_dsql.on_ddl_end();

-- Tables that were there before.
SELECT dal_dsql.watch(c.oid::regclass) FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind = 'r' AND NOT c.relispartition
    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'dal_dsql')
    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%';
RESET dal_dsql.internal;
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_reaches_the_installed_triggers() {
        let sql = install_sql();
        for rule in DSQL_UNSUPPORTED {
            assert!(
                sql.contains(&literal(rule.feature)),
                "{} is not checked",
                rule.feature
            );
        }
    }

    #[test]
    fn findings_are_listed_once_in_order() {
        let found = dsql_findings("TRUNCATE\nforeign keys\n\nTRUNCATE\nsomething else");
        let features: Vec<_> = found.iter().map(|r| r.feature).collect();
        assert_eq!(features, ["TRUNCATE", "foreign keys"]);
        assert!(dsql_findings("").is_empty());
    }
}
