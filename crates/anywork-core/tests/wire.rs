//! Golden JSON: these strings are the wire contract between server, worker, store and browser.
//! Changing one breaks deployed clients; do it on purpose only.

use anywork_core::ws::{ClientMessage, ServerMessage};
use anywork_core::{
    InputKind, InputRequest, InputResponse, SessionId, TaskEvent, TaskId, TaskLog, TaskOutcome,
    TaskStatus, Timestamp, TokenUsage,
};
use serde_json::{Value, json};

fn golden(event: TaskEvent, expected: Value) {
    let got = serde_json::to_value(&event).unwrap();
    assert_eq!(got, expected, "serialized form of {event:?}");
    let back: TaskEvent = serde_json::from_value(expected).unwrap();
    assert_eq!(back, event, "parsed form");
}

#[test]
fn init() {
    golden(
        TaskEvent::Init(anywork_core::AgentInit {
            model: "claude-sonnet-5-5".into(),
            agent_session_id: Some("0b1c".into()),
            tools: vec!["Bash".into(), "mcp__calc__add".into()],
            skills: vec!["greet".into()],
            mcp_servers: vec![anywork_core::McpServerStatus {
                name: "calc".into(),
                status: "connected".into(),
            }],
        }),
        json!({"type": "init", "content": "claude-sonnet-5-5", "metadata": {
            "agent_session_id": "0b1c", "tools": ["Bash", "mcp__calc__add"], "skills": ["greet"],
            "mcp_servers": [{"name": "calc", "status": "connected"}]}}),
    );
}

#[test]
fn text_and_thinking() {
    golden(
        TaskEvent::text("Hello"),
        json!({"type": "text", "content": "Hello", "metadata": {}}),
    );
    golden(
        TaskEvent::Thinking { text: "hmm".into() },
        json!({"type": "thinking", "content": "hmm", "metadata": {}}),
    );
}

#[test]
fn tool_call_and_result() {
    golden(
        TaskEvent::ToolCall {
            id: "toolu_1".into(),
            name: "Write".into(),
            input: json!({"file_path": "/w/files/a.txt", "content": "hi"}),
        },
        json!({"type": "tool_call", "content": "Write",
               "metadata": {"id": "toolu_1", "input": {"file_path": "/w/files/a.txt", "content": "hi"}}}),
    );
    golden(
        TaskEvent::ToolResult {
            tool_use_id: "toolu_1".into(),
            content: "ok".into(),
            is_error: false,
        },
        json!({"type": "tool_result", "content": "ok",
               "metadata": {"tool_use_id": "toolu_1", "is_error": false}}),
    );
}

#[test]
fn input_required_usage_status_error() {
    golden(
        TaskEvent::InputRequired(InputRequest {
            request_id: "r1".into(),
            kind: InputKind::Permission,
            prompt: "Allow Bash?".into(),
            tool_name: Some("Bash".into()),
            input: Some(json!({"command": "ls"})),
            options: vec![],
        }),
        json!({"type": "input_required", "content": "Allow Bash?",
               "metadata": {"request_id": "r1", "kind": "permission", "tool_name": "Bash",
                            "input": {"command": "ls"}}}),
    );
    golden(
        TaskEvent::Usage {
            usage: TokenUsage {
                input_tokens: 10,
                output_tokens: 5,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 2,
            },
            cost_usd: Some(0.25),
        },
        json!({"type": "usage", "content": "", "metadata": {"usage": {
            "input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2}, "cost_usd": 0.25}}),
    );
    golden(
        TaskEvent::Status {
            status: TaskStatus::InputRequired,
        },
        json!({"type": "status", "content": "input_required", "metadata": {}}),
    );
    golden(
        TaskEvent::Error {
            message: "API Error: 500".into(),
            code: Some("api_error".into()),
        },
        json!({"type": "error", "content": "API Error: 500", "metadata": {"code": "api_error"}}),
    );
    golden(
        TaskEvent::error("boom"),
        json!({"type": "error", "content": "boom", "metadata": {}}),
    );
}

#[test]
fn progress_tells_what_a_task_waits_for() {
    golden(
        TaskEvent::Progress(
            anywork_core::Progress::new(
                anywork_core::Progress::MODEL_RETRY,
                "the model API is overloaded (529); trying again in 2 s (attempt 2 of 5)",
            )
            .attempt(2, 5)
            .retry(2000, "overloaded"),
        ),
        json!({"type": "progress",
               "content": "the model API is overloaded (529); trying again in 2 s (attempt 2 of 5)",
               "metadata": {"stage": "model_retry", "attempt": 2, "max_attempts": 5,
                            "retry_in_ms": 2000, "reason": "overloaded"}}),
    );
    golden(
        TaskEvent::Progress(anywork_core::Progress::new("worker", "starting a worker")),
        json!({"type": "progress", "content": "starting a worker", "metadata": {"stage": "worker"}}),
    );
}

#[test]
fn done_carries_the_outcome() {
    let mut outcome = TaskOutcome::completed("The answer is 42.");
    outcome.cost_usd = Some(0.01);
    outcome.num_turns = 2;
    outcome.duration_ms = 1500;
    outcome.usage.input_tokens = 7;
    golden(
        TaskEvent::Done(outcome),
        json!({"type": "done", "content": "The answer is 42.", "metadata": {
            "status": "completed", "cost_usd": 0.01, "num_turns": 2, "duration_ms": 1500,
            "usage": {"input_tokens": 7, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}}),
    );
    golden(
        TaskEvent::Done(TaskOutcome::failed("claude exited with code 1")),
        json!({"type": "done", "content": "", "metadata": {
            "status": "failed", "error": "claude exited with code 1", "num_turns": 0,
            "duration_ms": 0, "usage": {"input_tokens": 0, "output_tokens": 0,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
    );
}

#[test]
fn the_original_workers_done_event_is_understood() {
    let e: TaskEvent = serde_json::from_value(json!({"type": "done", "content": "",
        "metadata": {"cost_usd": 0.5, "num_turns": 3, "duration_ms": 900}}))
    .unwrap();
    let TaskEvent::Done(o) = e else {
        panic!("not done")
    };
    assert_eq!(o.status, TaskStatus::Completed);
    assert_eq!(
        (o.cost_usd, o.num_turns, o.duration_ms),
        (Some(0.5), 3, 900)
    );
    // Missing metadata and content are fine too.
    let e: TaskEvent = serde_json::from_str(r#"{"type":"text"}"#).unwrap();
    assert_eq!(e, TaskEvent::text(""));
}

#[test]
fn unknown_types_are_kept_and_bad_metadata_is_refused() {
    let raw = json!({"type": "percent_done", "content": "50%", "metadata": {"pct": 50}});
    let e: TaskEvent = serde_json::from_value(raw.clone()).unwrap();
    assert_eq!(e.kind(), "percent_done");
    assert_eq!(serde_json::to_value(&e).unwrap(), raw);

    let err = serde_json::from_value::<TaskEvent>(
        json!({"type": "tool_result", "metadata": {"is_error": "yes"}}),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("`tool_result` event has invalid metadata"),
        "{err}"
    );
    assert!(
        serde_json::from_value::<TaskEvent>(json!({"type": "status", "content": "x"})).is_err()
    );
    assert!(
        serde_json::from_value::<TaskEvent>(
            json!({"type": "done", "metadata": {"status": "running"}})
        )
        .is_err()
    );
    assert!(serde_json::from_value::<TaskEvent>(json!({"content": "no type"})).is_err());
}

#[test]
fn task_log_is_flat() {
    let id: TaskId = "01936f4e-8f5a-7cc0-9a2b-000000000001".parse().unwrap();
    let log = TaskLog {
        task_id: id,
        seq: 1,
        event: TaskEvent::text("hi"),
        timestamp: Timestamp(1_700_000_000_000),
    };
    let v = json!({"task_id": "01936f4e-8f5a-7cc0-9a2b-000000000001", "seq": 1, "type": "text",
                   "content": "hi", "metadata": {}, "timestamp": 1_700_000_000_000i64});
    assert_eq!(serde_json::to_value(&log).unwrap(), v);
    assert_eq!(serde_json::from_value::<TaskLog>(v).unwrap(), log);
}

#[test]
fn websocket_client_messages() {
    let chat: ClientMessage =
        serde_json::from_str(r#"{"type":"chat","session_id":"s1","message":"hi"}"#).unwrap();
    assert_eq!(
        chat,
        ClientMessage::Chat {
            session_id: Some(SessionId::new("s1").unwrap()),
            message: "hi".into(),
            skills: vec![],
            mcp_servers: Default::default(),
        }
    );
    assert_eq!(
        serde_json::from_str::<ClientMessage>(r#"{"type":"ping"}"#).unwrap(),
        ClientMessage::Ping
    );
    let id = TaskId::generate();
    let resume: ClientMessage = serde_json::from_value(
        json!({"type": "resume", "task_id": id.to_string(), "after_seq": 7}),
    )
    .unwrap();
    assert_eq!(
        resume,
        ClientMessage::Resume {
            task_id: id,
            after_seq: 7
        }
    );
    let answer: ClientMessage = serde_json::from_value(json!({"type": "input_response",
        "task_id": id.to_string(), "request_id": "r1", "allow": true}))
    .unwrap();
    assert_eq!(
        answer,
        ClientMessage::InputResponse {
            task_id: id,
            response: InputResponse {
                request_id: "r1".into(),
                answer: String::new(),
                allow: Some(true)
            }
        }
    );
    assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"chat"}"#).is_err());
    assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"dance"}"#).is_err());
    // The original web client's and server's chat forms.
    let original: ClientMessage = serde_json::from_value(json!({"type": "chat",
        "session_id": null, "message": "hi", "skills": [], "mcp_servers": []}))
    .unwrap();
    assert_eq!(
        original,
        ClientMessage::Chat {
            session_id: None,
            message: "hi".into(),
            skills: vec![],
            mcp_servers: Default::default(),
        }
    );
    let ClientMessage::Chat {
        skills,
        mcp_servers,
        ..
    } = serde_json::from_value(json!({"type": "chat", "message": "hi",
        "skills": ["code-review"],
        "mcp_servers": [{"name": "github", "transport": "stdio", "command": "npx",
                         "args": ["-y", "gh"], "env": {"T": "x"}},
                        {"name": "docs", "transport": "http", "url": "https://d.example/mcp"}]}))
    .unwrap()
    else {
        panic!("not a chat")
    };
    assert!(skills[0].is_name_only() && skills[0].name == "code-review");
    assert_eq!(mcp_servers.keys().collect::<Vec<_>>(), ["docs", "github"]);
}

#[test]
fn websocket_server_messages() {
    let s = SessionId::new("s1").unwrap();
    let t: TaskId = "01936f4e-8f5a-7cc0-9a2b-000000000002".parse().unwrap();
    let cases = [
        (
            ServerMessage::SessionCreated {
                session_id: s.clone(),
            },
            json!({"type": "session_created", "session_id": "s1"}),
        ),
        (
            ServerMessage::TaskCreated {
                session_id: s.clone(),
                task_id: t,
            },
            json!({"type": "task_created", "session_id": "s1",
                   "task_id": "01936f4e-8f5a-7cc0-9a2b-000000000002"}),
        ),
        (
            ServerMessage::SessionTitle {
                session_id: s.clone(),
                title: "Weather".into(),
            },
            json!({"type": "session_title", "content": "Weather", "session_id": "s1"}),
        ),
        (ServerMessage::Pong, json!({"type": "pong"})),
        (
            ServerMessage::error("Invalid JSON"),
            json!({"type": "error", "content": "Invalid JSON", "metadata": {}}),
        ),
        (
            ServerMessage::Refused {
                session_id: Some(s.clone()),
                request_id: Some(json!("r-7")),
                code: "not_found".into(),
                message: "session s1 does not exist".into(),
            },
            json!({"type": "error", "content": "session s1 does not exist",
                   "metadata": {"code": "not_found", "created": false},
                   "session_id": "s1", "request_id": "r-7"}),
        ),
        (
            ServerMessage::Event {
                session_id: Some(s.clone()),
                task_id: Some(t),
                seq: Some(3),
                event: TaskEvent::text("Hi"),
            },
            json!({"type": "text", "content": "Hi", "metadata": {}, "session_id": "s1",
                   "task_id": "01936f4e-8f5a-7cc0-9a2b-000000000002", "seq": 3}),
        ),
    ];
    for (msg, expected) in cases {
        assert_eq!(serde_json::to_value(&msg).unwrap(), expected);
        assert_eq!(
            serde_json::from_value::<ServerMessage>(expected).unwrap(),
            msg
        );
    }
    assert!(serde_json::from_value::<ServerMessage>(json!({"type": "session_created"})).is_err());
}

/// The task as `GET /api/tasks/:id`, session task lists, cancel answers and push
/// notifications send it: camelCase, unix seconds, nulls for what is not known yet, and the
/// keys in the order they have always been sent (sorted), byte for byte.
#[test]
fn rest_task() {
    let mut task = anywork_core::NewTask::from_request(
        SessionId::new("s1").unwrap(),
        anywork_core::TaskRequest::new("github", "Fix the bug"),
    )
    .into_task();
    task.id = "01936f4e-8f5a-7cc0-9a2b-000000000002".parse().unwrap();
    task.created_at = Timestamp(1_700_000_000_123);
    task.started_at = Some(Timestamp(1_700_000_001_999));
    task.status = TaskStatus::Failed;
    task.error = Some("the worker went away".into());
    task.usage = TokenUsage {
        input_tokens: 10,
        output_tokens: 5,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 2,
    };
    task.num_turns = 2;
    task.worker_id = Some("w-1".into());
    let expected = json!({
        "id": "01936f4e-8f5a-7cc0-9a2b-000000000002",
        "sessionId": "s1",
        "channelType": "github",
        "status": "failed",
        "message": "Fix the bug",
        "result": null,
        "structuredOutput": null,
        "error": "the worker went away",
        "costUsd": null,
        "usage": {"input_tokens": 10, "output_tokens": 5,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2},
        "numTurns": 2,
        "durationMs": null,
        "workerId": "w-1",
        "createdAt": 1_700_000_000,
        "startedAt": 1_700_000_001,
        "finishedAt": null,
    });
    let wire = anywork_core::WireTask::from(&task);
    assert_eq!(serde_json::to_value(&wire).unwrap(), expected);
    assert_eq!(
        serde_json::to_string(&wire).unwrap(),
        expected.to_string(),
        "the same bytes as before, key order included"
    );
    let back: anywork_core::WireTask = serde_json::from_value(expected).unwrap();
    assert_eq!(back, wire, "clients can read it back");
}

#[test]
fn the_original_workers_health_and_cancel_are_understood() {
    use anywork_core::worker_api::{CancelRequest, WorkerHealth};
    let health: WorkerHealth = serde_json::from_value(json!({"status": "ok",
        "engine": "claude-agent-sdk", "workspace": "/workspace", "active_sessions": 2}))
    .unwrap();
    assert_eq!(
        (health.status.as_str(), health.executor.as_str()),
        ("ok", "claude-agent-sdk")
    );
    assert!(health.busy_sessions.is_empty());
    // The cancel carries the session too: the original's worker cancels by session.
    let id = TaskId::generate();
    let cancel = CancelRequest {
        task_id: id,
        session_id: Some(SessionId::new("s1").unwrap()),
    };
    assert_eq!(
        serde_json::to_value(&cancel).unwrap(),
        json!({"task_id": id.to_string(), "session_id": "s1"})
    );
    let bare: CancelRequest = serde_json::from_value(json!({"task_id": id.to_string()})).unwrap();
    assert_eq!(bare.session_id, None);
}
