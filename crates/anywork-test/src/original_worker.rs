//! A stand-in of the original AnyWork's Python worker (`worker/anywork_adapter/http_app.py`),
//! written from its protocol, so that the server can be tested against what users of the
//! original run today:
//!
//! | call | body it validates (pydantic: extra fields ignored) | answer |
//! |---|---|---|
//! | `POST /prepare` | `{task_id?: str, skills: [{name: str, files: {path: str}}], mcp_servers: {name: config}}` | `{"status":"ready"}` |
//! | `POST /chat` | `{session_id: str, message: str}` | SSE `event: <type>` / `data: {"content","metadata"}` |
//! | `POST /cancel` | `{session_id: str}` | `{"status":"canceled"}` |
//! | `GET /health` | | `{"status":"ok","engine":"claude-agent-sdk","workspace","active_sessions"}` |
//! | `GET /sessions/{id}` | | `{"session_id","messages":[..]}` (404 with `messages: []` when unknown) |
//!
//! A body that fails validation answers 422 `{"detail":[…]}` as FastAPI does. Each chat plays
//! the next queued [`Script`] (or the default: one `text` and a `done`), whose events carry no
//! `type` in their data: the type is only on the SSE `event:` line.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// One SSE event as the original sends it: `event: <kind>` and `data: {"content","metadata"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalEvent {
    /// The `event:` line (`text`, `tool_call`, `error`, `done`).
    pub kind: String,
    /// `data.content`.
    pub content: String,
    /// `data.metadata`.
    pub metadata: Value,
    /// Sent as the `data:` line instead of `{content, metadata}` (a broken worker).
    pub raw_data: Option<String>,
}

impl OriginalEvent {
    /// A `text` block.
    pub fn text(content: impl Into<String>) -> Self {
        Self::new("text", content, json!({}))
    }

    /// A `tool_call` of `name` with `input`.
    pub fn tool_call(id: &str, name: &str, input: Value) -> Self {
        Self::new("tool_call", name, json!({ "tool_id": id, "input": input }))
    }

    /// An `error` (the original sends it instead of `done` when the run fails).
    pub fn error(content: impl Into<String>) -> Self {
        Self::new("error", content, json!({}))
    }

    /// The `done` the original sends after an exception (its `error` came first): no metadata.
    pub fn empty_done() -> Self {
        Self::new("done", "", json!({}))
    }

    /// An event whose `data:` line is `data` as it is (e.g. not JSON).
    pub fn raw(kind: &str, data: &str) -> Self {
        Self {
            raw_data: Some(data.to_owned()),
            ..Self::new(kind, "", json!({}))
        }
    }

    /// A successful `done` with the original's metadata.
    pub fn done(result: &str, cost_usd: f64, num_turns: u32, duration_ms: u64) -> Self {
        Self::new(
            "done",
            "",
            json!({
                "result": result,
                "cost_usd": cost_usd,
                "num_turns": num_turns,
                "duration_ms": duration_ms,
            }),
        )
    }

    /// Any event.
    pub fn new(kind: &str, content: impl Into<String>, metadata: Value) -> Self {
        Self {
            kind: kind.into(),
            content: content.into(),
            metadata,
            raw_data: None,
        }
    }

    fn frame(&self) -> String {
        let data = match &self.raw_data {
            Some(raw) => raw.clone(),
            None => json!({ "content": self.content, "metadata": self.metadata }).to_string(),
        };
        format!("event: {}\ndata: {data}\n\n", self.kind)
    }
}

/// What one `/chat` plays.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The events, in order.
    pub events: Vec<OriginalEvent>,
    /// Pause before each event.
    pub delay: Duration,
    /// After the events, keep the stream open (a hung worker, or one working on) instead of
    /// ending it. A `/cancel` of the session then ends it as the original does after an
    /// interrupt: an `error` (the SDK's non-success result) and no `done`.
    pub hang: bool,
}

impl Script {
    /// Plays `events` and ends the stream.
    pub fn of(events: impl IntoIterator<Item = OriginalEvent>) -> Self {
        Self {
            events: events.into_iter().collect(),
            ..Self::default()
        }
    }
}

/// A request the stand-in received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// `POST /prepare`, `POST /chat`, ...
    pub route: String,
    /// The JSON body (`null` for GETs or unparsable bodies).
    pub body: Value,
    /// The status it answered.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    scripts: VecDeque<Script>,
    /// What a `/chat` plays when no script is queued (`None`: one `text` and a `done`).
    default_script: Option<Script>,
    received: Vec<Received>,
    histories: HashMap<String, Vec<Value>>,
    sessions: Vec<String>,
    /// Hanging streams by session, ended by `/cancel`.
    interrupts: HashMap<String, Vec<oneshot::Sender<()>>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stand-in worker on `127.0.0.1`; stops when dropped.
pub struct OriginalWorker {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl OriginalWorker {
    /// Binds `127.0.0.1:0` and serves on a thread of its own.
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the stand-in");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = oneshot::channel::<()>();
        let state = inner.clone();
        std::thread::Builder::new()
            .name(format!("original-worker-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let _ = ready_tx.send(());
                    let _ = axum::serve(listener, router(state))
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .expect("spawn the stand-in");
        ready.await.expect("stand-in started");
        Self {
            inner,
            addr,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues what the next `/chat` plays.
    pub fn push(&self, script: Script) {
        lock(&self.inner).scripts.push_back(script);
    }

    /// What every `/chat` plays when no script is queued.
    pub fn set_default(&self, script: Script) {
        lock(&self.inner).default_script = Some(script);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner).received.clone()
    }

    /// The bodies of the requests to `route` (e.g. `"POST /prepare"`).
    pub fn bodies(&self, route: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|r| r.route == route)
            .map(|r| r.body)
            .collect()
    }
}

impl Drop for OriginalWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

fn router(state: Shared) -> Router {
    Router::new()
        .route("/prepare", post(prepare))
        .route("/chat", post(chat))
        .route("/cancel", post(cancel))
        .route("/health", get(health))
        .route("/sessions/{id}", get(session))
        .with_state(state)
}

/// FastAPI's answer to a body that fails validation.
fn unprocessable(state: &Shared, route: &str, body: Value, why: &str) -> Response {
    record(state, route, body, 422);
    let detail = json!({ "detail": [{ "type": "value_error", "loc": ["body"], "msg": why }] });
    (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(detail)).into_response()
}

fn record(state: &Shared, route: &str, body: Value, status: u16) {
    lock(state).received.push(Received {
        route: route.into(),
        body,
        status,
    });
}

fn parse(bytes: &Bytes) -> Option<Value> {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .filter(Value::is_object)
}

async fn prepare(State(state): State<Shared>, bytes: Bytes) -> Response {
    const ROUTE: &str = "POST /prepare";
    let Some(body) = parse(&bytes) else {
        return unprocessable(&state, ROUTE, Value::Null, "body is not a JSON object");
    };
    if !matches!(
        body.get("task_id"),
        None | Some(Value::Null | Value::String(_))
    ) {
        return unprocessable(&state, ROUTE, body, "task_id must be a string");
    }
    let skills_ok = match body.get("skills") {
        None => true,
        Some(Value::Array(skills)) => skills.iter().all(|s| {
            s.get("name").is_some_and(Value::is_string)
                && s.get("files")
                    .and_then(Value::as_object)
                    .is_some_and(|f| f.values().all(Value::is_string))
        }),
        Some(_) => false,
    };
    if !skills_ok {
        return unprocessable(
            &state,
            ROUTE,
            body,
            "skills must be a list of {name: str, files: {filename: str}}",
        );
    }
    if !matches!(body.get("mcp_servers"), None | Some(Value::Object(_))) {
        return unprocessable(&state, ROUTE, body, "mcp_servers must be a dict");
    }
    record(&state, ROUTE, body, 200);
    axum::Json(json!({ "status": "ready" })).into_response()
}

async fn chat(State(state): State<Shared>, bytes: Bytes) -> Response {
    const ROUTE: &str = "POST /chat";
    let Some(body) = parse(&bytes) else {
        return unprocessable(&state, ROUTE, Value::Null, "body is not a JSON object");
    };
    let (Some(session), Some(message)) = (
        body.get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        body.get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
    ) else {
        return unprocessable(
            &state,
            ROUTE,
            body,
            "session_id and message are required strings",
        );
    };
    let script = {
        let mut inner = lock(&state);
        inner.received.push(Received {
            route: ROUTE.into(),
            body,
            status: 200,
        });
        if !inner.sessions.contains(&session) {
            inner.sessions.push(session.clone());
        }
        let default = inner.default_script.clone();
        inner.scripts.pop_front().or(default).unwrap_or_else(|| {
            Script::of([
                OriginalEvent::text("ok"),
                OriginalEvent::done("ok", 0.0, 1, 1),
            ])
        })
    };
    let (interrupt, interrupted) = oneshot::channel();
    lock(&state)
        .interrupts
        .entry(session.clone())
        .or_default()
        .push(interrupt);
    let history = state.clone();
    let stream = async_stream(script, interrupted, move |events| {
        let mut inner = lock(&history);
        let log = inner.histories.entry(session.clone()).or_default();
        log.push(json!({ "role": "user", "content": message }));
        let text: String = events
            .iter()
            .filter(|e| e.kind == "text")
            .map(|e| e.content.as_str())
            .collect();
        if !text.is_empty() {
            log.push(json!({ "role": "assistant", "content": text }));
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// The script as a byte stream; `finished` runs once every event was sent.
fn async_stream(
    script: Script,
    interrupted: oneshot::Receiver<()>,
    finished: impl FnOnce(&[OriginalEvent]) + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        for event in &script.events {
            if !script.delay.is_zero() {
                tokio::time::sleep(script.delay).await;
            }
            if tx.send(Ok(Bytes::from(event.frame()))).await.is_err() {
                return;
            }
        }
        finished(&script.events);
        if script.hang {
            tokio::select! {
                _ = tx.closed() => {}
                Ok(()) = interrupted => {
                    let error = OriginalEvent::error("error_during_execution");
                    let _ = tx.send(Ok(Bytes::from(error.frame()))).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn cancel(State(state): State<Shared>, bytes: Bytes) -> Response {
    const ROUTE: &str = "POST /cancel";
    let Some(body) = parse(&bytes) else {
        return unprocessable(&state, ROUTE, Value::Null, "body is not a JSON object");
    };
    if !body.get("session_id").is_some_and(Value::is_string) {
        return unprocessable(&state, ROUTE, body, "session_id is a required string");
    }
    let session = body
        .get("session_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let interrupts = lock(&state).interrupts.remove(&session).unwrap_or_default();
    for interrupt in interrupts {
        let _ = interrupt.send(());
    }
    record(&state, ROUTE, body, 200);
    axum::Json(json!({ "status": "canceled" })).into_response()
}

async fn health(State(state): State<Shared>) -> Response {
    let active = {
        let mut inner = lock(&state);
        inner.received.push(Received {
            route: "GET /health".into(),
            body: Value::Null,
            status: 200,
        });
        inner.sessions.len()
    };
    axum::Json(json!({
        "status": "ok",
        "engine": "claude-agent-sdk",
        "workspace": "/workspace",
        "active_sessions": active,
    }))
    .into_response()
}

async fn session(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let messages = lock(&state).histories.get(&id).cloned();
    let status = if messages.is_some() { 200 } else { 404 };
    record(&state, &format!("GET /sessions/{id}"), Value::Null, status);
    let body = json!({ "session_id": id, "messages": messages.unwrap_or_default() });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        axum::Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn speaks_the_original_protocol_and_validates_like_fastapi() {
        let worker = OriginalWorker::start().await;
        let http = reqwest::Client::new();
        let url = worker.url();

        let health: Value = http
            .get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["engine"], "claude-agent-sdk");
        assert_eq!(health["active_sessions"], 0);

        // /prepare: the map form of MCP servers and skills with files; a list is refused.
        let ok = http
            .post(format!("{url}/prepare"))
            .json(&json!({"task_id":"t1","skills":[{"name":"s","files":{"SKILL.md":"x"}}],"mcp_servers":{}}))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        for bad in [
            json!({"skills":[],"mcp_servers":[]}),
            json!({"skills":[{"name":"s","content":"x"}]}),
        ] {
            let r = http
                .post(format!("{url}/prepare"))
                .json(&bad)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 422, "{bad}");
        }

        worker.push(Script::of([
            OriginalEvent::text("Hello"),
            OriginalEvent::tool_call("tu1", "Bash", json!({"command":"ls"})),
            OriginalEvent::done("Hello", 0.25, 2, 1500),
        ]));
        let sse = http
            .post(format!("{url}/chat"))
            .json(&json!({"session_id":"s1","message":"hi","extra":"ignored"}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(sse.starts_with("event: text\ndata: {"), "{sse}");
        assert!(sse.contains("event: done\n"), "{sse}");
        assert!(!sse.contains("\"type\""), "the data carries no type: {sse}");
        let missing = http
            .post(format!("{url}/chat"))
            .json(&json!({"message":"hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 422);

        let history: Value = http
            .get(format!("{url}/sessions/s1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(history["messages"][1]["content"], "Hello");
        let unknown = http
            .get(format!("{url}/sessions/nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);
        let chats: Vec<u16> = worker
            .received()
            .iter()
            .filter(|r| r.route == "POST /chat")
            .map(|r| r.status)
            .collect();
        assert_eq!(chats, [200, 422]);
    }
}
