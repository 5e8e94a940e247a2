//! The native executor against the fake model APIs on loopback (and the test MCP server).

use std::path::Path;
use std::time::{Duration, Instant};

use anywork_core::{
    Execution, ExecutionRequest, Executor, InputKind, InputResponse, SessionId, TaskEvent, TaskId,
    TaskOutcome, TaskStatus,
};
use anywork_test::fake_llm::{Api, FakeLlm, Reply};
use anywork_worker::native::mcp::{McpClients, ToolOutcome};
use anywork_worker::native::{MISSING_CONFIG, NativeConfig, NativeExecutor, Provider};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Longest a test run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Flavor {
    Anthropic,
    OpenAi,
}

const BOTH: [Flavor; 2] = [Flavor::Anthropic, Flavor::OpenAi];

fn config(fake: &FakeLlm, flavor: Flavor) -> NativeConfig {
    let provider = match flavor {
        Flavor::Anthropic => Provider::Anthropic {
            api_key: "test-key".into(),
            base_url: fake.url(),
        },
        Flavor::OpenAi => Provider::openai("test-key", format!("{}/v1", fake.url())),
    };
    let mut config = NativeConfig::new(provider, "claude-sonnet-4-5");
    config.retry.initial_backoff = Duration::from_millis(10);
    config.retry.max_backoff = Duration::from_millis(100);
    config.request_timeout = Duration::from_secs(20);
    config
}

fn executor(fake: &FakeLlm, flavor: Flavor) -> NativeExecutor {
    NativeExecutor::new(config(fake, flavor)).unwrap()
}

fn request(ws: &Path, message: &str) -> ExecutionRequest {
    ExecutionRequest::new(
        TaskId::generate(),
        SessionId::new("s1").unwrap(),
        message,
        ws,
    )
}

/// Reads events up to and including `done` and checks it is the only one, and last.
async fn drain(execution: &mut Execution, mut events: Vec<TaskEvent>) -> Vec<TaskEvent> {
    tokio::time::timeout(RUN_LIMIT, async {
        while let Some(event) = execution.events.next().await {
            events.push(event);
        }
    })
    .await
    .expect("the run did not end in time");
    let dones = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(dones, 1, "exactly one done: {events:#?}");
    assert!(events.last().unwrap().is_terminal(), "done is last");
    events
}

async fn run(exec: &NativeExecutor, ws: &Path, message: &str) -> Vec<TaskEvent> {
    let mut execution = exec.start(request(ws, message)).await.unwrap();
    drain(&mut execution, Vec::new()).await
}

fn outcome(events: &[TaskEvent]) -> &TaskOutcome {
    match events.last() {
        Some(TaskEvent::Done(outcome)) => outcome,
        other => panic!("no done at the end: {other:?}"),
    }
}

fn tool_results(events: &[TaskEvent]) -> Vec<(String, String, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => Some((tool_use_id.clone(), content.clone(), *is_error)),
            _ => None,
        })
        .collect()
}

fn text(events: &[TaskEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The content of a recorded tool result (Anthropic block or OpenAI `tool` message).
fn result_text(v: &Value) -> String {
    match v.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn write_mcp_json(ws: &Path) {
    let mcp = json!({"mcpServers": {
        "calc": {"command": anywork_test::bins::test_mcp_server()},
        "broken": {"command": "/nonexistent/anywork-no-such-server"},
    }});
    std::fs::write(ws.join(".mcp.json"), mcp.to_string()).unwrap();
}

#[tokio::test]
async fn write_file_then_answer_on_both_providers() {
    for flavor in BOTH {
        let fake = FakeLlm::start().await;
        let ws = tempfile::tempdir().unwrap();
        fake.push(Reply::tool_use(
            "toolu_1",
            "write_file",
            json!({"path": "files/out.txt", "content": "hello"}),
        ));
        fake.push(Reply::text("all done"));
        let events = run(&executor(&fake, flavor), ws.path(), "write hello").await;

        match &events[0] {
            TaskEvent::Init(init) => {
                assert_eq!(init.model, "claude-sonnet-4-5");
                for tool in [
                    "bash",
                    "read_file",
                    "write_file",
                    "edit_file",
                    "list_files",
                    "grep",
                ] {
                    assert!(
                        init.tools.iter().any(|t| t == tool),
                        "{tool} in {:?}",
                        init.tools
                    );
                }
                assert!(init.tools.iter().any(|t| t == "ask_user"));
            }
            other => panic!("{flavor:?}: init first, got {other:?}"),
        }
        assert_eq!(
            std::fs::read_to_string(ws.path().join("files/out.txt")).unwrap(),
            "hello"
        );
        let call = events
            .iter()
            .find_map(|e| match e {
                TaskEvent::ToolCall { id, name, input } => Some((id, name, input)),
                _ => None,
            })
            .expect("a tool_call event");
        assert_eq!(call.0, "toolu_1");
        assert_eq!(call.1, "write_file");
        assert_eq!(call.2["path"], "files/out.txt");
        let results = tool_results(&events);
        assert_eq!(results.len(), 1, "{flavor:?}");
        assert!(!results[0].2, "{flavor:?}: {results:?}");
        assert_eq!(text(&events), "all done");
        assert!(
            events.iter().any(|e| matches!(e, TaskEvent::Usage { .. })),
            "usage events"
        );

        let done = outcome(&events);
        assert_eq!(done.status, TaskStatus::Completed, "{flavor:?}: {done:?}");
        assert_eq!(done.result.as_deref(), Some("all done"));
        assert_eq!(done.num_turns, 2);
        assert_eq!(done.usage.input_tokens, 200, "{flavor:?}");
        assert_eq!(done.usage.output_tokens, 40, "{flavor:?}");
        let cost = done.cost_usd.expect("claude-sonnet-4-5 has a price");
        assert!(
            (cost - (200.0 * 3.0 + 40.0 * 15.0) / 1e6).abs() < 1e-9,
            "{cost}"
        );

        let requests = fake.requests();
        assert_eq!(requests.len(), 2);
        match flavor {
            Flavor::Anthropic => {
                assert_eq!(requests[0].api(), Some(Api::Anthropic));
                assert_eq!(requests[0].header("x-api-key"), Some("test-key"));
                assert_eq!(requests[0].header("anthropic-version"), Some("2023-06-01"));
            }
            Flavor::OpenAi => {
                assert_eq!(requests[0].api(), Some(Api::OpenAi));
                assert_eq!(requests[0].header("authorization"), Some("Bearer test-key"));
                assert_eq!(
                    requests[0].body.pointer("/stream_options/include_usage"),
                    Some(&json!(true))
                );
            }
        }
        assert!(requests[0].is_stream());
        assert!(requests[0].tool_names().contains(&"write_file"));
        let sent = requests[1].tool_results();
        assert_eq!(sent.len(), 1);
        let id = sent[0]
            .get("tool_use_id")
            .or_else(|| sent[0].get("tool_call_id"))
            .and_then(Value::as_str);
        assert_eq!(id, Some("toolu_1"), "{flavor:?}");
        assert!(result_text(sent[0]).contains("wrote 5 bytes"), "{sent:?}");
    }
}

#[tokio::test]
async fn mcp_tools_work_on_both_providers() {
    for flavor in BOTH {
        let fake = FakeLlm::start().await;
        let ws = tempfile::tempdir().unwrap();
        write_mcp_json(ws.path());
        fake.push(Reply::tool_use(
            "toolu_mcp",
            "mcp__calc__add",
            json!({"a": 2, "b": 3}),
        ));
        fake.push(Reply::text("the sum is 5"));
        let events = run(&executor(&fake, flavor), ws.path(), "add 2 and 3").await;

        let TaskEvent::Init(init) = &events[0] else {
            panic!("init first: {events:?}")
        };
        assert!(
            init.tools.iter().any(|t| t == "mcp__calc__add"),
            "{:?}",
            init.tools
        );
        assert!(init.tools.iter().any(|t| t == "mcp__calc__echo"));
        let status = |name: &str| {
            init.mcp_servers
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.status.clone())
        };
        assert_eq!(status("calc").as_deref(), Some("connected"));
        assert_eq!(status("broken").as_deref(), Some("failed"));
        assert!(events.iter().any(|e| matches!(
            e,
            TaskEvent::Error { code: Some(code), message } if code == "mcp_server_failed" && message.contains("broken")
        )));

        let results = tool_results(&events);
        assert_eq!(results.len(), 1, "{flavor:?}: {events:#?}");
        assert!(!results[0].2, "{results:?}");
        assert!(results[0].1.contains('5'), "{results:?}");
        assert_eq!(outcome(&events).status, TaskStatus::Completed);
        let requests = fake.requests();
        assert!(requests[0].tool_names().contains(&"mcp__calc__add"));
        let sent = requests[1].tool_results();
        assert!(result_text(sent[0]).contains("{\"result\":5}"), "{sent:?}");
    }
}

#[tokio::test]
async fn paths_outside_the_workspace_are_refused() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), ws.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ws.path().join("dirlink")).unwrap();
    let escape = outside.path().join("new.txt");
    fake.push(
        Reply::new()
            .with_tool_use("t1", "read_file", json!({"path": "../../etc/passwd"}))
            .with_tool_use("t2", "read_file", json!({"path": "/etc/passwd"}))
            .with_tool_use("t3", "read_file", json!({"path": "link"}))
            .with_tool_use(
                "t4",
                "write_file",
                json!({"path": "dirlink/new.txt", "content": "x"}),
            )
            .with_tool_use("t5", "write_file", json!({"path": escape, "content": "x"}))
            .with_tool_use("t6", "list_files", json!({"path": "dirlink"}))
            .with_tool_use(
                "t7",
                "edit_file",
                json!({"path": "files/../../x", "old_string": "a", "new_string": "b"}),
            ),
    );
    fake.push(Reply::text("ok"));
    let events = run(&executor(&fake, Flavor::Anthropic), ws.path(), "escape").await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 7, "{events:#?}");
    for (id, content, is_error) in &results {
        assert!(*is_error, "{id} must fail: {content}");
        assert!(!content.contains("secret"), "{id}: {content}");
        assert!(!content.contains("root:"), "{id}: {content}");
    }
    assert!(
        results[0].1.contains("outside the workspace"),
        "{results:?}"
    );
    assert!(!escape.exists());
    assert_eq!(outcome(&events).status, TaskStatus::Completed);
}

#[tokio::test]
async fn file_tools_work_inside_the_workspace() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ws.path().join("files/sub")).unwrap();
    std::fs::write(ws.path().join("files/a.rs"), "fn main() {}\nlet x = 1;\n").unwrap();
    std::fs::write(ws.path().join("files/sub/b.rs"), "let needle = 2;\n").unwrap();
    std::fs::write(ws.path().join("files/c.txt"), "one\ntwo\nthree\n").unwrap();
    fake.push(
        Reply::new()
            .with_tool_use("l", "list_files", json!({"pattern": "**/*.rs"}))
            .with_tool_use("g", "grep", json!({"pattern": "needle", "glob": "*.rs"}))
            .with_tool_use(
                "r",
                "read_file",
                json!({"path": "files/c.txt", "offset": 2, "limit": 1}),
            )
            .with_tool_use(
                "e",
                "edit_file",
                json!({"path": "files/c.txt", "old_string": "two", "new_string": "2"}),
            )
            .with_tool_use("b", "bash", json!({"command": "cat files/c.txt; pwd"})),
    );
    fake.push(Reply::text("ok"));
    let events = run(&executor(&fake, Flavor::Anthropic), ws.path(), "look").await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 5);
    for r in &results {
        assert!(!r.2, "{r:?}");
    }
    assert_eq!(results[0].1, "files/a.rs\nfiles/sub/b.rs");
    assert_eq!(results[1].1, "files/sub/b.rs:1: let needle = 2;");
    assert!(results[2].1.starts_with("two\n"), "{:?}", results[2].1);
    assert!(results[2].1.contains("offset 3"), "{:?}", results[2].1);
    let canonical = ws.path().canonicalize().unwrap();
    assert!(results[4].1.contains("one\n2\nthree"), "{:?}", results[4].1);
    assert!(results[4].1.contains(&canonical.display().to_string()));
}

#[tokio::test]
async fn ask_user_waits_for_the_answer() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.push(Reply::tool_use(
        "toolu_ask",
        "ask_user",
        json!({"question": "Which color?", "options": ["red", "blue"]}),
    ));
    fake.push(Reply::text("blue it is"));
    let exec = executor(&fake, Flavor::OpenAi);
    let mut execution = exec
        .start(request(ws.path(), "pick a color"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let asked = tokio::time::timeout(RUN_LIMIT, async {
        while let Some(event) = execution.events.next().await {
            seen.push(event.clone());
            if let TaskEvent::InputRequired(req) = event {
                return req;
            }
        }
        panic!("no input_required: {seen:?}");
    })
    .await
    .unwrap();
    assert_eq!(asked.kind, InputKind::Question);
    assert_eq!(asked.prompt, "Which color?");
    assert_eq!(asked.options, vec!["red".to_owned(), "blue".to_owned()]);
    // A wrong id is refused and the run keeps waiting.
    let wrong = execution
        .control
        .respond(InputResponse {
            request_id: "nope".into(),
            answer: "x".into(),
            allow: None,
        })
        .await;
    assert!(wrong.is_err());
    execution
        .control
        .respond(InputResponse {
            request_id: asked.request_id.clone(),
            answer: "blue".into(),
            allow: None,
        })
        .await
        .unwrap();
    let events = drain(&mut execution, seen).await;
    let done = outcome(&events);
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.result.as_deref(), Some("blue it is"));
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let sent = requests[1].tool_results();
    assert_eq!(result_text(sent[0]), "blue");
}

#[tokio::test]
async fn max_turns_fails_the_run() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.set_responder(|_| Reply::tool_use("", "bash", json!({"command": "true"})));
    let mut config = config(&fake, Flavor::Anthropic);
    config.max_turns = 3;
    let exec = NativeExecutor::new(config).unwrap();
    let events = run(&exec, ws.path(), "loop forever").await;
    let done = outcome(&events);
    assert_eq!(done.status, TaskStatus::Failed);
    assert_eq!(
        done.error.as_deref(),
        Some("reached the maximum of 3 turns")
    );
    assert_eq!(done.num_turns, 3);
    assert_eq!(fake.request_count(), 3);
    assert_eq!(done.usage.input_tokens, 300);
}

#[tokio::test]
async fn overloaded_is_retried_and_bad_requests_fail_at_once() {
    for flavor in BOTH {
        let fake = FakeLlm::start().await;
        let ws = tempfile::tempdir().unwrap();
        fake.push(Reply::error(529, "overloaded_error", "Overloaded"));
        fake.push(
            Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after", "0"),
        );
        fake.push(Reply::text("ok after retry"));
        let events = run(&executor(&fake, flavor), ws.path(), "hi").await;
        let done = outcome(&events);
        assert_eq!(done.status, TaskStatus::Completed, "{flavor:?}: {done:?}");
        assert_eq!(done.result.as_deref(), Some("ok after retry"));
        assert_eq!(done.num_turns, 1);
        assert_eq!(fake.request_count(), 3);
        // Each retry is told while the task waits: attempt, delay and reason.
        let retries: Vec<&anywork_core::Progress> = events
            .iter()
            .filter_map(|e| match e {
                TaskEvent::Progress(p) if p.stage == anywork_core::Progress::MODEL_RETRY => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(retries.len(), 2, "{flavor:?}: {events:#?}");
        assert_eq!(retries[0].attempt, Some(2));
        assert_eq!(retries[1].attempt, Some(3));
        assert!(
            retries[0].reason.as_deref().unwrap().contains("529"),
            "{retries:?}"
        );
        assert!(retries[1].message.contains("429"), "{retries:?}");
        assert!(
            retries
                .iter()
                .all(|p| p.retry_in_ms.is_some() && p.max_attempts.is_some())
        );

        // A refused key is not retried, and says what to fix.
        let ws = tempfile::tempdir().unwrap();
        fake.clear_requests();
        fake.push(Reply::error(
            401,
            "authentication_error",
            "invalid x-api-key",
        ));
        fake.push(Reply::text("never"));
        let events = run(&executor(&fake, flavor), ws.path(), "hi").await;
        let done = outcome(&events);
        assert_eq!(done.status, TaskStatus::Failed);
        let error = done.error.as_deref().unwrap();
        assert!(error.contains("check the key"), "{error}");
        assert_eq!(fake.request_count(), 1, "a 401 is not retried");
        fake.clear_queue();

        let ws = tempfile::tempdir().unwrap();
        fake.clear_requests();
        fake.push(Reply::error(
            400,
            "invalid_request_error",
            "messages: bad thing",
        ));
        fake.push(Reply::text("never"));
        let events = run(&executor(&fake, flavor), ws.path(), "hi").await;
        let done = outcome(&events);
        assert_eq!(done.status, TaskStatus::Failed);
        let error = done.error.as_deref().unwrap();
        assert!(error.contains("messages: bad thing"), "{error}");
        assert!(error.contains("400"), "{error}");
        assert_eq!(fake.request_count(), 1);
        fake.clear_queue();
    }
}

#[tokio::test]
async fn retries_give_up_after_max_attempts() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.set_responder(|_| Reply::error(503, "api_error", "down"));
    let mut config = config(&fake, Flavor::Anthropic);
    config.retry.max_attempts = 3;
    let events = run(&NativeExecutor::new(config).unwrap(), ws.path(), "hi").await;
    let done = outcome(&events);
    assert_eq!(done.status, TaskStatus::Failed);
    assert!(
        done.error.as_deref().unwrap().contains("after 3 attempts"),
        "{done:?}"
    );
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn cancel_stops_a_hanging_stream() {
    for flavor in BOTH {
        let fake = FakeLlm::start().await;
        let ws = tempfile::tempdir().unwrap();
        fake.push(Reply::text("partial answer").hanging());
        let exec = executor(&fake, flavor);
        let mut execution = exec.start(request(ws.path(), "hang")).await.unwrap();
        let mut seen = Vec::new();
        // Wait for some streamed text, so the stream is really open.
        tokio::time::timeout(RUN_LIMIT, async {
            while let Some(event) = execution.events.next().await {
                let is_text = matches!(event, TaskEvent::Text { .. });
                seen.push(event);
                if is_text {
                    break;
                }
            }
        })
        .await
        .unwrap();
        let asked = Instant::now();
        execution.control.cancel().await.unwrap();
        let events = drain(&mut execution, seen).await;
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(outcome(&events).status, TaskStatus::Canceled, "{flavor:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.aborted_streams() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            fake.aborted_streams(),
            1,
            "{flavor:?}: the stream was closed"
        );
    }
}

/// Whether a process is gone (or a zombie nobody reaped yet).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_for_pid(file: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the command never wrote its pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cancel_kills_a_running_bash() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.push(Reply::tool_use(
        "toolu_sleep",
        "bash",
        json!({"command": "sleep 30 & echo $! > sleep.pid; wait"}),
    ));
    fake.push(Reply::text("never reached"));
    let exec = executor(&fake, Flavor::Anthropic);
    let mut execution = exec.start(request(ws.path(), "sleep")).await.unwrap();
    let pid = wait_for_pid(&ws.path().join("sleep.pid")).await;
    assert!(!process_gone(pid));
    let asked = Instant::now();
    execution.control.cancel().await.unwrap();
    let events = drain(&mut execution, Vec::new()).await;
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome(&events).status, TaskStatus::Canceled);
    wait_gone(pid).await;
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn dropping_the_events_kills_a_running_bash() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.push(Reply::tool_use(
        "toolu_sleep",
        "bash",
        json!({"command": "sleep 30 & echo $! > sleep.pid; wait"}),
    ));
    let exec = executor(&fake, Flavor::OpenAi);
    let execution = exec.start(request(ws.path(), "sleep")).await.unwrap();
    let pid = wait_for_pid(&ws.path().join("sleep.pid")).await;
    drop(execution);
    wait_gone(pid).await;
}

#[tokio::test]
async fn bash_times_out() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.push(Reply::tool_use(
        "toolu_slow",
        "bash",
        json!({"command": "echo started; sleep 20; echo late"}),
    ));
    fake.push(Reply::text("it timed out"));
    let mut config = config(&fake, Flavor::Anthropic);
    config.bash_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let events = run(&NativeExecutor::new(config).unwrap(), ws.path(), "slow").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let results = tool_results(&events);
    assert!(results[0].2, "{results:?}");
    assert!(results[0].1.contains("started"), "{results:?}");
    assert!(results[0].1.contains("timed out after 1 s"), "{results:?}");
    assert!(!results[0].1.contains("late"));
    assert_eq!(outcome(&events).status, TaskStatus::Completed);
}

#[tokio::test]
async fn the_conversation_continues_across_executors() {
    for flavor in BOTH {
        let fake = FakeLlm::start().await;
        let ws = tempfile::tempdir().unwrap();
        fake.push(Reply::tool_use(
            "toolu_w",
            "write_file",
            json!({"path": "a.txt", "content": "A"}),
        ));
        fake.push(Reply::text("first answer"));
        let events = run(&executor(&fake, flavor), ws.path(), "first message").await;
        assert_eq!(outcome(&events).status, TaskStatus::Completed);

        // A torn line (a crash mid-write) is ignored.
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(ws.path().join("sessions/native-transcript.jsonl"))
            .unwrap();
        file.write_all(b"{\"role\":\"user\",\"cont").unwrap();
        drop(file);

        fake.push(Reply::text("second answer"));
        let events = run(&executor(&fake, flavor), ws.path(), "second message").await;
        assert_eq!(outcome(&events).result.as_deref(), Some("second answer"));
        let last = fake.last_request().unwrap();
        let messages: Vec<String> = last.messages().iter().map(Value::to_string).collect();
        let all = messages.join("\n");
        let pos = |needle: &str| {
            all.find(needle)
                .unwrap_or_else(|| panic!("{needle} in {all}"))
        };
        assert!(pos("first message") < pos("toolu_w"));
        assert!(pos("toolu_w") < pos("first answer"));
        assert!(pos("first answer") < pos("second message"));
        assert_eq!(last.tool_results().len(), 1, "{flavor:?}");
    }
}

#[tokio::test]
async fn skills_soul_and_agents_reach_the_model() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    let skill_dir = ws.path().join(".claude/skills/greet");
    std::fs::create_dir_all(&skill_dir).unwrap();
    std::fs::write(
        skill_dir.join("SKILL.md"),
        "---\nname: greet\ndescription: Greets people warmly\n---\nAlways say GREETINGS-42.\n",
    )
    .unwrap();
    std::fs::write(ws.path().join("SOUL.md"), "You are SOUL-MARKER.").unwrap();
    std::fs::write(ws.path().join("AGENTS.md"), "Rule AGENTS-MARKER.").unwrap();
    fake.push(Reply::tool_use(
        "toolu_s",
        "skill",
        json!({"name": "greet"}),
    ));
    fake.push(Reply::text("GREETINGS-42"));
    let events = run(&executor(&fake, Flavor::Anthropic), ws.path(), "hi").await;
    let TaskEvent::Init(init) = &events[0] else {
        panic!("init first")
    };
    assert_eq!(init.skills, vec!["greet".to_owned()]);
    assert!(init.tools.iter().any(|t| t == "skill"));
    let first = &fake.requests()[0];
    let system = first.body["system"].as_str().unwrap();
    assert!(system.contains("greet: Greets people warmly"), "{system}");
    assert!(system.contains("SOUL-MARKER"));
    assert!(system.contains("AGENTS-MARKER"));
    assert!(
        !system.contains("GREETINGS-42"),
        "the body is loaded on demand"
    );
    let results = tool_results(&events);
    assert_eq!(results[0].1, "Always say GREETINGS-42.");
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_are_tool_errors() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    fake.push(
        Reply::new()
            .with_tool_use("u1", "no_such_tool", json!({}))
            .with_tool_use("u2", "write_file", json!({"path": 7}))
            .with_tool_use(
                "u3",
                "edit_file",
                json!({"path": "missing.txt", "old_string": "a", "new_string": "b"}),
            ),
    );
    fake.push(Reply::text("recovered"));
    let events = run(&executor(&fake, Flavor::OpenAi), ws.path(), "x").await;
    let results = tool_results(&events);
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r.2), "{results:?}");
    assert!(results[0].1.contains("no tool named"));
    assert!(results[1].1.contains("path"));
    assert_eq!(outcome(&events).status, TaskStatus::Completed);
}

#[test]
fn no_configuration_names_the_variables() {
    let err = NativeConfig::from_lookup(|_| None).unwrap_err();
    let message = err.to_string();
    assert_eq!(message, MISSING_CONFIG);
    for var in ["ANTHROPIC_API_KEY", "API_KEY", "API_BASE_URL", "MODEL"] {
        assert!(message.contains(var), "{var} in {message}");
    }
    let err = NativeConfig::from_lookup(|k| (k == "API_KEY").then(|| "k".to_owned())).unwrap_err();
    assert!(err.to_string().contains("MODEL"), "{err}");

    let config = NativeConfig::from_lookup(|k| match k {
        "ANTHROPIC_API_KEY" => Some("sk".into()),
        "ANTHROPIC_BASE_URL" => Some("http://127.0.0.1:9".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        config.provider,
        Provider::Anthropic {
            api_key: "sk".into(),
            base_url: "http://127.0.0.1:9".into(),
        }
    );
    assert_eq!(config.max_turns, 50);
    assert_eq!(config.bash_timeout, Duration::from_secs(120));
    assert!(
        !format!("{config:?}").contains("\"sk\""),
        "the key is not printed"
    );

    let config = NativeConfig::from_lookup(|k| match k {
        "API_KEY" => Some("k".into()),
        "API_BASE_URL" => Some("http://localhost:8000/v1".into()),
        "MODEL" => Some("qwen".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        config.provider,
        Provider::openai("k", "http://localhost:8000/v1")
    );
    assert_eq!(config.model, "qwen");
}

#[tokio::test]
async fn a_missing_workspace_fails_at_start() {
    let fake = FakeLlm::start().await;
    let err = executor(&fake, Flavor::Anthropic)
        .start(request(Path::new("/nonexistent/anywork-ws"), "hi"))
        .await
        .err()
        .expect("start fails");
    assert!(err.to_string().contains("/nonexistent/anywork-ws"), "{err}");
}

/// The test MCP server serving streamable HTTP; killed on drop.
struct HttpMcp {
    child: std::process::Child,
    url: String,
}

impl HttpMcp {
    fn start() -> HttpMcp {
        use std::io::BufRead;
        let mut child = std::process::Command::new(anywork_test::bins::test_mcp_server())
            .args(["--http", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        HttpMcp {
            child,
            url: line.trim().to_owned(),
        }
    }
}

impl Drop for HttpMcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn mcp_over_streamable_http_and_unsupported_transports() {
    let server = HttpMcp::start();
    assert!(
        server.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.url
    );
    let servers: anywork_core::spec::McpServers = serde_json::from_value(json!({
        "web": {"type": "http", "url": server.url, "headers": {"X-Test": "1"}},
        "old": {"type": "sse", "url": "http://127.0.0.1:9/sse"},
        // A plain-HTTP server spoken to over TLS: the handshake must be tried, and fail.
        "tls": {"type": "http", "url": server.url.replacen("http://", "https://", 1)},
    }))
    .unwrap();
    let ws = tempfile::tempdir().unwrap();
    let (clients, reports) = McpClients::connect(&servers, ws.path()).await;
    let report = |name: &str| reports.iter().find(|r| r.name == name).unwrap().clone();
    assert!(report("web").connected, "{reports:?}");
    assert_eq!(report("web").tools, 2);
    assert!(report("old").error.unwrap().contains("sse"));
    let tls = report("tls").error.unwrap();
    assert!(
        tls.contains("MCP handshake with https://127.0.0.1:"),
        "{tls}"
    );
    assert!(!report("tls").connected);
    let names: Vec<String> = clients.tools().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["mcp__web__add", "mcp__web__echo"]);
    let echoed = clients
        .call("mcp__web__echo", json!({"text": "over http"}))
        .await;
    assert_eq!(echoed, ToolOutcome::ok("over http"));
    let bad = clients.call("mcp__web__add", json!({"a": 1})).await;
    assert!(bad.is_error, "{bad:?}");
    let unknown = clients.call("mcp__web__nope", json!({})).await;
    assert!(unknown.is_error);
    let not_object = clients.call("mcp__web__echo", json!([1])).await;
    assert!(not_object.is_error);
    clients.shutdown().await;
}

/// Pids of test MCP servers whose working directory is `ws`.
fn mcp_servers_in(ws: &Path) -> Vec<u32> {
    let ws = ws.canonicalize().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if exe.to_string_lossy().contains("anywork-test-mcp") && cwd == ws && !process_gone(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn mcp_servers_stop_with_the_run() {
    let fake = FakeLlm::start().await;
    let ws = tempfile::tempdir().unwrap();
    write_mcp_json(ws.path());
    // A normal end closes the servers.
    fake.push(Reply::text("done"));
    let events = run(&executor(&fake, Flavor::Anthropic), ws.path(), "hi").await;
    assert_eq!(outcome(&events).status, TaskStatus::Completed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mcp_servers_in(ws.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "MCP server still runs after the run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A cancel while the model streams kills them too.
    fake.push(Reply::text("partial").hanging());
    let exec = executor(&fake, Flavor::Anthropic);
    let mut execution = exec.start(request(ws.path(), "hang")).await.unwrap();
    let mut seen = Vec::new();
    while let Some(event) = execution.events.next().await {
        let is_text = matches!(event, TaskEvent::Text { .. });
        seen.push(event);
        if is_text {
            break;
        }
    }
    assert_eq!(mcp_servers_in(ws.path()).len(), 1, "the calc server runs");
    execution.control.cancel().await.unwrap();
    let events = drain(&mut execution, seen).await;
    assert_eq!(outcome(&events).status, TaskStatus::Canceled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mcp_servers_in(ws.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "MCP server still runs after cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
