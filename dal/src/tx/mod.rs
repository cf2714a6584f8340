//! Transactions for both ORMs: one [`TxMode`] (isolation, read-only, deferrable), retries of
//! whole transactions after conflicts ([`RetryPolicy`]), and savepoints that refuse Aurora
//! DSQL, which has none.
//!
//! Optimistic-concurrency databases (Aurora DSQL) report conflicts at COMMIT as SQLSTATE
//! `40001`; PostgreSQL's SERIALIZABLE isolation does the same, and deadlocks end one
//! transaction with `40P01`. In each case the whole transaction must run again, so
//! [`Transactions`] takes the transaction's work as a closure it can call once per attempt.

#[cfg(feature = "diesel")]
mod diesel;
#[cfg(feature = "seaorm")]
mod seaorm;
mod transactions;

pub use transactions::{Isolation, Transactions, TxMode};
