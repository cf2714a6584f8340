//! What the pools run when they hand out a connection that was used before: one round trip
//! that fails inside a transaction block, and a `ROLLBACK` when it did.
//!
//! A future dropped between sending `BEGIN` and reading its answer (a timeout, a `select!`, a
//! client gone) leaves the session in a transaction the pool does not know of; the next user's
//! autocommit writes would then be acknowledged and never committed. `statement_timestamp()`
//! equals `transaction_timestamp()` only for a statement that runs in a transaction of its own,
//! so the check divides by zero (SQLSTATE `22012`) inside a transaction block, and fails with
//! `25P02` inside an aborted one. Either way the `ROLLBACK` that follows ends the transaction and
//! the connection is handed out clean; a connection that cannot run them is dropped.

/// Fails inside a transaction block; succeeds, at the cost of one round trip, outside one.
pub(crate) const OUTSIDE_TRANSACTION: &str =
    "SELECT 1 / (statement_timestamp() = transaction_timestamp())::int";

/// Ends whatever transaction the check found.
pub(crate) const ROLLBACK: &str = "ROLLBACK";

/// A connection back in the pool for less than this, with nothing left in flight, is handed
/// out again without a round trip (HikariCP's `aliveBypassWindowMs` has the same 500 ms). One
/// idle longer is checked first, and so is one that may be inside a transaction block a
/// statement of the user's own began. Diesel's pool knows every query was answered, sees the
/// closed flag and reads the last `ReadyForQuery`'s transaction status off the wire; the
/// SeaORM pool counts its statements' answers (sqlx answers everything in flight as the
/// connection comes back) and reads each statement's first word ([`keeps_transaction`]);
/// the tokio-postgres pool follows each session's wire (see [`wire`](super::wire)). The wire
/// is followed over TLS only: without it, Diesel's and tokio-postgres's every checkout checks.
pub(crate) const RECENTLY_USED: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a dropped connection may take to log out, or to be given the replies it still
/// waits for, before its socket is closed as it is: its few bytes go out at once unless the
/// server stopped reading, and the replies come at once unless it stopped answering.
pub(crate) const LOG_OUT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(feature = "seaorm")]
/// Whether `sql` leaves its session's transaction status as it found it: one statement
/// (nothing but blanks after a `;`) that starts, past blanks, comments and opening
/// parentheses, with one of [`KEEPING`]. Those cannot begin or end a transaction block;
/// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK` and their like do, and a procedure may
/// (`CALL`). Anything else, or not read to the end (a `;` inside a literal, say), counts as
/// one that may.
pub(crate) fn keeps_transaction(sql: &str) -> bool {
    let Some(rest) = past_blanks_and_comments(sql) else {
        return false;
    };
    let word_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    let (word, tail) = rest.split_at(word_end);
    let single = tail
        .find(';')
        .is_none_or(|at| tail[at..].chars().all(|c| c == ';' || c.is_whitespace()));
    single && KEEPING.iter().any(|k| word.eq_ignore_ascii_case(k))
}

#[cfg(feature = "seaorm")]
/// The first words of statements that cannot change a session's transaction status.
const KEEPING: [&str; 8] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE", "MERGE",
];

#[cfg(feature = "seaorm")]
/// `sql` from its first token that is not a blank, a comment (`--` to the end of the line,
/// `/* */` nested as PostgreSQL nests them) or an opening parenthesis; `None` for a comment
/// left open.
fn past_blanks_and_comments(mut sql: &str) -> Option<&str> {
    loop {
        sql = sql.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if sql.starts_with("/*") {
            let mut depth = 0usize;
            let mut at = 0;
            let bytes = sql.as_bytes();
            loop {
                match bytes.get(at..at + 2)? {
                    b"/*" => (depth, at) = (depth + 1, at + 2),
                    b"*/" => (depth, at) = (depth - 1, at + 2),
                    _ => at += 1,
                }
                if depth == 0 {
                    break;
                }
            }
            sql = &sql[at..];
        } else {
            return Some(sql);
        }
    }
}

#[cfg(all(test, feature = "seaorm"))]
mod tests {
    use super::keeps_transaction;

    #[test]
    fn statements_that_cannot_change_the_transaction_status_are_told_apart() {
        for sql in [
            "SELECT 1",
            "  select * from t where x = 1",
            "SELECT 1;",
            "-- note\n/* a /* nested */ comment */ (SELECT 1) UNION (SELECT 2)",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "insert into t values (1) returning id",
            "UPDATE t SET x = 1",
            "DELETE FROM t",
            "VALUES (1)",
            "TABLE t",
        ] {
            assert!(keeps_transaction(sql), "{sql:?}");
        }
        for sql in [
            "BEGIN",
            "begin;",
            " START TRANSACTION",
            "/* SELECT */ BEGIN",
            "-- SELECT\nBEGIN",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT s",
            "CALL p()",
            "SELECT 1; BEGIN",
            "SELECT 1; -- then\n",
            // Read as one that may: a `;` inside a literal is not told from one between statements.
            "select * from t where x = ';'",
            "select_x()",
            "SELECTED",
            "/* open",
            "/* a /* b */ SELECT 1",
            "-- only a comment",
            "",
            "SET search_path TO x",
        ] {
            assert!(!keeps_transaction(sql), "{sql:?}");
        }
    }
}
