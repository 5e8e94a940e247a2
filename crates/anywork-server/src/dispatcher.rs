//! [`Dispatcher`]: takes task requests, runs each on its session's worker, records every event
//! and fans it out. Not tied to HTTP: the API, channels and embedders all call it.
//!
//! Life of a task: [`Dispatcher::submit`] stores it `pending` and queues it on its session
//! (one task at a time per session, FIFO). A session's runner waits for a global permit, takes
//! the worker from the [`ContainerDriver`], marks the task `running` with a lease, calls
//! `/prepare` and `/chat`, appends the streamed events to the task log in batches (the store
//! numbers them), publishes them on the [`Hub`], and records the outcome. Cancel, input answers
//! and the timeout reach the run through one control channel, so a running task's status has a
//! single writer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::worker_api::{CancelRequest, ChatRequest, InputAnswer, PrepareRequest};
use anywork_core::{
    Channel, ContainerDriver, Error, ErrorKind, InputResponse, NewSession, NewTask, NewTaskLog,
    Page, Result, Session, SessionId, Task, TaskChange, TaskEvent, TaskId, TaskOutcome,
    TaskRequest, TaskStatus, TaskStore, Timestamp, WorkerEndpoint,
};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::{Hub, LiveEvent};
use crate::metrics::Metrics;
use crate::title::Titler;
use crate::worker_client::{ChatStream, WorkerClient};

/// Retries of calls that failed for a reason that may pass (worker not up yet, connection
/// refused, 5xx).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub initial: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

/// How the dispatcher behaves.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Tasks running at once, over all sessions.
    pub max_concurrent: usize,
    /// A run that takes longer ends as failed with the reason.
    pub task_timeout: Duration,
    /// How long a running task's lease lasts; renewed every third of it. After a crash, a task
    /// whose lease expired is failed with the reason.
    pub lease_ttl: Duration,
    /// How long a canceled run may take to stop before it is recorded as canceled anyway.
    pub cancel_grace: Duration,
    /// This server's name in leases (unique per process).
    pub owner: String,
    /// Retries of worker calls.
    pub retry: Backoff,
    /// Timeout of worker control calls (`/prepare`, `/cancel`, `/input`).
    pub control_timeout: Duration,
    /// Events appended to the log in one batch, at most.
    pub max_batch: usize,
    /// How often the driver is asked to stop idle workers ([`ContainerDriver::reap_idle`]);
    /// `None` never.
    pub reap_every: Option<Duration>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            task_timeout: Duration::from_secs(30 * 60),
            lease_ttl: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            owner: format!("server-{}", TaskId::generate()),
            retry: Backoff::default(),
            control_timeout: Duration::from_secs(30),
            max_batch: 256,
            reap_every: Some(Duration::from_secs(30)),
        }
    }
}

/// What [`Dispatcher::submit`] did.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The task, as stored (`pending`).
    pub task: Task,
    /// Whether the request made a new session.
    pub session_created: bool,
}

enum Control {
    Cancel(oneshot::Sender<()>),
    Input(InputResponse, oneshot::Sender<Result<()>>),
}

struct Inner {
    store: Arc<dyn TaskStore>,
    driver: Arc<dyn ContainerDriver>,
    client: WorkerClient,
    hub: Hub,
    config: DispatcherConfig,
    channels: HashMap<String, Arc<dyn Channel>>,
    titler: Titler,
    http: reqwest::Client,
    metrics: Metrics,
    /// Sessions with a runner, and the tasks waiting behind the running one.
    queues: Mutex<HashMap<SessionId, VecDeque<Task>>>,
    permits: Arc<Semaphore>,
    runs: Mutex<HashMap<TaskId, mpsc::Sender<Control>>>,
    closing: AtomicBool,
    stop: CancellationToken,
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

/// Builds a [`Dispatcher`].
pub struct DispatcherBuilder {
    store: Arc<dyn TaskStore>,
    driver: Arc<dyn ContainerDriver>,
    config: DispatcherConfig,
    channels: HashMap<String, Arc<dyn Channel>>,
    titler: Titler,
}

impl DispatcherBuilder {
    /// Sets the configuration.
    pub fn config(mut self, config: DispatcherConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a channel: its defaults apply to its tasks, and finished tasks are delivered to it.
    pub fn channel(mut self, channel: Arc<dyn Channel>) -> Self {
        self.channels
            .insert(channel.channel_type().to_owned(), channel);
        self
    }

    /// Sets how session titles are made.
    pub fn titler(mut self, titler: Titler) -> Self {
        self.titler = titler;
        self
    }

    /// Starts the dispatcher: its background recovery loop, and the tasks a previous run left
    /// pending are queued again. Needs a Tokio runtime.
    pub async fn start(self) -> Result<Dispatcher> {
        let client = WorkerClient::new(self.config.control_timeout)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        let permits = Arc::new(Semaphore::new(self.config.max_concurrent.max(1)));
        let dispatcher = Dispatcher {
            inner: Arc::new(Inner {
                store: self.store,
                driver: self.driver,
                client,
                hub: Hub::default(),
                config: self.config,
                channels: self.channels,
                titler: self.titler,
                http,
                metrics: Metrics::default(),
                queues: Mutex::new(HashMap::new()),
                permits,
                runs: Mutex::new(HashMap::new()),
                closing: AtomicBool::new(false),
                stop: CancellationToken::new(),
            }),
        };
        dispatcher.requeue_pending().await?;
        dispatcher.recover_expired().await;
        tokio::spawn(recovery_loop(Arc::downgrade(&dispatcher.inner)));
        if let Some(every) = dispatcher.inner.config.reap_every {
            tokio::spawn(reap_loop(Arc::downgrade(&dispatcher.inner), every));
        }
        Ok(dispatcher)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here panics while holding a lock; should it, the data is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dispatcher {
    /// A builder over a store and a driver.
    pub fn builder(
        store: Arc<dyn TaskStore>,
        driver: Arc<dyn ContainerDriver>,
    ) -> DispatcherBuilder {
        DispatcherBuilder {
            store,
            driver,
            config: DispatcherConfig::default(),
            channels: HashMap::new(),
            titler: Titler::first_words(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.inner.store
    }

    /// The driver.
    pub fn driver(&self) -> &Arc<dyn ContainerDriver> {
        &self.inner.driver
    }

    /// The worker client.
    pub fn worker_client(&self) -> &WorkerClient {
        &self.inner.client
    }

    /// The live event hub.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Counters for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
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

    /// Stores a task as `pending` and queues it. The session is `request.session_id` (which
    /// must exist), else the one found by `channel_key`, else a new one.
    pub async fn submit(&self, request: TaskRequest) -> Result<Submitted> {
        let submitted = self.store_new(request).await?;
        self.enqueue(submitted.task.clone());
        Ok(submitted)
    }

    /// [`submit`](Self::submit), and a subscription to the task's live events taken before
    /// it is queued: it receives every event of the run from the first (see
    /// [`follow_submitted`](crate::follow::follow_submitted)), with no store read.
    pub async fn submit_and_follow(
        &self,
        request: TaskRequest,
    ) -> Result<(Submitted, broadcast::Receiver<Arc<LiveEvent>>)> {
        let submitted = self.store_new(request).await?;
        let live = self.inner.hub.subscribe(submitted.task.id);
        self.enqueue(submitted.task.clone());
        Ok((submitted, live))
    }

    /// Stores the request's task as `pending` (and its session if new), not queued yet.
    async fn store_new(&self, request: TaskRequest) -> Result<Submitted> {
        if self.inner.closing.load(Ordering::Relaxed) {
            return Err(Error::unavailable("the server is shutting down"));
        }
        request.validate()?;
        let (session, created) = self.resolve_session(&request).await?;
        let untitled = session.title == NewSession::DEFAULT_TITLE;
        let task = self
            .inner
            .store
            .create_task(NewTask::from_request(session.id.clone(), request))
            .await?;
        self.inner.metrics.submitted();
        if created || untitled {
            self.spawn_title(session.id.clone(), task.message.clone());
        }
        Ok(Submitted {
            task,
            session_created: created,
        })
    }

    async fn resolve_session(&self, request: &TaskRequest) -> Result<(Session, bool)> {
        let store = &self.inner.store;
        if let Some(id) = &request.session_id {
            return match store.get_session(id).await {
                Ok(s) => Ok((s, false)),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::not_found(format!(
                    "session {id} does not exist; leave `session_id` out to start a new one"
                ))),
                Err(e) => Err(e),
            };
        }
        let Some(key) = &request.channel_key else {
            let session = store
                .create_session(NewSession::new(&request.channel_type))
                .await?;
            return Ok((session, true));
        };
        if let Some(s) = store.find_session(&request.channel_type, key).await? {
            return Ok((s, false));
        }
        match store
            .create_session(NewSession::new(&request.channel_type).with_key(key.clone()))
            .await
        {
            Ok(s) => Ok((s, true)),
            // Another request for the same key won the race: use its session.
            Err(e) if e.kind() == ErrorKind::Conflict => store
                .find_session(&request.channel_type, key)
                .await?
                .map(|s| (s, false))
                .ok_or(e),
            Err(e) => Err(e),
        }
    }

    fn spawn_title(&self, session: SessionId, message: String) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let title = inner.titler.title(&message).await;
            // Set only if nobody renamed the session meanwhile.
            match inner.store.get_session(&session).await {
                Ok(s) if s.title == NewSession::DEFAULT_TITLE => {}
                _ => return,
            }
            if let Err(e) = inner.store.set_session_title(&session, &title).await {
                tracing::warn!(%session, error = %e, "cannot store the session title");
                return;
            }
            inner
                .hub
                .notify(anywork_core::ws::ServerMessage::SessionTitle {
                    session_id: session,
                    title,
                });
        });
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
        tokio::spawn(session_runner(self.inner.clone(), session));
    }

    /// Cancels a task in any active state and returns it as stored afterwards: a pending task
    /// becomes `canceled` at once; a running one is stopped on its worker first.
    /// `Conflict` ("Cannot cancel task in status: …") when it is already over.
    pub async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        for _ in 0..5 {
            let task = self.inner.store.get_task(task_id).await?;
            if task.status.is_terminal() {
                return Err(Error::conflict(format!(
                    "Cannot cancel task in status: {}",
                    task.status
                )));
            }
            let run = lock(&self.inner.runs).get(&task_id).cloned();
            if let Some(run) = run {
                let (ack, done) = oneshot::channel();
                if run.send(Control::Cancel(ack)).await.is_ok() {
                    let wait = self.inner.config.cancel_grace + Duration::from_secs(5);
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
        let run = lock(&self.inner.runs).get(&task_id).cloned();
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

    /// A worker to ask about workspace-wide things (`SOUL.md`, `AGENTS.md`): a healthy one the
    /// driver knows, else the one of `fallback`.
    pub async fn any_worker(&self, fallback: &SessionId) -> Result<WorkerEndpoint> {
        if let Ok(workers) = self.inner.driver.list().await
            && let Some(w) = workers.into_iter().find(|w| w.healthy)
        {
            return Ok(w.endpoint);
        }
        self.inner.driver.get_worker(fallback).await
    }

    /// Stops taking tasks and waits up to `grace` for running ones to end. Tasks still running
    /// afterwards keep their lease, which expires; a later start fails them with the reason.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.closing.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + grace;
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.stop.cancel();
    }

    async fn requeue_pending(&self) -> Result<()> {
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = self
                .inner
                .store
                .tasks_by_status(TaskStatus::Pending, page)
                .await?;
            let n = tasks.len() as u32;
            for t in tasks {
                self.enqueue(t);
            }
            if n < page.limit {
                return Ok(());
            }
            offset += n;
        }
    }

    /// Fails the active tasks whose lease expired (their server is gone). Returns how many.
    pub async fn recover_expired(&self) -> usize {
        let inner = &self.inner;
        let expired = match inner.store.expired_leases(Timestamp::now(), 100).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read expired leases");
                return 0;
            }
        };
        let mut n = 0;
        for task in expired {
            if lock(&inner.runs).contains_key(&task.id) {
                continue;
            }
            let owner = task
                .lease
                .as_ref()
                .map(|l| l.owner.clone())
                .unwrap_or_default();
            let reason = format!(
                "the server running this task ({owner}) stopped before it finished; it was {} \
                 on worker {}",
                task.status,
                task.worker_id.as_deref().unwrap_or("(none)")
            );
            tracing::warn!(task = %task.id, %reason, "recovering an orphaned task");
            // The worker may still be running it: ask it to stop, best effort.
            if let Some(worker_id) = &task.worker_id
                && let Ok(workers) = inner.driver.list().await
                && let Some(w) = workers.iter().find(|w| &w.endpoint.worker_id == worker_id)
            {
                let _ = inner
                    .client
                    .cancel(&w.endpoint, &CancelRequest { task_id: task.id })
                    .await;
            }
            if inner
                .finish_unrun(&task, TaskOutcome::failed(reason))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }
}

impl Dispatcher {
    /// The sessions that need their worker: a task queued (`pending`), running or waiting
    /// for input, on this server or another one sharing the store.
    pub async fn busy_sessions(&self) -> Result<Vec<SessionId>> {
        let inner = &self.inner;
        let mut busy = std::collections::HashSet::new();
        for status in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::InputRequired,
        ] {
            let mut offset = 0;
            loop {
                let page = Page {
                    offset,
                    limit: 1000,
                };
                let tasks = inner.store.tasks_by_status(status, page).await?;
                let n = tasks.len() as u32;
                busy.extend(tasks.into_iter().map(|t| t.session_id));
                if n < page.limit {
                    break;
                }
                offset += n;
            }
        }
        Ok(busy.into_iter().collect())
    }

    /// Asks the driver to stop the idle workers of sessions that are not busy. Returns the
    /// sessions whose workers were stopped.
    pub async fn reap_idle(&self) -> Result<Vec<SessionId>> {
        let busy = self.busy_sessions().await?;
        let reaped = self.inner.driver.reap_idle(&busy).await?;
        if !reaped.is_empty() {
            tracing::info!(count = reaped.len(), "stopped idle workers");
        }
        Ok(reaped)
    }
}

async fn reap_loop(inner: std::sync::Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stop.is_cancelled() {
            return;
        }
        if let Err(e) = (Dispatcher { inner }).reap_idle().await {
            tracing::warn!(error = %e, "reaping idle workers failed");
        }
    }
}

async fn recovery_loop(inner: std::sync::Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.config.lease_ttl / 2).max(Duration::from_millis(200)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stop.is_cancelled() {
            return;
        }
        Dispatcher { inner }.recover_expired().await;
    }
}

async fn session_runner(inner: Arc<Inner>, session: SessionId) {
    loop {
        let next = {
            let mut queues = lock(&inner.queues);
            match queues.get_mut(&session).and_then(VecDeque::pop_front) {
                Some(t) => t,
                None => {
                    queues.remove(&session);
                    return;
                }
            }
        };
        let Ok(_permit) = inner.permits.clone().acquire_owned().await else {
            return;
        };
        let id = next.id;
        if let Err(e) = run_task(&inner, next).await {
            tracing::error!(task = %id, error = %e, "task run failed in the dispatcher");
        }
    }
}

/// Runs `task` as queued (`pending`). One canceled meanwhile, or taken by another server,
/// fails the `pending → running` compare-and-set and is left alone.
async fn run_task(inner: &Arc<Inner>, task: Task) -> Result<()> {
    let task_id = task.id;
    let (tx, rx) = mpsc::channel(8);
    lock(&inner.runs).insert(task_id, tx);
    inner.metrics.started();
    let mut run = Run {
        inner: inner.clone(),
        task,
        status: TaskStatus::Pending,
        control: rx,
        cancel_acks: Vec::new(),
        started: Instant::now(),
    };
    let result = run.execute().await;
    lock(&inner.runs).remove(&task_id);
    inner.metrics.stopped();
    // Anyone who asked to cancel learns it is over.
    for ack in run.cancel_acks.drain(..) {
        let _ = ack.send(());
    }
    inner.hub.close(task_id);
    result
}

/// One run of one task.
struct Run {
    inner: Arc<Inner>,
    task: Task,
    /// The status as stored (this run is its only writer while the task is active).
    status: TaskStatus,
    control: mpsc::Receiver<Control>,
    cancel_acks: Vec<oneshot::Sender<()>>,
    started: Instant,
}

/// Why the run stops before the worker's `done`.
enum Stop {
    Canceled,
    Failed(String),
}

impl Run {
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + self.inner.config.task_timeout)
    }

    fn lease_expiry(&self) -> Timestamp {
        Timestamp::now().plus_millis(self.inner.config.lease_ttl.as_millis() as i64)
    }

    async fn execute(&mut self) -> Result<()> {
        let (inner, session) = (self.inner.clone(), self.task.session_id.clone());
        let get_worker =
            async move { retry(&inner.config.retry, || inner.driver.get_worker(&session)).await };
        let endpoint = match self.until_stopped(get_worker).await {
            Ok(w) => w,
            Err(stop) => return self.stop_before_running(stop).await,
        };
        // pending → running, with the worker and a lease.
        let change = TaskChange::to(TaskStatus::Running)
            .worker(endpoint.worker_id.clone())
            .lease(self.inner.config.owner.clone(), self.lease_expiry());
        let running = vec![TaskEvent::Status {
            status: TaskStatus::Running,
        }];
        match self
            .inner
            .transition(&self.task, TaskStatus::Pending, change, running)
            .await
        {
            Ok(t) => self.task = t,
            // Canceled meanwhile, or another server took it.
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.status = TaskStatus::Running;

        let (inner, task, worker) = (self.inner.clone(), self.task.clone(), endpoint.clone());
        let start = async move { start_chat(&inner, &task, &worker).await };
        let stream = match self.until_stopped(start).await {
            Ok(s) => s,
            Err(stop) => return self.finish(stop_outcome(stop)).await,
        };
        self.follow(stream, endpoint).await
    }

    /// Runs a step before the chat stream exists, while watching for cancel and the timeout.
    async fn until_stopped<T>(
        &mut self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> std::result::Result<T, Stop> {
        tokio::pin!(work);
        let deadline = self.deadline();
        loop {
            tokio::select! {
                out = &mut work => return out.map_err(|e| Stop::Failed(e.message().to_owned())),
                ctl = self.control.recv() => match ctl {
                    Some(Control::Cancel(ack)) => {
                        self.cancel_acks.push(ack);
                        return Err(Stop::Canceled);
                    }
                    Some(Control::Input(_, ack)) => {
                        let _ = ack.send(Err(Error::conflict("the task is not waiting for input")));
                    }
                    None => return Err(Stop::Canceled),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Stop::Failed(self.timeout_message()));
                }
            }
        }
    }

    fn timeout_message(&self) -> String {
        format!(
            "the task timed out after {} s (the per-task timeout)",
            self.inner.config.task_timeout.as_secs_f64()
        )
    }

    /// Ends a task that never got to run: pending → canceled/failed.
    async fn stop_before_running(&mut self, stop: Stop) -> Result<()> {
        match self
            .inner
            .finish_unrun(&self.task, stop_outcome(stop))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the chat stream to its end, handling control messages, the lease and the timeout.
    async fn follow(&mut self, stream: ChatStream, worker: WorkerEndpoint) -> Result<()> {
        // The stream is read by its own task, so that while one batch is being stored the
        // next events queue up and are stored together.
        let mut stream = StreamReader::spawn(stream, self.inner.config.max_batch.max(1) * 4);
        let lease_every = (self.inner.config.lease_ttl / 3).max(Duration::from_millis(100));
        let mut lease =
            tokio::time::interval_at(tokio::time::Instant::now() + lease_every, lease_every);
        let deadline = self.deadline();
        let mut stopping: Option<(Stop, tokio::time::Instant)> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let stop_at = stopping.as_ref().map_or(far, |(_, at)| *at);
            tokio::select! {
                biased;
                ctl = self.control.recv(), if stopping.is_none() => match ctl {
                    Some(Control::Cancel(ack)) => {
                        self.cancel_acks.push(ack);
                        self.ask_worker_to_cancel(&worker).await;
                        stopping = Some((Stop::Canceled, tokio::time::Instant::now() + self.inner.config.cancel_grace));
                    }
                    Some(Control::Input(response, ack)) => {
                        let r = self.answer(&worker, response).await;
                        let _ = ack.send(r);
                    }
                    None => {}
                },
                _ = lease.tick() => {
                    let until = self.lease_expiry();
                    if let Err(e) = self.inner.store.renew_lease(self.task.id, &self.inner.config.owner, until).await {
                        if e.kind() == ErrorKind::Conflict {
                            // Someone else ended or took the task: stop quietly.
                            tracing::warn!(task = %self.task.id, error = %e, "lost the lease; leaving the task");
                            self.ask_worker_to_cancel(&worker).await;
                            return Ok(());
                        }
                        tracing::warn!(task = %self.task.id, error = %e, "cannot renew the lease");
                    }
                }
                _ = tokio::time::sleep_until(deadline), if stopping.is_none() => {
                    self.ask_worker_to_cancel(&worker).await;
                    stopping = Some((Stop::Failed(self.timeout_message()), tokio::time::Instant::now() + self.inner.config.cancel_grace));
                }
                _ = tokio::time::sleep_until(stop_at), if stopping.is_some() => {
                    let (stop, _) = stopping.take().unwrap_or((Stop::Canceled, far));
                    return self.finish(stop_outcome(stop)).await;
                }
                item = stream.events.recv() => {
                    let first = match item {
                        Some(Ok(event)) => event,
                        Some(Err(e)) => {
                            let outcome = match stopping.take() {
                                Some((stop, _)) => stop_outcome(stop),
                                None => TaskOutcome::failed(format!("lost the worker mid-task: {}", e.message())),
                            };
                            return self.finish(outcome).await;
                        }
                        None => {
                            let outcome = match stopping.take() {
                                Some((stop, _)) => stop_outcome(stop),
                                None => TaskOutcome::failed("the worker ended the stream without a result"),
                            };
                            return self.finish(outcome).await;
                        }
                    };
                    // Take whatever else is ready, so that bursts are stored in one batch.
                    let mut batch = vec![first];
                    let mut broken = None;
                    while batch.len() < self.inner.config.max_batch && !batch.last().is_some_and(TaskEvent::is_terminal) {
                        match stream.events.try_recv() {
                            Ok(Ok(e)) => batch.push(e),
                            Ok(Err(e)) => { broken = Some(e); break; }
                            Err(_) => break,
                        }
                    }
                    let done = match batch.last() {
                        Some(TaskEvent::Done(_)) => match batch.pop() { Some(TaskEvent::Done(o)) => Some(o), _ => None },
                        _ => None,
                    };
                    let asks = batch.iter().any(|e| matches!(e, TaskEvent::InputRequired(_)));
                    if asks && self.status == TaskStatus::Running {
                        self.set_status(TaskStatus::InputRequired, batch).await?;
                    } else {
                        self.record(batch).await?;
                    }
                    if let Some(mut outcome) = done {
                        if let Some((Stop::Failed(reason), _)) = stopping.take() {
                            // Timed out: the worker's "canceled" is our "failed".
                            if outcome.status == TaskStatus::Canceled {
                                outcome.status = TaskStatus::Failed;
                                outcome.error = Some(reason);
                            }
                        }
                        return self.finish(outcome).await;
                    }
                    if let Some(e) = broken {
                        let outcome = match stopping.take() {
                            Some((stop, _)) => stop_outcome(stop),
                            None => TaskOutcome::failed(format!("lost the worker mid-task: {}", e.message())),
                        };
                        return self.finish(outcome).await;
                    }
                }
            }
        }
    }

    async fn ask_worker_to_cancel(&self, worker: &WorkerEndpoint) {
        if let Err(e) = self
            .inner
            .client
            .cancel(
                worker,
                &CancelRequest {
                    task_id: self.task.id,
                },
            )
            .await
        {
            tracing::warn!(task = %self.task.id, error = %e, "the worker did not take the cancel");
        }
    }

    async fn answer(&mut self, worker: &WorkerEndpoint, response: InputResponse) -> Result<()> {
        if self.status != TaskStatus::InputRequired {
            return Err(Error::conflict(format!(
                "task {} is {} and not waiting for input",
                self.task.id, self.status
            )));
        }
        let answer = InputAnswer {
            task_id: self.task.id,
            request_id: response.request_id,
            answer: (!response.answer.is_empty()).then_some(response.answer),
            allow: response.allow,
        };
        self.inner.client.input(worker, &answer).await?;
        self.set_status(
            TaskStatus::Running,
            vec![TaskEvent::Status {
                status: TaskStatus::Running,
            }],
        )
        .await
    }

    /// Moves the task to `status`, renewing the lease, with `events` in the same write.
    async fn set_status(&mut self, status: TaskStatus, events: Vec<TaskEvent>) -> Result<()> {
        let change =
            TaskChange::to(status).lease(self.inner.config.owner.clone(), self.lease_expiry());
        self.task = self
            .inner
            .transition(&self.task, self.status, change, events)
            .await?;
        self.status = status;
        Ok(())
    }

    /// Appends events to the log and publishes them with their seqs.
    async fn record(&self, events: Vec<TaskEvent>) -> Result<()> {
        self.inner.record(&self.task, events).await
    }

    /// Records the outcome (the final status and the `done` event in one write), then
    /// delivers it.
    async fn finish(&mut self, mut outcome: TaskOutcome) -> Result<()> {
        if outcome.duration_ms == 0 {
            outcome.duration_ms = self.started.elapsed().as_millis() as u64;
        }
        if outcome.status == TaskStatus::Completed && self.status == TaskStatus::InputRequired {
            // The worker finished without the answer it asked for; pass through running.
            self.set_status(TaskStatus::Running, Vec::new()).await?;
        }
        if !outcome.status.is_terminal() {
            outcome = TaskOutcome::failed(format!(
                "the worker ended the task as {}, which is not a final status",
                outcome.status
            ));
        }
        let task = match self
            .inner
            .transition(
                &self.task,
                self.status,
                TaskChange::finish(outcome.clone()),
                vec![TaskEvent::Done(outcome.clone())],
            )
            .await
        {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition) => {
                tracing::warn!(task = %self.task.id, error = %e, "the task was ended elsewhere");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.task = task;
        self.inner.after_finish(&self.task, outcome).await;
        Ok(())
    }
}

fn stop_outcome(stop: Stop) -> TaskOutcome {
    match stop {
        Stop::Canceled => TaskOutcome::canceled(),
        Stop::Failed(reason) => TaskOutcome::failed(reason),
    }
}

/// A chat stream read by a task of its own into a queue; the task stops when this is dropped.
struct StreamReader {
    events: mpsc::Receiver<Result<TaskEvent>>,
    reader: tokio::task::JoinHandle<()>,
}

impl StreamReader {
    fn spawn(mut stream: ChatStream, capacity: usize) -> Self {
        let (tx, events) = mpsc::channel(capacity);
        let reader = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        Self { events, reader }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// `/prepare` with the channel's defaults merged in, then `/chat`; both retried on errors
/// that may pass.
async fn start_chat(inner: &Inner, task: &Task, worker: &WorkerEndpoint) -> Result<ChatStream> {
    let mut skills = task.skills.clone();
    let mut mcp_servers = task.mcp_servers.clone();
    if let Some(channel) = inner.channels.get(&task.channel_type) {
        let defaults = channel.defaults();
        for skill in defaults.skills {
            if !skills.iter().any(|s| s.name == skill.name) {
                skills.push(skill);
            }
        }
        for (name, server) in defaults.mcp_servers {
            mcp_servers.entry(name).or_insert(server);
        }
    }
    let prepare = PrepareRequest {
        session_id: task.session_id.clone(),
        skills: Some(skills),
        mcp_servers: Some(mcp_servers),
        soul: None,
    };
    retry(&inner.config.retry, || {
        inner.client.prepare(worker, &prepare)
    })
    .await?;
    let chat = ChatRequest {
        task_id: task.id,
        session_id: task.session_id.clone(),
        message: task.message.clone(),
    };
    retry(&inner.config.retry, || inner.client.chat(worker, &chat)).await
}

/// Tries `call` again after retryable errors (and after a busy session's 409, which passes
/// when the worker's previous run ends).
async fn retry<T, F, Fut>(policy: &Backoff, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    retry_if(policy, call, |e| {
        e.is_retryable() || e.kind() == ErrorKind::Conflict
    })
    .await
}

/// Calls `call` until it succeeds, fails with an error `again` refuses, or the attempts run
/// out, waiting as `policy` says between attempts.
async fn retry_if<T, F, Fut>(
    policy: &Backoff,
    mut call: F,
    again: impl Fn(&Error) -> bool,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < policy.attempts.max(1) && again(&e) => {
                tracing::debug!(attempt, error = %e, "retrying");
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Inner {
    async fn record(&self, task: &Task, events: Vec<TaskEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let logs = events.iter().cloned().map(NewTaskLog::now).collect();
        let last = self.store.append_logs(task.id, logs).await?;
        self.publish(task, last + 1 - n, events);
        Ok(())
    }

    /// Changes the task's status and appends `events` in one write, then publishes them.
    async fn transition(
        &self,
        task: &Task,
        expected: TaskStatus,
        change: TaskChange,
        events: Vec<TaskEvent>,
    ) -> Result<Task> {
        let n = events.len() as u64;
        let logs = events.iter().cloned().map(NewTaskLog::now).collect();
        let (stored, last) = self
            .store
            .update_task_and_append(task.id, expected, change, logs)
            .await?;
        self.publish(task, last + 1 - n, events);
        Ok(stored)
    }

    fn publish(&self, task: &Task, first: u64, events: Vec<TaskEvent>) {
        self.hub
            .publish(events.into_iter().enumerate().map(|(i, event)| LiveEvent {
                task_id: task.id,
                session_id: task.session_id.clone(),
                seq: first + i as u64,
                event,
            }));
    }

    /// Ends a task no run of this server holds (queued, or orphaned) with `outcome`.
    async fn finish_unrun(&self, task: &Task, outcome: TaskOutcome) -> Result<Task> {
        let stored = self
            .transition(
                task,
                task.status,
                TaskChange::finish(outcome.clone()),
                vec![TaskEvent::Done(outcome.clone())],
            )
            .await?;
        self.after_finish(&stored, outcome).await;
        if !lock(&self.runs).contains_key(&task.id) {
            self.hub.close(task.id);
        }
        Ok(stored)
    }

    /// Metrics, channel delivery and the push notification of a task that ended.
    async fn after_finish(&self, task: &Task, outcome: TaskOutcome) {
        self.metrics.finished(task);
        let channel = self.channels.get(&task.channel_type).cloned();
        if channel.is_none() && task.push_notification.is_none() {
            return;
        }
        let task = task.clone();
        let http = self.http.clone();
        let backoff = Backoff {
            attempts: 4,
            initial: Duration::from_millis(500),
            max: Duration::from_secs(10),
        };
        tokio::spawn(async move {
            if let Some(channel) = channel
                && let Err(e) = retry_if(
                    &backoff,
                    || channel.deliver(&task, &outcome),
                    Error::is_retryable,
                )
                .await
            {
                tracing::warn!(task = %task.id, error = %e, "channel delivery failed");
            }
            if let Some(push) = &task.push_notification
                && let Err(e) = retry_if(
                    &backoff,
                    || push_outcome(&http, push, &task),
                    Error::is_retryable,
                )
                .await
            {
                tracing::warn!(task = %task.id, url = %push.url, error = %e, "push notification failed");
            }
        });
    }
}

/// POSTs the finished task (the REST task shape) to its push-notification URL.
async fn push_outcome(
    http: &reqwest::Client,
    push: &anywork_core::PushNotification,
    task: &Task,
) -> Result<()> {
    let mut request = http.post(&push.url).json(&crate::api::dto::task_json(task));
    if let Some(auth) = &push.authorization {
        request = request.header(reqwest::header::AUTHORIZATION, auth);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Error::unavailable(format!("push notification to {}: {e}", push.url)))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status.as_u16() == 429 {
        Err(Error::unavailable(format!(
            "push notification to {} answered {status}",
            push.url
        )))
    } else {
        Err(Error::invalid_input(format!(
            "push notification to {} answered {status}",
            push.url
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver whose workers never come up, and which records what the reaper is told.
    #[derive(Default)]
    struct RecordingDriver {
        told_busy: Mutex<Vec<Vec<SessionId>>>,
    }

    #[async_trait::async_trait]
    impl ContainerDriver for RecordingDriver {
        fn name(&self) -> &str {
            "recording"
        }
        async fn get_worker(&self, _: &SessionId) -> Result<WorkerEndpoint> {
            Err(Error::unavailable("no workers here"))
        }
        async fn release(&self, _: &SessionId) -> Result<()> {
            Ok(())
        }
        async fn is_healthy(&self, _: &WorkerEndpoint) -> bool {
            false
        }
        async fn list(&self) -> Result<Vec<anywork_core::WorkerInfo>> {
            Ok(Vec::new())
        }
        async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
            lock(&self.told_busy).push(busy.to_vec());
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn the_reaper_spares_sessions_with_work_and_only_those() {
        let driver = Arc::new(RecordingDriver::default());
        let store: Arc<dyn TaskStore> = Arc::new(anywork_store::MemoryStore::new());
        let d = Dispatcher::builder(store.clone(), driver.clone())
            .config(DispatcherConfig {
                retry: Backoff {
                    attempts: 1000,
                    initial: Duration::from_millis(100),
                    max: Duration::from_millis(100),
                },
                reap_every: None,
                ..DispatcherConfig::default()
            })
            .start()
            .await
            .unwrap();
        // A session whose task waits for a worker, and one whose only task is over.
        let waiting = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        let over = d.submit(TaskRequest::new("web", "bye")).await.unwrap().task;
        d.cancel(over.id).await.unwrap();
        d.reap_idle().await.unwrap();
        let told = lock(&driver.told_busy).pop().unwrap();
        assert!(told.contains(&waiting.session_id), "{told:?}");
        assert!(!told.contains(&over.session_id), "{told:?}");
        d.cancel(waiting.id).await.unwrap();
        d.reap_idle().await.unwrap();
        let told = lock(&driver.told_busy).pop().unwrap();
        assert!(told.is_empty(), "{told:?}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            attempts: 10,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(4), Duration::from_millis(500));
        assert_eq!(b.delay(40), Duration::from_millis(500));
    }
}
