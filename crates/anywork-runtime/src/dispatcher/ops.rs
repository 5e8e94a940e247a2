//! The operations an API calls on the engine — REST and WebSocket handlers, a channel's HTTP
//! route, an embedder's own code — so that none of them needs the store, the driver or the
//! worker client: sessions (list, create, rename, delete with its tasks and worker), a task and
//! its log, its events as a stream, the conversation as the worker keeps it, the workspace
//! documents, inbound channel requests, workers and metrics.

use std::str::FromStr;
use std::sync::Weak;
use std::time::{Duration, Instant};

use anywork_core::{
    Error, ErrorKind, Inbound, InboundRequest, InputKind, InputRequest, InputResponse, NewSession,
    Page, Result, Session, SessionId, SessionSummary, Task, TaskEvent, TaskId, TaskLog,
    TaskRequest, TaskStatus, UsageTotals, WorkerEndpoint, WorkerInfo, session::MAX_TITLE_CHARS,
    session::validate_title,
};
use futures_util::Stream;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Dispatcher, Inner, Known, Submitted, lock};

/// What a channel asked for, once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Task,
    FollowUp,
    AnswerOnly,
}

/// Idempotency keys of answers kept in memory.
const ANSWERED_KEYS: usize = 4096;

impl Inner {
    fn was_answered(&self, channel_type: &str, key: &str) -> bool {
        lock(&self.answered)
            .iter()
            .any(|(c, k)| c == channel_type && k == key)
    }

    fn remember_answer(&self, channel_type: &str, key: String) {
        let mut keys = lock(&self.answered);
        if keys.len() >= ANSWERED_KEYS {
            keys.pop_front();
        }
        keys.push_back((channel_type.to_owned(), key));
    }
}
use crate::hub::LiveEvent;
use crate::notices::Notices;

/// What [`Dispatcher::inbound`] did with a channel's request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum InboundOutcome {
    /// The channel made a task of it, now queued.
    Submitted(Box<Submitted>),
    /// The channel had nothing to do (a bot's own comment, an ignored event type).
    Skipped {
        /// Why, as the channel says.
        reason: String,
    },
    /// The request answered the question a task of its session was waiting on; the task
    /// goes on.
    Answered {
        /// The task that was waiting.
        task: Box<Task>,
    },
    /// The channel answers the sender with this JSON (HTTP 200) and nothing else happens: a
    /// handshake such as Slack's `url_verification`.
    Responded(Value),
}

/// A workspace-wide document the workers keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkspaceDoc {
    /// `SOUL.md`: who the agent is.
    Soul,
    /// `AGENTS.md`: how the agent works.
    Agents,
}

impl WorkspaceDoc {
    /// The name in the worker API's path (`soul`, `agents`).
    pub fn slug(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => "soul",
            WorkspaceDoc::Agents => "agents",
        }
    }

    /// The file name (`SOUL.md`, `AGENTS.md`).
    pub fn file_name(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => "SOUL.md",
            WorkspaceDoc::Agents => "AGENTS.md",
        }
    }

    /// The store setting holding the default of new sessions.
    pub fn setting_key(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => "workspace.soul",
            WorkspaceDoc::Agents => "workspace.agents",
        }
    }

    /// The built-in default, until one is saved.
    pub fn builtin(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => anywork_core::worker_api::DEFAULT_SOUL,
            WorkspaceDoc::Agents => anywork_core::worker_api::DEFAULT_AGENTS,
        }
    }
}

impl FromStr for WorkspaceDoc {
    type Err = Error;

    /// `soul` or `agents`; anything else is `NotFound` saying which exist.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "soul" => Ok(WorkspaceDoc::Soul),
            "agents" => Ok(WorkspaceDoc::Agents),
            _ => Err(Error::not_found(format!(
                "no workspace file {s:?}; use `soul` or `agents`"
            ))),
        }
    }
}

/// A workspace document as a worker answered it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct DocFile {
    /// Its file name (`SOUL.md`).
    #[serde(default)]
    pub file: String,
    /// Its text.
    #[serde(default)]
    pub content: String,
}

impl Dispatcher {
    /// Sessions, most recently active first, with their task counts.
    pub async fn sessions(&self, page: Page) -> Result<Vec<SessionSummary>> {
        self.inner.store.list_sessions(page).await
    }

    /// Sessions whose title contains `query` (ignoring case, literally), ordered and paged
    /// as [`sessions`](Self::sessions). `InvalidInput` for a query longer than a title may be.
    pub async fn search_sessions(&self, query: &str, page: Page) -> Result<Vec<SessionSummary>> {
        if query.chars().count() > MAX_TITLE_CHARS {
            return Err(Error::invalid_input(format!(
                "the search text is longer than a title may be ({MAX_TITLE_CHARS} characters): \
                 shorten it"
            )));
        }
        self.inner.store.search_sessions(query, page).await
    }

    /// Cost and tokens of every task of every session, with the session and task counts.
    pub async fn usage_totals(&self) -> Result<UsageTotals> {
        self.inner.store.usage_totals().await
    }

    /// One session; `NotFound` if there is none.
    pub async fn session(&self, id: &SessionId) -> Result<Session> {
        self.inner.store.get_session(id).await
    }

    /// Stores a new session (no task yet). `InvalidInput` for a bad channel type or title.
    pub async fn create_session(&self, session: NewSession) -> Result<Session> {
        anywork_core::spec::validate_name("channel type", &session.channel_type)?;
        validate_title(&session.title)?;
        self.inner.store.create_session(session).await
    }

    /// Renames a session to `title` (trimmed). `InvalidInput` for an empty or bad title,
    /// `NotFound` for an unknown session.
    pub async fn rename_session(&self, id: &SessionId, title: &str) -> Result<()> {
        if title.trim().is_empty() {
            return Err(Error::invalid_input("`title` must not be empty"));
        }
        validate_title(title)?;
        self.inner.store.set_session_title(id, title.trim()).await
    }

    /// Deletes a session for good: its active tasks are canceled (so no worker keeps working
    /// for it), the session and its tasks are deleted, and the driver purges its worker and
    /// workspace storage. A failed purge is logged and does not undo the deletion.
    pub async fn delete_session(&self, id: &SessionId) -> Result<()> {
        let store = &self.inner.store;
        store.get_session(id).await?;
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = store.tasks_by_session(id, page).await?;
            for t in tasks.iter().filter(|t| t.status.is_active()) {
                if let Err(e) = self.cancel(t.id).await
                    && e.kind() != ErrorKind::Conflict
                {
                    tracing::warn!(task = %t.id, error = %e, "cannot cancel a task of a deleted session");
                }
            }
            if tasks.len() < page.limit as usize {
                break;
            }
            offset += page.limit;
        }
        store.delete_session(id).await?;
        // The session is gone for good: its worker and its workspace storage (volume, claim) too.
        if let Err(e) = self.inner.driver.purge(id).await {
            tracing::warn!(session = %id, error = %e, "cannot purge the session's worker and workspace");
        }
        Ok(())
    }

    /// A session's tasks, oldest first; `NotFound` for an unknown session.
    pub async fn session_tasks(&self, id: &SessionId, page: Page) -> Result<Vec<Task>> {
        let store = &self.inner.store;
        store.get_session(id).await?;
        store.tasks_by_session(id, page).await
    }

    /// The conversation as the session's worker keeps it (a JSON array of messages). A worker
    /// that cannot be reached gives an empty conversation; `NotFound` for an unknown session.
    pub async fn session_messages(&self, id: &SessionId) -> Result<Value> {
        self.inner.store.get_session(id).await?;
        let history = async {
            let worker = self.inner.driver.get_worker(id).await?;
            self.inner.client.messages(&worker, id).await
        };
        Ok(match history.await {
            Ok(v) => v.get("messages").cloned().unwrap_or(v),
            Err(e) => {
                tracing::info!(session = %id, error = %e, "no history from the worker");
                json!([])
            }
        })
    }

    /// One task; `NotFound` if there is none.
    pub async fn task(&self, id: TaskId) -> Result<Task> {
        self.inner.store.get_task(id).await
    }

    /// The task's log entries with seq > `after`, at most `limit`; `NotFound` for an unknown
    /// task.
    pub async fn task_logs(&self, id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
        let store = &self.inner.store;
        store.get_task(id).await?;
        store.read_logs(id, after, limit).await
    }

    /// The task's events with seq > `after`, in seq order with no gap and no duplicate: first
    /// from the log, then live. Ends after the `done` event (or soon after a task found over
    /// whose `done` never comes). An unknown task gives one `NotFound` error. Dropping the
    /// stream stops following.
    pub fn events(
        &self,
        task_id: TaskId,
        after: u64,
    ) -> impl Stream<Item = Result<LiveEvent>> + Send + 'static {
        let d = self.clone();
        crate::follow::into_stream(move |out| async move {
            crate::follow::follow(&d, task_id, after, &out).await
        })
    }

    /// Passes an inbound HTTP request to the channel registered for `channel_type`, which
    /// verifies and parses it, then does what the [`Channel`](anywork_core::Channel) trait
    /// says of what it returns: a request whose session has a task waiting for input answers
    /// it; otherwise a `Task` is submitted, a `FollowUp` only into an existing session, an
    /// `AnswerOnly` not at all; a repeated idempotency key gives the first task back.
    /// `NotFound` when no such channel is registered; the channel's own errors otherwise.
    pub async fn inbound(
        &self,
        channel_type: &str,
        request: InboundRequest,
    ) -> Result<InboundOutcome> {
        let channel = self.channel(channel_type).cloned().ok_or_else(|| {
            Error::not_found(format!("no channel of type {channel_type:?} is configured"))
        })?;
        let (mut request, kind) = match channel.parse(request).await? {
            Inbound::Task(r) => (r, Kind::Task),
            Inbound::FollowUp(r) => (r, Kind::FollowUp),
            Inbound::AnswerOnly(r) => (r, Kind::AnswerOnly),
            Inbound::Respond(body) => return Ok(InboundOutcome::Responded(body)),
            Inbound::Skip { reason } => return Ok(InboundOutcome::Skipped { reason }),
            other => {
                return Ok(InboundOutcome::Skipped {
                    reason: format!("this server does not handle {other:?}"),
                });
            }
        };
        request.channel_type = channel_type.to_owned();
        let key = request.idempotency_key.clone();
        // A repeated event (its idempotency key taken) gets the first copy's task. The key is
        // looked up only where the copy would do something else than store a task, which the
        // store refuses for a taken key (then `store_new` reads the first task): before it
        // answers a waiting question, and before it is skipped. A request that makes a task
        // reads nothing before its write.
        if let Some(key) = &key
            && self.inner.was_answered(channel_type, key)
        {
            return Ok(InboundOutcome::Skipped {
                reason: "this event answered a question already".into(),
            });
        }
        let known = self.inbound_session(&request).await?;
        if let Known::Found(session) = &known
            && let Some(task) = self.waiting_task(session).await?
        {
            if let Some(first) = self.first_copy(channel_type, key.as_deref()).await? {
                return Ok(first);
            }
            if self.answer_waiting(&task, &request).await? {
                if let Some(key) = key {
                    self.inner.remember_answer(channel_type, key);
                }
                return Ok(InboundOutcome::Answered {
                    task: Box::new(task),
                });
            }
        }
        match (kind, known) {
            (Kind::Task, known) => Ok(InboundOutcome::Submitted(Box::new(
                self.submit_known(*request, known).await?,
            ))),
            (Kind::FollowUp, Known::Found(session)) => {
                request.session_id = Some(session.id.clone());
                request.session_mode = anywork_core::SessionMode::Existing;
                Ok(InboundOutcome::Submitted(Box::new(
                    self.submit_known(*request, Known::Found(session)).await?,
                )))
            }
            (Kind::FollowUp, _) => Ok(self
                .first_copy(channel_type, key.as_deref())
                .await?
                .unwrap_or_else(|| InboundOutcome::Skipped {
                    reason: "a follow-up where no session of this channel exists".into(),
                })),
            (Kind::AnswerOnly, _) => Ok(self
                .first_copy(channel_type, key.as_deref())
                .await?
                .unwrap_or_else(|| InboundOutcome::Skipped {
                    reason: "nothing there waits for an answer".into(),
                })),
        }
    }

    /// The first copy's task of a repeated event (its idempotency `key` taken in
    /// `channel_type`), as the answer to this copy; `None` without a key or such a task.
    async fn first_copy(
        &self,
        channel_type: &str,
        key: Option<&str>,
    ) -> Result<Option<InboundOutcome>> {
        let Some(key) = key else {
            return Ok(None);
        };
        let first = self
            .inner
            .store
            .find_task_by_idempotency_key(channel_type, key)
            .await?;
        Ok(first.map(|task| {
            InboundOutcome::Submitted(Box::new(Submitted {
                task,
                session_created: false,
                duplicate: true,
                session_titled: false,
            }))
        }))
    }

    /// The stored session an inbound request belongs to, if it exists yet, read once: the
    /// submit that may follow uses what was found. A session the channel has just named
    /// for a new conversation ([`SessionMode::CreateNew`](anywork_core::SessionMode)) is not
    /// read: nothing in it can wait for an answer, and its creation fails if the id is taken.
    async fn inbound_session(&self, request: &TaskRequest) -> Result<Known> {
        let store = &self.inner.store;
        let found = |s: Option<Session>| s.map_or(Known::Absent, Known::Found);
        if let Some(id) = &request.session_id {
            if request.session_mode == anywork_core::SessionMode::CreateNew {
                return Ok(Known::Absent);
            }
            return match store.get_session(id).await {
                Ok(s) => Ok(Known::Found(s)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Known::Absent),
                Err(e) => Err(e),
            };
        }
        match &request.channel_key {
            Some(key) => Ok(found(store.find_session(&request.channel_type, key).await?)),
            None => Ok(Known::Unknown),
        }
    }

    /// A task of `session` that waits for input, if any: one store query by session, however
    /// many tasks of other sessions wait.
    async fn waiting_task(&self, session: &Session) -> Result<Option<Task>> {
        let waiting = self
            .inner
            .store
            .tasks_by_session_in_status(&session.id, TaskStatus::InputRequired, Page::first(1))
            .await?;
        Ok(waiting.into_iter().next())
    }

    /// Answers `task`'s open question with the request's words; `false` when it asks none
    /// (or it stopped waiting meanwhile).
    async fn answer_waiting(&self, task: &Task, request: &TaskRequest) -> Result<bool> {
        let Some(question) = self.open_question(task.id).await? else {
            return Ok(false);
        };
        let answer = request.answer_text().trim().to_owned();
        let allow = (question.kind == InputKind::Permission).then(|| {
            let first = answer
                .split(|c: char| !c.is_alphanumeric())
                .find(|w| !w.is_empty())
                .unwrap_or("")
                .to_ascii_lowercase();
            matches!(first.as_str(), "yes" | "y" | "allow" | "ok")
        });
        let response = InputResponse {
            request_id: question.request_id,
            answer,
            allow,
        };
        match self.respond(task.id, response).await {
            Ok(()) => Ok(true),
            // It stopped waiting meanwhile (answered elsewhere, ended): treat the request as new.
            Err(e) if e.kind() == ErrorKind::Conflict => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The last question a task asked, from its log.
    async fn open_question(&self, task_id: TaskId) -> Result<Option<InputRequest>> {
        let mut after = 0;
        let mut last = None;
        loop {
            let logs = self.inner.store.read_logs(task_id, after, 500).await?;
            let n = logs.len();
            for l in logs {
                after = l.seq;
                if let TaskEvent::InputRequired(r) = l.event {
                    last = Some(r);
                }
            }
            if n < 500 {
                return Ok(last);
            }
        }
    }

    /// The default of `doc` that new sessions start with, kept in the store (the built-in
    /// text until someone saves one). No worker is asked, none is started.
    pub async fn workspace_doc(&self, doc: WorkspaceDoc) -> Result<DocFile> {
        let content = match self.inner.store.get_setting(doc.setting_key()).await? {
            Some(text) => text,
            None => doc.builtin().to_owned(),
        };
        Ok(DocFile {
            file: doc.file_name().to_owned(),
            content,
        })
    }

    /// Saves the default of `doc` in the store: every session created from now on starts with
    /// it (handed to its workspace by `/prepare`); existing sessions keep their own copy.
    pub async fn put_workspace_doc(&self, doc: WorkspaceDoc, content: &str) -> Result<DocFile> {
        let saved = self
            .inner
            .store
            .put_setting(doc.setting_key(), content)
            .await;
        // Whether or not it was stored, the next task reads the store again.
        lock(&self.inner.defaults).forget();
        saved?;
        Ok(DocFile {
            file: doc.file_name().to_owned(),
            content: content.to_owned(),
        })
    }

    /// `doc` as the session has it in its workspace, from the session's running worker.
    /// No worker is started: `Conflict` when none runs for the session now.
    pub async fn session_doc(&self, session: &SessionId, doc: WorkspaceDoc) -> Result<DocFile> {
        self.inner.store.get_session(session).await?;
        let worker = self.running_worker(session).await?;
        let answer = self
            .inner
            .client
            .get_session_doc(&worker, doc.slug(), session)
            .await?;
        doc_file(answer)
    }

    /// Writes `doc` into the session's workspace through its running worker (it applies to
    /// the session's next task). `Conflict` when no worker runs for the session now.
    pub async fn put_session_doc(
        &self,
        session: &SessionId,
        doc: WorkspaceDoc,
        content: &str,
    ) -> Result<DocFile> {
        self.inner.store.get_session(session).await?;
        let worker = self.running_worker(session).await?;
        let answer = self
            .inner
            .client
            .put_session_doc(&worker, doc.slug(), session, content)
            .await?;
        let mut file = doc_file(answer)?;
        file.content = content.to_owned();
        Ok(file)
    }

    /// The session's `files/` listing (`{files: [{path, size, modified}], truncated}`), from
    /// its worker (started if it is not running: the files live on its workspace).
    pub async fn session_files(&self, session: &SessionId) -> Result<Value> {
        self.inner.store.get_session(session).await?;
        let worker = self.inner.driver.get_worker(session).await?;
        self.inner.client.list_files(&worker, session).await
    }

    /// One file of the session's `files/` (`path` relative to it).
    pub async fn session_file(&self, session: &SessionId, path: &str) -> Result<Vec<u8>> {
        anywork_core::spec::validate_relative_path(path)?;
        self.inner.store.get_session(session).await?;
        let worker = self.inner.driver.get_worker(session).await?;
        self.inner.client.read_file(&worker, session, path).await
    }

    /// The session's `files/` as a zip.
    pub async fn session_files_zip(&self, session: &SessionId) -> Result<Vec<u8>> {
        self.inner.store.get_session(session).await?;
        let worker = self.inner.driver.get_worker(session).await?;
        self.inner.client.zip_files(&worker, session).await
    }

    /// Writes (uploads) `bytes` as `files/<path>` of the session; the worker refuses
    /// traversal, links and files over its upload limit.
    pub async fn put_session_file(
        &self,
        session: &SessionId,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<Value> {
        anywork_core::spec::validate_relative_path(path)?;
        self.inner.store.get_session(session).await?;
        let worker = self.inner.driver.get_worker(session).await?;
        self.inner
            .client
            .write_file(&worker, session, path, bytes)
            .await
    }

    /// The healthy worker that serves `session` now (its own, or a shared one), without
    /// starting one.
    pub(super) async fn running_worker(&self, session: &SessionId) -> Result<WorkerEndpoint> {
        let workers = self.inner.driver.list().await?;
        workers
            .into_iter()
            .filter(|w| w.healthy)
            .find(|w| w.session_id.as_ref().is_none_or(|s| s == session))
            .map(|w| w.endpoint)
            .ok_or_else(|| {
                Error::conflict(format!(
                    "session {session} has no running worker now (it is started by the \
                     session's next message and stopped when idle): its workspace files can be \
                     read and changed while it runs"
                ))
            })
    }

    /// The tasks not yet over (pending, running, waiting for input), oldest first, at most
    /// `limit` of each status.
    pub async fn active_tasks(&self, limit: u32) -> Result<Vec<Task>> {
        let mut tasks = Vec::new();
        for status in [
            anywork_core::TaskStatus::Running,
            anywork_core::TaskStatus::InputRequired,
            anywork_core::TaskStatus::Pending,
        ] {
            tasks.extend(
                self.inner
                    .store
                    .tasks_by_status(status, Page::first(limit))
                    .await?,
            );
        }
        Ok(tasks)
    }

    /// `Ok` when this server can take work: it is not shutting down and its store takes
    /// writes now ([`TaskStore::check_ready`](anywork_core::TaskStore::check_ready): one small
    /// real write, bounded). `Unavailable` with the reason otherwise.
    pub async fn check_ready(&self) -> Result<()> {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(Error::unavailable("the server is shutting down"));
        }
        self.inner.store.check_ready().await
    }

    /// The workers the driver runs.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.inner.driver.list().await
    }

    /// Session notices (`session_title`) for one client: those of the sessions it
    /// [`watch`](Notices::watch)es (see [`submit_follow_and_watch`](Self::submit_follow_and_watch)).
    pub fn notices(&self) -> Notices {
        self.inner.hub.notices()
    }

    /// Sessions a client watches the notices of (0 when no connection is open, for leak
    /// checks).
    pub fn watched_sessions(&self) -> usize {
        self.inner.hub.watched_sessions()
    }

    /// Registers this dispatcher's metrics (see [`metrics`](crate::metrics)) in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(
            registry,
            Gauges {
                inner: std::sync::Arc::downgrade(&self.inner),
            },
        );
    }
}

impl Inner {
    /// The defaults saved in the store, for `/prepare` (`None` where none was saved; a store
    /// that cannot be read is logged and the worker's own defaults apply). Read from the
    /// store at most once per [`DEFAULTS_FRESH`] (two statements per task otherwise), and
    /// at once again after this server saved one; a default saved through another server
    /// sharing the store reaches this one's new tasks within [`DEFAULTS_FRESH`]. One read at
    /// a time: the tasks that find the defaults stale while it is under way wait for it and
    /// take its answer, also a failed one, unless a save here came after it began (each task
    /// used to read them itself: at 200 sessions, dozens of reads at every expiry, each a
    /// pooled connection's three calls to its thread).
    pub(super) async fn saved_defaults(&self) -> Defaults {
        if let Some(fresh) = lock(&self.defaults).fresh() {
            return fresh;
        }
        let asked = Instant::now();
        let mut last = self.defaults_read.lock().await;
        let generation = {
            let cache = lock(&self.defaults);
            if let Some(fresh) = cache.fresh() {
                return fresh;
            }
            cache.generation
        };
        if let Some(read) = last.as_ref()
            && read.ended >= asked
            && read.generation == generation
        {
            // The read this call waited for, which failed (a passed one is fresh).
            return read.answer.clone();
        }
        let get = |doc: WorkspaceDoc| async move {
            self.store
                .get_setting(doc.setting_key())
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot read the default {}", doc.file_name());
                })
        };
        let answer = match (
            get(WorkspaceDoc::Soul).await,
            get(WorkspaceDoc::Agents).await,
        ) {
            (Ok(soul), Ok(agents)) => {
                lock(&self.defaults).keep(generation, (soul.clone(), agents.clone()));
                (soul, agents)
            }
            (soul, agents) => (soul.ok().flatten(), agents.ok().flatten()),
        };
        *last = Some(DefaultsRead {
            ended: Instant::now(),
            generation,
            answer: answer.clone(),
        });
        answer
    }
}

/// The last read of the saved defaults: when it ended, the cache generation it began in, and
/// what it answered.
#[derive(Debug)]
pub(super) struct DefaultsRead {
    ended: Instant,
    generation: u64,
    answer: Defaults,
}

/// How long the saved defaults read for one task serve the next ones.
pub(super) const DEFAULTS_FRESH: Duration = Duration::from_secs(1);

/// The saved SOUL.md and AGENTS.md defaults (`None`: none saved).
type Defaults = (Option<String>, Option<String>);

/// The saved defaults as last read from the store, and when.
#[derive(Debug, Default)]
pub(super) struct DefaultsCache {
    read: Option<(Instant, Defaults)>,
    /// Counts this server's saves: a read that began before one is not kept.
    generation: u64,
}

impl DefaultsCache {
    fn fresh(&self) -> Option<Defaults> {
        self.read
            .as_ref()
            .filter(|(at, _)| at.elapsed() < DEFAULTS_FRESH)
            .map(|(_, defaults)| defaults.clone())
    }

    fn keep(&mut self, generation: u64, defaults: Defaults) {
        if generation == self.generation {
            self.read = Some((Instant::now(), defaults));
        }
    }

    fn forget(&mut self) {
        self.read = None;
        self.generation += 1;
    }
}

fn doc_file(answer: Value) -> Result<DocFile> {
    serde_json::from_value(answer).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("the worker answered a workspace file that is not {{file, content}}: {e}"),
        )
    })
}

/// The gauges read at scrape time: tasks running here and tasks queued.
#[derive(Debug)]
struct Gauges {
    inner: Weak<Inner>,
}

impl Collector for Gauges {
    fn encode(
        &self,
        mut encoder: DescriptorEncoder<'_>,
    ) -> std::result::Result<(), std::fmt::Error> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let d = Dispatcher { inner };
        for (name, help, value) in [
            (
                "anywork_tasks_running",
                "Tasks running on this server",
                d.running(),
            ),
            (
                "anywork_queue_depth",
                "Tasks waiting behind another task of their session or for a slot",
                d.queue_depth(),
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(soul: &str) -> Defaults {
        (Some(soul.to_owned()), None)
    }

    #[test]
    fn saved_defaults_serve_the_next_tasks_until_a_save_here() {
        let mut cache = DefaultsCache::default();
        assert_eq!(cache.fresh(), None, "nothing read yet");
        let generation = cache.generation;
        cache.keep(generation, defaults("first"));
        assert_eq!(cache.fresh(), Some(defaults("first")));
        // A save on this server: the next task reads the store again.
        cache.forget();
        assert_eq!(cache.fresh(), None);
        // A read that began before the save is not kept: it may hold the old text.
        cache.keep(generation, defaults("old"));
        assert_eq!(cache.fresh(), None);
        cache.keep(cache.generation, defaults("new"));
        assert_eq!(cache.fresh(), Some(defaults("new")));
    }

    #[test]
    fn saved_defaults_are_read_again_once_stale() {
        let mut cache = DefaultsCache::default();
        let read_at = Instant::now()
            .checked_sub(DEFAULTS_FRESH)
            .expect("the clock is past the freshness window");
        cache.read = Some((read_at, defaults("stale")));
        assert_eq!(cache.fresh(), None);
    }
}
