//! Container drivers for AnyWork: where a session's worker runs.
//!
//! Each driver implements [`ContainerDriver`]: [`StaticDriver`] (one fixed worker URL,
//! feature `static`, default); `docker` and `k8s` drivers (one container or pod per session)
//! arrive with their own issue.

pub use anywork_core::driver::{ContainerDriver, WorkerEndpoint, WorkerInfo};

pub mod common;

#[cfg(feature = "static")]
mod static_driver;
#[cfg(feature = "static")]
pub use static_driver::StaticDriver;

#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "docker")]
pub use docker::{DockerConfig, DockerDriver};

#[cfg(feature = "k8s")]
pub mod k8s;
#[cfg(feature = "k8s")]
pub use k8s::{K8sConfig, K8sDriver};
