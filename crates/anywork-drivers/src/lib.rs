//! Container drivers for AnyWork: where a session's worker runs.
//!
//! Each driver implements [`ContainerDriver`]: [`StaticDriver`] (one fixed worker URL,
//! feature `static`, default), `DockerDriver` (a container per session, feature `docker`) and
//! `K8sDriver` (a pod + service per session, feature `k8s`). [`common`] holds what the
//! per-session drivers share.

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
