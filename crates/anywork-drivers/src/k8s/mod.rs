//! [`K8sDriver`]: one Pod and one Service per session on Kubernetes (feature `k8s`).
//!
//! For session `s` the driver owns, in one namespace, objects named `<prefix><slug>` where
//! `slug` is [`session_slug`](crate::common::session_slug):
//!
//! - a **Pod** running the worker image, labelled `app.kubernetes.io/managed-by=anywork` and
//!   `anywork.dev/session=<slug>`, annotated with the raw session id (so a restarted server
//!   adopts it), locked down (non-root, no privilege escalation, read-only root filesystem with
//!   an emptyDir `/tmp`, all capabilities dropped, seccomp `RuntimeDefault`) and probed on
//!   `/health`;
//! - a **Service** selecting it, owned by the Pod (deleting the Pod garbage-collects it);
//! - a **Secret** `<prefix><slug>-auth` holding the worker's own random secret
//!   (`WORKER_SECRET`, which the pod takes with `secretKeyRef`): the worker refuses calls
//!   without it. It is created before the pod and deleted with it; the Pod spec names it but
//!   never holds the value, so whoever may `get pods` does not learn it;
//! - with `K8S_WORKSPACE_STORAGE=pvc`, a **PersistentVolumeClaim** `<prefix><slug>-ws` for the
//!   workspace. It is not owned by the Pod: it survives release and reaping, so the session's
//!   next worker finds its files. [`purge`](anywork_core::ContainerDriver::purge) (a deleted
//!   session) deletes it with the Pod and Service.
//!
//! `get_worker` (under a per-session lock) reuses a Running+Ready pod whose `/health` answers,
//! waits for one still starting (another server's creation is adopted, a 409 on create
//! included), replaces a Failed/Succeeded one, waits out a terminating one, and otherwise
//! creates one, then waits until it is Ready and answers `/health`. `list` finds pods by label
//! selector (so a restarted server adopts them); terminating pods, and with `pod-ip`
//! addressing pods without an IP yet, are not listed. `release` and `reap_idle` delete the pod
//! its Service and its Secret, `purge` also the claim (a 404 is fine everywhere).
//!
//! The API calls it makes, and so the RBAC it needs (`deploy/k8s/rbac.yaml`): pods `get`,
//! `list`, `create`, `delete`; services `get`, `create`, `delete`; secrets `get`, `create`,
//! `delete`; persistentvolumeclaims `create`, `delete`.

mod config;
mod driver;
mod manifests;

use std::collections::HashMap;
use std::sync::Mutex;

use anywork_core::SessionId;
use anywork_core::worker_api::WorkerSecret;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::Api;

use crate::common::{HealthCheck, IdleClock, SessionLocks};

/// The `kube` crate this driver is built on, so callers can make a [`kube::Client`] of the
/// same version for [`K8sDriver::with_client`].
pub use kube;

pub use config::{Addressing, K8sConfig, PASSED_THROUGH_ENV, Resources, WorkspaceStorage};
pub use driver::client_for;
pub use manifests::{
    COMPONENT, COMPONENT_LABEL, CONTAINER_NAME, MANAGED_BY, MANAGED_BY_LABEL, SESSION_ANNOTATION,
    SESSION_LABEL, WORKER_SECRET_KEY, WORKSPACE_MOUNT,
};

/// One Pod and one Service per session; see the [module docs](self).
pub struct K8sDriver {
    config: K8sConfig,
    pods: Api<Pod>,
    services: Api<Service>,
    pvcs: Api<PersistentVolumeClaim>,
    secrets: Api<Secret>,
    /// The worker secret of each session's pod (by the pod's uid), as created or read from
    /// its Secret.
    known_secrets: Mutex<HashMap<SessionId, (String, WorkerSecret)>>,
    health: HealthCheck,
    locks: SessionLocks,
    clock: IdleClock,
}

impl std::fmt::Debug for K8sDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sDriver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
