//! [`WorkerConfig`] and [`WorkerState`]: what the HTTP handlers share.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anywork_core::worker_api::{RepoCheckout, WorkerSecret};
use anywork_core::{
    Error, ExecutionControl, Executor, PullRequestLink, Result, SessionId, TaskId, TaskStatus,
};
use tokio::sync::{Notify, watch};

use crate::run::Journal;
use crate::sandbox::Sandbox;
use crate::workspace::Workspace;

/// The worker's settings. Build with [`WorkerConfig::new`] and the `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The workspace root (`WORKSPACE_DIR`).
    pub workspace_root: PathBuf,
    /// Largest request body accepted, in bytes (default 8 MiB).
    pub max_body_bytes: usize,
    /// How long a canceled run may take to end by itself before the worker drops its event
    /// stream (default 1 s).
    pub cancel_grace: Duration,
    /// Interval of SSE keep-alive comments (default 15 s; at least 100 ms is used).
    pub keep_alive: Duration,
    /// Longest wait for [`ExecutionControl::respond`] (default 10 s).
    pub control_timeout: Duration,
    /// Unused: a run keeps its events in a journal its clients read at their own pace. Kept
    /// so that existing configurations compile.
    pub event_buffer: usize,
    /// How long a run goes on with no client attached (the server went away) before it is
    /// canceled; a server coming back re-attaches within it (`GET /chat/attach`). Default
    /// zero: a run stops as soon as its client is gone.
    pub detach_grace: Duration,
    /// The sandbox the executor confines its processes with, as `/health` reports it
    /// (`"sandbox": "bwrap"` or `"none: <reason>"`). Give it the same [`Sandbox`] as the
    /// executor (see [`crate::select::executor_with_sandbox`]); the default says that none
    /// was configured.
    pub sandbox: Sandbox,
    /// The secret every call but `GET /health` must carry
    /// ([`SECRET_HEADER`](anywork_core::worker_api::SECRET_HEADER)); `None` accepts every
    /// call (only for a worker that nobody else can reach).
    pub secret: Option<WorkerSecret>,
    /// The worker's own API as the agent's processes reach it (e.g. `http://127.0.0.1:8080`):
    /// where the Claude Code CLI finds the MCP server of the pull-request tool. `None`: only
    /// executors that run tools in the worker itself (native) offer that tool.
    pub self_url: Option<String>,
}

impl WorkerConfig {
    /// Default of [`max_body_bytes`](Self::max_body_bytes): 8 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

    /// Defaults, with the workspace at `workspace_root`.
    pub fn new(workspace_root: impl Into<PathBuf>) -> Self {
        Self {
            workspace_root: workspace_root.into(),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            cancel_grace: Duration::from_secs(1),
            keep_alive: Duration::from_secs(15),
            control_timeout: Duration::from_secs(10),
            event_buffer: 64,
            detach_grace: Duration::ZERO,
            sandbox: Sandbox::default(),
            secret: None,
            self_url: None,
        }
    }

    /// Sets [`self_url`](Self::self_url) (a trailing `/` is dropped).
    pub fn with_self_url(mut self, url: Option<String>) -> Self {
        self.self_url = url.map(|u| u.trim_end_matches('/').to_owned());
        self
    }

    /// Sets [`secret`](Self::secret).
    pub fn with_secret(mut self, secret: Option<WorkerSecret>) -> Self {
        self.secret = secret;
        self
    }

    /// Reads the secret from `WORKER_SECRET`, or else the file named by `WORKER_SECRET_FILE`,
    /// through `lookup`; `None` when neither is set. `InvalidInput` for a secret that is too
    /// short or a file that cannot be read.
    pub fn secret_from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WorkerSecret>> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(value) = get("WORKER_SECRET") {
            return WorkerSecret::new(value).map(Some);
        }
        let Some(path) = get("WORKER_SECRET_FILE") else {
            return Ok(None);
        };
        let value = std::fs::read_to_string(path.trim()).map_err(|e| {
            Error::invalid_input(format!("cannot read WORKER_SECRET_FILE {path}: {e}"))
        })?;
        WorkerSecret::new(value).map(Some).map_err(|e| {
            Error::invalid_input(format!("WORKER_SECRET_FILE {path}: {}", e.message()))
        })
    }

    /// Sets [`sandbox`](Self::sandbox).
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Sets [`max_body_bytes`](Self::max_body_bytes).
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets [`cancel_grace`](Self::cancel_grace).
    pub fn with_cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// Sets [`keep_alive`](Self::keep_alive).
    pub fn with_keep_alive(mut self, interval: Duration) -> Self {
        self.keep_alive = interval;
        self
    }

    /// Sets [`control_timeout`](Self::control_timeout).
    pub fn with_control_timeout(mut self, timeout: Duration) -> Self {
        self.control_timeout = timeout;
        self
    }

    /// Sets [`detach_grace`](Self::detach_grace).
    pub fn with_detach_grace(mut self, grace: Duration) -> Self {
        self.detach_grace = grace;
        self
    }

    /// Sets [`event_buffer`](Self::event_buffer) (at least 1).
    pub fn with_event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }
}

/// Everything the HTTP handlers share: configuration, workspace, executor and running tasks.
/// Cheap to clone.
#[derive(Clone)]
pub struct WorkerState {
    inner: Arc<Inner>,
}

struct Inner {
    config: WorkerConfig,
    workspace: Workspace,
    executor: Arc<dyn Executor>,
    runs: Mutex<Runs>,
    repos: Mutex<HashMap<SessionId, SessionRepo>>,
    /// Per session: the secret of its tool endpoint, and the running task's pull-request tool.
    #[allow(clippy::type_complexity)]
    tools: Mutex<HashMap<SessionId, (String, Option<Arc<dyn anywork_core::PullRequestOpener>>)>>,
}

/// A session's repository, as the last `/prepare` checked it out.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "pull-requests"), allow(dead_code))]
pub(crate) struct SessionRepo {
    /// What was asked (with its credentials).
    pub(crate) checkout: RepoCheckout,
    /// The checkout's folder.
    pub(crate) dir: PathBuf,
    /// The commit checked out.
    pub(crate) base: String,
}

#[derive(Default)]
struct Runs {
    tasks: HashMap<TaskId, RunEntry>,
    sessions: HashMap<SessionId, TaskId>,
    /// Journals of runs that ended, newest last, for a client re-attaching late.
    ended: std::collections::VecDeque<(TaskId, Arc<Journal>, std::time::Instant)>,
}

/// Ended runs' journals kept at most, and for how long.
const ENDED_KEPT: usize = 256;
const ENDED_FOR: Duration = Duration::from_secs(600);

struct RunEntry {
    journal: Arc<Journal>,
    control: Option<Arc<dyn ExecutionControl>>,
    cancel: Arc<Notify>,
    ended: watch::Receiver<Option<TaskStatus>>,
}

impl fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerState")
            .field("config", &self.inner.config)
            .field("executor", &self.inner.executor.name())
            .field("busy_sessions", &self.busy_sessions())
            .finish()
    }
}

impl WorkerState {
    /// A state for `executor`; creates the workspace root and its default `SOUL.md` and
    /// `AGENTS.md` when missing.
    pub fn new(config: WorkerConfig, executor: Arc<dyn Executor>) -> Result<Self> {
        let workspace = Workspace::new(config.workspace_root.clone());
        workspace.init()?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                workspace,
                executor,
                runs: Mutex::new(Runs::default()),
                repos: Mutex::new(HashMap::new()),
                tools: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.inner.config
    }

    /// The workspace.
    pub fn workspace(&self) -> &Workspace {
        &self.inner.workspace
    }

    /// The executor that runs tasks.
    pub fn executor(&self) -> &Arc<dyn Executor> {
        &self.inner.executor
    }

    /// Sessions with a running task, sorted.
    pub fn busy_sessions(&self) -> Vec<SessionId> {
        let mut sessions: Vec<SessionId> = self.runs().sessions.keys().cloned().collect();
        sessions.sort();
        sessions
    }

    /// Whether `session` has a running task.
    pub fn is_busy(&self, session: &SessionId) -> bool {
        self.runs().sessions.contains_key(session)
    }

    /// Remembers the repository `/prepare` checked out for `session` in `workspace` at
    /// commit `base`.
    pub(crate) fn set_session_repo(
        &self,
        session: &SessionId,
        checkout: RepoCheckout,
        workspace: &std::path::Path,
        base: String,
    ) {
        let dir = workspace.join(&checkout.dir);
        lock(&self.inner.repos).insert(
            session.clone(),
            SessionRepo {
                checkout,
                dir,
                base,
            },
        );
    }

    /// Forgets `session`'s repository (a `/prepare` without one).
    pub(crate) fn clear_session_repo(&self, session: &SessionId) {
        lock(&self.inner.repos).remove(session);
    }

    /// `session`'s repository, if the last `/prepare` checked one out.
    #[cfg_attr(not(feature = "pull-requests"), allow(dead_code))]
    pub(crate) fn session_repo(&self, session: &SessionId) -> Option<SessionRepo> {
        lock(&self.inner.repos).get(session).cloned()
    }

    /// The secret that calls `session`'s tool endpoint (made on first use, then the same for
    /// the session's life in this worker, so that a warm CLI process keeps a valid one).
    pub(crate) fn session_tool_secret(&self, session: &SessionId) -> String {
        lock(&self.inner.tools)
            .entry(session.clone())
            .or_insert_with(|| (WorkerSecret::generate().expose().to_owned(), None))
            .0
            .clone()
    }

    /// Sets (or, with `None`, clears) the tool `session`'s endpoint serves.
    pub(crate) fn set_session_tool(
        &self,
        session: &SessionId,
        opener: Option<Arc<dyn anywork_core::PullRequestOpener>>,
    ) {
        if let Some(entry) = lock(&self.inner.tools).get_mut(session) {
            entry.1 = opener;
        }
    }

    /// The session that `presented` is the tool secret of (compared in constant time), and
    /// its running task's tool if it has one.
    pub(crate) fn tool_for_secret(
        &self,
        presented: &str,
    ) -> Option<(SessionId, Option<Arc<dyn anywork_core::PullRequestOpener>>)> {
        let tools = lock(&self.inner.tools);
        let mut found = None;
        for (session, (secret, opener)) in tools.iter() {
            if constant_time_eq(secret.as_bytes(), presented.as_bytes()) {
                found = Some((session.clone(), opener.clone()));
            }
        }
        found
    }

    fn runs(&self) -> MutexGuard<'_, Runs> {
        // The map stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.inner
            .runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks `session` busy with `task_id`; `Conflict` when the session or the task id is
    /// already running. The returned guard frees both when dropped.
    pub(crate) fn reserve(&self, task_id: TaskId, session_id: &SessionId) -> Result<RunGuard> {
        let mut runs = self.runs();
        if let Some(running) = runs.sessions.get(session_id) {
            return Err(Error::conflict(format!(
                "session {session_id} is busy with task {running}; wait for it to end or cancel it"
            )));
        }
        if runs.tasks.contains_key(&task_id) {
            return Err(Error::conflict(format!(
                "task {task_id} is already running"
            )));
        }
        let cancel = Arc::new(Notify::new());
        let (ended_tx, ended_rx) = watch::channel(None);
        let journal = Arc::new(Journal::default());
        runs.tasks.insert(
            task_id,
            RunEntry {
                journal: journal.clone(),
                control: None,
                cancel: cancel.clone(),
                ended: ended_rx,
            },
        );
        runs.sessions.insert(session_id.clone(), task_id);
        Ok(RunGuard {
            state: self.clone(),
            journal,
            task_id,
            session_id: session_id.clone(),
            cancel,
            ended: ended_tx,
            status: None,
            opened: Arc::default(),
            serves_tool: false,
        })
    }

    /// Records the control handle of a started run.
    pub(crate) fn set_control(&self, task_id: TaskId, control: Arc<dyn ExecutionControl>) {
        if let Some(entry) = self.runs().tasks.get_mut(&task_id) {
            entry.control = Some(control);
        }
    }

    /// The journal of a running task, or of one that ended lately; `NotFound` otherwise.
    pub(crate) fn journal(&self, task_id: TaskId) -> Result<Arc<Journal>> {
        let runs = self.runs();
        if let Some(entry) = runs.tasks.get(&task_id) {
            return Ok(entry.journal.clone());
        }
        runs.ended
            .iter()
            .find(|(id, _, at)| *id == task_id && at.elapsed() < ENDED_FOR)
            .map(|(_, j, _)| j.clone())
            .ok_or_else(|| not_running(task_id))
    }

    /// The cancel signal and end watch of a running task; `NotFound` when it is not running.
    pub(crate) fn cancel_handle(
        &self,
        task_id: TaskId,
    ) -> Result<(Arc<Notify>, watch::Receiver<Option<TaskStatus>>)> {
        self.runs()
            .tasks
            .get(&task_id)
            .map(|e| (e.cancel.clone(), e.ended.clone()))
            .ok_or_else(|| not_running(task_id))
    }

    /// The control handle of a running task: `NotFound` when it is not running, `Conflict`
    /// while its executor is still starting.
    pub(crate) fn control(&self, task_id: TaskId) -> Result<Arc<dyn ExecutionControl>> {
        let runs = self.runs();
        let entry = runs
            .tasks
            .get(&task_id)
            .ok_or_else(|| not_running(task_id))?;
        entry.control.clone().ok_or_else(|| {
            Error::conflict(format!(
                "task {task_id} is still starting; it asks for input with an `input_required` event"
            ))
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `a` equals `b`, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn not_running(task_id: TaskId) -> Error {
    Error::not_found(format!(
        "task {task_id} is not running on this worker (unknown or already ended)"
    ))
}

/// Holds a session busy for one run; frees it when dropped, however the run ends.
pub(crate) struct RunGuard {
    state: WorkerState,
    journal: Arc<Journal>,
    task_id: TaskId,
    session_id: SessionId,
    cancel: Arc<Notify>,
    ended: watch::Sender<Option<TaskStatus>>,
    status: Option<TaskStatus>,
    /// Pull requests the run's tool opened, for its outcome.
    opened: Arc<Mutex<Vec<PullRequestLink>>>,
    /// Whether the session's tool endpoint serves this run's tool (cleared when it ends).
    serves_tool: bool,
}

impl RunGuard {
    /// Where the run's pull-request tool records what it opened.
    #[cfg_attr(not(feature = "pull-requests"), allow(dead_code))]
    pub(crate) fn opened(&self) -> &Arc<Mutex<Vec<PullRequestLink>>> {
        &self.opened
    }

    /// The pull requests opened so far.
    pub(crate) fn opened_links(&self) -> Vec<PullRequestLink> {
        lock(&self.opened).clone()
    }

    /// Serves `opener` on the session's tool endpoint while the run lasts.
    #[cfg_attr(not(feature = "pull-requests"), allow(dead_code))]
    pub(crate) fn serve_tool(&mut self, opener: Arc<dyn anywork_core::PullRequestOpener>) {
        self.state.session_tool_secret(&self.session_id);
        self.state.set_session_tool(&self.session_id, Some(opener));
        self.serves_tool = true;
    }

    /// The worker state this run belongs to.
    pub(crate) fn state(&self) -> &WorkerState {
        &self.state
    }

    /// The task.
    pub(crate) fn task_id(&self) -> TaskId {
        self.task_id
    }

    /// The session.
    pub(crate) fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// The run's events, for its clients.
    pub(crate) fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Fires when `/cancel` asks this run to stop.
    pub(crate) fn cancel_signal(&self) -> Arc<Notify> {
        self.cancel.clone()
    }

    /// Publishes how the run ended and frees the session.
    pub(crate) fn finish(mut self, status: TaskStatus) {
        self.status = Some(status);
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if self.serves_tool {
            self.state.set_session_tool(&self.session_id, None);
        }
        let keep = !self.state.config().detach_grace.is_zero();
        let mut runs = self.state.runs();
        runs.tasks.remove(&self.task_id);
        if keep {
            // A client that lost the stream may come back for the end of it.
            while runs.ended.len() >= ENDED_KEPT
                || runs
                    .ended
                    .front()
                    .is_some_and(|(_, _, at)| at.elapsed() >= ENDED_FOR)
            {
                runs.ended.pop_front();
            }
            runs.ended.push_back((
                self.task_id,
                self.journal.clone(),
                std::time::Instant::now(),
            ));
        }
        if runs.sessions.get(&self.session_id) == Some(&self.task_id) {
            runs.sessions.remove(&self.session_id);
        }
        drop(runs);
        // Only now, with the session free, tell `/cancel` how the run ended.
        if let Some(status) = self.status {
            self.ended.send_replace(Some(status));
        }
    }
}
