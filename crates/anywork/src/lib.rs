//! AnyWork in one dependency: the crate family re-exported by feature, as `kube` does.
//!
//! | module | crate | feature |
//! | --- | --- | --- |
//! | `core` | `anywork-core`: types, the four traits, the wire contract | always |
//! | `runtime` | `anywork-runtime`: the dispatcher | `runtime` (default) |
//! | `store` | `anywork-store` | `store`; `sqlite` (default), `postgres` |
//! | `drivers` | `anywork-drivers` | `drivers`; `static` (default), `docker`, `k8s` |
//! | `channels` | `anywork-channels` | `channels` |
//! | `server` | `anywork-server`: the API and UI routers | `server` |
//! | `conformance` | `anywork-conformance` | `conformance` |
//!
//! ```toml
//! anywork = { version = "0.1", features = ["postgres", "docker", "server"] }
//! ```

#[cfg(feature = "channels")]
pub use anywork_channels as channels;
#[cfg(feature = "conformance")]
pub use anywork_conformance as conformance;
pub use anywork_core as core;
#[cfg(feature = "drivers")]
pub use anywork_drivers as drivers;
#[cfg(feature = "runtime")]
pub use anywork_runtime as runtime;
#[cfg(feature = "server")]
pub use anywork_server as server;
#[cfg(feature = "store")]
pub use anywork_store as store;

pub use anywork_core::{Error, ErrorKind, Result, TaskEvent, TaskRequest, TaskStatus};
#[cfg(feature = "runtime")]
pub use anywork_runtime::Dispatcher;
