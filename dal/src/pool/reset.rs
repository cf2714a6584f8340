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
/// idle longer is checked first. Diesel's pool knows every query was answered and sees the
/// closed flag; sqlx answers everything in flight and ends any transaction as the connection
/// comes back. The tokio-postgres pool follows each session's wire (see
/// [`wire`](super::wire)), over TLS.
pub(crate) const RECENTLY_USED: std::time::Duration = std::time::Duration::from_millis(500);
