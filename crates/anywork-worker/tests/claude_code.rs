//! [`ClaudeCodeExecutor`] against the real Claude Code CLI, which talks to [`FakeLlm`] on
//! loopback. The CLI is `$CLAUDE_BIN` or the one bundled with the `claude-agent-sdk` wheel;
//! without it these tests print a loud skip banner (and fail when `CI` is set). The tests at the
//! end drive small shell scripts instead and always run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anywork_core::{
    ErrorKind, Execution, ExecutionRequest, Executor, InputKind, InputResponse, SessionId,
    TaskEvent, TaskId, TaskOutcome, TaskStatus,
};
use anywork_test::bins::claude_cli;
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::claude::{HISTORY_LOST, LINE_TOO_LONG, SESSION_ID_FILE, SESSIONS_DIR};
use anywork_worker::{
    ClaudeCodeConfig, ClaudeCodeExecutor, PermissionMode, Sandbox, SandboxConfig, SandboxMode,
    Workspace, WorkspaceDoc,
};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Longest a whole run may take in these tests.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// A marker put in every workspace's SOUL.md, expected in the system prompt.
const SOUL_MARKER: &str = "SOUL-MARKER-7f3a";

/// The settings every test starts from: offline against `fake`, no retries.
fn config(claude: &Path, fake: &FakeLlm) -> ClaudeCodeConfig {
    ClaudeCodeConfig::new(claude)
        .with_api_key("test")
        .with_base_url(fake.url())
        .with_max_turns(5)
        .with_timeout(RUN_LIMIT)
        .with_env("CLAUDE_CODE_MAX_RETRIES", "0")
}

/// A session workspace with `files/` and a SOUL.md holding [`SOUL_MARKER`].
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir(ws.path().join("files")).unwrap();
    std::fs::write(
        ws.path().join("SOUL.md"),
        format!("# Soul\n\nYou are careful. {SOUL_MARKER}\n"),
    )
    .unwrap();
    std::fs::write(ws.path().join("AGENTS.md"), "# Agents\n\n- Be brief.\n").unwrap();
    ws
}

fn request(ws: &Path, message: &str) -> ExecutionRequest {
    ExecutionRequest::new(
        TaskId::generate(),
        SessionId::new("s-claude-test").unwrap(),
        message,
        ws,
    )
}

/// Reads events until the stream ends; panics after [`RUN_LIMIT`].
async fn collect(execution: &mut Execution) -> Vec<TaskEvent> {
    let mut events = Vec::new();
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, execution.events.next()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => return events,
            Err(_) => panic!("the run did not end within {RUN_LIMIT:?}; events: {events:#?}"),
        }
    }
}

/// Reads events until `pick` returns something.
async fn wait_for<T>(
    execution: &mut Execution,
    seen: &mut Vec<TaskEvent>,
    pick: impl Fn(&TaskEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, execution.events.next())
            .await
            .unwrap_or_else(|_| panic!("no expected event within {RUN_LIMIT:?}: {seen:#?}"))
            .unwrap_or_else(|| panic!("the stream ended before the expected event: {seen:#?}"));
        let found = pick(&event);
        seen.push(event);
        if let Some(found) = found {
            return found;
        }
    }
}

/// Runs `message` in `ws` to the end.
async fn run(executor: &ClaudeCodeExecutor, ws: &Path, message: &str) -> Vec<TaskEvent> {
    let started = Instant::now();
    let mut execution = executor.start(request(ws, message)).await.expect("start");
    let events = collect(&mut execution).await;
    eprintln!(
        "run {message:?} took {:?}: {:?}",
        started.elapsed(),
        events.iter().map(TaskEvent::kind).collect::<Vec<_>>()
    );
    events
}

/// Every text piece, joined.
fn texts(events: &[TaskEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// Where the first tool call is.
fn call_position(events: &[TaskEvent]) -> usize {
    events
        .iter()
        .position(|e| matches!(e, TaskEvent::ToolCall { .. }))
        .expect("a tool call")
}

/// The `Done` outcome, checking that there is exactly one and that it is last.
fn done(events: &[TaskEvent]) -> &TaskOutcome {
    let dones = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(dones, 1, "exactly one done: {events:#?}");
    match events.last() {
        Some(TaskEvent::Done(outcome)) => outcome,
        _ => panic!("done is not last: {events:#?}"),
    }
}

fn init(events: &[TaskEvent]) -> &anywork_core::AgentInit {
    events
        .iter()
        .find_map(|e| match e {
            TaskEvent::Init(init) => Some(init),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no init event: {events:#?}"))
}

fn error_codes(events: &[TaskEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Error { message, code } => {
                Some((code.clone().unwrap_or_default(), message.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Processes whose working directory is inside `ws` (the CLI and anything it started).
fn processes_in(ws: &Path) -> Vec<i32> {
    let ws = std::fs::canonicalize(ws).unwrap();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(entry.path().join("cwd")).ok()?;
            cwd.starts_with(&ws).then_some(pid)
        })
        .collect()
}

/// Waits until no process runs in `ws`; panics after `limit`.
async fn assert_no_processes(ws: &Path, limit: Duration) {
    let started = Instant::now();
    loop {
        let left = processes_in(ws);
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "processes still running in the workspace after {limit:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stored_session_id(ws: &Path) -> Option<String> {
    std::fs::read_to_string(ws.join(SESSIONS_DIR).join(SESSION_ID_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// With the real CLI.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_tool_writes_a_file_and_streams_events() {
    let Some(claude) = claude_cli("write_tool_writes_a_file_and_streams_events") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("I'll create the file.").with_tool_use(
        "toolu_write_1",
        "Write",
        json!({"file_path": "{cwd}/files/out.txt", "content": "hello"}),
    ));
    fake.push(Reply::text("done"));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake).with_model("-claude-test-model"));
    assert_eq!(executor.name(), "claude-code");

    let events = run(&executor, ws.path(), "write the file").await;

    assert_eq!(
        std::fs::read_to_string(ws.path().join("files/out.txt")).expect("the file was written"),
        "hello"
    );
    assert!(matches!(events[0], TaskEvent::Init(_)), "{events:#?}");
    let init = init(&events);
    assert!(!init.model.is_empty());
    assert!(init.tools.iter().any(|t| t == "Write"), "{:?}", init.tools);
    let session = init.agent_session_id.clone().expect("a CLI session id");
    assert_eq!(stored_session_id(ws.path()), Some(session));

    let position = |pred: &dyn Fn(&TaskEvent) -> bool| {
        events
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("missing event: {events:#?}"))
    };
    let call = position(&|e| {
        matches!(e, TaskEvent::ToolCall { id, name, input }
            if id == "toolu_write_1" && name == "Write" && input["content"] == "hello")
    });
    let result = position(&|e| {
        matches!(e, TaskEvent::ToolResult { tool_use_id, is_error: false, content }
            if tool_use_id == "toolu_write_1" && !content.is_empty())
    });
    // Text streams in pieces (`--include-partial-messages`), each sent once.
    let first_text = position(&|e| matches!(e, TaskEvent::Text { .. }));
    let last_text = events
        .iter()
        .rposition(|e| matches!(e, TaskEvent::Text { .. }))
        .unwrap();
    assert_eq!(
        texts(&events[..call_position(&events)]),
        "I'll create the file."
    );
    assert_eq!(texts(&events), "I'll create the file.done");
    let pieces = events
        .iter()
        .filter(|e| matches!(e, TaskEvent::Text { .. }))
        .count();
    assert!(pieces > 2, "the text came in pieces: {events:#?}");
    let usage = position(&|e| {
        matches!(e, TaskEvent::Usage { usage, cost_usd: Some(cost) }
            if usage.input_tokens > 0 && usage.output_tokens > 0 && *cost > 0.0)
    });
    assert!(first_text < call && call < result && result < last_text && last_text < usage);

    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("done"));
    assert_eq!(outcome.error, None);
    assert!(outcome.cost_usd.is_some_and(|c| c > 0.0), "{outcome:?}");
    assert!(outcome.num_turns >= 2, "{outcome:?}");
    assert!(outcome.duration_ms > 0);
    assert!(outcome.usage.input_tokens > 0);
    assert!(error_codes(&events).is_empty(), "{events:#?}");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests[0].contains_text(SOUL_MARKER),
        "SOUL.md is in the system prompt"
    );
    assert!(requests[0].contains_text("Be brief."), "AGENTS.md too");
    assert_eq!(requests[0].header("x-api-key"), Some("test"));
    assert_eq!(requests[0].model(), Some("-claude-test-model"));
    // The process waits for the session's next task until the executor goes.
    assert_eq!(processes_in(ws.path()).len(), 1, "one warm process");
    drop(executor);
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;
    assert!(
        !ws.path().join(".home/.claude").exists(),
        "state goes to CLAUDE_CONFIG_DIR, not HOME"
    );
}

/// A failed model call the CLI retries is told as progress; a refused key is not retried
/// for minutes (as the CLI would by default) but fails the task at once, saying what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_told_and_a_refused_key_fails_at_once() {
    let Some(claude) = claude_cli("retries_are_told_and_a_refused_key_fails_at_once") else {
        return;
    };
    let fake = FakeLlm::start().await;
    let ws = workspace();
    // The CLI's own retry settings (no CLAUDE_CODE_MAX_RETRIES=0 here).
    let retrying = || {
        ClaudeCodeConfig::new(&claude)
            .with_api_key("test")
            .with_base_url(fake.url())
            .with_max_turns(5)
            .with_timeout(RUN_LIMIT)
    };
    fake.push(Reply::error(529, "overloaded_error", "Overloaded"));
    fake.push(Reply::text("fine now"));
    let events = run(&ClaudeCodeExecutor::new(retrying()), ws.path(), "hi").await;
    assert_eq!(done(&events).status, TaskStatus::Completed, "{events:#?}");
    let progress: Vec<&anywork_core::Progress> = events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Progress(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 1, "{events:#?}");
    assert_eq!(progress[0].stage, anywork_core::Progress::MODEL_RETRY);
    assert_eq!(progress[0].attempt, Some(1));
    assert!(
        progress[0].reason.as_deref().unwrap().contains("529"),
        "{progress:?}"
    );

    fake.clear_requests();
    fake.set_responder(|_| Reply::error(401, "authentication_error", "invalid x-api-key"));
    let events = run(&ClaudeCodeExecutor::new(retrying()), ws.path(), "again").await;
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Failed, "{events:#?}");
    let error = outcome.error.as_deref().unwrap();
    assert!(error.contains("check ANTHROPIC_API_KEY"), "{error}");
    assert!(
        error_codes(&events)
            .iter()
            .any(|(code, _)| code == "auth_failed"),
        "{events:#?}"
    );
    assert!(
        fake.request_count() <= 2,
        "the CLI was stopped instead of retrying ten times: {} requests",
        fake.request_count()
    );
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;
}

/// The CLI's `total_cost_usd` adds up every run of a resumed conversation; a task's cost is
/// its own run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_reports_its_own_cost_in_a_resumed_conversation() {
    let Some(claude) = claude_cli("each_task_reports_its_own_cost_in_a_resumed_conversation")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    let ws = workspace();
    // The same usage twice: the same cost twice, not a growing sum.
    fake.push(Reply::text("first").with_usage(20_000, 1_000));
    fake.push(Reply::text("second").with_usage(20_000, 1_000));
    fake.push(Reply::error(
        401,
        "authentication_error",
        "invalid x-api-key",
    ));
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));

    let first = done(&run(&executor, ws.path(), "one").await).clone();
    let second = done(&run(&executor, ws.path(), "two").await).clone();
    let c1 = first.cost_usd.expect("a cost");
    let c2 = second.cost_usd.expect("a cost");
    assert!(c1 > 0.0, "{first:?}");
    assert!(
        (c1 - c2).abs() < 1e-9,
        "task 2 costs its own run ({c2}), not the conversation's total ({})",
        c1 + c2
    );
    // A failed run that called the model for nothing costs nothing of the earlier runs.
    let failed_events = run(&executor, ws.path(), "three").await;
    let failed = done(&failed_events);
    assert_eq!(failed.status, TaskStatus::Failed, "{failed:?}");
    assert!(
        failed.cost_usd.is_none_or(|c| c < c1 / 2.0),
        "the failed task does not carry the earlier cost: {failed:?}"
    );
    let usage_costs: Vec<f64> = failed_events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Usage { cost_usd, .. } => *cost_usd,
            _ => None,
        })
        .collect();
    assert!(usage_costs.iter().all(|c| *c < c1 / 2.0), "{usage_costs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_task_resumes_the_conversation_even_after_a_restart() {
    let Some(claude) = claude_cli("second_task_resumes_the_conversation_even_after_a_restart")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    let ws = workspace();
    fake.push(Reply::text("I'll create the file.").with_tool_use(
        "toolu_resume_1",
        "Write",
        json!({"file_path": "{cwd}/files/hello.txt", "content": "hello\n"}),
    ));
    fake.push(Reply::text("Done: created files/hello.txt."));
    fake.push(Reply::text("Nothing else to do."));
    fake.push(Reply::text("Still here."));

    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let first = run(&executor, ws.path(), "create hello").await;
    assert_eq!(done(&first).status, TaskStatus::Completed);
    let session = init(&first).agent_session_id.clone().unwrap();

    let second = run(&executor, ws.path(), "and now?").await;
    assert_eq!(done(&second).status, TaskStatus::Completed, "{second:#?}");
    assert_eq!(done(&second).result.as_deref(), Some("Nothing else to do."));
    assert_eq!(
        init(&second).agent_session_id.as_deref(),
        Some(session.as_str())
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let resumed = &requests[2];
    for text in [
        "create hello",
        "I'll create the file.",
        "Done: created files/hello.txt.",
        "and now?",
    ] {
        assert!(
            resumed.contains_text(text),
            "task 2's request has {text:?}: {:#}",
            Value::Array(resumed.messages().to_vec())
        );
    }
    let results = resumed.tool_results();
    assert_eq!(results.len(), 1, "task 1's tool result is replayed");
    assert_eq!(results[0]["tool_use_id"], "toolu_resume_1");
    let roles: Vec<&str> = resumed
        .messages()
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert!(
        roles.ends_with(&["assistant", "user", "assistant", "user"]),
        "{roles:?}"
    );

    // A worker restart: a new executor finds the conversation through the workspace.
    drop(executor);
    let restarted = ClaudeCodeExecutor::new(config(&claude, &fake));
    let third = run(&restarted, ws.path(), "are you still there?").await;
    assert_eq!(done(&third).status, TaskStatus::Completed, "{third:#?}");
    assert_eq!(
        init(&third).agent_session_id.as_deref(),
        Some(session.as_str())
    );
    let last = fake.last_request().unwrap();
    for text in [
        "create hello",
        "and now?",
        "Nothing else to do.",
        "are you still there?",
    ] {
        assert!(last.contains_text(text), "task 3's request has {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_conversation_starts_a_new_one() {
    let Some(claude) = claude_cli("forgotten_conversation_starts_a_new_one") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("fresh start"));
    let ws = workspace();
    let unknown = "1475dbc3-8016-45ca-808a-9c2d8ea388d2";
    std::fs::create_dir(ws.path().join(SESSIONS_DIR)).unwrap();
    std::fs::write(
        ws.path().join(SESSIONS_DIR).join(SESSION_ID_FILE),
        format!("{unknown}\n"),
    )
    .unwrap();

    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let events = run(&executor, ws.path(), "hello again").await;
    let errors = error_codes(&events);
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0].0, HISTORY_LOST);
    assert!(errors[0].1.contains(unknown), "{}", errors[0].1);
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("fresh start"));
    let new_id = init(&events).agent_session_id.clone().unwrap();
    assert_ne!(new_id, unknown);
    assert_eq!(stored_session_id(ws.path()), Some(new_id));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_skill_is_listed_in_init() {
    let Some(claude) = claude_cli("workspace_skill_is_listed_in_init") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("hi"));
    let ws = workspace();
    let skill = ws.path().join(".claude/skills/greet");
    std::fs::create_dir_all(&skill).unwrap();
    std::fs::write(
        skill.join("SKILL.md"),
        "---\nname: greet\ndescription: Greets the user warmly\n---\n\n# Greet\n\nSay hello.\n",
    )
    .unwrap();

    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let events = run(&executor, ws.path(), "greet me").await;
    assert!(
        init(&events).skills.iter().any(|s| s == "greet"),
        "skills: {:?}",
        init(&events).skills
    );
    assert_eq!(done(&events).status, TaskStatus::Completed);
    assert!(fake.requests()[0].contains_text("Greets the user warmly"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_error_fails_with_its_text() {
    let Some(claude) = claude_cli("api_error_fails_with_its_text") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::error(500, "api_error", "fake 500 from the test"));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let events = run(&executor, ws.path(), "hello").await;

    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Failed, "{outcome:?}");
    let error = outcome.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("500") && error.contains("fake 500 from the test"),
        "{error}"
    );
    assert_eq!(outcome.result, None);
    let errors = error_codes(&events);
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0].0, "api_error");
    assert!(
        !events.iter().any(|e| matches!(e, TaskEvent::Text { .. })),
        "the synthetic API-error message is not assistant text: {events:#?}"
    );
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_turns_fails() {
    let Some(claude) = claude_cli("max_turns_fails") else {
        return;
    };
    let fake = FakeLlm::start().await;
    for i in 0..3 {
        fake.push(Reply::tool_use(
            format!("toolu_turn_{i}"),
            "Bash",
            json!({"command": format!("echo turn{i}"), "description": "Echo"}),
        ));
    }
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake).with_max_turns(2));
    let events = run(&executor, ws.path(), "loop").await;

    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Failed, "{outcome:?}");
    assert!(
        outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("maximum number of turns")),
        "{outcome:?}"
    );
    assert!(
        error_codes(&events)
            .iter()
            .any(|(code, _)| code == "max_turns"),
        "{events:#?}"
    );
    let results = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                TaskEvent::ToolResult {
                    is_error: false,
                    ..
                }
            )
        })
        .count();
    assert_eq!(results, 2, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_ends_canceled_and_kills_the_process() {
    let Some(claude) = claude_cli("cancel_mid_stream_ends_canceled_and_kills_the_process") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("a long story that never ends").hanging());
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let mut execution = executor
        .start(request(ws.path(), "tell me a long story"))
        .await
        .unwrap();
    assert!(
        fake.wait_for_requests(1, Duration::from_secs(60)).await,
        "the CLI called the model"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!processes_in(ws.path()).is_empty(), "the CLI is running");

    let canceled = Instant::now();
    execution.control.cancel().await.unwrap();
    let events = collect(&mut execution).await;
    let took = canceled.elapsed();
    eprintln!(
        "cancel → done in {took:?}: {:?}",
        events.iter().map(TaskEvent::kind).collect::<Vec<_>>()
    );
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Canceled, "{outcome:?}");
    assert!(took < Duration::from_secs(2), "done {took:?} after cancel");
    assert_no_processes(ws.path(), Duration::from_secs(1)).await;
    // Canceling a finished run is harmless; answering it is not possible.
    execution.control.cancel().await.unwrap();
    let late = execution
        .control
        .respond(InputResponse {
            request_id: "nope".into(),
            answer: String::new(),
            allow: Some(true),
        })
        .await
        .unwrap_err();
    assert_eq!(late.kind(), ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_right_after_start_ends_canceled() {
    let Some(claude) = claude_cli("cancel_right_after_start_ends_canceled") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::hang());
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let mut execution = executor.start(request(ws.path(), "hi")).await.unwrap();
    let canceled = Instant::now();
    execution.control.cancel().await.unwrap();
    let events = collect(&mut execution).await;
    let took = canceled.elapsed();
    eprintln!(
        "early cancel → done in {took:?}: {:?}",
        events.iter().map(TaskEvent::kind).collect::<Vec<_>>()
    );
    assert_eq!(done(&events).status, TaskStatus::Canceled, "{events:#?}");
    assert!(took < Duration::from_secs(2), "done {took:?} after cancel");
    assert_no_processes(ws.path(), Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_kills_the_process() {
    let Some(claude) = claude_cli("dropping_the_stream_kills_the_process") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::hang());
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let execution = executor.start(request(ws.path(), "hang")).await.unwrap();
    assert!(fake.wait_for_requests(1, Duration::from_secs(60)).await);
    let before = processes_in(ws.path());
    assert!(!before.is_empty(), "the CLI is running");

    let dropped = Instant::now();
    drop(execution);
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;
    eprintln!(
        "processes {before:?} gone {:?} after the drop",
        dropped.elapsed()
    );
    while fake.aborted_streams() == 0 && dropped.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.aborted_streams(), 1, "the model stream was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_timeout_fails_and_kills() {
    let Some(claude) = claude_cli("hard_timeout_fails_and_kills") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::hang());
    let ws = workspace();
    let executor =
        ClaudeCodeExecutor::new(config(&claude, &fake).with_timeout(Duration::from_secs(3)));
    let started = Instant::now();
    let events = run(&executor, ws.path(), "hang").await;
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(outcome.error.as_deref(), Some("timed out after 3s"));
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_no_processes(ws.path(), Duration::from_secs(1)).await;
}

/// Runs a Bash call in [`PermissionMode::Prompt`] and answers the prompt with `allow`.
async fn permission_run(allow: bool) {
    let test = format!("permission_prompt_allow_{allow}");
    let Some(claude) = claude_cli(&test) else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "toolu_bash_1",
        "Bash",
        json!({"command": "echo hi > {cwd}/files/bash-out.txt", "description": "Write hi to a file"}),
    ));
    fake.push(Reply::text("Bash step finished."));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(
        config(&claude, &fake).with_permission_mode(PermissionMode::Prompt),
    );
    let mut execution = executor
        .start(request(ws.path(), "run bash please"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let prompt = wait_for(&mut execution, &mut seen, |e| match e {
        TaskEvent::InputRequired(request) => Some(request.clone()),
        _ => None,
    })
    .await;
    assert_eq!(prompt.kind, InputKind::Permission);
    assert_eq!(prompt.tool_name.as_deref(), Some("Bash"));
    assert!(
        prompt.input.as_ref().is_some_and(|i| i["command"]
            .as_str()
            .is_some_and(|c| c.contains("bash-out.txt"))),
        "{prompt:?}"
    );
    assert!(!prompt.prompt.is_empty());
    assert!(
        !ws.path().join("files/bash-out.txt").exists(),
        "nothing ran before the answer"
    );
    // A wrong id is refused; the right one goes through.
    let wrong = execution
        .control
        .respond(InputResponse {
            request_id: "not-a-request".into(),
            answer: String::new(),
            allow: Some(true),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.kind(), ErrorKind::NotFound);
    execution
        .control
        .respond(InputResponse {
            request_id: prompt.request_id.clone(),
            answer: String::new(),
            allow: Some(allow),
        })
        .await
        .unwrap();
    seen.extend(collect(&mut execution).await);
    eprintln!(
        "{test}: {:?}",
        seen.iter().map(TaskEvent::kind).collect::<Vec<_>>()
    );

    let (content, is_error) = seen
        .iter()
        .find_map(|e| match e {
            TaskEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } if tool_use_id == "toolu_bash_1" => Some((content.clone(), *is_error)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no tool result: {seen:#?}"));
    let written = ws.path().join("files/bash-out.txt");
    if allow {
        assert!(!is_error, "{content}");
        assert_eq!(std::fs::read_to_string(&written).unwrap(), "hi\n");
    } else {
        assert!(is_error, "{content}");
        assert_eq!(content, "Denied by the user");
        assert!(!written.exists());
    }
    let outcome = done(&seen);
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("Bash step finished."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_prompt_allow_runs_the_tool() {
    permission_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_prompt_deny_refuses_the_tool() {
    permission_run(false).await;
}

/// The model key of the sandbox tests: must not reach the CLI's tools or MCP servers.
const KEY_MARKER: &str = "sk-KEY-MARKER-c1a7";
/// The "database" of the sandbox test.
const DB_MARKER: &str = "DB-SECRET-MARKER-0d4e";

/// The CLI confined by the worker's sandbox (bwrap) with Claude Code's own sandbox for `Bash`
/// inside it: its Bash, Read and MCP servers do not see the hidden data dir nor write outside
/// the workspace, and MCP servers (and, with socat, Bash commands) do not get the API key;
/// writing in the workspace works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_cli_keeps_its_tools_in_the_workspace() {
    let Some(claude) = claude_cli("sandboxed_cli_keeps_its_tools_in_the_workspace") else {
        return;
    };
    // The data dir outside /tmp (which the sandbox replaces anyway): the database, and the
    // workspace root with this session below it.
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data_path = data.path().canonicalize().unwrap();
    let db = data_path.join("anywork.db");
    std::fs::write(&db, DB_MARKER).unwrap();
    let ws = data_path.join("workspace").join("s1");
    std::fs::create_dir_all(ws.join("files")).unwrap();
    let probe = format!("env > mcp-env.txt; cat {} > mcp-db.txt 2>&1", db.display());
    std::fs::write(
        ws.join(".mcp.json"),
        json!({"mcpServers": {"probe": {"command": "sh", "args": ["-c", probe]}}}).to_string(),
    )
    .unwrap();
    let Ok(sandbox) = Sandbox::detect(
        SandboxConfig::default()
            .with_mode(SandboxMode::Bwrap)
            .with_hidden(&data_path)
            .with_network(false),
    ) else {
        let bar = "!".repeat(88);
        eprintln!("\n{bar}\n!! SKIPPED: bwrap does not work here (apt install bubblewrap).\n{bar}");
        assert!(
            std::env::var_os("CI").is_none(),
            "bwrap is required when CI is set"
        );
        return;
    };
    let fake = FakeLlm::start().await;
    let planted = data_path.join("planted");
    fake.push(Reply::tool_use(
        "toolu_bash",
        "Bash",
        json!({
            "command": format!(
                "env; cat {db}; echo evil > {planted}; echo mine > {{cwd}}/files/in.txt",
                db = db.display(),
                planted = planted.display()
            ),
            "description": "Probe"
        }),
    ));
    fake.push(Reply::tool_use(
        "toolu_read",
        "Read",
        json!({"file_path": db}),
    ));
    fake.push(Reply::text("done"));
    let executor = ClaudeCodeExecutor::new(
        config(&claude, &fake)
            .with_api_key(KEY_MARKER)
            .with_sandbox(sandbox.clone()),
    );
    let events = run(&executor, &ws, "probe the sandbox").await;
    assert_eq!(done(&events).status, TaskStatus::Completed, "{events:#?}");
    let result = |id: &str| {
        events
            .iter()
            .find_map(|e| match e {
                TaskEvent::ToolResult {
                    tool_use_id,
                    content,
                    ..
                } if tool_use_id == id => Some(content.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no result of {id}: {events:#?}"))
    };
    let bash = result("toolu_bash");
    assert!(bash.contains("No such file or directory"), "{bash}");
    assert!(bash.contains("Read-only file system"), "{bash}");
    assert!(!bash.contains(DB_MARKER), "{bash}");
    let read = result("toolu_read");
    assert!(!read.contains(DB_MARKER), "{read}");
    assert!(!planted.exists());
    assert_eq!(
        std::fs::read_to_string(ws.join("files/in.txt")).unwrap(),
        "mine\n"
    );
    if sandbox.has_socat() {
        // Claude Code's own sandbox runs: the key is unset for Bash.
        assert!(!bash.contains(KEY_MARKER), "{bash}");
    } else {
        eprintln!("socat missing: Claude Code's Bash sandbox was off (see the module docs)");
    }
    let mcp_env = std::fs::read_to_string(ws.join("mcp-env.txt")).expect("the MCP server ran");
    assert!(!mcp_env.contains(KEY_MARKER), "{mcp_env}");
    let mcp_db = std::fs::read_to_string(ws.join("mcp-db.txt")).unwrap();
    assert!(mcp_db.contains("No such file or directory"), "{mcp_db}");
    drop(executor);
    assert_no_processes(&ws, Duration::from_secs(5)).await;
}

/// Cancel while a sandboxed `Bash` command runs: the run ends `canceled` and the CLI, its
/// nested sandbox and the command are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_cli_cancel_kills_everything() {
    let Some(claude) = claude_cli("sandboxed_cli_cancel_kills_everything") else {
        return;
    };
    let Ok(sandbox) = Sandbox::detect(SandboxConfig::default().with_mode(SandboxMode::Bwrap))
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "bwrap is required when CI is set"
        );
        eprintln!("SKIPPED sandboxed_cli_cancel_kills_everything: bwrap does not work here");
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "toolu_sleep",
        "Bash",
        json!({"command": "echo started > {cwd}/files/started; sleep 3173", "description": "Wait"}),
    ));
    fake.push(Reply::text("done"));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake).with_sandbox(sandbox));
    let mut execution = executor
        .start(request(ws.path(), "wait a long time"))
        .await
        .unwrap();
    let deadline = Instant::now() + RUN_LIMIT;
    while !ws.path().join("files/started").exists() {
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    execution.control.cancel().await.unwrap();
    let events = collect(&mut execution).await;
    assert_eq!(done(&events).status, TaskStatus::Canceled, "{events:#?}");
    assert_no_processes(ws.path(), Duration::from_secs(5)).await;
    // By command line too: the namespaces may hide a process's working directory.
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("sleep\u{0}3173"))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleeping() {
        assert!(
            Instant::now() < deadline,
            "the sandboxed command outlived the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Warm processes, with the real CLI.

/// The pid of the one CLI process running in `ws`. A short-lived child of it (a script's
/// `rm`) may be seen beside it for a moment: the listing is read again until it is gone.
async fn only_process(ws: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = processes_in(ws);
        if pids.len() == 1 || Instant::now() > deadline {
            assert_eq!(pids.len(), 1, "one process in {}: {pids:?}", ws.display());
            return pids[0];
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outcome_cost(events: &[TaskEvent]) -> f64 {
    done(events).cost_usd.expect("a cost")
}

/// Two tasks of one session run in one process; the second sees the first's conversation and
/// costs its own turn only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_process_runs_the_sessions_next_task_with_its_context() {
    let Some(claude) = claude_cli("warm_process_runs_the_sessions_next_task_with_its_context")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("Noted: PLUM.").with_usage(20_000, 1_000));
    fake.push(Reply::text("The word was PLUM.").with_usage(20_000, 1_000));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));

    let first = run(&executor, ws.path(), "remember the word PLUM").await;
    assert_eq!(done(&first).status, TaskStatus::Completed, "{first:#?}");
    let pid = only_process(ws.path()).await;
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.started, stats.idle, stats.running),
        (1, 1, 0),
        "{stats:?}"
    );

    let second = run(&executor, ws.path(), "which word?").await;
    assert_eq!(done(&second).status, TaskStatus::Completed, "{second:#?}");
    assert_eq!(done(&second).result.as_deref(), Some("The word was PLUM."));
    assert_eq!(only_process(ws.path()).await, pid, "the same process");
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.reused), (1, 1), "{stats:?}");
    // Each turn starts with its own init, of the same conversation.
    assert_eq!(
        init(&second).agent_session_id,
        init(&first).agent_session_id
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    for text in ["remember the word PLUM", "Noted: PLUM.", "which word?"] {
        assert!(requests[1].contains_text(text), "turn 2 sees {text:?}");
    }
    assert!(requests[1].contains_text(SOUL_MARKER));
    let (c1, c2) = (outcome_cost(&first), outcome_cost(&second));
    assert!(c1 > 0.0);
    assert!(
        (c1 - c2).abs() < c1 * 0.2,
        "task 2 costs its own turn ({c2}), not both ({})",
        c1 + c2
    );
    drop(executor);
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;
}

/// A warm process goes after the idle window; the next task starts a new one that resumes
/// the conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_process_is_released_after_the_idle_window() {
    let Some(claude) = claude_cli("warm_process_is_released_after_the_idle_window") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("first answer"));
    fake.push(Reply::text("second answer"));
    let ws = workspace();
    let executor =
        ClaudeCodeExecutor::new(config(&claude, &fake).with_warm_idle(Duration::from_millis(500)));
    let first = run(&executor, ws.path(), "hello").await;
    assert_eq!(done(&first).status, TaskStatus::Completed);
    assert_no_processes(ws.path(), Duration::from_secs(10)).await;
    let stats = executor.warm_stats();
    assert_eq!((stats.released, stats.idle), (1, 0), "{stats:?}");

    let second = run(&executor, ws.path(), "again").await;
    assert_eq!(done(&second).status, TaskStatus::Completed);
    assert_eq!(executor.warm_stats().started, 2);
    assert!(fake.last_request().unwrap().contains_text("first answer"));
}

/// With a cap of two resident processes, a third session's task releases the least recently
/// used idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_cap_releases_the_least_recently_used() {
    let Some(claude) = claude_cli("warm_cap_releases_the_least_recently_used") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let (a, b, c) = (workspace(), workspace(), workspace());
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake).with_warm_max(2));
    for ws in [&a, &b] {
        assert_eq!(
            done(&run(&executor, ws.path(), "hi").await).status,
            TaskStatus::Completed
        );
    }
    let b_pid = only_process(b.path()).await;
    only_process(a.path()).await;
    // a is used again: b becomes the least recently used.
    assert_eq!(
        done(&run(&executor, a.path(), "hi").await).status,
        TaskStatus::Completed
    );
    assert_eq!(
        done(&run(&executor, c.path(), "hi").await).status,
        TaskStatus::Completed
    );
    assert_no_processes(b.path(), Duration::from_secs(5)).await;
    only_process(a.path()).await;
    only_process(c.path()).await;
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.started, stats.reused, stats.released, stats.idle),
        (3, 1, 1, 2),
        "{stats:?}"
    );
    assert!(!processes_in(b.path()).contains(&b_pid));
}

/// A canceled turn does not leave its process for the next task, which runs well in a new one
/// with the conversation so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceled_warm_turn_does_not_poison_the_next() {
    let Some(claude) = claude_cli("canceled_warm_turn_does_not_poison_the_next") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("Noted: PEAR."));
    fake.push(Reply::text("a long story that never ends").hanging());
    fake.push(Reply::text("The word was PEAR."));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let first = run(&executor, ws.path(), "remember the word PEAR").await;
    assert_eq!(done(&first).status, TaskStatus::Completed);
    let pid = only_process(ws.path()).await;

    let mut execution = executor
        .start(request(ws.path(), "tell me a long story"))
        .await
        .unwrap();
    assert!(fake.wait_for_requests(2, Duration::from_secs(60)).await);
    assert_eq!(
        only_process(ws.path()).await,
        pid,
        "the warm process runs it"
    );
    execution.control.cancel().await.unwrap();
    let events = collect(&mut execution).await;
    assert_eq!(done(&events).status, TaskStatus::Canceled, "{events:#?}");
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;

    let third = run(&executor, ws.path(), "which word?").await;
    assert_eq!(done(&third).status, TaskStatus::Completed, "{third:#?}");
    assert_eq!(done(&third).result.as_deref(), Some("The word was PEAR."));
    assert!(error_codes(&third).is_empty(), "{third:#?}");
    assert!(fake.last_request().unwrap().contains_text("Noted: PEAR."));
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.reused), (2, 1), "{stats:?}");
}

/// A warm process is not reused once the session's skills changed, nor after its workspace
/// was removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_skills_or_removed_workspace_release_the_warm_process() {
    let Some(claude) = claude_cli("changed_skills_or_removed_workspace_release_the_warm_process")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    let first = run(&executor, ws.path(), "hi").await;
    assert!(init(&first).skills.iter().all(|s| s != "greet"));
    let old = only_process(ws.path()).await;
    let skill = ws.path().join(".claude/skills/greet");
    std::fs::create_dir_all(&skill).unwrap();
    std::fs::write(
        skill.join("SKILL.md"),
        "---\nname: greet\ndescription: Greets the user warmly\n---\n\nSay hello.\n",
    )
    .unwrap();
    let second = run(&executor, ws.path(), "greet me").await;
    assert!(
        init(&second).skills.iter().any(|s| s == "greet"),
        "{second:#?}"
    );
    assert_ne!(only_process(ws.path()).await, old, "a new process");
    assert_eq!(executor.warm_stats().started, 2);

    // The session's workspace is purged (moved away here, to watch its processes).
    let moved = tempfile::tempdir().unwrap();
    let gone = moved.path().join("purged");
    std::fs::rename(ws.path(), &gone).unwrap();
    assert_no_processes(&gone, Duration::from_secs(15)).await;
    assert_eq!(executor.warm_stats().idle, 0);
}

// ---------------------------------------------------------------------------------------------
// A spare process for a one-session worker, with the real CLI.

/// A worker root whose default SOUL.md holds [`SOUL_MARKER`], and the folders (only) of
/// `session`'s workspace, as `WorkerState::prestart` leaves them.
fn spare_root(session: &SessionId) -> (tempfile::TempDir, Workspace, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(root.path());
    workspace.init().unwrap();
    workspace
        .write_doc(
            None,
            WorkspaceDoc::Soul,
            &format!("# Soul\n\nYou are careful. {SOUL_MARKER}\n"),
        )
        .unwrap();
    let ws = workspace.ensure_session_dirs(session).unwrap();
    (root, workspace, ws)
}

/// What the model is sent, with `ws` written as `<ws>`, for comparing two runs.
fn prompt_strings(request: &anywork_test::fake_llm::RecordedRequest, ws: &Path) -> Vec<String> {
    fn visit(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| visit(i, out)),
            Value::Object(map) => map.values().for_each(|i| visit(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for part in ["system", "messages"] {
        visit(&request.body[part], &mut out);
    }
    let ws = std::fs::canonicalize(ws).unwrap().display().to_string();
    // The CLI's folder of the project under CLAUDE_CONFIG_DIR: the path, `/` and `.` as `-`.
    let project: String = ws
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    out.iter()
        .map(|s| s.replace(&ws, "<ws>").replace(&project, "<project>"))
        .collect()
}

/// The spare runs the session's first task: no new process, and the model is sent the same
/// system prompt and messages as by a CLI started for the task (the default SOUL.md, written
/// into the workspace only after the spare started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_runs_the_first_task_as_a_new_process_would() {
    let Some(claude) = claude_cli("a_spare_runs_the_first_task_as_a_new_process_would") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Hello from the fake."));
    let session = SessionId::new("s-spare").unwrap();
    let (root, workspace, ws) = spare_root(&session);
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    assert!(executor.prestart(&ws, root.path()).await.unwrap());
    let pid = only_process(&ws).await;
    assert!(!ws.join("SOUL.md").exists(), "left for /prepare to write");
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.started, stats.spares, stats.idle),
        (1, 1, 1),
        "{stats:?}"
    );

    // What /prepare (no server defaults) and /chat do, then the task.
    workspace
        .ensure_session_seeded(&session, None, None)
        .unwrap();
    let events = run(&executor, &ws, "hello spare").await;
    assert_eq!(done(&events).status, TaskStatus::Completed, "{events:#?}");
    assert_eq!(texts(&events), "Hello from the fake.");
    assert_eq!(only_process(&ws).await, pid, "the spare ran it");
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.spares_used), (1, 1), "{stats:?}");
    let with_spare = fake.last_request().unwrap();
    assert!(with_spare.contains_text(SOUL_MARKER));

    // The same first task in a CLI started for it.
    let other = SessionId::new("s-no-spare").unwrap();
    let ws2 = workspace.ensure_session(&other).unwrap();
    let cold = ClaudeCodeExecutor::new(config(&claude, &fake).with_spare(false));
    assert!(!cold.prestart(&ws2, root.path()).await.unwrap(), "off");
    let events = run(&cold, &ws2, "hello spare").await;
    assert_eq!(done(&events).status, TaskStatus::Completed, "{events:#?}");
    let without = fake.last_request().unwrap();
    let (a, b) = (
        prompt_strings(&with_spare, &ws),
        prompt_strings(&without, &ws2),
    );
    let differ: Vec<(usize, &String, Option<&String>)> = a
        .iter()
        .enumerate()
        .filter(|(i, s)| b.get(*i) != Some(*s))
        .map(|(i, s)| (i, s, b.get(i)))
        .collect();
    assert!(
        differ.is_empty() && a.len() == b.len(),
        "the spare's first request is the one a new process sends; differing: {differ:#?}"
    );
    drop(executor);
    drop(cold);
    assert_no_processes(&ws, Duration::from_secs(2)).await;
}

/// When `/prepare` brings the server's own SOUL.md default (or skills, MCP servers), the spare
/// does not match the workspace any more: it is released and the task runs in a new CLI with
/// what was prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_is_released_when_prepare_brings_other_settings() {
    let Some(claude) = claude_cli("a_spare_is_released_when_prepare_brings_other_settings") else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let session = SessionId::new("s-spare-2").unwrap();
    let (root, workspace, ws) = spare_root(&session);
    let executor = ClaudeCodeExecutor::new(config(&claude, &fake));
    assert!(executor.prestart(&ws, root.path()).await.unwrap());
    let spare = only_process(&ws).await;
    workspace
        .ensure_session_seeded(&session, Some("Server soul SERVER-SOUL-5e1d"), None)
        .unwrap();
    let events = run(&executor, &ws, "hi").await;
    assert_eq!(done(&events).status, TaskStatus::Completed, "{events:#?}");
    let request = fake.last_request().unwrap();
    assert!(request.contains_text("SERVER-SOUL-5e1d"));
    assert!(
        !request.contains_text(SOUL_MARKER),
        "not the worker's default"
    );
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.started, stats.spares, stats.spares_used),
        (2, 1, 0),
        "{stats:?}"
    );
    wait_gone(&ws, spare).await;
}

/// Waits until process `pid` no longer runs in `ws`; panics after 5 s.
async fn wait_gone(ws: &Path, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_in(ws).contains(&pid) {
        assert!(Instant::now() < deadline, "process {pid} was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Without the real CLI.

#[tokio::test]
async fn missing_binary_is_a_clear_start_error() {
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new("/nonexistent/bin/claude"));
    let error = match executor.start(request(ws.path(), "hi")).await {
        Ok(_) => panic!("started without a binary"),
        Err(error) => error,
    };
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    let message = error.to_string();
    assert!(message.contains("/nonexistent/bin/claude"), "{message}");
    assert!(message.contains("CLAUDE_BIN"), "{message}");
    assert!(
        message.contains("pip install claude-agent-sdk"),
        "{message}"
    );
}

/// An executable shell script standing in for the CLI.
fn script(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-claude.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn exit_without_result_fails_with_stderr() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(
        bin_dir.path(),
        r#"read -r line
echo 'this is not JSON'
echo '{"type":"mystery","x":1}'
echo '{"type":"assistant","message":{"content":[{"type":"text","text":"partial"}]}}'
echo 'Error: Session ID 123 is already in use.' >&2
exit 3"#,
    );
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(bin));
    let events = run(&executor, ws.path(), "hi").await;
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0], TaskEvent::text("partial"));
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Failed);
    let error = outcome.error.as_deref().unwrap();
    assert!(error.contains("without a result"), "{error}");
    assert!(error.contains("exit status: 3"), "{error}");
    assert!(error.contains("is already in use"), "{error}");
}

#[tokio::test]
async fn over_long_lines_are_skipped_and_a_hung_exit_is_killed() {
    let bin_dir = tempfile::tempdir().unwrap();
    // Reads the message, writes an over-long line and a result, then ignores stdin's end.
    let bin = script(
        bin_dir.path(),
        r#"read -r line
case "$line" in *'"content":"hi"'*) ;; *) echo "unexpected stdin: $line" >&2; exit 9;; esac
head -c 5000 /dev/zero | tr '\0' a; echo
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok","num_turns":1,"duration_ms":5,"total_cost_usd":0.5,"usage":{"input_tokens":1,"output_tokens":2}}'
sleep 30"#,
    );
    let ws = workspace();
    // One process per task: the hung exit is what is tested.
    let executor = ClaudeCodeExecutor::new(
        ClaudeCodeConfig::new(bin)
            .with_max_line_bytes(1024)
            .with_warm_max(0),
    );
    let started = Instant::now();
    let events = run(&executor, ws.path(), "hi").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let errors = error_codes(&events);
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0].0, LINE_TOO_LONG);
    assert!(
        matches!(&events[1], TaskEvent::Usage { usage, cost_usd: Some(c) } if usage.output_tokens == 2 && *c == 0.5),
        "{events:#?}"
    );
    let outcome = done(&events);
    assert_eq!(outcome.status, TaskStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("ok"));
    assert_eq!(outcome.num_turns, 1);
    assert_no_processes(ws.path(), Duration::from_secs(1)).await;
}

/// A stand-in for the long-lived CLI: one `init` and one `result` per stdin line, its pid and
/// turn in the result, a cumulative cost of 1.0 per turn; with `die-on-second` in its
/// workspace it exits silently on its second line.
const LONG_LIVED: &str = r#"n=0
while read -r line; do
  n=$((n+1))
  if [ "$n" -eq 2 ] && [ -e die-on-second ]; then exit 1; fi
  echo '{"type":"system","subtype":"init","session_id":"warm-script-1","model":"m","tools":[]}'
  echo "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"pid $$ turn $n\",\"num_turns\":1,\"duration_ms\":1,\"total_cost_usd\":$n,\"session_id\":\"warm-script-1\",\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}"
done"#;

fn result_text(events: &[TaskEvent]) -> String {
    let outcome = done(events);
    assert_eq!(outcome.status, TaskStatus::Completed, "{events:#?}");
    outcome.result.clone().unwrap_or_default()
}

#[tokio::test]
async fn warm_turns_share_a_process_and_cost_their_own_turn() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(bin_dir.path(), LONG_LIVED);
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(bin));
    let mut pids = Vec::new();
    for turn in 1..=3 {
        let events = run(&executor, ws.path(), "hi").await;
        let text = result_text(&events);
        let (pid, n) = text
            .strip_prefix("pid ")
            .and_then(|t| t.split_once(" turn "))
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(n, turn.to_string(), "{text}");
        pids.push(pid.to_owned());
        assert_eq!(
            done(&events).cost_usd,
            Some(1.0),
            "turn {turn}: {events:#?}"
        );
    }
    assert!(pids.iter().all(|p| *p == pids[0]), "{pids:?}");
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.reused), (1, 2), "{stats:?}");
    drop(executor);
    assert_no_processes(ws.path(), Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_warm_process_that_dies_silently_is_replaced_in_the_same_task() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(bin_dir.path(), LONG_LIVED);
    let ws = workspace();
    std::fs::write(ws.path().join("die-on-second"), "").unwrap();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(bin));
    assert!(result_text(&run(&executor, ws.path(), "one").await).ends_with("turn 1"));
    let events = run(&executor, ws.path(), "two").await;
    assert!(
        result_text(&events).ends_with("turn 1"),
        "a new process: {events:#?}"
    );
    assert!(error_codes(&events).is_empty(), "{events:#?}");
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.reused), (2, 1), "{stats:?}");
}

#[tokio::test]
async fn a_failed_turn_is_not_kept_warm() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(
        bin_dir.path(),
        r#"while read -r line; do
  echo '{"type":"result","subtype":"success","is_error":true,"terminal_reason":"api_error","result":"API Error: 500","session_id":"s-fail","usage":{"input_tokens":1,"output_tokens":1}}'
done"#,
    );
    let ws = workspace();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(bin));
    for _ in 0..2 {
        let events = run(&executor, ws.path(), "hi").await;
        assert_eq!(done(&events).status, TaskStatus::Failed, "{events:#?}");
        assert_no_processes(ws.path(), Duration::from_secs(3)).await;
    }
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.started, stats.reused, stats.idle),
        (2, 0, 0),
        "{stats:?}"
    );
}

/// `WorkerState::prestart` (a worker serving one session) creates the session's folders but
/// not its SOUL.md, so the server's defaults still apply at `/prepare`; the spare then runs
/// the first task. Off with `CLAUDE_SPARE=0`; never past the cap, never pushing out a warm
/// process.
#[tokio::test]
async fn a_spare_is_started_within_the_cap_and_can_be_turned_off() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(bin_dir.path(), LONG_LIVED);
    let root = tempfile::tempdir().unwrap();
    let session = SessionId::new("s-one").unwrap();

    let off = std::sync::Arc::new(ClaudeCodeExecutor::new(
        ClaudeCodeConfig::new(&bin).with_spare(false),
    ));
    let state = anywork_worker::WorkerState::new(
        anywork_worker::WorkerConfig::new(root.path()),
        off.clone(),
    )
    .unwrap();
    assert!(!state.prestart(&session).await.unwrap());
    let ws = root
        .path()
        .join(anywork_worker::encode_session_id(&session));
    assert!(ws.join(".claude/skills").is_dir(), "the folders are made");
    assert!(processes_in(&ws).is_empty());
    drop(state);

    let executor = std::sync::Arc::new(ClaudeCodeExecutor::new(ClaudeCodeConfig::new(&bin)));
    let state = anywork_worker::WorkerState::new(
        anywork_worker::WorkerConfig::new(root.path()),
        executor.clone(),
    )
    .unwrap();
    assert!(state.prestart(&session).await.unwrap());
    assert!(
        !state.prestart(&session).await.unwrap(),
        "one spare per session"
    );
    let spare = only_process(&ws).await;
    assert!(!ws.join("SOUL.md").exists());
    state
        .workspace()
        .prepare_seeded(
            &session,
            &[],
            &Default::default(),
            None,
            Some("server soul"),
            None,
        )
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(ws.join("SOUL.md")).unwrap(),
        "server soul",
        "the server's default applies"
    );
    // The prompt changed (the server's SOUL.md): the spare goes, a new process runs it.
    let events = run(&executor, &ws, "hi").await;
    assert!(result_text(&events).ends_with("turn 1"));
    wait_gone(&ws, spare).await;
    let stats = executor.warm_stats();
    assert_eq!(
        (stats.spares, stats.spares_used, stats.started),
        (1, 0, 2),
        "{stats:?}"
    );

    // A cap of one, taken by a warm process of another session: no spare.
    let capped = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(&bin).with_warm_max(1));
    let a = workspace();
    assert!(result_text(&run(&capped, a.path(), "hi").await).ends_with("turn 1"));
    let b = workspace();
    assert!(!capped.prestart(b.path(), root.path()).await.unwrap());
    assert!(processes_in(b.path()).is_empty());
    only_process(a.path()).await;
    // Room for it: the spare runs b's first task, in its own process.
    let roomy = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(&bin).with_warm_max(2));
    assert!(roomy.prestart(b.path(), root.path()).await.unwrap());
    let spare = only_process(b.path()).await;
    let text = result_text(&run(&roomy, b.path(), "hi").await);
    assert_eq!(text, format!("pid {spare} turn 1"));
    let stats = roomy.warm_stats();
    assert_eq!((stats.started, stats.spares_used), (1, 1), "{stats:?}");
}

/// A spare that dies before writing anything for its task is replaced in the same task.
#[tokio::test]
async fn a_spare_that_dies_silently_is_replaced_in_the_same_task() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = script(
        bin_dir.path(),
        &format!("if [ -e die-first ]; then rm die-first; read -r line; exit 1; fi\n{LONG_LIVED}"),
    );
    let root = tempfile::tempdir().unwrap();
    let ws = workspace();
    std::fs::write(ws.path().join("die-first"), "").unwrap();
    let executor = ClaudeCodeExecutor::new(ClaudeCodeConfig::new(bin));
    assert!(executor.prestart(ws.path(), root.path()).await.unwrap());
    let spare = only_process(ws.path()).await;
    let events = run(&executor, ws.path(), "hi").await;
    let text = result_text(&events);
    assert!(text.ends_with("turn 1"), "{text}");
    assert!(
        !text.contains(&format!("pid {spare} ")),
        "a new process: {text}"
    );
    assert!(error_codes(&events).is_empty(), "{events:#?}");
    let stats = executor.warm_stats();
    assert_eq!((stats.started, stats.spares_used), (2, 1), "{stats:?}");
}
