//! A stand-in worker for load runs: it speaks the worker API the way the original AnyWork's
//! Python worker does (`POST /prepare` → `{"status":"ready"}`, `POST /chat` → SSE
//! `event: text` + `event: done` with `data: {"content","metadata"}`, `POST /cancel`,
//! `GET /health`) and answers at once, on one thread, so that it costs far less than the
//! server under test.
//!
//! Each `/chat` is stamped on arrival with CLOCK_MONOTONIC (the same clock in every process
//! of the machine) and the stamp is the content of its `text` event: `recv <ns>`. The load
//! generator reads it from the WebSocket and subtracts the time it sent the chat (dispatch).
//! `GET /stats` counts the requests by route (what the server asks of a worker per task).
//!
//! With `--prepare-keys` it also speaks this project's worker API on one point, as
//! `anywork-worker` does: `/prepare` answers back the request's `X-AnyWork-Prepare-Key` and
//! remembers it for the session, and a `/chat` that names a key the session was not prepared
//! with is refused with `412`. The server then leaves `/prepare` out while what it carries
//! is unchanged (one worker call per task instead of two).
//!
//! `anywork-bench stand-in` runs it as a process of its own (it prints `listening <url>`);
//! [`spawn`] starts that process.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

/// Options of `anywork-bench stand-in`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Port on 127.0.0.1 (0: any free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Acknowledge `/prepare` keys as AnyWork's own worker does (see the module's text).
    #[arg(long)]
    prepare_keys: bool,
}

/// The header of a prepare key (`anywork_core::worker_api::PREPARE_KEY_HEADER`).
const KEY_HEADER: &str = anywork_core::worker_api::PREPARE_KEY_HEADER;

/// The prefix of the `text` event's content; the rest is the CLOCK_MONOTONIC ns of arrival.
pub const STAMP: &str = "recv ";

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes of one machine.
pub fn mono_ns() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Requests by route.
#[derive(Default)]
struct Counts {
    prepare: AtomicU64,
    chat: AtomicU64,
    cancel: AtomicU64,
    health: AtomicU64,
    other: AtomicU64,
}

/// What the handlers share: the counts, and with `--prepare-keys` each session's key.
#[derive(Default)]
struct Stand {
    counts: Counts,
    keys: Option<Mutex<HashMap<String, String>>>,
}

type Shared = Arc<Stand>;

fn router(counts: Shared) -> Router {
    Router::new()
        .route("/prepare", post(prepare))
        .route("/chat", post(chat))
        .route("/cancel", post(cancel))
        .route("/health", get(health))
        .route("/stats", get(stats))
        .fallback(other)
        .with_state(counts)
}

fn object(bytes: &Bytes) -> Option<Value> {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .filter(Value::is_object)
}

/// FastAPI's answer to a body that fails validation.
fn unprocessable(why: &str) -> Response {
    let detail = json!({ "detail": [{ "type": "value_error", "loc": ["body"], "msg": why }] });
    (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(detail)).into_response()
}

fn key_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get(KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn lock_keys(
    m: &Mutex<HashMap<String, String>>,
) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn prepare(State(stand): State<Shared>, headers: HeaderMap, bytes: Bytes) -> Response {
    stand.counts.prepare.fetch_add(1, Ordering::Relaxed);
    let Some(body) = object(&bytes) else {
        return unprocessable("body is not a JSON object");
    };
    let (Some(keys), Some(session)) = (&stand.keys, body["session_id"].as_str()) else {
        return axum::Json(json!({ "status": "ready" })).into_response();
    };
    let key = key_of(&headers);
    let mut keys = lock_keys(keys);
    match &key {
        Some(k) => keys.insert(session.to_owned(), k.clone()),
        None => keys.remove(session),
    };
    axum::Json(json!({ "status": "ready", "prepared": key })).into_response()
}

async fn chat(State(stand): State<Shared>, headers: HeaderMap, bytes: Bytes) -> Response {
    let arrived = mono_ns();
    stand.counts.chat.fetch_add(1, Ordering::Relaxed);
    let Some(body) = object(&bytes) else {
        return unprocessable("body is not a JSON object");
    };
    let Some(session) = body["session_id"].as_str() else {
        return unprocessable("session_id and message are required strings");
    };
    if !body["message"].is_string() {
        return unprocessable("session_id and message are required strings");
    }
    if let (Some(keys), Some(key)) = (&stand.keys, key_of(&headers))
        && lock_keys(keys).get(session) != Some(&key)
    {
        let error = json!({"error": {"code": "conflict", "message":
            format!("session {session} is not prepared as this chat expects: send /prepare again")}});
        return (StatusCode::PRECONDITION_FAILED, axum::Json(error)).into_response();
    }
    // The whole stream at once: the original sends these two events for a one-block answer.
    let sse = format!(
        "event: text\ndata: {{\"content\":\"{STAMP}{arrived}\",\"metadata\":{{}}}}\n\n\
         event: done\ndata: {{\"content\":\"\",\"metadata\":{{\"result\":\"ok\",\"cost_usd\":0.0,\
         \"num_turns\":1,\"duration_ms\":0}}}}\n\n"
    );
    (
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        sse,
    )
        .into_response()
}

async fn cancel(State(stand): State<Shared>, bytes: Bytes) -> Response {
    stand.counts.cancel.fetch_add(1, Ordering::Relaxed);
    if object(&bytes).is_none_or(|b| !b["session_id"].is_string()) {
        return unprocessable("session_id is a required string");
    }
    axum::Json(json!({ "status": "canceled" })).into_response()
}

async fn health(State(stand): State<Shared>) -> Response {
    stand.counts.health.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "status": "ok",
        "engine": "claude-agent-sdk",
        "workspace": "/workspace",
        "active_sessions": 0,
    }))
    .into_response()
}

async fn other(State(stand): State<Shared>) -> Response {
    stand.counts.other.fetch_add(1, Ordering::Relaxed);
    StatusCode::NOT_FOUND.into_response()
}

async fn stats(State(stand): State<Shared>) -> Response {
    let counts = &stand.counts;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    axum::Json(json!({
        "prepare": get(&counts.prepare),
        "chat": get(&counts.chat),
        "cancel": get(&counts.cancel),
        "health": get(&counts.health),
        "other": get(&counts.other),
    }))
    .into_response()
}

/// Serves on `listener` until the process ends.
async fn serve(listener: tokio::net::TcpListener, prepare_keys: bool) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let stand = Stand {
        counts: Counts::default(),
        keys: prepare_keys.then(Mutex::default),
    };
    axum::serve(listener, router(Arc::new(stand))).await
}

/// Serves until killed (`anywork-bench stand-in`); run it on a current-thread runtime.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port)).await?;
    println!("listening http://{}", listener.local_addr()?);
    serve(listener, options.prepare_keys).await?;
    Ok(())
}

/// The stand-in in its own process (this binary's `stand-in`); killed when dropped.
pub struct StandIn {
    pub url: String,
    pub pid: u32,
    _child: tokio::process::Child,
}

impl StandIn {
    /// Requests so far by route (`prepare`, `chat`, `cancel`, `health`, `other`).
    pub async fn stats(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(reqwest::get(format!("{}/stats", self.url))
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// Starts `bench stand-in` (with `--prepare-keys` if `prepare_keys`) and waits for its
/// address.
pub async fn spawn(bench: &Path, prepare_keys: bool) -> anyhow::Result<StandIn> {
    let mut child = tokio::process::Command::new(bench)
        .arg("stand-in")
        .args(prepare_keys.then_some("--prepare-keys"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} stand-in", bench.display()))?;
    let pid = child.id().context("no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .context("the stand-in did not start in 10 s")??
        .context("the stand-in ended at once")?;
    let url = line
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected first line of the stand-in: {line}"))?
        .to_owned();
    Ok(StandIn {
        url,
        pid,
        _child: child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anywork_core::WorkerEndpoint;
    use anywork_core::worker_api::{ChatRequest, PrepareRequest};
    use anywork_core::{SessionId, TaskEvent, TaskId, TaskStatus};
    use anywork_runtime::WorkerClient;
    use futures_util::StreamExt;

    async fn start() -> WorkerEndpoint {
        start_with(false).await
    }

    async fn start_with(prepare_keys: bool) -> WorkerEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, prepare_keys));
        WorkerEndpoint {
            worker_id: url.clone(),
            base_url: url,
            secret: None,
        }
    }

    /// The server's own worker client reads the stand-in as an original-protocol worker: a
    /// `text` carrying the arrival stamp, then a completed `done`; the calls are counted.
    #[tokio::test]
    async fn the_server_reads_its_chat_as_a_stamped_text_and_a_completed_done() {
        let worker = start().await;
        let client = WorkerClient::new(std::time::Duration::from_secs(5)).unwrap();
        let session = SessionId::new("s1").unwrap();
        let prepare: PrepareRequest =
            serde_json::from_value(json!({"session_id": "s1", "skills": [], "mcp_servers": {}}))
                .unwrap();
        client.prepare(&worker, &prepare).await.unwrap();
        let before = mono_ns();
        let request = ChatRequest {
            task_id: TaskId::generate(),
            session_id: session,
            message: "hi".into(),
        };
        let events: Vec<TaskEvent> = client
            .chat(&worker, &request)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        let after = mono_ns();
        let [TaskEvent::Text { text, .. }, TaskEvent::Done(outcome)] = events.as_slice() else {
            panic!("{events:?}");
        };
        let stamp: u64 = text.strip_prefix(STAMP).unwrap().parse().unwrap();
        assert!(
            (before..=after).contains(&stamp),
            "{before} <= {stamp} <= {after}"
        );
        assert_eq!(outcome.status, TaskStatus::Completed);

        let http = reqwest::Client::new();
        let bad = http
            .post(format!("{}/chat", worker.base_url))
            .json(&json!({"message": "no session"}))
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 422);
        let stats: Value = http
            .get(format!("{}/stats", worker.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats["prepare"], 1);
        assert_eq!(stats["chat"], 2);
    }

    /// With `--prepare-keys` the server's client leaves `/prepare` out once the stand-in
    /// acknowledged its key, and a chat with a key the session was not prepared with is
    /// refused (the client then prepares again), as with AnyWork's own worker; without it the
    /// stand-in acknowledges nothing (the original's worker).
    #[tokio::test]
    async fn prepare_keys_are_acknowledged_and_checked_only_when_asked_for() {
        use anywork_runtime::worker_client::{ChatStart, PreparedBody};
        let client = WorkerClient::new(std::time::Duration::from_secs(5)).unwrap();
        let prepare = |skill: &str| -> PreparedBody {
            let request: PrepareRequest = serde_json::from_value(json!({
                "session_id": "s1", "skills": [{"name": skill, "content": "x"}], "mcp_servers": {}
            }))
            .unwrap();
            PreparedBody::new(&request).unwrap()
        };
        let request = ChatRequest {
            task_id: TaskId::generate(),
            session_id: SessionId::new("s1").unwrap(),
            message: "hi".into(),
        };
        let (first, second) = (prepare("a"), prepare("b"));

        let original = start_with(false).await;
        client.prepare_body(&original, &first).await.unwrap();
        assert!(
            !client.is_prepared(&original, &first),
            "nothing acknowledged"
        );

        let keyed = start_with(true).await;
        client.prepare_body(&keyed, &first).await.unwrap();
        assert!(client.is_prepared(&keyed, &first));
        assert!(
            !client.is_prepared(&keyed, &second),
            "another body, another key"
        );
        let started = client
            .chat_prepared(&keyed, &request, first.key())
            .await
            .unwrap();
        assert!(matches!(started, ChatStart::Started(_)));
        let refused = client
            .chat_prepared(&keyed, &request, second.key())
            .await
            .unwrap();
        assert!(matches!(refused, ChatStart::NotPrepared));
    }
}
