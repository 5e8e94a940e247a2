//! The worker's HTTP API, driven through `Router::oneshot` with a scripted executor.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::{
    Error, Execution, ExecutionControl, ExecutionRequest, Executor, InputKind, InputRequest,
    InputResponse, SessionId, TaskEvent, TaskId, TaskOutcome, TaskStatus,
};
use anywork_worker::workspace::DEFAULT_SOUL;
use anywork_worker::{NO_RESULT, WorkerConfig, WorkerState, encode_session_id, router};
use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, BodyDataStream};
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// A scripted executor

/// One thing the scripted run does.
#[derive(Debug, Clone)]
enum Step {
    /// Send this event.
    Emit(TaskEvent),
    /// Wait (a cancel cuts it short when the script honours cancel).
    Sleep(Duration),
    /// Wait for a cancel (forever if the script ignores cancel).
    Hang,
    /// Wait for `respond`, then send `text` "answer=<answer> allow=<allow>".
    AwaitInput,
    /// Panic inside the stream (a buggy executor).
    Panic,
}

#[derive(Debug, Clone)]
struct Script {
    steps: Vec<Step>,
    honours_cancel: bool,
    fail_start: bool,
}

impl Script {
    fn new(steps: Vec<Step>) -> Self {
        Self {
            steps,
            honours_cancel: true,
            fail_start: false,
        }
    }

    fn ignoring_cancel(mut self) -> Self {
        self.honours_cancel = false;
        self
    }
}

/// Runs the script registered for the request's message; unknown messages echo and complete.
#[derive(Default)]
struct ScriptedExecutor {
    scripts: Mutex<HashMap<String, Script>>,
    started: Mutex<Vec<ExecutionRequest>>,
    dropped_streams: Arc<AtomicUsize>,
    cancels: Arc<AtomicUsize>,
}

impl ScriptedExecutor {
    fn script(&self, message: &str, script: Script) {
        self.scripts
            .lock()
            .unwrap()
            .insert(message.to_owned(), script);
    }

    fn dropped(&self) -> usize {
        self.dropped_streams.load(Ordering::SeqCst)
    }
}

struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct ScriptControl {
    cancel: Arc<Notify>,
    cancels: Arc<AtomicUsize>,
    answers: mpsc::UnboundedSender<InputResponse>,
}

#[async_trait]
impl ExecutionControl for ScriptControl {
    async fn cancel(&self) -> anywork_core::Result<()> {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        self.cancel.notify_one();
        Ok(())
    }

    async fn respond(&self, response: InputResponse) -> anywork_core::Result<()> {
        self.answers
            .send(response)
            .map_err(|_| Error::not_found("no pending input request"))
    }
}

struct RunState {
    steps: VecDeque<Step>,
    honours_cancel: bool,
    cancel: Arc<Notify>,
    answers: mpsc::UnboundedReceiver<InputResponse>,
    _dropped: DropCounter,
}

impl RunState {
    async fn canceled(&mut self) -> TaskEvent {
        self.steps.clear();
        TaskEvent::Done(TaskOutcome::canceled())
    }
}

#[async_trait]
impl Executor for ScriptedExecutor {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn start(&self, request: ExecutionRequest) -> anywork_core::Result<Execution> {
        let script = self
            .scripts
            .lock()
            .unwrap()
            .get(&request.message)
            .cloned()
            .unwrap_or_else(|| {
                let reply = format!("echo: {}", request.message);
                Script::new(vec![
                    Step::Emit(TaskEvent::text(reply.clone())),
                    Step::Emit(TaskEvent::Done(TaskOutcome::completed(reply))),
                ])
            });
        self.started.lock().unwrap().push(request);
        if script.fail_start {
            return Err(Error::unavailable("the agent binary is missing"));
        }
        let cancel = Arc::new(Notify::new());
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let state = RunState {
            steps: script.steps.into(),
            honours_cancel: script.honours_cancel,
            cancel: cancel.clone(),
            answers: answers_rx,
            _dropped: DropCounter(self.dropped_streams.clone()),
        };
        let events = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                let step = st.steps.pop_front()?;
                match step {
                    Step::Emit(event) => return Some((event, st)),
                    Step::Sleep(d) => {
                        if st.honours_cancel {
                            tokio::select! {
                                _ = tokio::time::sleep(d) => {}
                                _ = st.cancel.notified() => {
                                    let done = st.canceled().await;
                                    return Some((done, st));
                                }
                            }
                        } else {
                            tokio::time::sleep(d).await;
                        }
                    }
                    Step::Hang => {
                        if st.honours_cancel {
                            st.cancel.notified().await;
                            let done = st.canceled().await;
                            return Some((done, st));
                        }
                        std::future::pending::<()>().await;
                    }
                    Step::Panic => panic!("scripted executor panics on purpose"),
                    Step::AwaitInput => {
                        let answer = st.answers.recv().await?;
                        let text = format!("answer={} allow={:?}", answer.answer, answer.allow);
                        return Some((TaskEvent::text(text), st));
                    }
                }
            }
        });
        Ok(Execution {
            events: Box::pin(events),
            control: Arc::new(ScriptControl {
                cancel,
                cancels: self.cancels.clone(),
                answers: answers_tx,
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    app: Router,
    state: WorkerState,
    exec: Arc<ScriptedExecutor>,
    dir: tempfile::TempDir,
}

fn harness() -> Harness {
    harness_with(|c| c)
}

fn harness_with(configure: impl FnOnce(WorkerConfig) -> WorkerConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let exec = Arc::new(ScriptedExecutor::default());
    let config = configure(WorkerConfig::new(dir.path().join("ws")));
    let state = WorkerState::new(config, exec.clone()).unwrap();
    Harness {
        app: router(state.clone()),
        state,
        exec,
        dir,
    }
}

impl Harness {
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("ws")
    }

    fn session_dir(&self, session: &str) -> std::path::PathBuf {
        self.root()
            .join(encode_session_id(&SessionId::new(session).unwrap()))
    }

    async fn send(&self, request: Request<Body>) -> Response {
        self.app.clone().oneshot(request).await.unwrap()
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let builder = Request::builder().method(method).uri(uri);
        let request = match body {
            Some(body) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => builder.body(Body::empty()),
        }
        .unwrap();
        json_of(self.send(request).await).await
    }

    async fn raw(&self, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        json_of(self.send(request).await).await
    }

    async fn chat(&self, task: TaskId, session: &str, message: &str) -> Response {
        let body = json!({"task_id": task, "session_id": session, "message": message});
        let request = Request::builder()
            .method("POST")
            .uri("/chat")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(request).await
    }

    /// Starts a chat that must be accepted, and returns its event stream.
    async fn chat_ok(&self, task: TaskId, session: &str, message: &str) -> SseReader {
        let response = self.chat(task, session, message).await;
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader::new(response)
    }

    async fn busy(&self) -> Vec<Value> {
        let (status, health) = self.call("GET", "/health", None).await;
        assert_eq!(status, StatusCode::OK);
        health["busy_sessions"].as_array().unwrap().clone()
    }

    /// Waits until no session is busy.
    async fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.state.busy_sessions().is_empty() {
            assert!(Instant::now() < deadline, "sessions stayed busy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// One SSE event: the `event:` name and the parsed `data:` JSON.
#[derive(Debug, Clone)]
struct SseEvent {
    name: String,
    data: Value,
    /// The SSE `id`: the event's seq in the run.
    id: Option<String>,
}

struct SseReader {
    body: BodyDataStream,
    buf: String,
}

impl SseReader {
    fn new(response: Response) -> Self {
        Self {
            body: response.into_body().into_data_stream(),
            buf: String::new(),
        }
    }

    /// The next event; `None` when the body ended. Fails the test after 5 s.
    async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(5), self.next_inner())
            .await
            .expect("no SSE event within 5 s")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = None;
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                let Some(name) = name else {
                    continue; // keep-alive comment
                };
                let data: Value = serde_json::from_str(&data).unwrap();
                assert_eq!(data["type"], name.as_str(), "event name matches data.type");
                return Some(SseEvent { name, data, id });
            }
            let chunk = self.body.next().await?.unwrap();
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every remaining event, until the body ends.
    async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }

    /// Reads events until one named `name`.
    async fn until(&mut self, name: &str) -> SseEvent {
        loop {
            let event = self.next().await.expect("stream ended early");
            if event.name == name {
                return event;
            }
        }
    }
}

fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.name.as_str()).collect()
}

fn done_of(events: &[SseEvent]) -> &Value {
    let dones: Vec<&SseEvent> = events.iter().filter(|e| e.name == "done").collect();
    assert_eq!(dones.len(), 1, "exactly one done in {events:?}");
    assert_eq!(events.last().unwrap().name, "done", "done is last");
    &dones[0].data
}

fn assert_error(body: &Value, code: &str, needle: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
}

fn emit(event: TaskEvent) -> Step {
    Step::Emit(event)
}

fn done(result: &str) -> Step {
    Step::Emit(TaskEvent::Done(TaskOutcome::completed(result)))
}

// ---------------------------------------------------------------------------------------------
// Chat

#[tokio::test]
async fn chat_streams_events_and_exactly_one_done() {
    let h = harness();
    h.exec.script(
        "work",
        Script::new(vec![
            emit(TaskEvent::text("Let me look.")),
            emit(TaskEvent::ToolCall {
                id: "t1".into(),
                name: "Bash".into(),
                input: json!({"command": "ls"}),
            }),
            emit(TaskEvent::ToolResult {
                tool_use_id: "t1".into(),
                content: "a.txt".into(),
                is_error: false,
            }),
            Step::Sleep(Duration::from_millis(20)),
            done("There is a.txt."),
        ]),
    );
    let task = TaskId::generate();
    let events = h.chat_ok(task, "s1", "work").await.rest().await;
    assert_eq!(names(&events), ["text", "tool_call", "tool_result", "done"]);
    assert_eq!(
        events[0].data,
        json!({"type": "text", "content": "Let me look.", "metadata": {}})
    );
    assert_eq!(events[1].data["metadata"]["input"]["command"], "ls");
    let done = done_of(&events);
    assert_eq!(done["content"], "There is a.txt.");
    assert_eq!(done["metadata"]["status"], "completed");
    // Parses back as the core type.
    let parsed: TaskEvent = serde_json::from_value(done.clone()).unwrap();
    assert!(matches!(parsed, TaskEvent::Done(o) if o.status == TaskStatus::Completed));

    let started = h.exec.started.lock().unwrap()[0].clone();
    assert_eq!(started.task_id, task);
    assert_eq!(started.workspace, h.session_dir("s1"));
    assert!(started.workspace.join("SOUL.md").is_file());
    h.wait_idle().await;
}

#[tokio::test]
async fn events_after_done_are_dropped() {
    let h = harness();
    h.exec.script(
        "chatty",
        Script::new(vec![
            emit(TaskEvent::text("a")),
            done("first"),
            emit(TaskEvent::text("late")),
            done("second"),
        ]),
    );
    let events = h
        .chat_ok(TaskId::generate(), "s", "chatty")
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["text", "done"]);
    assert_eq!(done_of(&events)["content"], "first");
    h.wait_idle().await;
    assert_eq!(
        h.exec.dropped(),
        1,
        "the executor stream is dropped after done"
    );
}

#[tokio::test]
async fn missing_done_becomes_failed_done() {
    let h = harness();
    h.exec.script(
        "quiet",
        Script::new(vec![
            emit(TaskEvent::text("partial")),
            emit(TaskEvent::Usage {
                usage: anywork_core::TokenUsage {
                    input_tokens: 7,
                    output_tokens: 3,
                    ..Default::default()
                },
                cost_usd: Some(0.5),
            }),
        ]),
    );
    let events = h
        .chat_ok(TaskId::generate(), "s", "quiet")
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["text", "usage", "done"]);
    let done = done_of(&events);
    assert_eq!(done["metadata"]["status"], "failed");
    assert_eq!(done["metadata"]["error"], NO_RESULT);
    assert_eq!(done["metadata"]["usage"]["input_tokens"], 7);
    assert_eq!(done["metadata"]["cost_usd"], 0.5);
}

#[tokio::test]
async fn start_failure_is_a_single_failed_done() {
    let h = harness();
    let mut script = Script::new(vec![]);
    script.fail_start = true;
    h.exec.script("boom", script);
    let events = h
        .chat_ok(TaskId::generate(), "s", "boom")
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["done"]);
    let done = done_of(&events);
    assert_eq!(done["metadata"]["status"], "failed");
    let error = done["metadata"]["error"].as_str().unwrap();
    assert!(error.contains("agent binary is missing"), "{error}");
    h.wait_idle().await;
}

#[tokio::test]
async fn a_panicking_executor_still_ends_with_one_failed_done_and_frees_the_session() {
    let h = harness();
    h.exec.script(
        "panic",
        Script::new(vec![emit(TaskEvent::text("before")), Step::Panic]),
    );
    let events = h
        .chat_ok(TaskId::generate(), "s", "panic")
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["text", "done"]);
    assert_eq!(done_of(&events)["metadata"]["status"], "failed");
    h.wait_idle().await;
    let events = h
        .chat_ok(TaskId::generate(), "s", "next")
        .await
        .rest()
        .await;
    assert_eq!(done_of(&events)["metadata"]["status"], "completed");
}

#[tokio::test]
async fn busy_session_conflicts_while_others_run() {
    let h = harness();
    h.exec.script(
        "hang",
        Script::new(vec![emit(TaskEvent::text("working")), Step::Hang]),
    );
    let first = TaskId::generate();
    let mut a = h.chat_ok(first, "a", "hang").await;
    assert_eq!(a.next().await.unwrap().name, "text");

    let second = h.chat(TaskId::generate(), "a", "hello").await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    let (_, body) = json_of(second).await;
    assert_error(&body, "conflict", "busy");

    // The same task id cannot run twice either.
    let again = h.chat(first, "other", "hello").await;
    assert_eq!(again.status(), StatusCode::CONFLICT);

    let b = h
        .chat_ok(TaskId::generate(), "b", "hello")
        .await
        .rest()
        .await;
    assert_eq!(done_of(&b)["content"], "echo: hello");

    assert_eq!(h.busy().await, vec![json!("a")]);
    let (status, body) = h
        .call("POST", "/cancel", Some(json!({"task_id": first})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "canceled");
    let rest = a.rest().await;
    assert_eq!(done_of(&rest)["metadata"]["status"], "canceled");
    assert!(h.busy().await.is_empty());
}

#[tokio::test]
async fn cancel_of_an_executor_that_ignores_it_ends_within_a_second() {
    let h = harness();
    h.exec.script(
        "stubborn",
        Script::new(vec![emit(TaskEvent::text("working")), Step::Hang]).ignoring_cancel(),
    );
    let task = TaskId::generate();
    let mut sse = h.chat_ok(task, "s", "stubborn").await;
    assert_eq!(sse.next().await.unwrap().name, "text");

    let asked = Instant::now();
    let (status, body) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "canceled");
    let events = sse.rest().await;
    let waited = asked.elapsed();
    assert_eq!(names(&events), ["done"]);
    assert_eq!(done_of(&events)["metadata"]["status"], "canceled");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1800),
        "canceled after {waited:?}"
    );
    assert_eq!(
        h.exec.cancels.load(Ordering::SeqCst),
        1,
        "cancel was asked first"
    );
    assert_eq!(h.exec.dropped(), 1, "the worker dropped the stream");
    assert!(h.busy().await.is_empty());

    // Finished tasks are unknown to /cancel.
    let (status, body) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "not running");
}

#[tokio::test]
async fn cancel_honoured_by_the_executor_is_quick() {
    let h = harness();
    h.exec.script(
        "slow",
        Script::new(vec![Step::Sleep(Duration::from_secs(30)), done("never")]),
    );
    let task = TaskId::generate();
    let sse = h.chat_ok(task, "s", "slow").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = Instant::now();
    let (status, _) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = sse.rest().await;
    assert_eq!(done_of(&events)["metadata"]["status"], "canceled");
    assert!(asked.elapsed() < Duration::from_millis(800));
}

#[tokio::test]
async fn cancel_and_input_for_unknown_tasks_are_404() {
    let h = harness();
    let task = TaskId::generate();
    let (status, body) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", &task.to_string());
    let (status, body) = h
        .call(
            "POST",
            "/input",
            Some(json!({"task_id": task, "request_id": "r1", "answer": "yes"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "not running");
}

#[tokio::test]
async fn client_disconnect_stops_the_run_and_frees_the_session() {
    let h = harness();
    h.exec.script(
        "hang",
        Script::new(vec![emit(TaskEvent::text("working")), Step::Hang]).ignoring_cancel(),
    );
    let task = TaskId::generate();
    let mut sse = h.chat_ok(task, "s", "hang").await;
    assert_eq!(sse.next().await.unwrap().name, "text");
    assert_eq!(h.busy().await, vec![json!("s")]);
    drop(sse);
    h.wait_idle().await;
    assert_eq!(h.exec.dropped(), 1, "the executor stream was dropped");

    // The session takes a new task, and the history tells what happened.
    let events = h
        .chat_ok(TaskId::generate(), "s", "again")
        .await
        .rest()
        .await;
    assert_eq!(done_of(&events)["content"], "echo: again");
    let (_, body) = h.call("GET", "/sessions/s/messages", None).await;
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert_eq!(messages[1]["status"], "canceled");
    assert_eq!(messages[1]["content"], "working");
}

/// Issue 15, item 5: with a detach grace, a run outlives its client: a client that lost the
/// stream attaches again (`GET /chat/attach`) from the last seq it had and gets the rest, up
/// to the `done`, with no gap and no repeat; the journal of a run that ended is still there
/// for a late attach; an unknown task is 404.
#[tokio::test]
async fn a_run_outlives_its_client_and_a_client_attaches_again() {
    let h = harness_with(|c| c.with_detach_grace(Duration::from_secs(30)));
    h.exec.script(
        "long",
        Script::new(vec![
            emit(TaskEvent::text("one")),
            Step::Sleep(Duration::from_millis(300)),
            emit(TaskEvent::text("two")),
            emit(TaskEvent::text("three")),
            done("all"),
        ]),
    );
    let task = TaskId::generate();
    let mut sse = h.chat_ok(task, "s", "long").await;
    let first = sse.next().await.unwrap();
    assert_eq!(
        (first.data["content"].as_str(), first.id.as_deref()),
        (Some("one"), Some("1"))
    );
    drop(sse);

    let attach = |after: u64| {
        let request = Request::builder()
            .uri(format!("/chat/attach?task_id={task}&after_seq={after}"))
            .body(Body::empty())
            .unwrap();
        h.send(request)
    };
    let response = attach(1).await;
    assert_eq!(response.status(), StatusCode::OK);
    let rest = SseReader::new(response).rest().await;
    assert_eq!(names(&rest), ["text", "text", "done"], "{rest:?}");
    let ids: Vec<&str> = rest.iter().map(|e| e.id.as_deref().unwrap()).collect();
    assert_eq!(ids, ["2", "3", "4"]);
    assert_eq!(done_of(&rest)["content"], "all");
    assert_eq!(
        done_of(&rest)["metadata"]["status"],
        "completed",
        "the run was not stopped"
    );
    h.wait_idle().await;

    // Ended: the whole journal is still there for a while.
    let all = SseReader::new(attach(0).await).rest().await;
    assert_eq!(names(&all), ["text", "text", "text", "done"]);

    let (status, body) = h
        .call(
            "GET",
            &format!("/chat/attach?task_id={}", TaskId::generate()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "not running");
}

#[tokio::test]
async fn input_required_waits_for_an_answer() {
    let h = harness();
    h.exec.script(
        "ask",
        Script::new(vec![
            emit(TaskEvent::InputRequired(InputRequest {
                request_id: "r1".into(),
                kind: InputKind::Question,
                prompt: "Which color?".into(),
                tool_name: None,
                input: None,
                options: vec!["red".into(), "blue".into()],
            })),
            Step::AwaitInput,
            done("painted"),
        ]),
    );
    let task = TaskId::generate();
    let mut sse = h.chat_ok(task, "s", "ask").await;
    let asked = sse.until("input_required").await;
    assert_eq!(asked.data["content"], "Which color?");
    assert_eq!(asked.data["metadata"]["request_id"], "r1");

    let (status, body) = h
        .call(
            "POST",
            "/input",
            Some(json!({"task_id": task, "request_id": "r1", "answer": "blue", "allow": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = sse.rest().await;
    assert_eq!(names(&events), ["text", "done"]);
    assert_eq!(events[0].data["content"], "answer=blue allow=Some(true)");
    assert_eq!(done_of(&events)["content"], "painted");

    let (status, body) = h
        .call(
            "POST",
            "/input",
            Some(json!({"task_id": task, "request_id": ""})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_input", "request_id");
}

// ---------------------------------------------------------------------------------------------
// Prepare

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn entries(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn prepare_writes_skills_twice_and_mcp_json_and_replaces_on_the_next_call() {
    let h = harness();
    let session = "org/repo#7";
    let body = json!({
        "session_id": session,
        "skills": [
            {"name": "greet", "content": "---\nname: greet\n---\nSay hi",
             "files": {"scripts/hi.sh": "echo hi"}},
            {"name": "calc", "content": "", "files": {"SKILL.md": "calc skill"}},
        ],
        "mcp_servers": {"calc": {"command": "python3", "args": ["calc.py"]}},
        "soul": "You are terse.",
    });
    let (status, reply) = h.call("POST", "/prepare", Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply, json!({"status": "ready"}));

    let ws = h.session_dir(session);
    assert!(ws.ends_with("org%2Frepo%237"));
    for root in [".claude/skills", "skills"] {
        let root = ws.join(root);
        assert_eq!(entries(&root), ["calc", "greet"]);
        assert_eq!(
            read(&root.join("greet/SKILL.md")),
            "---\nname: greet\n---\nSay hi"
        );
        assert_eq!(read(&root.join("greet/scripts/hi.sh")), "echo hi");
        assert_eq!(read(&root.join("calc/SKILL.md")), "calc skill");
    }
    let mcp: Value = serde_json::from_str(&read(&ws.join(".mcp.json"))).unwrap();
    assert_eq!(
        mcp,
        json!({"mcpServers": {"calc": {"type": "stdio", "command": "python3", "args": ["calc.py"]}}})
    );
    assert_eq!(read(&ws.join("SOUL.md")), "You are terse.");
    assert!(ws.join("AGENTS.md").is_file());
    for dir in ["files", "sessions"] {
        assert!(ws.join(dir).is_dir());
    }

    // Idempotent.
    let (status, _) = h.call("POST", "/prepare", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(entries(&ws.join("skills")), ["calc", "greet"]);

    // The next call replaces: calc goes, greet changes, no MCP servers.
    let (status, _) = h
        .call(
            "POST",
            "/prepare",
            Some(json!({"session_id": session,
                        "skills": [{"name": "greet", "content": "v2"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for root in [".claude/skills", "skills"] {
        let root = ws.join(root);
        assert_eq!(entries(&root), ["greet"]);
        assert_eq!(entries(&root.join("greet")), ["SKILL.md"]);
        assert_eq!(read(&root.join("greet/SKILL.md")), "v2");
    }
    assert!(!ws.join(".mcp.json").exists());
    assert_eq!(
        read(&ws.join("SOUL.md")),
        "You are terse.",
        "soul kept when not given"
    );
}

impl Harness {
    /// A request with `headers` and a JSON body.
    async fn call_with(
        &self,
        uri: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (StatusCode, Value, Option<Response>) {
        let mut builder = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let response = self
            .send(builder.body(Body::from(body.to_string())).unwrap())
            .await;
        let is_stream = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        if is_stream {
            return (response.status(), Value::Null, Some(response));
        }
        let (status, value) = json_of(response).await;
        (status, value, None)
    }

    /// A chat with the prepare key `key`: its status, and the stream read to its end.
    async fn keyed_chat(&self, session: &str, key: Option<&str>) -> (StatusCode, Value) {
        let headers: Vec<(&str, &str)> = key
            .map(|k| vec![("x-anywork-prepare-key", k)])
            .unwrap_or_default();
        let body = json!({"task_id": TaskId::generate(), "session_id": session, "message": "hi"});
        let (status, value, stream) = self.call_with("/chat", &headers, body).await;
        if let Some(stream) = stream {
            let events = SseReader::new(stream).rest().await;
            assert_eq!(events.last().unwrap().name, "done");
            self.wait_idle().await;
        }
        (status, value)
    }
}

#[tokio::test]
async fn a_prepare_key_is_answered_and_a_chat_expecting_another_is_refused_with_412() {
    let h = harness();
    let session = "s";
    let body = json!({"session_id": session, "skills": [{"name": "greet", "content": "hi"}]});
    let key = [("x-anywork-prepare-key", "k1")];
    let (status, reply, _) = h.call_with("/prepare", &key, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply, json!({"status": "ready", "prepared": "k1"}));

    // The key it was prepared with: accepted; another (or a session never prepared): 412.
    assert_eq!(h.keyed_chat(session, Some("k1")).await.0, StatusCode::OK);
    let (status, reply) = h.keyed_chat(session, Some("k2")).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{reply}");
    assert_error(&reply, "conflict", "not prepared");
    assert_eq!(
        h.keyed_chat("other", Some("k1")).await.0,
        StatusCode::PRECONDITION_FAILED
    );
    // Without a key, as every chat was before: taken.
    assert_eq!(h.keyed_chat(session, None).await.0, StatusCode::OK);
    assert_eq!(
        h.exec.started.lock().unwrap().len(),
        2,
        "refused chats never started"
    );

    // A prepare without a key forgets the session's key; a refused prepare too.
    let (status, reply, _) = h.call_with("/prepare", &[], body.clone()).await;
    assert_eq!(
        (status, reply),
        (StatusCode::OK, json!({"status": "ready"}))
    );
    assert_eq!(
        h.keyed_chat(session, Some("k1")).await.0,
        StatusCode::PRECONDITION_FAILED
    );
    h.call_with("/prepare", &key, body.clone()).await;
    let bad = json!({"session_id": session, "skills": [{"name": "../x", "content": "x"}]});
    let (status, _, _) = h
        .call_with("/prepare", &[("x-anywork-prepare-key", "k3")], bad)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.keyed_chat(session, Some("k1")).await.0,
        StatusCode::PRECONDITION_FAILED
    );

    // Deleting the session's workspace forgets its key.
    h.call_with("/prepare", &key, body).await;
    assert_eq!(h.keyed_chat(session, Some("k1")).await.0, StatusCode::OK);
    let (status, _) = h.call("DELETE", "/sessions/s", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h.keyed_chat(session, Some("k1")).await.0,
        StatusCode::PRECONDITION_FAILED
    );
}

#[tokio::test]
async fn prepare_refuses_paths_that_escape_and_writes_nothing() {
    let h = harness();
    let bad_skills = [
        json!({"name": "../x", "content": "x"}),
        json!({"name": "/abs", "content": "x"}),
        json!({"name": "a/b", "content": "x"}),
        json!({"name": "ok", "content": "x", "files": {"../x": "y"}}),
        json!({"name": "ok", "content": "x", "files": {"/etc/passwd": "y"}}),
        json!({"name": "ok", "content": "x", "files": {"a/../../b": "y"}}),
    ];
    for skill in bad_skills {
        let body = json!({"session_id": "victim", "skills": [skill]});
        let (status, reply) = h.call("POST", "/prepare", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{skill}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_input");
    }
    let body = json!({"session_id": "victim", "mcp_servers": {"../x": {"command": "sh"}}});
    let (status, reply) = h.call("POST", "/prepare", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&reply, "invalid_input", "MCP server name");

    assert!(!h.session_dir("victim").exists(), "nothing was written");
    assert!(!h.dir.path().join("x").exists());
    assert_eq!(entries(&h.root()), ["AGENTS.md", "SOUL.md"]);
}

#[cfg(unix)]
#[tokio::test]
async fn prepare_refuses_a_planted_symlink() {
    let h = harness();
    let outside = tempfile::tempdir().unwrap();
    let body = json!({"session_id": "s", "skills": [{"name": "greet", "content": "hi"}]});
    let (status, _) = h.call("POST", "/prepare", Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK);

    // The agent replaces its skills folder with a link to somewhere else.
    let skills = h.session_dir("s").join(".claude/skills");
    std::fs::remove_dir_all(&skills).unwrap();
    std::os::unix::fs::symlink(outside.path(), &skills).unwrap();
    let (status, reply) = h.call("POST", "/prepare", Some(body.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&reply, "invalid_input", "symbolic link");
    assert!(
        entries(outside.path()).is_empty(),
        "nothing written outside"
    );

    // A link planted as one skill's folder, or as .mcp.json, is refused too.
    std::fs::remove_file(&skills).unwrap();
    std::fs::create_dir(&skills).unwrap();
    std::os::unix::fs::symlink(outside.path(), skills.join("greet")).unwrap();
    let (status, _) = h.call("POST", "/prepare", Some(body.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    std::fs::remove_file(skills.join("greet")).unwrap();
    let target = outside.path().join("mcp.json");
    std::os::unix::fs::symlink(&target, h.session_dir("s").join(".mcp.json")).unwrap();
    let with_mcp = json!({"session_id": "s", "mcp_servers": {"m": {"command": "x"}}});
    let (status, _) = h.call("POST", "/prepare", Some(with_mcp)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(!target.exists());
    assert!(entries(outside.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Bad requests

#[tokio::test]
async fn bad_bodies_are_4xx_json_that_says_what_is_wrong() {
    let h = harness_with(|c| c.with_max_body_bytes(1024));
    let (status, body) = h.raw("POST", "/chat", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_input", "not valid JSON");

    let task = TaskId::generate();
    let (status, body) = h
        .call(
            "POST",
            "/chat",
            Some(json!({"task_id": task, "session_id": "s", "message": "hi", "extra": 1})),
        )
        .await;
    assert!(status.is_client_error(), "{status}");
    assert_error(&body, "invalid_input", "unknown field `extra`");

    let (status, body) = h
        .call(
            "POST",
            "/chat",
            Some(json!({"task_id": task, "session_id": "s"})),
        )
        .await;
    assert!(status.is_client_error());
    assert_error(&body, "invalid_input", "missing field `message`");

    let (status, body) = h
        .call(
            "POST",
            "/chat",
            Some(json!({"task_id": "nope", "session_id": "s", "message": "hi"})),
        )
        .await;
    assert!(status.is_client_error());
    assert_error(&body, "invalid_input", "task_id");

    let (status, body) = h
        .call(
            "POST",
            "/chat",
            Some(json!({"task_id": task, "session_id": "has space", "message": "hi"})),
        )
        .await;
    assert!(status.is_client_error());
    assert_error(&body, "invalid_input", "session id");

    let (status, body) = h
        .call(
            "POST",
            "/chat",
            Some(json!({"task_id": task, "session_id": "s", "message": "  "})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_input", "message");

    let big = json!({"session_id": "s", "soul": "x".repeat(4096)});
    let (status, body) = h.call("POST", "/prepare", Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&body, "invalid_input", "limit of 1024 bytes");

    let request = Request::builder()
        .method("POST")
        .uri("/cancel")
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = json_of(h.send(request).await).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(&body, "invalid_input", "application/json");

    let (status, body) = h.call("GET", "/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "/nope");

    let (status, body) = h.call("GET", "/chat", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&body, "invalid_input", "GET");

    let (status, body) = h.call("GET", "/sessions/bad%20id/messages", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_input", "session id");

    let (status, body) = h.call("GET", "/workspace/soul?color=red", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_input", "color");

    assert!(h.exec.started.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Health, workspace files, history

#[tokio::test]
async fn health_names_the_executor_and_busy_sessions() {
    let h = harness();
    let (status, mut body) = h.call("GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    let idle = body.as_object_mut().unwrap().remove("idle_ms");
    let idle = idle.and_then(|v| v.as_u64()).expect("idle_ms, a number");
    assert_eq!(
        body,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"),
               "executor": "scripted", "busy_sessions": [],
               "sandbox": format!("none: {}", anywork_worker::sandbox::NOT_CONFIGURED)})
    );
    // Asking for /health is not a use: the idle time goes on.
    let (_, again) = h.call("GET", "/health", None).await;
    assert!(again["idle_ms"].as_u64().unwrap() >= idle, "{again}");
    h.exec.script("hang", Script::new(vec![Step::Hang]));
    let task = TaskId::generate();
    let sse = h.chat_ok(task, "x/y", "hang").await;
    assert_eq!(h.busy().await, vec![json!("x/y")]);
    let (_, running) = h.call("GET", "/health", None).await;
    assert_eq!(running["idle_ms"], 0, "not idle while a task runs");
    let (status, _) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done_of(&sse.rest().await)["metadata"]["status"], "canceled");
    assert!(h.busy().await.is_empty());
}

#[tokio::test]
async fn soul_and_agents_defaults_and_round_trips() {
    let h = harness();
    assert_eq!(read(&h.root().join("SOUL.md")), DEFAULT_SOUL);
    let (status, body) = h.call("GET", "/workspace/soul", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"file": "SOUL.md", "content": DEFAULT_SOUL}));
    let (status, body) = h.call("GET", "/workspace/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["file"], "AGENTS.md");

    // The worker-level default changes what new sessions copy.
    let (status, body) = h
        .call(
            "PUT",
            "/workspace/soul",
            Some(json!({"content": "Be kind."})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = h.call("GET", "/workspace/soul", None).await;
    assert_eq!(body["content"], "Be kind.");
    let (_, body) = h.call("GET", "/workspace/soul?session_id=new", None).await;
    assert_eq!(body["content"], "Be kind.");

    // A session's copy is its own.
    let (status, _) = h
        .call(
            "PUT",
            "/workspace/soul?session_id=a%2Fb",
            Some(json!({"content": "Be brief."})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = h
        .call("GET", "/workspace/soul?session_id=a%2Fb", None)
        .await;
    assert_eq!(body["content"], "Be brief.");
    assert_eq!(read(&h.session_dir("a/b").join("SOUL.md")), "Be brief.");
    let (_, body) = h.call("GET", "/workspace/soul", None).await;
    assert_eq!(body["content"], "Be kind.");

    let (status, body) = h.call("GET", "/workspace/passwd", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found", "soul");
    let (status, body) = h
        .call("PUT", "/workspace/soul", Some(json!({"text": "x"})))
        .await;
    assert!(status.is_client_error());
    assert_error(&body, "invalid_input", "unknown field");
}

#[tokio::test]
async fn history_keeps_the_user_message_and_the_assistant_result() {
    let h = harness();
    h.exec.script(
        "list files",
        Script::new(vec![
            emit(TaskEvent::ToolCall {
                id: "t1".into(),
                name: "Bash".into(),
                input: json!({"command": "ls"}),
            }),
            emit(TaskEvent::ToolResult {
                tool_use_id: "t1".into(),
                content: "a.txt".into(),
                is_error: false,
            }),
            done("One file: a.txt"),
        ]),
    );
    let (_, body) = h.call("GET", "/sessions/r%2F1/messages", None).await;
    assert_eq!(body, json!({"messages": []}));

    let task = TaskId::generate();
    let events = h.chat_ok(task, "r/1", "list files").await.rest().await;
    done_of(&events);
    let (status, body) = h.call("GET", "/sessions/r%2F1/messages", None).await;
    assert_eq!(status, StatusCode::OK);
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{body}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "list files");
    assert_eq!(messages[0]["task_id"], json!(task));
    assert!(messages[0]["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], "One file: a.txt");
    assert_eq!(messages[1]["status"], "completed");
    assert_eq!(messages[1]["tool_calls"][0]["name"], "Bash");
    assert_eq!(messages[1]["tool_calls"][0]["output"], "a.txt");

    // A torn last line is skipped, and the next append starts on a new line.
    let path = h.session_dir("r/1").join("sessions/history.jsonl");
    let mut text = read(&path);
    text.push_str("{\"role\":\"us");
    std::fs::write(&path, text).unwrap();
    let (_, body) = h.call("GET", "/sessions/r%2F1/messages", None).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    h.chat_ok(TaskId::generate(), "r/1", "hi")
        .await
        .rest()
        .await;
    let (_, body) = h.call("GET", "/sessions/r%2F1/messages", None).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn files_are_listed_with_size_and_time() {
    let h = harness();
    let (status, body) = h.call("GET", "/sessions/none/files", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"files": []}));

    let (status, _) = h
        .call("POST", "/prepare", Some(json!({"session_id": "f"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let files = h.session_dir("f").join("files");
    std::fs::create_dir_all(files.join("out")).unwrap();
    std::fs::write(files.join("out/report.md"), "# Report").unwrap();
    std::fs::write(files.join("a.txt"), "a").unwrap();
    let (status, body) = h.call("GET", "/sessions/f/files", None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = body["files"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["path"], "a.txt");
    assert_eq!(listed[0]["size"], 1);
    assert_eq!(listed[1]["path"], "out/report.md");
    assert_eq!(listed[1]["size"], 8);
    assert!(listed[1]["modified"].as_i64().unwrap() > 1_600_000_000_000);
}

// ---------------------------------------------------------------------------------------------
// Over a real socket

#[tokio::test]
async fn closing_the_connection_frees_the_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = harness();
    h.exec.script(
        "hang",
        Script::new(vec![emit(TaskEvent::text("working")), Step::Hang]).ignoring_cancel(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(anywork_worker::serve(
        listener,
        h.state.clone(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let body =
        json!({"task_id": TaskId::generate(), "session_id": "net", "message": "hang"}).to_string();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("event: text") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert_eq!(h.busy().await, vec![json!("net")]);
    drop(conn);
    h.wait_idle().await;
    assert_eq!(h.exec.dropped(), 1);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

// ---------------------------------------------------------------------------------------------
// The worker's secret

#[tokio::test]
async fn with_a_secret_every_call_but_health_needs_it() {
    use anywork_core::worker_api::{SECRET_HEADER, WorkerSecret};
    let secret = WorkerSecret::generate();
    let h = harness_with(|c| c.with_secret(Some(secret.clone())));
    let send = |uri: &str, method: &str, key: Option<&str>, body: Option<Value>| {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            builder = builder.header(SECRET_HEADER, key);
        }
        let request = match body {
            Some(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => builder.body(Body::empty()),
        }
        .unwrap();
        let app = h.app.clone();
        async move { json_of(app.oneshot(request).await.unwrap()).await }
    };
    let wrong = "0".repeat(64);
    let prepare = json!({"session_id": "s1"});
    let chat = json!({"task_id": TaskId::generate(), "session_id": "s1", "message": "hi"});
    for key in [None, Some(wrong.as_str()), Some("")] {
        for (method, uri, body) in [
            ("POST", "/prepare", Some(prepare.clone())),
            ("POST", "/chat", Some(chat.clone())),
            (
                "POST",
                "/cancel",
                Some(json!({"task_id": TaskId::generate()})),
            ),
            ("GET", "/sessions/s1/messages", None),
            ("GET", "/sessions/s1/files", None),
            ("GET", "/workspace/soul", None),
            ("PUT", "/workspace/soul", Some(json!({"content": "evil"}))),
            ("DELETE", "/sessions/s1", None),
            ("GET", "/no/such/route", None),
        ] {
            let (status, body) = send(uri, method, key, body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri} {key:?}");
            assert_error(&body, "unauthorized", "X-AnyWork-Worker-Secret");
        }
        // /health answers probes, and says nothing more.
        let (status, body) = send("/health", "GET", key, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"status": "ok"}));
    }
    assert!(!h.session_dir("s1").exists(), "nothing was done");
    assert_eq!(
        std::fs::read_to_string(h.root().join("SOUL.md")).unwrap(),
        DEFAULT_SOUL
    );

    // With the secret, everything works.
    let key = Some(secret.expose());
    let (status, _) = send("/prepare", "POST", key, Some(prepare)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, health) = send("/health", "GET", key, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["executor"], "scripted");
    assert!(health["busy_sessions"].is_array());
    let (status, body) = send("/workspace/soul", "GET", key, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["content"], DEFAULT_SOUL);
}

#[test]
fn the_secret_comes_from_the_variable_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
    let path = file.to_str().unwrap().to_owned();
    let lookup = |vars: Vec<(&'static str, String)>| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    };
    assert_eq!(
        WorkerConfig::secret_from_lookup(lookup(vec![])).unwrap(),
        None
    );
    let from_file =
        WorkerConfig::secret_from_lookup(lookup(vec![("WORKER_SECRET_FILE", path.clone())]))
            .unwrap()
            .unwrap();
    assert_eq!(from_file.expose(), "0123456789abcdef0123");
    let from_var = WorkerConfig::secret_from_lookup(lookup(vec![
        ("WORKER_SECRET", "abcdefabcdefabcdef".into()),
        ("WORKER_SECRET_FILE", path),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(from_var.expose(), "abcdefabcdefabcdef", "the variable wins");
    let short = WorkerConfig::secret_from_lookup(lookup(vec![("WORKER_SECRET", "short".into())]))
        .unwrap_err();
    assert!(short.to_string().contains("at least 16"), "{short}");
    let missing = WorkerConfig::secret_from_lookup(lookup(vec![(
        "WORKER_SECRET_FILE",
        "/nonexistent/secret".into(),
    )]))
    .unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/secret"),
        "{missing}"
    );
    assert!(!format!("{from_var:?}").contains("abcdef"), "Debug redacts");
}

// ---------------------------------------------------------------------------------------------
// Deleting a session

#[tokio::test]
async fn deleting_a_session_removes_its_whole_workspace_and_nothing_else() {
    let h = harness();
    h.exec.script("hold", Script::new(vec![Step::Hang]));
    // Two sessions with history, files and a custom soul.
    for s in ["doomed", "kept"] {
        let (status, _) = h
            .call(
                "POST",
                "/prepare",
                Some(json!({"session_id": s, "soul": "custom soul"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        h.chat_ok(TaskId::generate(), s, "hello").await.rest().await;
        std::fs::write(h.session_dir(s).join("files").join("notes.txt"), "x").unwrap();
    }
    let doomed = h.session_dir("doomed");
    for f in [
        "SOUL.md",
        "AGENTS.md",
        "sessions/history.jsonl",
        "files/notes.txt",
    ] {
        assert!(doomed.join(f).exists(), "{f}");
    }

    // Refused while a task runs in it.
    let task = TaskId::generate();
    let running = h.chat_ok(task, "doomed", "hold").await;
    let (status, body) = h.call("DELETE", "/sessions/doomed", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error(&body, "conflict", "while a task runs");
    assert!(doomed.exists());
    let (status, _) = h
        .call("POST", "/cancel", Some(json!({"task_id": task})))
        .await;
    assert_eq!(status, StatusCode::OK);
    running.rest().await;
    h.wait_idle().await;

    let (status, body) = h.call("DELETE", "/sessions/doomed", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": "deleted", "session_id": "doomed"}));
    assert!(!doomed.exists(), "nothing of the session is left");
    let (_, history) = h.call("GET", "/sessions/doomed/messages", None).await;
    assert_eq!(history["messages"], json!([]));
    // Deleting again is fine.
    let (status, _) = h.call("DELETE", "/sessions/doomed", None).await;
    assert_eq!(status, StatusCode::OK);

    // Ids that look like paths name a folder inside the root, never the root or a sibling.
    for uri in [
        "/sessions/..",
        "/sessions/.",
        "/sessions/%2E%2E",
        "/sessions/..%2F..%2Fetc",
        "/sessions/%2E%2E%2Fkept",
        "/sessions/kept%2F..%2F..",
    ] {
        let (status, body) = h.call("DELETE", uri, None).await;
        assert!(
            status == StatusCode::OK || status.is_client_error(),
            "{uri}: {status} {body}"
        );
    }
    let (status, _) = h.call("DELETE", "/sessions/", None).await;
    assert!(status.is_client_error());
    assert!(h.session_dir("kept").join("files/notes.txt").exists());
    assert!(h.root().join("SOUL.md").exists());
    assert!(h.root().join("AGENTS.md").exists());
}

#[cfg(unix)]
#[tokio::test]
async fn a_session_folder_replaced_by_a_link_is_unlinked_not_followed() {
    let h = harness();
    let outside = h.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), "keep me").unwrap();
    std::fs::create_dir_all(h.root()).unwrap();
    std::os::unix::fs::symlink(&outside, h.session_dir("linked")).unwrap();
    let (status, body) = h.call("DELETE", "/sessions/linked", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!h.session_dir("linked").exists());
    assert_eq!(read(&outside.join("precious")), "keep me");
}
