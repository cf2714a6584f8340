//! Lakebase's platform APIs beside its credentials: the Management API of projects,
//! branches and endpoints ([`Management`]), a branch per test ([`TemporaryBranch`]), and the
//! PostgREST-compatible Data API ([`DataApi`]). They stand above the configuration and the
//! token cache, which they build on; the workspace calls themselves are the credential
//! source's ([`Lakebase`](crate::credentials::Lakebase)).

mod data_api;
mod management;

pub use data_api::{DataApi, DataQuery};
pub use management::{Branch, Endpoint, Management, Operation, TemporaryBranch};
