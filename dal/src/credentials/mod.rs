//! Where database passwords come from: a static password, Lakebase, Aurora DSQL, or your own
//! async function.
//!
//! Every source implements [`CredentialSource`]: an async call that returns a [`Token`] (the
//! secret and, when it has one, its expiry). The [`TokenCache`](crate::TokenCache) sits in front of a
//! source and decides when to call it.

mod custom;
#[cfg(feature = "dsql")]
mod dsql;
mod lakebase;
mod source;
mod static_password;

#[cfg(feature = "dsql")]
pub use dsql::Dsql;
pub use lakebase::{Lakebase, LakebaseTarget, WorkspaceAuth};
pub use source::{BoxFuture, Clock, CredentialSource, SystemClock, Token};
pub use static_password::StaticPassword;
