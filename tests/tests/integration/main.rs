//! Integration tests of dal against PostgreSQL servers the tests start themselves, linked
//! into one test binary: one module per subject.

mod branches;
mod data_api;
mod dsql;
mod examples;
mod fault_suite;
mod faults;
mod lakebase_pools;
mod local_lakebase;
mod local_server;
mod migrations;
mod pools;
mod schema_parity;
mod secrets;
mod transactions;
