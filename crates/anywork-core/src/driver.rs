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

/// What a driver's idle reaper asks before it stops a session's worker, and tells once it is
/// done: the runtime holds the session in the shared store meanwhile
/// ([`TaskStore::hold_idle_session`](crate::TaskStore::hold_idle_session)), so that a task
/// arriving at that moment either keeps the worker (the hold is refused) or waits until the
/// stop is over and then gets a new one, on whichever server it runs.
#[async_trait]
pub trait ReapGuard: Send + Sync {
    /// Whether the worker of `session_id` may be stopped now. `true` holds the session: none
    /// of its tasks asks for a worker until [`release`](Self::release) (or the hold runs out).
    async fn hold(&self, session_id: &SessionId) -> bool;

    /// The reaper is done with `session_id` (its worker stopped, or the stop failed).
    async fn release(&self, session_id: &SessionId);
}

/// A [`ReapGuard`] that lets every stop happen: for one server without a shared store, and
/// for [`ContainerDriver::reap_idle`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Unguarded;

#[async_trait]
impl ReapGuard for Unguarded {
    async fn hold(&self, _: &SessionId) -> bool {
        true
    }

    async fn release(&self, _: &SessionId) {}
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

    /// The worker of `session_id` when the driver can tell it without waiting (no engine
    /// call, no health check due): what a dispatcher asks before it stores a new task, to
    /// store it already started ([`TaskStore::create_task_claimed`](crate::TaskStore::create_task_claimed)).
    /// `None` means "ask [`get_worker`](Self::get_worker)", never "no worker". The default
    /// answers `None`.
    fn ready_worker(&self, session_id: &SessionId) -> Option<WorkerEndpoint> {
        let _ = session_id;
        None
    }

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
    /// Drivers without per-session workers have nothing to reap (and say so with
    /// [`reaps_workers`](Self::reaps_workers)).
    async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
        let _ = busy;
        Ok(Vec::new())
    }

    /// Whether [`reap_idle`](Self::reap_idle) can ever stop a worker. A driver without
    /// per-session workers (one shared worker at a fixed URL) answers `false`, and a
    /// dispatcher then never asks it, nor reads the busy sessions it would have been told.
    /// The default answers `true`: a driver that stops workers needs nothing more.
    fn reaps_workers(&self) -> bool {
        true
    }

    /// [`reap_idle`](Self::reap_idle) asking `guard` before each stop (after the driver's
    /// own checks, right before the worker goes) and telling it after: a worker whose
    /// session the guard does not give is left alone. What the runtime calls, so that
    /// servers sharing a store do not stop a worker a task has just been given.
    ///
    /// The default ignores the guard and calls `reap_idle`: a driver that stops workers
    /// implements this (and `reap_idle` as this with [`Unguarded`]) to be safe with several
    /// servers.
    async fn reap_idle_guarded(
        &self,
        busy: &[SessionId],
        guard: &dyn ReapGuard,
    ) -> Result<Vec<SessionId>> {
        let _ = guard;
        self.reap_idle(busy).await
    }
}
