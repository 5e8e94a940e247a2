//! Server benchmarks: dispatch overhead and tasks/s over WebSocket (in-process server on
//! SQLite), and the memory of an idle WebSocket session (the release server binary).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use anywork_core::{
    ContainerDriver, Execution, ExecutionRequest, Executor, NewSession, NewTask, NewTaskLog, Page,
    Session, SessionId, SessionSummary, Task, TaskChange, TaskId, TaskLog, TaskStatus, TaskStore,
    Timestamp, WorkerEndpoint,
};
use anywork_runtime::{Dispatcher, DispatcherConfig};
use anywork_server::{ApiOptions, AppState};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::{WorkerConfig, WorkerState};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stats::{ms, summarize};
use crate::worker::{Worker, native, start_worker};

/// Options of `anywork-bench server`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Concurrent WebSocket sessions of the dispatch benchmark.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Chats per session, one after the other (each waits for the previous `done`).
    #[arg(long, default_value_t = 5)]
    chats: usize,
    /// Paced rounds: each session sends a chat every this many ms (spread evenly over the
    /// sessions, so `sessions / interval` tasks/s are offered); one round per value.
    #[arg(long, value_delimiter = ',', default_value = "4000,2000,1000")]
    interval_ms: Vec<u64>,
    /// The dispatcher's global limit of running tasks (set above `--sessions` so that it is not
    /// what limits the run).
    #[arg(long, default_value_t = 256)]
    max_concurrent: usize,
    /// Store of the in-process server.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// Also time every store call and the driver's `get_worker` (where the time goes).
    #[arg(long)]
    phases: bool,
    /// Experiment: let one store write at a time through, in-process, in front of the store.
    #[arg(long)]
    serialize_writes: bool,
    /// Idle WebSocket connections of the memory benchmark (needs 2 file descriptors each).
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Memory benchmark: connections chatting at once in the "after one chat" step.
    #[arg(long, default_value_t = 50)]
    chat_concurrency: usize,
    /// Skip the memory benchmark.
    #[arg(long)]
    no_memory: bool,
    /// Skip the dispatch benchmark.
    #[arg(long)]
    no_dispatch: bool,
    /// The release server binary for the memory figures (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// Store of the in-process server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// SQLite in a temporary directory (the shipped default).
    Sqlite,
    /// The in-memory store (what the dispatcher costs without a database).
    Memory,
}

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any one WebSocket message may take before the benchmark gives up.
const WAIT: Duration = Duration::from_secs(120);

// --- instrumentation --------------------------------------------------------------------

/// The worker's executor, noting when each task reaches it (and, for `--phases`, when it
/// yields each event).
struct Stamping {
    inner: Arc<dyn Executor>,
    starts: Arc<Mutex<HashMap<TaskId, Instant>>>,
    events: Option<Arc<EventTimes>>,
}

/// When the executor yielded each event of each task, and its type.
type EventTimes = Mutex<HashMap<TaskId, Vec<(Instant, String)>>>;

#[async_trait::async_trait]
impl Executor for Stamping {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn start(&self, request: ExecutionRequest) -> anywork_core::Result<Execution> {
        let task = request.task_id;
        lock(&self.starts).insert(task, Instant::now());
        let mut execution = self.inner.start(request).await?;
        if let Some(events) = self.events.clone() {
            execution.events = Box::pin(execution.events.inspect(move |e| {
                let kind = serde_json::to_value(e)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                lock(&events)
                    .entry(task)
                    .or_default()
                    .push((Instant::now(), kind));
            }));
        }
        Ok(execution)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Durations per named call, and the events per `append_logs` call.
#[derive(Default)]
pub(crate) struct Timings(
    Mutex<HashMap<&'static str, Vec<Duration>>>,
    Mutex<Vec<usize>>,
);

impl Timings {
    fn record(&self, name: &'static str, took: Duration) {
        lock(&self.0).entry(name).or_default().push(took);
    }

    async fn time<T>(&self, name: &'static str, f: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        self.record(name, started.elapsed());
        out
    }

    pub(crate) fn clear(&self) {
        lock(&self.0).clear();
        lock(&self.1).clear();
    }

    pub(crate) fn print(&self, prefix: &str) {
        let batches = std::mem::take(&mut *lock(&self.1));
        if !batches.is_empty() {
            let events: usize = batches.iter().sum();
            println!(
                "{prefix} append_logs batches: {} calls, {events} events, {:.2} events/call, max {}",
                batches.len(),
                events as f64 / batches.len() as f64,
                batches.iter().max().unwrap_or(&0)
            );
        }
        let mut all: Vec<_> = lock(&self.0).drain().collect();
        all.sort_by_key(|(name, _)| *name);
        for (name, mut samples) in all {
            let total: Duration = samples.iter().sum();
            if let Some(s) = summarize(&mut samples) {
                println!(
                    "{prefix} {name:22} {s} total={:.0} ms",
                    total.as_secs_f64() * 1000.0
                );
            }
        }
    }
}

/// A store that times every call (`--phases`) and, with `--serialize-writes`, lets one write
/// at a time through, in-process (an experiment: SQLite then never answers `SQLITE_BUSY`).
pub(crate) struct Instrumented {
    inner: Arc<dyn TaskStore>,
    timings: Option<Arc<Timings>>,
    writes: Option<tokio::sync::Mutex<()>>,
}

impl Instrumented {
    /// `inner` with every call timed into `timings`.
    pub(crate) fn timed(inner: Arc<dyn TaskStore>, timings: Arc<Timings>) -> Self {
        Self {
            inner,
            timings: Some(timings),
            writes: None,
        }
    }

    /// Records the size of one appended batch of log rows.
    fn count_batch(&self, rows: usize) {
        if let Some(t) = &self.timings {
            lock(&t.1).push(rows);
        }
    }

    async fn call<T>(&self, name: &'static str, write: bool, f: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let guard = match (&self.writes, write) {
            (Some(lock), true) => Some(lock.lock().await),
            _ => None,
        };
        let out = f.await;
        drop(guard);
        if let Some(t) = &self.timings {
            t.record(name, started.elapsed());
        }
        out
    }
}

#[async_trait::async_trait]
impl TaskStore for Instrumented {
    async fn create_session(&self, new: NewSession) -> anywork_core::Result<Session> {
        let f = self.inner.create_session(new);
        self.call("create_session", true, f).await
    }
    async fn get_session(&self, id: &SessionId) -> anywork_core::Result<Session> {
        let f = self.inner.get_session(id);
        self.call("get_session", false, f).await
    }
    async fn find_session(
        &self,
        channel_type: &str,
        channel_key: &str,
    ) -> anywork_core::Result<Option<Session>> {
        let f = self.inner.find_session(channel_type, channel_key);
        self.call("find_session", false, f).await
    }
    async fn list_sessions(&self, page: Page) -> anywork_core::Result<Vec<SessionSummary>> {
        let f = self.inner.list_sessions(page);
        self.call("list_sessions", false, f).await
    }
    async fn search_sessions(
        &self,
        query: &str,
        page: Page,
    ) -> anywork_core::Result<Vec<SessionSummary>> {
        let f = self.inner.search_sessions(query, page);
        self.call("search_sessions", false, f).await
    }
    async fn usage_totals(&self) -> anywork_core::Result<anywork_core::UsageTotals> {
        let f = self.inner.usage_totals();
        self.call("usage_totals", false, f).await
    }
    async fn set_session_title(&self, id: &SessionId, title: &str) -> anywork_core::Result<()> {
        let f = self.inner.set_session_title(id, title);
        self.call("set_session_title", true, f).await
    }
    async fn touch_session(&self, id: &SessionId, at: Timestamp) -> anywork_core::Result<()> {
        let f = self.inner.touch_session(id, at);
        self.call("touch_session", true, f).await
    }
    async fn delete_session(&self, id: &SessionId) -> anywork_core::Result<()> {
        let f = self.inner.delete_session(id);
        self.call("delete_session", true, f).await
    }
    async fn create_task(&self, new: NewTask) -> anywork_core::Result<Task> {
        let f = self.inner.create_task(new);
        self.call("create_task", true, f).await
    }
    async fn create_task_claimed(
        &self,
        new: NewTask,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<(Task, Option<u64>)> {
        let f = self
            .inner
            .create_task_claimed(new, change, logs, deliveries);
        self.call("create_task_claimed", true, f).await
    }
    async fn create_session_with_task(
        &self,
        session: NewSession,
        task: NewTask,
    ) -> anywork_core::Result<(Session, Task)> {
        let f = self.inner.create_session_with_task(session, task);
        self.call("create_session_with_task", true, f).await
    }
    async fn create_session_with_task_claimed(
        &self,
        session: NewSession,
        task: NewTask,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<(Session, Task, Option<u64>)> {
        let f = self
            .inner
            .create_session_with_task_claimed(session, task, change, logs, deliveries);
        self.call("create_session_with_task_claimed", true, f).await
    }
    async fn get_task(&self, id: TaskId) -> anywork_core::Result<Task> {
        let f = self.inner.get_task(id);
        self.call("get_task", false, f).await
    }
    async fn task_status(&self, id: TaskId) -> anywork_core::Result<TaskStatus> {
        let f = self.inner.task_status(id);
        self.call("task_status", false, f).await
    }
    async fn task_status_for_start(
        &self,
        id: TaskId,
    ) -> anywork_core::Result<(TaskStatus, Option<Timestamp>)> {
        let f = self.inner.task_status_for_start(id);
        self.call("task_status_for_start", false, f).await
    }
    async fn hold_idle_session(
        &self,
        session_id: &SessionId,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> anywork_core::Result<bool> {
        let f = self.inner.hold_idle_session(session_id, owner, now, until);
        self.call("hold_idle_session", true, f).await
    }
    async fn release_idle_hold(
        &self,
        session_id: &SessionId,
        owner: &str,
    ) -> anywork_core::Result<()> {
        let f = self.inner.release_idle_hold(session_id, owner);
        self.call("release_idle_hold", true, f).await
    }
    async fn update_task(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
    ) -> anywork_core::Result<Task> {
        let f = self.inner.update_task(id, expected, change);
        self.call("update_task", true, f).await
    }
    async fn update_task_and_append(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
    ) -> anywork_core::Result<(Task, u64)> {
        let f = self
            .inner
            .update_task_and_append(id, expected, change, logs);
        self.call("update_task_and_append", true, f).await
    }
    async fn tasks_by_session(
        &self,
        session_id: &SessionId,
        page: Page,
    ) -> anywork_core::Result<Vec<Task>> {
        let f = self.inner.tasks_by_session(session_id, page);
        self.call("tasks_by_session", false, f).await
    }
    async fn tasks_by_status(
        &self,
        status: TaskStatus,
        page: Page,
    ) -> anywork_core::Result<Vec<Task>> {
        let f = self.inner.tasks_by_status(status, page);
        self.call("tasks_by_status", false, f).await
    }
    async fn tasks_by_session_in_status(
        &self,
        session_id: &SessionId,
        status: TaskStatus,
        page: Page,
    ) -> anywork_core::Result<Vec<Task>> {
        let f = self
            .inner
            .tasks_by_session_in_status(session_id, status, page);
        self.call("tasks_by_session_in_status", false, f).await
    }
    async fn renew_lease(
        &self,
        id: TaskId,
        owner: &str,
        expires_at: Timestamp,
    ) -> anywork_core::Result<()> {
        let f = self.inner.renew_lease(id, owner, expires_at);
        self.call("renew_lease", true, f).await
    }
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> anywork_core::Result<Vec<Task>> {
        let f = self.inner.expired_leases(now, limit);
        self.call("expired_leases", false, f).await
    }
    async fn claim_task(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<anywork_core::Claim> {
        let f = self.inner.claim_task(id, change, logs, deliveries);
        self.call("claim_task", true, f).await
    }
    async fn claim_task_lean(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<anywork_core::Claim<()>> {
        let f = self.inner.claim_task_lean(id, change, logs, deliveries);
        self.call("claim_task_lean", true, f).await
    }
    async fn claimable(&self, limit: u32) -> anywork_core::Result<Vec<Task>> {
        let f = self.inner.claimable(limit);
        self.call("claimable", false, f).await
    }
    fn change_feed(&self) -> Option<anywork_core::ChangeFeed> {
        self.inner.change_feed()
    }
    async fn append_logs(
        &self,
        task_id: TaskId,
        logs: Vec<NewTaskLog>,
    ) -> anywork_core::Result<u64> {
        self.count_batch(logs.len());
        let f = self.inner.append_logs(task_id, logs);
        self.call("append_logs", true, f).await
    }
    async fn append_logs_while_active(
        &self,
        task_id: TaskId,
        logs: Vec<NewTaskLog>,
    ) -> anywork_core::Result<u64> {
        // A run's appends: counted with the others.
        self.count_batch(logs.len());
        let f = self.inner.append_logs_while_active(task_id, logs);
        self.call("append_logs", true, f).await
    }
    async fn read_logs(
        &self,
        task_id: TaskId,
        after: u64,
        limit: u32,
    ) -> anywork_core::Result<Vec<TaskLog>> {
        let f = self.inner.read_logs(task_id, after, limit);
        self.call("read_logs", false, f).await
    }
    async fn find_task_by_idempotency_key(
        &self,
        channel_type: &str,
        key: &str,
    ) -> anywork_core::Result<Option<Task>> {
        let f = self.inner.find_task_by_idempotency_key(channel_type, key);
        self.call("find_task_by_idempotency_key", false, f).await
    }
    async fn update_task_and_enqueue(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<(Task, u64)> {
        let f = self
            .inner
            .update_task_and_enqueue(id, expected, change, logs, deliveries);
        self.call("update_task_and_enqueue", true, f).await
    }
    async fn update_task_lean(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<u64> {
        let f = self
            .inner
            .update_task_lean(id, expected, change, logs, deliveries);
        self.call("update_task_lean", true, f).await
    }
    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
        limit: u32,
    ) -> anywork_core::Result<Vec<anywork_core::Delivery>> {
        let f = self.inner.claim_deliveries(owner, now, until, limit);
        self.call("claim_deliveries", true, f).await
    }
    async fn record_delivery_attempt(
        &self,
        id: anywork_core::DeliveryId,
        owner: &str,
        attempt: anywork_core::DeliveryAttempt,
        at: Timestamp,
    ) -> anywork_core::Result<anywork_core::Delivery> {
        let f = self.inner.record_delivery_attempt(id, owner, attempt, at);
        self.call("record_delivery_attempt", true, f).await
    }
    async fn get_delivery(
        &self,
        id: anywork_core::DeliveryId,
    ) -> anywork_core::Result<anywork_core::Delivery> {
        let f = self.inner.get_delivery(id);
        self.call("get_delivery", false, f).await
    }
    async fn list_deliveries(
        &self,
        status: Option<anywork_core::DeliveryStatus>,
        page: Page,
    ) -> anywork_core::Result<Vec<anywork_core::Delivery>> {
        let f = self.inner.list_deliveries(status, page);
        self.call("list_deliveries", false, f).await
    }
    async fn retry_delivery(
        &self,
        id: anywork_core::DeliveryId,
        now: Timestamp,
    ) -> anywork_core::Result<anywork_core::Delivery> {
        let f = self.inner.retry_delivery(id, now);
        self.call("retry_delivery", true, f).await
    }
    async fn delete_settled_deliveries(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> anywork_core::Result<u64> {
        let f = self.inner.delete_settled_deliveries(before, limit);
        self.call("delete_settled_deliveries", true, f).await
    }
    async fn delete_finished_logs(
        &self,
        finished_before: Timestamp,
        max_tasks: u32,
        now: Timestamp,
    ) -> anywork_core::Result<anywork_core::DeletedLogs> {
        let f = self
            .inner
            .delete_finished_logs(finished_before, max_tasks, now);
        self.call("delete_finished_logs", true, f).await
    }
    async fn compact(&self) -> anywork_core::Result<u64> {
        let f = self.inner.compact();
        self.call("compact", true, f).await
    }
    async fn store_size(&self) -> anywork_core::Result<Option<anywork_core::StoreSize>> {
        let f = self.inner.store_size();
        self.call("store_size", false, f).await
    }
    async fn check_ready(&self) -> anywork_core::Result<()> {
        let f = self.inner.check_ready();
        self.call("check_ready", true, f).await
    }
    async fn get_setting(&self, key: &str) -> anywork_core::Result<Option<String>> {
        let f = self.inner.get_setting(key);
        self.call("get_setting", false, f).await
    }
    async fn put_setting(&self, key: &str, value: &str) -> anywork_core::Result<()> {
        let f = self.inner.put_setting(key, value);
        self.call("put_setting", true, f).await
    }
}

/// An in-process worker like [`start_worker`]'s whose HTTP calls are timed (request to response
/// head; for `/chat` that is when the SSE stream starts).
async fn start_timed_worker(
    executor: Arc<dyn Executor>,
    timings: Arc<Timings>,
) -> anyhow::Result<Worker> {
    async fn timed(
        axum::extract::State(timings): axum::extract::State<Arc<Timings>>,
        request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        let name = match request.uri().path() {
            "/prepare" => "worker /prepare",
            "/chat" => "worker /chat (to head)",
            "/health" => "worker /health",
            _ => "worker (other)",
        };
        timings.time(name, next.run(request)).await
    }
    let dir = tempfile::tempdir()?;
    let state = WorkerState::new(WorkerConfig::new(dir.path()), executor)?;
    let app =
        anywork_worker::router(state).layer(axum::middleware::from_fn_with_state(timings, timed));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Worker::new(url, dir))
}

/// A driver that times `get_worker`.
struct TimedDriver {
    inner: Arc<dyn ContainerDriver>,
    timings: Arc<Timings>,
}

#[async_trait::async_trait]
impl ContainerDriver for TimedDriver {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get_worker(&self, session_id: &SessionId) -> anywork_core::Result<WorkerEndpoint> {
        let f = self.inner.get_worker(session_id);
        self.timings.time("driver.get_worker", f).await
    }
    async fn release(&self, session_id: &SessionId) -> anywork_core::Result<()> {
        self.inner.release(session_id).await
    }
    async fn purge(&self, session_id: &SessionId) -> anywork_core::Result<()> {
        self.inner.purge(session_id).await
    }
    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool {
        self.inner.is_healthy(endpoint).await
    }
    async fn list(&self) -> anywork_core::Result<Vec<anywork_core::WorkerInfo>> {
        self.inner.list().await
    }
    fn reaps_workers(&self) -> bool {
        self.inner.reaps_workers()
    }
}

// --- WebSocket client -------------------------------------------------------------------

pub(crate) async fn connect(http_url: &str) -> anyhow::Result<Ws> {
    let url = format!("{}/ws", http_url.replacen("http://", "ws://", 1));
    // Nagle off, as the server has it: small frames must not wait for delayed ACKs. A small
    // read buffer: the default (128 KiB) is zeroed on every read, which costs the load
    // generator CPU that the server under test then lacks.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .context("connect /ws")?;
    Ok(ws)
}

async fn send(ws: &mut Ws, v: &Value) -> anyhow::Result<()> {
    ws.send(Message::Text(v.to_string().into())).await?;
    Ok(())
}

/// The next JSON text message.
async fn recv(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no WebSocket message in time")?
            .context("the server closed the WebSocket")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

/// What the client saw of one chat.
pub(crate) struct ChatTimes {
    pub task: TaskId,
    pub sent: Instant,
    pub created: Instant,
    pub done: Instant,
}

/// Sends one chat and reads up to its `done`; returns the times and the session.
pub(crate) async fn chat(
    ws: &mut Ws,
    session: Option<&str>,
    message: &str,
) -> anyhow::Result<(ChatTimes, String)> {
    let mut request = json!({"type": "chat", "message": message});
    if let Some(s) = session {
        request["session_id"] = json!(s);
    }
    let sent = Instant::now();
    send(ws, &request).await?;
    let mut session = session.map(str::to_owned);
    let mut task: Option<(TaskId, Instant)> = None;
    loop {
        let v = recv(ws).await?;
        match v["type"].as_str().unwrap_or_default() {
            "session_created" => session = v["session_id"].as_str().map(str::to_owned),
            "task_created" => {
                let id: TaskId = serde_json::from_value(v["task_id"].clone())?;
                task = Some((id, Instant::now()));
            }
            "done" if task.is_some_and(|(id, _)| v["task_id"] == json!(id)) => {
                let done = Instant::now();
                let status = v["metadata"]["status"].as_str().unwrap_or_default();
                ensure!(status == "completed", "a task ended {status}: {v}");
                let (task, created) = task.context("done before task_created")?;
                let session = session.context("no session_created")?;
                return Ok((
                    ChatTimes {
                        task,
                        sent,
                        created,
                        done,
                    },
                    session,
                ));
            }
            "error" if v["task_id"].is_null() || task.is_none() => bail!("server error: {v}"),
            _ => {}
        }
    }
}

/// A session doing `chats` chats one after the other, once `go` says so: back to back, or
/// with `pace = (phase, interval)` the k-th chat is sent at `go + phase + k * interval` (or when
/// the previous one is done, if later).
async fn session_client(
    url: String,
    chats: usize,
    pace: Option<(Duration, Duration)>,
    go: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<Vec<ChatTimes>> {
    let mut ws = connect(&url).await?;
    go.wait().await;
    let started = tokio::time::Instant::now();
    let mut session: Option<String> = None;
    let mut out = Vec::with_capacity(chats);
    for i in 0..chats {
        if let Some((phase, interval)) = pace {
            tokio::time::sleep_until(started + phase + interval * i as u32).await;
        }
        let (times, s) = chat(&mut ws, session.as_deref(), &format!("hello {i}")).await?;
        session = Some(s);
        out.push(times);
    }
    let _ = ws.close(None).await;
    Ok(out)
}

/// `sessions` concurrent clients, `chats` each; returns every chat and the wall time.
async fn round(
    url: &str,
    sessions: usize,
    chats: usize,
    interval: Option<Duration>,
) -> anyhow::Result<(Vec<ChatTimes>, Duration)> {
    let go = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let clients: Vec<_> = (0..sessions)
        .map(|i| {
            let pace = interval.map(|every| (every * i as u32 / sessions as u32, every));
            tokio::spawn(session_client(url.to_owned(), chats, pace, go.clone()))
        })
        .collect();
    go.wait().await;
    let started = Instant::now();
    let mut all = Vec::with_capacity(sessions * chats);
    for c in clients {
        all.extend(c.await??);
    }
    Ok((all, started.elapsed()))
}

// --- dispatch overhead and throughput -----------------------------------------------------

/// Prints the figures of one round.
fn report(
    label: &str,
    chats: &[ChatTimes],
    starts: &HashMap<TaskId, Instant>,
    wall: Duration,
    cpu: Duration,
) -> anyhow::Result<()> {
    let (mut overhead, mut submit, mut rest, mut end_to_end) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in chats {
        let start = *starts
            .get(&c.task)
            .with_context(|| format!("task {} never reached the executor", c.task))?;
        overhead.push(start.saturating_duration_since(c.sent));
        submit.push(c.created.saturating_duration_since(c.sent));
        rest.push(c.done.saturating_duration_since(start));
        end_to_end.push(c.done.saturating_duration_since(c.sent));
    }
    let n = chats.len();
    let line = |what: &str, samples: &mut Vec<Duration>| -> anyhow::Result<()> {
        let s = summarize(samples).context("no samples")?;
        println!("server  {label:14} {what:34} {s}");
        Ok(())
    };
    line("chat sent -> task_created", &mut submit)?;
    line("chat sent -> executor start (DISPATCH)", &mut overhead)?;
    line("executor start -> done at client", &mut rest)?;
    line("chat sent -> done (end to end)", &mut end_to_end)?;
    println!(
        "server  {label:14} {:34} {n} tasks in {} = {:.0} tasks/s",
        "throughput",
        ms(wall),
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "server  {label:14} {:34} {:.2} ms per task ({:.0}% of 2 cores)",
        "CPU, whole process",
        cpu.as_secs_f64() * 1000.0 / n as f64,
        cpu.as_secs_f64() / wall.as_secs_f64() / 2.0 * 100.0
    );
    Ok(())
}

/// User + system CPU time of this process so far (Linux: `/proc/self/stat`, 100 ticks/s).
fn cpu_time() -> anyhow::Result<Duration> {
    process_cpu_time("self")
}

/// User + system CPU time of process `pid` (a number, or `self`).
fn process_cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')').context("bad /proc/self/stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (from 1).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// The executor's events per task, and the time from its first to its last event.
fn print_events(prefix: &str, events: &EventTimes) {
    let all = std::mem::take(&mut *lock(events));
    let mut spans: Vec<Duration> = all
        .values()
        .filter_map(|e| Some(e.last()?.0.saturating_duration_since(e.first()?.0)))
        .collect();
    if let Some(kinds) = all.values().next() {
        let kinds: Vec<&str> = kinds.iter().map(|(_, k)| k.as_str()).collect();
        println!("{prefix} executor events of a task: {}", kinds.join(", "));
    }
    if let Some(s) = summarize(&mut spans) {
        println!("{prefix} executor first -> last event  {s}");
    }
}

async fn dispatch(fake: &FakeLlm, options: &Options) -> anyhow::Result<()> {
    let starts = Arc::new(Mutex::new(HashMap::new()));
    let events = Arc::new(Mutex::new(HashMap::new()));
    let executor = Arc::new(Stamping {
        inner: native(fake),
        starts: starts.clone(),
        events: options.phases.then(|| events.clone()),
    });
    let timings = Arc::new(Timings::default());
    let worker = if options.phases {
        start_timed_worker(executor, timings.clone()).await?
    } else {
        start_worker(executor).await?
    };
    let db = tempfile::tempdir()?;
    let mut store: Arc<dyn TaskStore> = match options.store {
        StoreKind::Sqlite => Arc::new(anywork_store::SqliteStore::open_in_dir(db.path()).await?),
        StoreKind::Memory => Arc::new(anywork_store::MemoryStore::new()),
    };
    let mut driver: Arc<dyn ContainerDriver> =
        Arc::new(anywork_drivers::StaticDriver::new(&worker.url)?);
    if options.phases || options.serialize_writes {
        store = Arc::new(Instrumented {
            inner: store,
            timings: options.phases.then(|| timings.clone()),
            writes: options
                .serialize_writes
                .then(|| tokio::sync::Mutex::new(())),
        });
    }
    if options.phases {
        driver = Arc::new(TimedDriver {
            inner: driver,
            timings: timings.clone(),
        });
    }
    let mut config = DispatcherConfig::default();
    config.max_concurrent = options.max_concurrent;
    let dispatcher = Dispatcher::builder(store, driver)
        .config(config)
        .start()
        .await?;
    let state = AppState::new(dispatcher, ApiOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(anywork_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let (n, k) = (options.sessions, options.chats);
    println!(
        "server  store={:?}{} max_concurrent={} sessions={n} chats/session={k}",
        options.store,
        if options.serialize_writes {
            " (writes serialized in-process)"
        } else {
            ""
        },
        options.max_concurrent
    );

    // Warm-up: connections, SQLite pages, the worker's and the fake's pools.
    round(&url, n.min(50), 2, None).await?;
    lock(&starts).clear();
    timings.clear();

    let cpu = cpu_time()?;
    let (chats, wall) = round(&url, n, k, None).await?;
    let cpu = cpu_time()? - cpu;
    report(
        &format!("burst {n}x{k}"),
        &chats,
        &std::mem::take(&mut *lock(&starts)),
        wall,
        cpu,
    )?;
    if options.phases {
        timings.print("phase   burst");
        print_events("phase   burst", &events);
    }

    for &interval in options.interval_ms.iter().filter(|&&i| i > 0) {
        let every = Duration::from_millis(interval);
        let cpu = cpu_time()?;
        let (chats, wall) = round(&url, n, k, Some(every)).await?;
        let cpu = cpu_time()? - cpu;
        let offered = n as f64 / every.as_secs_f64();
        report(
            &format!("paced {offered:.0}/s"),
            &chats,
            &std::mem::take(&mut *lock(&starts)),
            wall,
            cpu,
        )?;
        if options.phases {
            timings.print("phase   paced");
            print_events("phase   paced", &events);
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    drop(worker);
    Ok(())
}

// --- the server binary ------------------------------------------------------------------

/// `given`, else the `anywork-server` next to this binary.
pub(crate) fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(b) => Ok(b.to_path_buf()),
        None => Ok(std::env::current_exe()?.with_file_name("anywork-server")),
    }
}

/// How [`ServerProcess::start_with`] runs the binary.
#[derive(Debug, Default)]
pub(crate) struct Launch {
    /// A program and its arguments that run the binary (e.g. `valgrind --tool=callgrind`).
    pub wrapper: Vec<String>,
    /// Where the server's stderr goes (default: this process's).
    pub stderr: Option<std::fs::File>,
    /// How long it may take to answer `/api/health` (default 10 s).
    pub startup: Option<Duration>,
}

/// The release server binary running as its own process on a free loopback port, with the
/// static driver to `worker_url`; killed when dropped.
pub(crate) struct ServerProcess {
    child: tokio::process::Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl ServerProcess {
    /// Starts `bin` with `DB_DIR=db_dir` and `env` added to a clean environment, and waits
    /// (10 s at most) until `/api/health` answers.
    pub async fn start(
        bin: &Path,
        db_dir: &Path,
        worker_url: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, db_dir, worker_url, env, &Launch::default()).await
    }

    /// [`start`](Self::start), run through `launch`.
    pub async fn start_with(
        bin: &Path,
        db_dir: &Path,
        worker_url: &str,
        env: &[(&str, String)],
        launch: &Launch,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = match launch.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        if let Some(file) = &launch.stderr {
            command.stderr(file.try_clone()?);
        }
        command
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", port.to_string())
            .env("DB_DIR", db_dir)
            .env("CONTAINER_DRIVER", "static")
            .env("STATIC_WORKER_URL", worker_url)
            // Every connection of the benchmark comes from 127.0.0.1.
            .env("WS_MAX_CONNECTIONS_PER_CLIENT", "0")
            // sqlx warns of every slow pool acquire under load; only errors matter here.
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("no pid")?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + launch.startup.unwrap_or(Duration::from_secs(10));
        while !client
            .get(format!("{url}/api/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if let Some(status) = child.try_wait()? {
                bail!("the server exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("the server did not come up");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, pid, url })
    }

    /// `Err` when the process has ended.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the server process ended: {status}"),
            None => Ok(()),
        }
    }

    /// Kills the process and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

// --- memory per idle session ------------------------------------------------------------

pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// Context switches (voluntary and not) of all threads of `pid` so far.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for thread in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(thread?.path().join("status")) else {
            continue; // the thread has just ended
        };
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Opens a connection and has one ping answered (so it is fully set up).
async fn idle_connection(url: String) -> anyhow::Result<Ws> {
    let mut ws = connect(&url).await?;
    send(&mut ws, &json!({"type": "ping"})).await?;
    loop {
        if recv(&mut ws).await?["type"] == "pong" {
            return Ok(ws);
        }
    }
}

/// One chat, then reads whatever else comes (other sessions' titles) until quiet.
async fn chat_then_idle(mut ws: Ws, i: usize) -> anyhow::Result<Ws> {
    chat(&mut ws, None, &format!("hello {i}")).await?;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
        m?;
    }
    Ok(ws)
}

async fn memory(fake: &FakeLlm, options: &Options, bin: &Path) -> anyhow::Result<()> {
    let worker = start_worker(native(fake)).await?;
    let db = tempfile::tempdir()?;
    let server = ServerProcess::start(
        bin,
        db.path(),
        &worker.url,
        &[("MAX_CONCURRENT_TASKS", options.max_concurrent.to_string())],
    )
    .await?;
    let (pid, url) = (server.pid, server.url.clone());
    // Warm-up: a few sessions with a chat each, then closed.
    for i in 0..5 {
        let ws = connect(&url).await?;
        let mut ws = chat_then_idle(ws, i).await?;
        let _ = ws.close(None).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(pid)?;

    let m = options.idle;
    let mut conns = Vec::with_capacity(m);
    let opened = futures_util::stream::iter((0..m).map(|_| idle_connection(url.clone())))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    for c in opened {
        conns.push(c?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid)?;
    let per_idle = idle.saturating_sub(base) as f64 * 1024.0 / m as f64;

    // One chat per connection, `chat_concurrency` at a time (so that the figure is what idle
    // sessions keep, not the peak of a thousand tasks at once).
    let chatted = futures_util::stream::iter(conns.into_iter().enumerate())
        .map(|(i, ws)| chat_then_idle(ws, i))
        .buffer_unordered(options.chat_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut conns = Vec::with_capacity(m);
    for c in chatted {
        conns.push(c?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_chat = rss_kib(pid)?;
    let per_chatted = after_chat.saturating_sub(base) as f64 * 1024.0 / m as f64;
    drop(conns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = rss_kib(pid)?;

    println!(
        "server  RSS after warm-up (release binary):        {}",
        mib(base)
    );
    println!(
        "server  RSS with {m} idle WebSockets (one ping each): {} -> {:.1} KiB per session",
        mib(idle),
        per_idle / 1024.0
    );
    println!(
        "server  RSS after each of them did one chat ({} at a time): {} -> {:.1} KiB per session",
        options.chat_concurrency,
        mib(after_chat),
        per_chatted / 1024.0
    );
    println!(
        "server  RSS after closing them all:                 {}",
        mib(closed)
    );

    // Throughput of the binary alone, with its own CPU time (the benchmark, the worker and the
    // fake share the other core(s)).
    let (n, k) = (options.sessions, options.chats);
    let (cpu, switches) = (process_cpu_time(&pid.to_string())?, context_switches(pid)?);
    let (chats, wall) = round(&url, n, k, None).await?;
    let cpu = process_cpu_time(&pid.to_string())? - cpu;
    let switches = context_switches(pid)?.saturating_sub(switches);
    let tasks = chats.len();
    println!(
        "server  binary, burst {n}x{k}: {tasks} tasks in {} = {:.0} tasks/s; server process CPU \
         {:.2} ms per task ({:.0}% of one core), {:.0} context switches per task",
        ms(wall),
        tasks as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / tasks as f64,
        cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
        switches as f64 / tasks as f64
    );
    server.stop().await?;
    drop(worker);
    Ok(())
}

/// Runs the server benchmarks and prints one line per figure.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    if !options.no_dispatch {
        dispatch(&fake, &options).await?;
    }
    if !options.no_memory {
        let bin = server_bin(options.server_bin.as_deref())?;
        memory(&fake, &options, &bin).await?;
    }
    Ok(())
}
