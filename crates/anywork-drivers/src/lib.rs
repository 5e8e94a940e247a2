//! Container drivers for AnyWork: where a session's worker runs.
//!
//! Each driver implements [`anywork_core::ContainerDriver`]: `static` (one fixed worker URL,
//! default), `docker` (one container per session, feature `docker`) and `k8s` (one pod per
//! session, feature `k8s`). The implementations arrive with their own issues; until then this
//! crate only re-exports the trait so that embedders can already depend on the final path.

pub use anywork_core::driver::{ContainerDriver, WorkerEndpoint, WorkerInfo};
