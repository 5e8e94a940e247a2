//! [`ContainerDriver`]: where a session's worker comes from.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ids::SessionId;
use crate::worker_api::WorkerSecret;

/// How to reach a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEndpoint {
    /// Stable id of the worker (container id, pod name, or the static URL).
    pub worker_id: String,
    /// Base URL of its HTTP API, without a trailing slash (`http://10.0.0.5:8080`).
    pub base_url: String,
    /// The secret the worker requires on every call
    /// ([`SECRET_HEADER`](crate::worker_api::SECRET_HEADER)); `None` for a worker that has
    /// none. Never serialized: it must not reach an API answer.
    #[serde(skip)]
    pub secret: Option<WorkerSecret>,
}

impl WorkerEndpoint {
    /// An endpoint without a secret.
    pub fn new(worker_id: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            base_url: base_url.into(),
            secret: None,
        }
    }

    /// The same endpoint, with `secret`.
    pub fn with_secret(mut self, secret: Option<WorkerSecret>) -> Self {
        self.secret = secret;
        self
    }
}

/// A worker as listed by a driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Where it is.
    pub endpoint: WorkerEndpoint,
    /// The session it serves, if it is per session.
    pub session_id: Option<SessionId>,
    /// Whether its last health check passed.
    pub healthy: bool,
}

/// One finding of a driver's set-up check ([`ContainerDriver::check_setup`]): what was
/// looked at, whether it is fine, and for people what was found or what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SetupCheck {
    /// What was checked: `engine`, `image`, `model`, `cluster`, `worker`, …
    pub name: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found; for a problem, what to do about it.
    pub message: String,
}

impl SetupCheck {
    /// `name` is fine: `message` says what was found.
    pub fn ok(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            message: message.into(),
        }
    }

    /// `name` is a problem: `message` says what to fix.
    pub fn problem(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            message: message.into(),
        }
    }
}

/// Gives each session a worker: a fixed URL, a container, or a pod.
///
/// Errors: `Unavailable` when the engine or API cannot be reached, `RateLimited` on a quota,
/// `NotFound` when the worker image is missing, each with a message that says what to fix.
///
/// The endpoints it gives carry the worker's [`secret`](WorkerEndpoint::secret): a
/// per-session driver generates one for each worker it creates and hands it to the worker
/// where its engine does not show it to others.
#[async_trait]
pub trait ContainerDriver: Send + Sync + 'static {
    /// Short name (`static`, `docker`, `k8s`).
    fn name(&self) -> &str;

    /// A healthy worker for `session_id`: reused if one exists and answers `/health`, created
    /// otherwise. Concurrent calls for one session create at most one worker.
    async fn get_worker(&self, session_id: &SessionId) -> Result<WorkerEndpoint>;

    /// Lets the worker of `session_id` go (stop it, or forget it). What the driver keeps for
    /// the session (its workspace volume or claim) stays, so the next
    /// [`get_worker`](Self::get_worker) finds the session's files. Releasing an unknown
    /// session is not an error.
    async fn release(&self, session_id: &SessionId) -> Result<()>;

    /// Ends `session_id` for good: [`release`](Self::release), then deletes whatever the
    /// driver keeps for the session (its workspace volume or claim), so its files and
    /// conversation are gone. Idempotent; purging an unknown session is not an error. A later
    /// [`get_worker`](Self::get_worker) starts a fresh worker on an empty workspace.
    ///
    /// The default only releases: right for drivers that keep nothing per session.
    async fn purge(&self, session_id: &SessionId) -> Result<()> {
        self.release(session_id).await
    }

    /// Whether the worker answers its `/health` within the driver's timeout.
    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool;

    /// The workers this driver knows, including ones adopted after a restart.
    async fn list(&self) -> Result<Vec<WorkerInfo>>;

    /// Looks at what the driver needs before a first task (its engine or cluster answers,
    /// the worker image is there, a model is configured for the workers, …) and says what
    /// is missing. Called at start-up, for the log and the UI; never fails: an unreachable
    /// backend is a finding. The default finds nothing to check.
    async fn check_setup(&self) -> Vec<SetupCheck> {
        Vec::new()
    }

    /// Stops the workers nobody asked for (through [`get_worker`](Self::get_worker)) for
    /// longer than the driver's idle TTL — except those of the `busy` sessions (a task running
    /// or waiting for input) and those whose `/health` reports a busy session. A reaped
    /// session's workspace survives where the driver keeps it (a volume, a PVC); its next
    /// `get_worker` starts a new worker. Returns the sessions whose workers were stopped.
    ///
    /// Drivers without per-session workers have nothing to reap.
    async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
        let _ = busy;
        Ok(Vec::new())
    }
}
