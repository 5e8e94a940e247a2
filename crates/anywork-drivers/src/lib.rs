//! Container drivers for AnyWork: where a session's worker runs.
//!
//! Each driver implements [`ContainerDriver`]: [`StaticDriver`] (one fixed worker URL,
//! feature `static`, default); `docker` and `k8s` drivers (one container or pod per session)
//! arrive with their own issue.

pub use anywork_core::driver::{ContainerDriver, WorkerEndpoint, WorkerInfo};

#[cfg(feature = "static")]
mod static_driver;
#[cfg(feature = "static")]
pub use static_driver::StaticDriver;
