//! The worker over real HTTP with the real executors: `/prepare` sets up skills and MCP
//! servers, `/chat` streams events, `/cancel` stops a run, `/sessions/:id/messages` keeps the
//! conversation. The model is the fake on loopback; MCP is the `anywork-test-mcp` server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anywork_core::{Executor, TaskEvent, TaskId, TaskOutcome, TaskStatus};
use anywork_test::bins::{claude_cli, test_mcp_server};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::{
    ClaudeCodeConfig, ClaudeCodeExecutor, NativeConfig, NativeExecutor, Provider, WorkerConfig,
    WorkerState,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

struct Worker {
    url: String,
    root: tempfile::TempDir,
    http: reqwest::Client,
}

async fn worker(executor: Arc<dyn Executor>) -> Worker {
    let root = tempfile::tempdir().unwrap();
    let state = WorkerState::new(WorkerConfig::new(root.path()), executor).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(anywork_worker::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Worker {
        url,
        root,
        http: reqwest::Client::new(),
    }
}

impl Worker {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn prepare(&self, session: &str, skills: Value, mcp: Value) {
        let r = self
            .post(
                "/prepare",
                json!({"session_id": session, "skills": skills, "mcp_servers": mcp}),
            )
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Starts a chat and returns its task id and the response (an SSE stream).
    async fn start_chat(&self, session: &str, message: &str) -> (TaskId, reqwest::Response) {
        let task_id = TaskId::generate();
        let r = self
            .post(
                "/chat",
                json!({"task_id": task_id, "session_id": session, "message": message}),
            )
            .await;
        assert_eq!(r.status(), 200);
        (task_id, r)
    }

    async fn chat(&self, session: &str, message: &str) -> Vec<TaskEvent> {
        let (_, response) = self.start_chat(session, message).await;
        events(response).await
    }
}

/// Reads an SSE body to its end as TaskEvents.
async fn events(response: reqwest::Response) -> Vec<TaskEvent> {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut out = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                for line in frame.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        out.push(serde_json::from_str::<TaskEvent>(data.trim()).unwrap());
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the stream ended in time");
    out
}

fn done(events: &[TaskEvent]) -> &TaskOutcome {
    let dones: Vec<&TaskOutcome> = events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Done(o) => Some(o),
            _ => None,
        })
        .collect();
    assert_eq!(dones.len(), 1, "exactly one done: {events:#?}");
    assert!(
        matches!(events.last(), Some(TaskEvent::Done(_))),
        "done is last"
    );
    dones[0]
}

fn calc_server() -> Value {
    json!({"calc": {"command": test_mcp_server()}})
}

/// The add call and its result, checked in the events and in the model's second request.
fn assert_mcp_add(events: &[TaskEvent], fake: &FakeLlm) {
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TaskEvent::ToolCall { name, .. } if name == "mcp__calc__add")),
        "{events:#?}"
    );
    let result = events
        .iter()
        .find_map(|e| match e {
            TaskEvent::ToolResult {
                content, is_error, ..
            } => Some((content.clone(), *is_error)),
            _ => None,
        })
        .expect("a tool result");
    assert!(!result.1, "the MCP call failed: {}", result.0);
    assert!(result.0.contains("\"result\":5"), "{}", result.0);
    let last = fake.last_request().unwrap();
    let returned = last.tool_results();
    assert_eq!(returned.len(), 1);
    assert!(
        returned[0].to_string().contains("result"),
        "{}",
        returned[0]
    );
}

fn init(events: &[TaskEvent]) -> &anywork_core::AgentInit {
    events
        .iter()
        .find_map(|e| match e {
            TaskEvent::Init(i) => Some(i),
            _ => None,
        })
        .expect("an init event")
}

fn claude(bin: &Path, fake: &FakeLlm) -> Arc<dyn Executor> {
    Arc::new(ClaudeCodeExecutor::new(
        ClaudeCodeConfig::new(bin)
            .with_api_key("test")
            .with_base_url(fake.url())
            .with_max_turns(5)
            .with_env("CLAUDE_CODE_MAX_RETRIES", "0"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_gets_skills_and_mcp_from_prepare() {
    let Some(bin) = claude_cli("claude_code_gets_skills_and_mcp_from_prepare") else {
        return;
    };
    let fake = FakeLlm::start().await;
    let w = worker(claude(&bin, &fake)).await;
    let skill = json!([{"name": "greet",
        "content": "---\nname: greet\ndescription: Greets the user warmly\n---\nSay hello."}]);
    w.prepare("owner/repo#1", skill, calc_server()).await;

    fake.push(Reply::tool_use(
        "toolu_add",
        "mcp__calc__add",
        json!({"a": 2, "b": 3}),
    ));
    fake.push(Reply::text("The sum is 5"));
    let events = w.chat("owner/repo#1", "add 2 and 3").await;
    let first = init(&events);
    assert_eq!(
        first.skills.first().map(String::as_str),
        Some("greet"),
        "{first:?}"
    );
    assert!(
        first
            .mcp_servers
            .iter()
            .any(|s| s.name == "calc" && s.status == "connected"),
        "{first:?}"
    );
    assert_mcp_add(&events, &fake);
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("The sum is 5"));

    // The conversation is kept by the worker.
    let history: Value = w
        .http
        .get(format!("{}/sessions/owner%2Frepo%231/messages", w.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = history.to_string();
    assert!(
        text.contains("add 2 and 3") && text.contains("The sum is 5"),
        "{text}"
    );

    // A new prepare without the skill replaces the old set: it does not linger.
    w.prepare("owner/repo#1", json!([]), json!({})).await;
    fake.push(Reply::text("hi again"));
    let events = w.chat("owner/repo#1", "hello").await;
    assert!(!init(&events).skills.iter().any(|s| s == "greet"));
    assert_eq!(done(&events).status, TaskStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_cancel_over_http_stops_the_cli() {
    let Some(bin) = claude_cli("claude_code_cancel_over_http_stops_the_cli") else {
        return;
    };
    let fake = FakeLlm::start().await;
    let w = worker(claude(&bin, &fake)).await;
    fake.push(Reply::text("partial answer").hanging());
    let (task_id, response) = w.start_chat("s1", "long job").await;
    assert!(fake.wait_for_requests(1, Duration::from_secs(30)).await);
    let asked = Instant::now();
    let reader = tokio::spawn(events(response));
    let r = w.post("/cancel", json!({"task_id": task_id})).await;
    assert_eq!(r.status(), 200);
    let events = reader.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(done(&events).status, TaskStatus::Canceled);
    // No process is left running inside the workspace root.
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd"))
            && cwd.starts_with(w.root.path())
        {
            left.push(entry.file_name());
        }
    }
    assert!(left.is_empty(), "processes left in the workspace: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_executor_calls_mcp_tools_on_both_providers() {
    let fake = FakeLlm::start().await;
    for provider in [
        Provider::Anthropic {
            api_key: "test".into(),
            base_url: fake.url(),
        },
        Provider::OpenAi {
            api_key: "test".into(),
            base_url: format!("{}/v1", fake.url()),
        },
    ] {
        let executor = Arc::new(NativeExecutor::new(NativeConfig::new(provider, "m")).unwrap());
        let w = worker(executor).await;
        w.prepare("s1", json!([]), calc_server()).await;
        fake.push(Reply::tool_use(
            "call_1",
            "mcp__calc__add",
            json!({"a": 2, "b": 3}),
        ));
        fake.push(Reply::text("The sum is 5"));
        let events = w.chat("s1", "add 2 and 3").await;
        assert_mcp_add(&events, &fake);
        let outcome = done(&events);
        assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
        assert_eq!(outcome.num_turns, 2);
    }
}

/// `LOG_FORMAT=json`: one JSON object per log line; text logs carry no colour codes when
/// stderr is not a terminal; an unknown format is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_or_plain_text() {
    use tokio::io::AsyncBufReadExt as _;
    async fn first_lines(format: &str) -> (Vec<String>, Option<i32>) {
        let ws = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = tokio::process::Command::new(anywork_test::bins::worker_bin())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", format)
            .env("RUST_LOG", "info")
            .env("EXECUTOR", "native")
            .env("API_KEY", "k")
            .env("API_BASE_URL", "http://127.0.0.1:9/v1")
            .env("MODEL", "m")
            .env("SANDBOX", "off")
            .env("WORKER_PORT", port.to_string())
            .env("WORKSPACE_DIR", ws.path())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line()).await
            {
                Ok(Ok(Some(line))) => seen.push(line),
                _ => break,
            }
        }
        let _ = child.start_kill();
        let status = child.wait().await.ok().and_then(|s| s.code());
        (seen, status)
    }

    let (json_lines, _) = first_lines("json").await;
    assert!(!json_lines.is_empty(), "the worker logged something");
    for line in &json_lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
    }
    let (text_lines, _) = first_lines("text").await;
    assert!(!text_lines.is_empty());
    assert!(
        text_lines.iter().all(|l| !l.contains('\u{1b}')),
        "no ANSI escapes without a terminal: {text_lines:?}"
    );
    let (refused, status) = first_lines("xml").await;
    assert_ne!(status, Some(0));
    assert!(
        refused.iter().any(|l| l.contains("LOG_FORMAT")),
        "the error names the setting: {refused:?}"
    );
}
