//! What every pool runs when it hands out a connection that was used before: one round trip
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
