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
//! `anywork-bench stand-in` runs it as a process of its own (it prints `listening <url>`);
//! [`spawn`] starts that process.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
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
}

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

type Shared = Arc<Counts>;

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

async fn prepare(State(counts): State<Shared>, bytes: Bytes) -> Response {
    counts.prepare.fetch_add(1, Ordering::Relaxed);
    if object(&bytes).is_none() {
        return unprocessable("body is not a JSON object");
    }
    axum::Json(json!({ "status": "ready" })).into_response()
}

async fn chat(State(counts): State<Shared>, bytes: Bytes) -> Response {
    let arrived = mono_ns();
    counts.chat.fetch_add(1, Ordering::Relaxed);
    let Some(body) = object(&bytes) else {
        return unprocessable("body is not a JSON object");
    };
    if !body["session_id"].is_string() || !body["message"].is_string() {
        return unprocessable("session_id and message are required strings");
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

async fn cancel(State(counts): State<Shared>, bytes: Bytes) -> Response {
    counts.cancel.fetch_add(1, Ordering::Relaxed);
    if object(&bytes).is_none_or(|b| !b["session_id"].is_string()) {
        return unprocessable("session_id is a required string");
    }
    axum::Json(json!({ "status": "canceled" })).into_response()
}

async fn health(State(counts): State<Shared>) -> Response {
    counts.health.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "status": "ok",
        "engine": "claude-agent-sdk",
        "workspace": "/workspace",
        "active_sessions": 0,
    }))
    .into_response()
}

async fn other(State(counts): State<Shared>) -> Response {
    counts.other.fetch_add(1, Ordering::Relaxed);
    StatusCode::NOT_FOUND.into_response()
}

async fn stats(State(counts): State<Shared>) -> Response {
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
async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(Arc::default())).await
}

/// Serves until killed (`anywork-bench stand-in`); run it on a current-thread runtime.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port)).await?;
    println!("listening http://{}", listener.local_addr()?);
    serve(listener).await?;
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

/// Starts `bench stand-in` and waits for its address.
pub async fn spawn(bench: &Path) -> anyhow::Result<StandIn> {
    let mut child = tokio::process::Command::new(bench)
        .arg("stand-in")
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener));
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
}
