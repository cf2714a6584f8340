//! Where database passwords come from: a static password, Lakebase (the `lakebase` feature),
//! Aurora DSQL (the `dsql` feature), or your own async function.
//!
//! Every source implements [`CredentialSource`]: an async call that returns a [`Token`] (the
//! secret and, when it has one, its expiry). The [`TokenCache`](crate::TokenCache) sits in front of a
//! source and decides when to call it.

mod custom;
#[cfg(feature = "dsql")]
mod dsql;
#[cfg(feature = "lakebase")]
pub(crate) mod lakebase;
mod source;
mod static_password;

pub use custom::CUSTOM_FETCH_TIMEOUT;
#[cfg(feature = "dsql")]
pub use dsql::Dsql;
#[cfg(feature = "lakebase")]
pub use lakebase::{Claim, IdTokenSource, Lakebase, LakebaseTarget, WorkspaceAuth};
pub use source::{BoxFuture, Clock, CredentialSource, SystemClock, Token};
pub use static_password::StaticPassword;
