//! [`Dispatcher`]: takes task requests, runs each on its session's worker, records every event
//! and fans it out. Not tied to HTTP: the API, channels and embedders all call it.
//!
//! Life of a task: [`Dispatcher::submit`] stores it `pending` and queues it on its session
//! (one task at a time per session, FIFO). A session's runner waits for a global permit, takes
//! the worker from the [`ContainerDriver`], marks the task `running` with a lease, calls
//! `/prepare` and `/chat`, appends the streamed events to the task log in batches (the store
//! numbers them), publishes them on the hub, and records the outcome. Cancel, input answers
//! and the timeout reach the run through one control channel, so a running task's status has a
//! single writer.
//!
//! The engine is closed: events are published only by the dispatcher, after the store has
//! them, so "persist, then publish" holds by construction. Callers read and change state
//! through the operations here and in [`ops`](self) (sessions, logs, live events, workspace
//! documents, inbound channel requests).
//!
//! - `builder.rs`: [`DispatcherConfig`], [`DispatcherBuilder`], start-up.
//! - this file: submit, cancel, respond, shutdown; the store-then-publish primitives.
//! - `run.rs`: the run of one task. `retry.rs`: [`Backoff`] and retries.
//! - `deliver.rs`: what happens after a task ends (metrics, the end of its hooks).
//! - `hooks.rs`: the channel hooks of a task, in order, off the run's path.
//! - `outbox.rs`: the outbox sender (channel deliveries and push notifications, retried,
//!   dead-lettered) and the deliveries API.
//! - `upkeep.rs`: recovery of expired leases, re-queueing at start, the idle-worker reaper.
//! - `restart.rs`: at start, ending a dead previous server's tasks as interrupted and holding
//!   back sessions whose task another server holds.
//! - `feed.rs`: live events of tasks run by other servers sharing the store (the store's
//!   change feed, read into the hub).
//! - `retention.rs`: deleting finished tasks' logs by age and size, the store size metric.
//! - `ops.rs`: the operations an API calls (sessions, logs, events, workspace docs, inbound).

mod builder;
mod deliver;
mod fast;
mod feed;
mod hooks;
mod ops;
pub(crate) mod outbox;
mod restart;
mod retention;
mod retry;
mod run;
#[cfg(test)]
mod submit_tests;
mod upkeep;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::{
    Channel, ContainerDriver, Error, ErrorKind, InputResponse, NewSession, NewTask, NewTaskLog,
    Result, Session, SessionId, SessionMode, SkillSpec, Task, TaskChange, TaskEvent, TaskId,
    TaskOutcome, TaskRequest, TaskStatus, TaskStore,
};
use futures_util::Stream;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

pub use builder::{DispatcherBuilder, DispatcherConfig};
pub use ops::{DocFile, InboundOutcome, WorkspaceDoc};
pub use outbox::OutboxConfig;
pub use retention::{Retention, RetentionRound};
pub use retry::Backoff;
pub(crate) use retry::retry_if;

use crate::hub::{Hub, LiveEvent};
use crate::metrics::Metrics;
use crate::notices::Notices;
use crate::task_map::{TaskMap, TaskSet};
use crate::title::TitleGenerator;
use crate::worker_client::WorkerClient;

/// The longest [`Dispatcher::cancel`] waits for a running task to end before it answers
/// with the task still active (HTTP: 202 `canceling`).
pub const CANCEL_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// What [`Dispatcher::submit`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Submitted {
    /// The task, as stored (`pending`).
    pub task: Task,
    /// Whether the request made a new session.
    pub session_created: bool,
    /// Whether the request repeated an earlier one (same channel and idempotency key): `task`
    /// is the first one's, and nothing new was stored or queued.
    pub duplicate: bool,
    /// Whether the task's session had a title of its own (not the default one) when the task
    /// was stored: a caller that chats in it again may say it knows the session
    /// ([`submit_follow_and_watch_known`](Dispatcher::submit_follow_and_watch_known)), so
    /// that it is not read again. False for a duplicate.
    pub session_titled: bool,
}

/// What a caller of [`Dispatcher::submit_known`] found of the request's session when it
/// looked it up (by `session_id`, else by `channel_key`) just before.
#[derive(Debug)]
pub(crate) enum Known {
    /// It was not looked up.
    Unknown,
    /// It exists.
    Found(Session),
    /// There was none.
    Absent,
    /// The caller saw it stored, with a title of its own, on an earlier submit (a WebSocket
    /// chatting in the session it chatted in before): not read again. If it was deleted
    /// since, the task's create answers `NotFound` and nothing is stored. Only for a request
    /// in [`SessionMode::Existing`]; any other is read as [`Known::Unknown`].
    Stored,
}

/// What [`Dispatcher::resolve_session`] found for a request.
enum Resolved {
    /// The stored session the request continues.
    Found(Session),
    /// The stored session the request continues, as the caller knew it ([`Known::Stored`]):
    /// not read, titled.
    Stored(SessionId),
    /// A session to create in the same store write as the request's task, and what a
    /// `Conflict` on it means.
    Create(NewSession, IfTaken),
}

impl Resolved {
    /// The session's id.
    fn id(&self) -> &SessionId {
        match self {
            Self::Found(s) => &s.id,
            Self::Stored(id) => id,
            Self::Create(new, _) => &new.id,
        }
    }
}

/// What [`Dispatcher::create_with_session`] stored, or the first copy's task instead.
enum Created {
    /// The session (`true`: created by this write) and the task.
    Stored(Session, bool, Task),
    /// The task of the request's idempotency key, stored by its first copy.
    Duplicate(Submitted),
}

/// What a request does when the session it would create was taken meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IfTaken {
    /// Continues it (created by another request for the same id or channel key).
    Continue,
    /// Fails (`Conflict`): the request must make the session itself.
    Refuse,
    /// Nothing to look up: the session's id is fresh, so a conflict is the task's.
    Fresh,
}

/// The `Conflict` of a request that must create session `id` ([`SessionMode::CreateNew`])
/// when it exists already.
/// The refusal of a request that continues a session that does not exist.
fn no_session(id: &SessionId) -> Error {
    Error::not_found(format!(
        "session {id} does not exist; leave `session_id` out to start a new one"
    ))
}

fn session_taken(id: &SessionId) -> Error {
    Error::conflict(format!(
        "session {id} exists already; send the request again for a fresh one"
    ))
}

enum Control {
    Cancel(oneshot::Sender<()>),
    /// The server is going away: stop the run and record why (a failure, not a cancel).
    Interrupt(String),
    Input(InputResponse, oneshot::Sender<Result<()>>),
    /// Another server ended the task (its `done` is in the log, told by the store's change
    /// feed): the run stops at once, asks the worker to cancel and writes nothing more.
    Ended,
}

/// A run of this server, as others reach it.
#[derive(Debug, Clone)]
struct RunHandle {
    /// Its control messages.
    control: mpsc::Sender<Control>,
    /// Whether it holds its task (claimed it, `pending → running`): until then the run only
    /// waits for a worker, and the task may yet be claimed and run by another server, whose
    /// events reach this server through the store's change feed.
    claimed: bool,
}

impl RunHandle {
    fn new(control: mpsc::Sender<Control>) -> Self {
        Self {
            control,
            claimed: false,
        }
    }
}

struct Inner {
    store: Arc<dyn TaskStore>,
    driver: Arc<dyn ContainerDriver>,
    client: WorkerClient,
    hub: Hub,
    config: DispatcherConfig,
    channels: HashMap<String, Arc<dyn Channel>>,
    titles: Arc<dyn TitleGenerator>,
    skills: Arc<dyn crate::skills::SkillSource>,
    http: reqwest::Client,
    metrics: Metrics,
    /// Sessions with a runner, and the tasks waiting behind the running one.
    queues: Mutex<HashMap<SessionId, VecDeque<Task>>>,
    permits: Arc<Semaphore>,
    /// The runs of this server, by their task.
    runs: Mutex<TaskMap<RunHandle>>,
    closing: AtomicBool,
    /// Why runs that could not store their outcome ended: recovery gives that reason when
    /// the task's lease runs out, rather than blaming a server crash.
    last_words: Mutex<TaskMap<String>>,
    /// Sessions whose pending tasks wait for tasks another server holds (found at start).
    held: Mutex<HashMap<SessionId, Vec<TaskId>>>,
    /// Tasks taken back from this server's previous run: their runs re-attach to the worker
    /// (`/chat/attach`) instead of starting a new chat.
    resume: Mutex<TaskSet>,
    /// Set by `shutdown`: the background loops end.
    stopped: AtomicBool,
    /// The channel hooks of running tasks.
    hooks: hooks::Hooks,
    /// Wakes the outbox sender when something was enqueued.
    outbox_wake: Arc<Notify>,
    /// The key push notifications are signed with, if any.
    push_secret: Option<String>,
    /// Idempotency keys of inbound requests that answered a question (no task records them),
    /// newest last, so that a resent answer does not start a task.
    answered: Mutex<VecDeque<(String, String)>>,
    /// The saved defaults of new workspaces, as last read for a `/prepare`.
    defaults: Mutex<ops::DefaultsCache>,
    /// Held by the one read of the saved defaults under way, with when the last one ended,
    /// the cache generation it began in and what it answered: the tasks that find the
    /// defaults stale meanwhile wait for it and take its answer.
    defaults_read: tokio::sync::Mutex<Option<ops::DefaultsRead>>,
}

/// Schedules and runs tasks. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("driver", &self.inner.driver.name())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; should it, the data is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dispatcher {
    /// The store (inside the crate only: callers outside use the operations, so that nothing
    /// is published that was not stored).
    pub(crate) fn store(&self) -> &Arc<dyn TaskStore> {
        &self.inner.store
    }

    /// The live event hub (inside the crate only).
    pub(crate) fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The dispatcher's metrics (inside the crate only).
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether a run of this server has claimed `task_id` (what the change feed skips).
    #[cfg(test)]
    pub(crate) fn runs_here(&self, task_id: TaskId) -> bool {
        self.inner.runs_here(task_id)
    }

    /// Whether this server runs `task_id` now, is about to (a run that waits for its worker
    /// before it claims the task), or has it queued (in its session's queue, or next there and
    /// waiting for a permit): either way its events will reach the hub here, unless another
    /// server sharing the store claims it first (then the store's change feed brings them —
    /// it skips only tasks claimed here — and once the run or runner here finds the task
    /// taken, it no longer holds it).
    pub(crate) fn runs_or_queues(&self, task_id: TaskId, session: &SessionId) -> bool {
        lock(&self.inner.runs).contains_key(&task_id)
            || lock(&self.inner.queues)
                .get(session)
                .is_some_and(|q| q.iter().any(|t| t.id == task_id))
    }

    /// The name of the container driver (`static`, `docker`, `k8s`, …).
    pub fn driver_name(&self) -> &str {
        self.inner.driver.name()
    }

    /// The driver's set-up check ([`ContainerDriver::check_setup`]): what it needs before a
    /// first task, and what is missing.
    pub async fn check_setup(&self) -> Vec<anywork_core::SetupCheck> {
        self.inner.driver.check_setup().await
    }

    /// The configuration.
    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.config
    }

    /// The channel registered for `channel_type`.
    pub fn channel(&self, channel_type: &str) -> Option<&Arc<dyn Channel>> {
        self.inner.channels.get(channel_type)
    }

    /// Tasks waiting in session queues (not counting the running ones).
    pub fn queue_depth(&self) -> usize {
        lock(&self.inner.queues).values().map(VecDeque::len).sum()
    }

    /// Tasks being run by this dispatcher.
    pub fn running(&self) -> usize {
        lock(&self.inner.runs).len()
    }

    /// Tasks with a live event channel (followed or running); 0 when idle, for leak checks.
    pub fn live_tasks(&self) -> usize {
        self.inner.hub.live_tasks()
    }

    /// Stores a task as `pending` and queues it. The session is `request.session_id` (which
    /// must exist), else the one found by `channel_key`, else a new one.
    ///
    /// A request with an `idempotency_key` that a task of its channel already has stores
    /// nothing: the first task comes back with [`Submitted::duplicate`] set.
    pub async fn submit(&self, request: TaskRequest) -> Result<Submitted> {
        self.submit_known(request, Known::Unknown).await
    }

    /// [`submit`](Self::submit) of a request whose session the caller has just looked up.
    pub(crate) async fn submit_known(
        &self,
        request: TaskRequest,
        known: Known,
    ) -> Result<Submitted> {
        let mut start = None;
        let submitted = self.store_new(request, known, None, &mut start).await?;
        if !submitted.duplicate {
            if let Some(channel) = self.inner.channels.get(&submitted.task.channel_type) {
                self.inner.hooks.accepted(channel, &submitted.task);
            }
            self.start_or_enqueue(&submitted.task, start);
        }
        Ok(submitted)
    }

    /// [`submit`](Self::submit), and the task's events from its first to its `done`. The
    /// subscription is taken before the task is queued, so the events arrive live with no
    /// store read (the log is read only if the stream falls behind).
    pub async fn submit_and_follow(
        &self,
        request: TaskRequest,
    ) -> Result<(
        Submitted,
        impl Stream<Item = Result<LiveEvent>> + Send + 'static,
    )> {
        self.submit_follow_and_watch(request, None).await
    }

    /// [`submit_and_follow`](Self::submit_and_follow), and `notices` watches the task's session
    /// from before its title can be announced (a new session's title is announced while it is
    /// stored).
    pub async fn submit_follow_and_watch(
        &self,
        request: TaskRequest,
        notices: Option<&mut Notices>,
    ) -> Result<(
        Submitted,
        impl Stream<Item = Result<LiveEvent>> + Send + 'static,
    )> {
        self.submit_follow_and_watch_known(request, notices, false)
            .await
    }

    /// [`submit_follow_and_watch`](Self::submit_follow_and_watch); with `session_known`, of a
    /// request in a session (`session_id`, [`SessionMode::Existing`]) that the caller saw
    /// stored and titled on an earlier submit ([`Submitted::session_titled`]): the session
    /// is then not read again (a store read per chat less). If it was deleted since, the
    /// answer is the same `NotFound` as for a session that never was, and nothing is stored.
    pub async fn submit_follow_and_watch_known(
        &self,
        request: TaskRequest,
        notices: Option<&mut Notices>,
        session_known: bool,
    ) -> Result<(
        Submitted,
        impl Stream<Item = Result<LiveEvent>> + Send + 'static,
    )> {
        let known = if session_known {
            Known::Stored
        } else {
            Known::Unknown
        };
        let mut start = None;
        let submitted = self.store_new(request, known, notices, &mut start).await?;
        let live = self
            .inner
            .hub
            .subscribe(submitted.task.id, &submitted.task.session_id);
        if !submitted.duplicate {
            if let Some(channel) = self.inner.channels.get(&submitted.task.channel_type) {
                self.inner.hooks.accepted(channel, &submitted.task);
            }
            // After the subscription: a task stored started publishes its `running` here.
            let started = start.is_some();
            self.start_or_enqueue(&submitted.task, start);
            if started {
                // The run was spawned on this thread, where it would be polled only once
                // the caller stops: after the caller has written `task_created` and the
                // `running` event to its client (a WebSocket), all on the dispatch's path.
                // Yielding once lets the run go first, up to its first worker call. (A
                // plain `submit` does not: its caller answers a webhook or REST request,
                // whose answer should not wait for the run.)
                tokio::task::yield_now().await;
            }
        }
        // The follower keeps the task's id and session, not the whole task.
        let (d, task_id, session) = (
            self.clone(),
            submitted.task.id,
            submitted.task.session_id.clone(),
        );
        let events = crate::follow::into_stream(move |out| async move {
            crate::follow::follow_submitted(&d, task_id, session, live, &out).await
        });
        Ok((submitted, events))
    }

    /// Stores the request's task as `pending` (and its session if new), not queued yet; or,
    /// when it can start at once, already claimed, with `start` set to what starts its run
    /// when dropped (see [`fast`]).
    async fn store_new(
        &self,
        mut request: TaskRequest,
        known: Known,
        notices: Option<&mut Notices>,
        start: &mut Option<fast::FastStart>,
    ) -> Result<Submitted> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(Error::unavailable("the server is shutting down"));
        }
        request.validate_shape()?;
        self.resolve_skills(&mut request).await?;
        request.validate()?;
        // A request with an idempotency key is not looked up before it is stored: the store
        // refuses a key its channel has already (`Conflict`, nothing stored), and only then
        // is the first copy's task read (`duplicate_of`). A copy that would be refused here
        // gets the first task too, as when the lookup came first.
        let resolved = match self.admit(&mut request).await {
            Ok(()) => self.resolve_session(&request, known).await,
            Err(e) => Err(e),
        };
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(e) => {
                let key = request.idempotency_key.as_deref();
                return self.duplicate_of(e, &request.channel_type, key).await;
            }
        };
        let mut notices = notices;
        if let Some(notices) = notices.as_deref_mut() {
            notices.watch(resolved.id());
        }
        let (channel_type, key) = (
            request.channel_type.clone(),
            request.idempotency_key.clone(),
        );
        let new_task = NewTask::from_request(resolved.id().clone(), request);
        // The session as stored (`None`: known stored and titled, not read).
        let (session, created, task) = match resolved {
            Resolved::Found(session) => match self.create_task_fast(new_task, start).await {
                Ok(task) => (Some(session), false, task),
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    return self.duplicate_of(e, &channel_type, key.as_deref()).await;
                }
                Err(e) => return Err(e),
            },
            Resolved::Stored(id) => match self.create_task_fast(new_task, start).await {
                Ok(task) => (None, false, task),
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    return self.duplicate_of(e, &channel_type, key.as_deref()).await;
                }
                // Deleted since the caller saw it: refused as a session that never was.
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_session(&id)),
                Err(e) => return Err(e),
            },
            // The session and its first task in one store write (the task stored started
            // when it can start at once).
            // Boxed: the largest step of a submit, taken once per new session, whose future
            // would otherwise make every submit's future (moved whole into the WebSocket's
            // box per chat) twice as large.
            Resolved::Create(new, if_taken) => {
                match Box::pin(self.create_with_session(
                    new,
                    if_taken,
                    new_task,
                    key.as_deref(),
                    start,
                ))
                .await?
                {
                    Created::Stored(session, created, task) => (Some(session), created, task),
                    Created::Duplicate(first) => return Ok(first),
                }
            }
        };
        // A fresh session's id drawn again: its notices too (watching one again is a no-op).
        if let Some(notices) = notices {
            notices.watch(&task.session_id);
        }
        let untitled = session
            .as_ref()
            .is_some_and(|s| s.title == NewSession::DEFAULT_TITLE);
        self.inner.metrics.submitted();
        tracing::info!(
            task = %task.id,
            session = %task.session_id,
            channel = %task.channel_type,
            new_session = created,
            "task submitted"
        );
        // Created with a title already (`title_now`): nothing to set, only to announce.
        match &session {
            Some(session) if created && !untitled => self.inner.hub.notify(
                &session.id,
                anywork_core::ws::ServerMessage::SessionTitle {
                    session_id: session.id.clone(),
                    title: session.title.clone(),
                },
            ),
            _ if created || untitled => {
                self.spawn_title(task.session_id.clone(), task.message.clone());
            }
            _ => {}
        }
        Ok(Submitted {
            task,
            session_created: created,
            duplicate: false,
            session_titled: !untitled,
        })
    }

    /// What a request may ask for: MCP servers from the catalog (its own commands only when
    /// allowed; its own HTTP servers and its push URL only where the outbound policy allows).
    async fn admit(&self, request: &mut TaskRequest) -> Result<()> {
        let config = &self.inner.config;
        for (name, url) in config.mcp.admit(&mut request.mcp_servers)? {
            crate::outbound::check_remote_url(
                &config.outbound,
                &format!("MCP server {name:?}"),
                &url,
            )
            .await?;
        }
        if let Some(push) = &request.push_notification {
            crate::outbound::check_url(&config.outbound, "push_notification.url", &push.url)
                .await?;
        }
        Ok(())
    }

    /// Replaces the request's skills given by name with the skills from the [`SkillSource`],
    /// and checks that the name-only default skills of its channel resolve too: an unknown
    /// or broken skill refuses the request before anything is stored.
    ///
    /// [`SkillSource`]: crate::skills::SkillSource
    async fn resolve_skills(&self, request: &mut TaskRequest) -> Result<()> {
        let defaults = self
            .channel(&request.channel_type)
            .map(|c| c.defaults().skills)
            .unwrap_or_default();
        let mut names: Vec<String> = request
            .unresolved_skills()
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.extend(
            defaults
                .iter()
                .filter(|s| s.is_name_only())
                .map(|s| s.name.clone()),
        );
        if names.is_empty() {
            return Ok(());
        }
        let resolved = self.inner.resolve_skill_names(names).await?;
        request.resolve_skills(|name| {
            resolved
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .ok_or_else(|| Error::internal(format!("skill {name:?} was not resolved")))
        })
    }

    /// What can be asked for by name (`GET /api/skills`).
    pub async fn skill_catalog(&self) -> Result<crate::skills::SkillCatalog> {
        let skills = self.inner.skills.clone();
        tokio::task::spawn_blocking(move || skills.catalog())
            .await
            .map_err(|e| Error::internal(format!("the skills listing stopped: {e}")))?
    }

    /// Stores `new` with its first task `new_task` in one write. When the store refuses them
    /// (`Conflict`, nothing stored): the first copy's task when the request's idempotency
    /// `key` is taken in its channel (one read); else the session another request created
    /// meanwhile, continued with the task alone ([`IfTaken::Continue`]); or, when the id the
    /// channel drew for a session of the request's own ([`IfTaken::Refuse`]) is taken, the
    /// same write again with another id from the channel
    /// ([`Channel::fresh_session_id`](anywork_core::Channel::fresh_session_id)), a few times
    /// at most.
    async fn create_with_session(
        &self,
        mut new: NewSession,
        if_taken: IfTaken,
        mut new_task: NewTask,
        key: Option<&str>,
        start: &mut Option<fast::FastStart>,
    ) -> Result<Created> {
        /// Ids drawn again for a taken fresh session before the request is refused.
        const REDRAWS: usize = 3;
        let store = &self.inner.store;
        let mut redraws = 0;
        loop {
            let e = match self
                .create_session_fast(new.clone(), new_task.clone(), start)
                .await
            {
                Ok((session, task)) => return Ok(Created::Stored(session, true, task)),
                Err(e) if e.kind() == ErrorKind::Conflict => e,
                Err(e) => return Err(e),
            };
            // Nothing was stored. Either the task's key was taken (the same event arrived
            // twice and the other copy stored it first), or the session was (another
            // request made it first, or a fresh id repeated an existing one).
            let e = match self.first_of_key(e, &new.channel_type, key).await? {
                Ok(first) => return Ok(Created::Duplicate(first)),
                Err(e) => e,
            };
            // A fresh session's id is new: the conflict was the task's.
            if if_taken == IfTaken::Fresh {
                return Err(e);
            }
            let taken = self.taken_session(&new).await?;
            if if_taken == IfTaken::Refuse {
                if taken.is_none() {
                    return Err(e);
                }
                let again = (redraws < REDRAWS)
                    .then(|| self.channel(&new.channel_type)?.fresh_session_id())
                    .flatten()
                    .filter(|id| *id != new.id);
                let Some(id) = again else {
                    return Err(session_taken(&new.id));
                };
                redraws += 1;
                tracing::info!(taken = %new.id, session = %id, "a fresh session id was taken: drawn again");
                new.id = id.clone();
                new_task.session_id = id;
                continue;
            }
            // Another request for the same id or channel key made it first: continued.
            let Some(session) = taken else {
                return Err(e);
            };
            new_task.session_id = session.id.clone();
            return match store.create_task(new_task).await {
                Ok(task) => Ok(Created::Stored(session, false, task)),
                Err(e) if e.kind() == ErrorKind::Conflict => self
                    .duplicate_of(e, &new.channel_type, key)
                    .await
                    .map(Created::Duplicate),
                Err(e) => Err(e),
            };
        }
    }

    /// The task already stored by the first copy of a request with idempotency key `key`
    /// (`Ok`), or `e` back (`Err`) when there is no key or no such task.
    async fn first_of_key(
        &self,
        e: Error,
        channel_type: &str,
        key: Option<&str>,
    ) -> Result<std::result::Result<Submitted, Error>> {
        let Some(key) = key else {
            return Ok(Err(e));
        };
        let first = self
            .inner
            .store
            .find_task_by_idempotency_key(channel_type, key)
            .await?;
        Ok(first
            .map(|task| Submitted {
                task,
                session_created: false,
                duplicate: true,
                session_titled: false,
            })
            .ok_or(e))
    }

    /// The task already stored by the first copy of a request with idempotency key `key`,
    /// as the answer to a copy whose task the store refused with `e` (a `Conflict`); `e`
    /// when there is no key or no such task.
    async fn duplicate_of(
        &self,
        e: Error,
        channel_type: &str,
        key: Option<&str>,
    ) -> Result<Submitted> {
        self.first_of_key(e, channel_type, key).await?
    }

    /// After the store refused to create `new` with its first task (`Conflict`, nothing
    /// stored): the session stored meanwhile with its channel key, else with its id (`None`
    /// when there is none: the conflict was the task's).
    async fn taken_session(&self, new: &NewSession) -> Result<Option<Session>> {
        let store = &self.inner.store;
        match &new.channel_key {
            Some(key) => store.find_session(&new.channel_type, key).await,
            None => match store.get_session(&new.id).await {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// The request's session: the stored one it continues, or the one to create with its
    /// task. A new session gets its title in the same write when the generator has one at
    /// once ([`title_now`](crate::TitleGenerator::title_now)), made only for sessions to
    /// create. `known` is what the caller found when it looked the session up just before
    /// (by `session_id`, else by `channel_key`), so that it is not read twice. A session the
    /// request must create ([`SessionMode::CreateNew`]) is not read at all: the store refuses
    /// a taken id when it is created.
    async fn resolve_session(&self, request: &TaskRequest, known: Known) -> Result<Resolved> {
        let store = &self.inner.store;
        let titled = |mut new: NewSession| {
            if let Some(title) = self.inner.titles.title_now(&request.message) {
                new.title = title;
            }
            new
        };
        if let Some(id) = &request.session_id {
            let mode = request.session_mode;
            let existing = match (known, mode) {
                (Known::Stored, SessionMode::Existing) => return Ok(Resolved::Stored(id.clone())),
                (Known::Found(_), SessionMode::CreateNew) => return Err(session_taken(id)),
                (_, SessionMode::CreateNew) | (Known::Absent, _) => None,
                (Known::Found(s), _) => Some(s),
                (Known::Unknown | Known::Stored, _) => match store.get_session(id).await {
                    Ok(s) => Some(s),
                    Err(e) if e.kind() == ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                },
            };
            if let Some(s) = existing {
                return Ok(Resolved::Found(s));
            }
            if mode == SessionMode::Existing {
                return Err(no_session(id));
            }
            let new = NewSession::new(&request.channel_type).with_id(id.clone());
            let if_taken = if mode == SessionMode::CreateNew {
                IfTaken::Refuse
            } else {
                // Created meanwhile by another request: continue it.
                IfTaken::Continue
            };
            return Ok(Resolved::Create(titled(new), if_taken));
        }
        let Some(key) = &request.channel_key else {
            let new = NewSession::new(&request.channel_type);
            return Ok(Resolved::Create(titled(new), IfTaken::Fresh));
        };
        let existing = match known {
            Known::Found(s) => Some(s),
            Known::Absent => None,
            Known::Unknown | Known::Stored => {
                store.find_session(&request.channel_type, key).await?
            }
        };
        if let Some(s) = existing {
            return Ok(Resolved::Found(s));
        }
        // Another request for the same key may win the race: then its session is used.
        let new = NewSession::new(&request.channel_type).with_key(key.clone());
        Ok(Resolved::Create(titled(new), IfTaken::Continue))
    }

    fn spawn_title(&self, session: SessionId, message: String) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut title = inner.titles.title(&message).await;
            if title.trim().is_empty() {
                title = crate::title::first_words(&message);
            }
            // Set only if nobody renamed the session meanwhile.
            match inner.store.get_session(&session).await {
                Ok(s) if s.title == NewSession::DEFAULT_TITLE => {}
                _ => return,
            }
            if let Err(e) = inner.store.set_session_title(&session, &title).await {
                tracing::warn!(%session, error = %e, "cannot store the session title");
                return;
            }
            inner.hub.notify(
                &session,
                anywork_core::ws::ServerMessage::SessionTitle {
                    session_id: session.clone(),
                    title,
                },
            );
        });
    }

    /// Starts a task stored started (dropping `start` runs it), or queues `task`.
    fn start_or_enqueue(&self, task: &Task, start: Option<fast::FastStart>) {
        match start {
            Some(start) => drop(start),
            None => self.enqueue(task.clone()),
        }
    }

    fn enqueue(&self, task: Task) {
        let mut queues = lock(&self.inner.queues);
        if let Some(queue) = queues.get_mut(&task.session_id) {
            queue.push_back(task);
            return;
        }
        let session = task.session_id.clone();
        queues.insert(session.clone(), VecDeque::from([task]));
        drop(queues);
        tokio::spawn(run::session_runner(self.inner.clone(), session));
    }

    /// Cancels a task in any active state and returns it as stored afterwards: a pending task
    /// becomes `canceled` at once; a running one is stopped on its worker first, and if it has
    /// not ended within [`CANCEL_ANSWER_WAIT`] it is returned still active (its run goes on
    /// stopping it: the worker's grace, then `canceled` anyway). `Conflict` ("Cannot cancel
    /// task in status: …") when it is already over.
    pub async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        for _ in 0..5 {
            let task = self.inner.store.get_task(task_id).await?;
            if task.status.is_terminal() {
                return Err(Error::conflict(format!(
                    "Cannot cancel task in status: {}",
                    task.status
                )));
            }
            let run = lock(&self.inner.runs)
                .get(&task_id)
                .map(|r| r.control.clone());
            if let Some(run) = run {
                let (ack, done) = oneshot::channel();
                if run.send(Control::Cancel(ack)).await.is_ok() {
                    let wait = CANCEL_ANSWER_WAIT
                        .min(self.inner.config.cancel_grace + Duration::from_secs(1));
                    let _ = tokio::time::timeout(wait, done).await;
                    return self.inner.store.get_task(task_id).await;
                }
                continue;
            }
            // Not running here: queued, or left by a server that is gone.
            match self
                .inner
                .finish_unrun(&task, TaskOutcome::canceled())
                .await
            {
                Ok(task) => {
                    if let Some(queue) = lock(&self.inner.queues).get_mut(&task.session_id) {
                        queue.retain(|t| t.id != task_id);
                    }
                    return Ok(task);
                }
                Err(e) if e.kind() == ErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::conflict(format!(
            "task {task_id} kept changing while it was being canceled; try again"
        )))
    }

    /// Answers a task's `input_required` event; the run continues.
    pub async fn respond(&self, task_id: TaskId, response: InputResponse) -> Result<()> {
        let run = lock(&self.inner.runs)
            .get(&task_id)
            .map(|r| r.control.clone());
        let Some(run) = run else {
            let task = self.inner.store.get_task(task_id).await?;
            return Err(Error::conflict(format!(
                "task {task_id} is {} and not waiting for input",
                task.status
            )));
        };
        let (ack, done) = oneshot::channel();
        run.send(Control::Input(response, ack))
            .await
            .map_err(|_| Error::conflict(format!("task {task_id} has just ended")))?;
        done.await
            .map_err(|_| Error::conflict(format!("task {task_id} has just ended")))?
    }

    /// Shuts down in order: new tasks are refused (and `check_ready` fails) and queued ones
    /// are no longer started (they stay `pending` for the next start); running tasks get up
    /// to `grace` to finish, their followers still served; those still running then are
    /// stopped on their workers and recorded as failed, interrupted by the shutdown (within
    /// the cancel grace). Call it before closing connections, so that followers see the
    /// `done` of the tasks that finished.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + grace;
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let runs: Vec<_> = lock(&self.inner.runs)
            .values()
            .map(|r| r.control.clone())
            .collect();
        if !runs.is_empty() {
            tracing::warn!(
                tasks = runs.len(),
                "tasks still running after the shutdown grace are interrupted"
            );
        }
        let reason = format!(
            "interrupted: the server shut down before the task finished (it waited {} s, \
             SHUTDOWN_GRACE_SECONDS); send the message again to retry",
            grace.as_secs_f64()
        );
        for run in runs {
            let _ = run.try_send(Control::Interrupt(reason.clone()));
        }
        let deadline = Instant::now() + self.inner.config.cancel_grace + Duration::from_secs(1);
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::Relaxed)
    }
}

/// An event with its wire JSON, when it was encoded.
type Encoded = (TaskEvent, Option<Arc<str>>);

/// `events` as log rows for the store and as they are published, each encoded once
/// ([`NewTaskLog::now_encoded`]): the store writes the bytes its followers are sent. An event
/// that cannot be encoded (none can: its JSON is text and numbers) goes without, and is
/// encoded by the store and by each follower as before.
fn encode(events: Vec<TaskEvent>) -> (Vec<NewTaskLog>, Vec<Encoded>) {
    events
        .into_iter()
        .map(|event| match NewTaskLog::now_encoded(event.clone()) {
            Ok((log, wire)) => (log, (event, Some(wire))),
            Err(_) => (NewTaskLog::now(event.clone()), (event, None)),
        })
        .unzip()
}

impl Inner {
    /// Whether a run of this server holds `task_id` (claimed it): it publishes the task's
    /// events here as it stores them.
    fn runs_here(&self, task_id: TaskId) -> bool {
        lock(&self.runs).get(&task_id).is_some_and(|r| r.claimed)
    }

    /// Resolves skill names through the skill source, off the async threads.
    async fn resolve_skill_names(&self, names: Vec<String>) -> Result<Vec<SkillSpec>> {
        let skills = self.skills.clone();
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|n| skills.resolve(n))
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| Error::internal(format!("resolving skills stopped: {e}")))?
    }

    /// Appends events to the log while the task is active, then publishes them with their
    /// seqs. `Conflict` once the task is over (ended by another server sharing the store):
    /// nothing is written after its `done`.
    async fn record(&self, task: &Task, events: Vec<TaskEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let (logs, events) = encode(events);
        let last = self.store.append_logs_while_active(task.id, logs).await?;
        self.publish(task, last + 1 - n, events);
        Ok(())
    }

    /// Changes the task's status and appends `events` in one write, then publishes them.
    /// Also enqueues, in the same store transaction, the deliveries that tell of the new
    /// status (the outcome to the task's channel, its push notification), and wakes the
    /// outbox sender when there are any.
    ///
    /// The caller brings its copy of the task up to date afterwards with
    /// [`stored_change`](Self::stored_change) ([`TaskStore::update_task_lean`] does not read
    /// the row back): no copy of the task is made here unless the task has a channel or a
    /// push receiver to tell.
    async fn transition_and_enqueue(
        &self,
        task: &Task,
        expected: TaskStatus,
        change: TaskChange,
        events: Vec<TaskEvent>,
    ) -> Result<()> {
        let question = events.iter().rev().find_map(|e| match e {
            TaskEvent::InputRequired(r) => Some(r),
            _ => None,
        });
        let done = events.iter().rev().find_map(|e| match e {
            TaskEvent::Done(o) => Some(o),
            _ => None,
        });
        let deliveries = outbox::deliveries_after(self, task, expected, &change, question, done);
        let woken = !deliveries.is_empty();
        let n = events.len() as u64;
        let (logs, events) = encode(events);
        let last = self
            .store
            .update_task_lean(task.id, expected, change, logs, deliveries)
            .await?;
        self.publish(task, last + 1 - n, events);
        if woken {
            self.outbox_wake.notify_one();
        }
        Ok(())
    }

    /// Brings `task` (the copy a [`transition_and_enqueue`](Self::transition_and_enqueue)
    /// from `expected` was made with) to the task as stored after `change`: `change` applied
    /// in place, as the store applied it (its compare-and-set on `expected`, and on the lease
    /// for a change with `if_lease`, makes the two agree); read back from the store when this
    /// copy refuses the change (a copy older than the store's row).
    async fn stored_change(
        &self,
        task: &mut Task,
        expected: TaskStatus,
        change: &TaskChange,
    ) -> Result<()> {
        task.status = expected;
        if change.apply(task).is_err() {
            *task = self.store.get_task(task.id).await?;
        }
        Ok(())
    }

    /// Starts `task` through the store's claim ([`TaskStore::claim_task_lean`]): `pending →
    /// running` with `change` and `events` (and the deliveries the new status calls for) if
    /// it is its session's turn on every server sharing the store; publishes the events when
    /// it was. A claimed task comes back as `task` with `change` applied (the store does not
    /// read it back: its compare-and-set on `pending` makes the two agree).
    async fn claim(
        &self,
        task: &Task,
        change: TaskChange,
        events: Vec<TaskEvent>,
    ) -> Result<anywork_core::Claim> {
        let mut after = task.clone();
        after.status = TaskStatus::Pending;
        let applied = change.apply(&mut after);
        let deliveries = match applied {
            Ok(()) => outbox::deliveries_for(self, &after, None, None),
            Err(_) => Vec::new(),
        };
        let woken = !deliveries.is_empty();
        let n = events.len() as u64;
        let (logs, events) = encode(events);
        let claim = self
            .store
            .claim_task_lean(task.id, change, logs, deliveries)
            .await?;
        let anywork_core::Claim::Claimed((), last) = claim else {
            return Ok(claim.map(|()| after));
        };
        self.publish(task, last + 1 - n, events);
        if woken {
            self.outbox_wake.notify_one();
        }
        match applied {
            Ok(()) => Ok(anywork_core::Claim::Claimed(after, last)),
            Err(_) => Ok(anywork_core::Claim::Claimed(
                self.store.get_task(task.id).await?,
                last,
            )),
        }
    }

    /// Publishes events the store has just numbered `first..`. Only `record`, `claim` and
    /// `transition_and_enqueue` call it: what is published was stored.
    fn publish(&self, task: &Task, first: u64, events: Vec<Encoded>) {
        self.hub.publish(
            events
                .into_iter()
                .enumerate()
                .map(|(i, (event, wire))| LiveEvent {
                    wire,
                    ..LiveEvent::new(task.id, task.session_id.clone(), first + i as u64, event)
                }),
        );
    }

    /// Ends a task no run of this server holds (queued, or orphaned) with `outcome`.
    async fn finish_unrun(&self, task: &Task, outcome: TaskOutcome) -> Result<Task> {
        self.finish_unrun_with(task, outcome, Vec::new()).await
    }

    /// [`finish_unrun`](Self::finish_unrun) with `before` written just ahead of the `done`.
    async fn finish_unrun_with(
        &self,
        task: &Task,
        outcome: TaskOutcome,
        before: Vec<TaskEvent>,
    ) -> Result<Task> {
        self.finish_unrun_change(task, TaskChange::finish(outcome), before)
            .await
    }

    /// Ends a task whose lease expired, as [`finish_unrun`](Self::finish_unrun) does, if
    /// its lease is still the expired one: an owner that renewed it meanwhile keeps it
    /// (`Conflict`), and of several servers recovering it at once one wins.
    async fn finish_expired(&self, task: &Task, outcome: TaskOutcome) -> Result<Task> {
        let change = TaskChange::finish(outcome).if_lease(task.lease.clone());
        self.finish_unrun_change(task, change, Vec::new()).await
    }

    async fn finish_unrun_change(
        &self,
        task: &Task,
        change: TaskChange,
        mut before: Vec<TaskEvent>,
    ) -> Result<Task> {
        let outcome = change
            .outcome
            .clone()
            .ok_or_else(|| Error::internal("finishing a task without its outcome"))?;
        before.push(TaskEvent::Done(outcome.clone()));
        let mut stored = task.clone();
        self.transition_and_enqueue(task, task.status, change.clone(), before)
            .await?;
        self.stored_change(&mut stored, task.status, &change)
            .await?;
        tracing::info!(
            task = %task.id,
            session = %task.session_id,
            status = %stored.status,
            ran = false,
            error = outcome.error.as_deref().unwrap_or(""),
            "task finished"
        );
        self.after_finish(&stored);
        if !lock(&self.runs).contains_key(&task.id) {
            self.hub.close(task.id);
        }
        Ok(stored)
    }
}
