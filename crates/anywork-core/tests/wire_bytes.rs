//! Golden bytes: the exact text of WebSocket event frames and of stored log payloads, key
//! order included (`tests/wire.rs` compares JSON values, which ignore it). A client that reads
//! frames with its own parser, and every stored log, see these strings.

use anywork_core::ws::ServerMessage;
use anywork_core::{
    AgentInit, InputKind, InputRequest, McpServerStatus, Progress, SessionId, TaskEvent, TaskId,
    TaskOutcome, TaskStatus, TokenUsage, WireEvent,
};
use serde_json::json;

/// One event of every type, with the text that is hard to escape.
fn events() -> Vec<TaskEvent> {
    let mut done = TaskOutcome::completed("The answer is 42.");
    done.cost_usd = Some(0.01);
    done.num_turns = 2;
    done.duration_ms = 1500;
    done.usage.input_tokens = 7;
    done.structured_output = Some(json!({"b": 1, "a": [true, null]}));
    vec![
        TaskEvent::Init(AgentInit {
            model: "claude-sonnet-5-5".into(),
            agent_session_id: Some("0b1c".into()),
            tools: vec!["Bash".into()],
            skills: vec![],
            mcp_servers: vec![McpServerStatus {
                name: "calc".into(),
                status: "connected".into(),
            }],
        }),
        TaskEvent::Status {
            status: TaskStatus::Running,
        },
        TaskEvent::text("Hello \"wörld\" \u{1F600}\n\t\u{0}</script>"),
        TaskEvent::Thinking { text: "hmm".into() },
        TaskEvent::ToolCall {
            id: "toolu_1".into(),
            name: "Write".into(),
            input: json!({"z": 1, "file_path": "/w/a.txt", "n": 1.5e300}),
        },
        TaskEvent::ToolResult {
            tool_use_id: "toolu_1".into(),
            content: "ok".into(),
            is_error: true,
        },
        TaskEvent::InputRequired(InputRequest {
            request_id: "r1".into(),
            kind: InputKind::Permission,
            prompt: "Allow Bash?".into(),
            tool_name: Some("Bash".into()),
            input: Some(json!({"command": "ls"})),
            options: vec![],
        }),
        TaskEvent::Usage {
            usage: TokenUsage {
                input_tokens: 10,
                output_tokens: 5,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 2,
            },
            cost_usd: Some(0.25),
        },
        TaskEvent::Progress(
            Progress::new(Progress::MODEL_RETRY, "retrying")
                .attempt(2, 5)
                .retry(2000, "overloaded"),
        ),
        TaskEvent::Error {
            message: "API Error: 500".into(),
            code: Some("api_error".into()),
        },
        TaskEvent::error("boom"),
        TaskEvent::Done(done),
        TaskEvent::Done(TaskOutcome::failed("exit 1")),
        TaskEvent::Done(TaskOutcome::canceled()),
        TaskEvent::Other(WireEvent {
            kind: "percent_done".into(),
            content: "50%".into(),
            metadata: json!({"pct": 50, "a": "b"}),
        }),
    ]
}

/// The stored payload of each event of [`events`] (the log's `payload` column).
const PAYLOADS: &[&str] = &[
    r#"{"type":"init","content":"claude-sonnet-5-5","metadata":{"agent_session_id":"0b1c","mcp_servers":[{"name":"calc","status":"connected"}],"skills":[],"tools":["Bash"]}}"#,
    r#"{"type":"status","content":"running","metadata":{}}"#,
    r#"{"type":"text","content":"Hello \"wörld\" 😀\n\t\u0000</script>","metadata":{}}"#,
    r#"{"type":"thinking","content":"hmm","metadata":{}}"#,
    r#"{"type":"tool_call","content":"Write","metadata":{"id":"toolu_1","input":{"file_path":"/w/a.txt","n":1.5e+300,"z":1}}}"#,
    r#"{"type":"tool_result","content":"ok","metadata":{"is_error":true,"tool_use_id":"toolu_1"}}"#,
    r#"{"type":"input_required","content":"Allow Bash?","metadata":{"input":{"command":"ls"},"kind":"permission","request_id":"r1","tool_name":"Bash"}}"#,
    r#"{"type":"usage","content":"","metadata":{"cost_usd":0.25,"usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":2,"input_tokens":10,"output_tokens":5}}}"#,
    r#"{"type":"progress","content":"retrying","metadata":{"attempt":2,"max_attempts":5,"reason":"overloaded","retry_in_ms":2000,"stage":"model_retry"}}"#,
    r#"{"type":"error","content":"API Error: 500","metadata":{"code":"api_error"}}"#,
    r#"{"type":"error","content":"boom","metadata":{}}"#,
    r#"{"type":"done","content":"The answer is 42.","metadata":{"cost_usd":0.01,"duration_ms":1500,"num_turns":2,"status":"completed","structured_output":{"a":[true,null],"b":1},"usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":7,"output_tokens":0}}}"#,
    r#"{"type":"done","content":"","metadata":{"duration_ms":0,"error":"exit 1","num_turns":0,"status":"failed","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":0,"output_tokens":0}}}"#,
    r#"{"type":"done","content":"","metadata":{"duration_ms":0,"num_turns":0,"status":"canceled","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":0,"output_tokens":0}}}"#,
    r#"{"type":"percent_done","content":"50%","metadata":{"a":"b","pct":50}}"#,
];

/// The WebSocket frame of each event of [`events`], as event 7 of task `T` in session `s1`.
const FRAMES: &[&str] = &[
    r#"{"type":"init","content":"claude-sonnet-5-5","metadata":{"agent_session_id":"0b1c","mcp_servers":[{"name":"calc","status":"connected"}],"skills":[],"tools":["Bash"]},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"status","content":"running","metadata":{},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"text","content":"Hello \"wörld\" 😀\n\t\u0000</script>","metadata":{},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"thinking","content":"hmm","metadata":{},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"tool_call","content":"Write","metadata":{"id":"toolu_1","input":{"file_path":"/w/a.txt","n":1.5e+300,"z":1}},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"tool_result","content":"ok","metadata":{"is_error":true,"tool_use_id":"toolu_1"},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"input_required","content":"Allow Bash?","metadata":{"input":{"command":"ls"},"kind":"permission","request_id":"r1","tool_name":"Bash"},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"usage","content":"","metadata":{"cost_usd":0.25,"usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":2,"input_tokens":10,"output_tokens":5}},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"progress","content":"retrying","metadata":{"attempt":2,"max_attempts":5,"reason":"overloaded","retry_in_ms":2000,"stage":"model_retry"},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"error","content":"API Error: 500","metadata":{"code":"api_error"},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"error","content":"boom","metadata":{},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"done","content":"The answer is 42.","metadata":{"cost_usd":0.01,"duration_ms":1500,"num_turns":2,"status":"completed","structured_output":{"a":[true,null],"b":1},"usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":7,"output_tokens":0}},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"done","content":"","metadata":{"duration_ms":0,"error":"exit 1","num_turns":0,"status":"failed","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":0,"output_tokens":0}},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"done","content":"","metadata":{"duration_ms":0,"num_turns":0,"status":"canceled","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"input_tokens":0,"output_tokens":0}},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
    r#"{"type":"percent_done","content":"50%","metadata":{"a":"b","pct":50},"session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002","seq":7}"#,
];

const T: &str = "01936f4e-8f5a-7cc0-9a2b-000000000002";

fn frame_of(event: &TaskEvent) -> ServerMessage {
    ServerMessage::Event {
        session_id: Some(SessionId::new("s1").unwrap()),
        task_id: Some(T.parse::<TaskId>().unwrap()),
        seq: Some(7),
        event: event.clone(),
    }
}

#[test]
fn stored_payloads_are_byte_for_byte() {
    let got: Vec<String> = events()
        .into_iter()
        .map(|e| serde_json::to_string(&WireEvent::from(e)).unwrap())
        .collect();
    assert_eq!(got, PAYLOADS);
}

#[test]
fn websocket_frames_are_byte_for_byte() {
    let events = events();
    assert_eq!(events.len(), FRAMES.len());
    for (event, expected) in events.iter().zip(FRAMES) {
        let message = frame_of(event);
        // Both ways of writing a frame give the same bytes.
        assert_eq!(&serde_json::to_string(&message).unwrap(), expected);
        assert_eq!(&message.into_json().unwrap(), expected);
    }
}

#[test]
fn control_frames_are_byte_for_byte() {
    let s = SessionId::new("s1").unwrap();
    let t: TaskId = T.parse().unwrap();
    let cases = [
        (
            ServerMessage::SessionCreated {
                session_id: s.clone(),
            },
            r#"{"type":"session_created","session_id":"s1"}"#,
        ),
        (
            ServerMessage::TaskCreated {
                session_id: s.clone(),
                task_id: t,
            },
            r#"{"type":"task_created","session_id":"s1","task_id":"01936f4e-8f5a-7cc0-9a2b-000000000002"}"#,
        ),
        (
            ServerMessage::SessionTitle {
                session_id: s.clone(),
                title: "Weather".into(),
            },
            r#"{"type":"session_title","content":"Weather","session_id":"s1"}"#,
        ),
        (ServerMessage::Pong, r#"{"type":"pong"}"#),
        (
            ServerMessage::error("Invalid JSON"),
            r#"{"type":"error","content":"Invalid JSON","metadata":{}}"#,
        ),
        (
            ServerMessage::Refused {
                session_id: Some(s.clone()),
                request_id: Some(json!(7)),
                code: "not_found".into(),
                message: "no".into(),
            },
            r#"{"type":"error","content":"no","metadata":{"code":"not_found","created":false},"session_id":"s1","request_id":7}"#,
        ),
    ];
    for (message, expected) in cases {
        assert_eq!(serde_json::to_string(&message).unwrap(), expected);
        assert_eq!(message.into_json().unwrap(), expected);
    }
}

#[test]
fn events_encoded_once_give_the_same_payloads_and_frames() {
    let s = SessionId::new("s1").unwrap();
    let t: TaskId = T.parse().unwrap();
    let events = events();
    assert_eq!(events.len(), PAYLOADS.len());
    for ((event, payload), frame) in events.iter().zip(PAYLOADS).zip(FRAMES) {
        // What a run hands the store, encoded without copying the event.
        let wire = event.wire_json().unwrap();
        assert_eq!(&wire, payload);
        // The frame made from those bytes, without encoding the event again.
        assert_eq!(
            ServerMessage::event_json(&s, t, 7, &wire).as_deref(),
            Some(*frame)
        );
    }
    // Ids that need escaping, and a large seq, as `into_json` writes them.
    let odd = SessionId::new("owner/repo#12\"q\"\\").unwrap();
    let wire = TaskEvent::text("x").wire_json().unwrap();
    let message = ServerMessage::Event {
        session_id: Some(odd.clone()),
        task_id: Some(t),
        seq: Some(u64::MAX),
        event: TaskEvent::text("x"),
    };
    assert_eq!(
        ServerMessage::event_json(&odd, t, u64::MAX, &wire),
        Some(message.into_json().unwrap())
    );
    // Not an object's text: no frame made of it.
    for bad in ["", "{", "}", "{}", "[1]"] {
        assert_eq!(ServerMessage::event_json(&s, t, 1, bad), None, "{bad}");
    }
}

/// A `done` is written straight out (not through a `Value`) unless it has pull requests: the
/// bytes are those of the `Value` path whatever its fields hold (every usage count, a cost
/// that is not a finite number, an error to escape, nested structured output).
#[test]
fn a_done_written_straight_out_is_byte_for_byte_the_wire_event() {
    let mut full = TaskOutcome::completed("r\u{e9}sultat \"q\"\n");
    full.cost_usd = Some(f64::NAN);
    full.error = Some("half \\ done\t".into());
    full.num_turns = u32::MAX;
    full.duration_ms = u64::MAX;
    full.usage = TokenUsage {
        input_tokens: 1,
        output_tokens: 2,
        cache_creation_input_tokens: 3,
        cache_read_input_tokens: 4,
    };
    full.structured_output = Some(json!({"z": {"b": [1, {"d": 2, "c": 3}], "a": null}, "y": 1.5}));
    let mut infinite = TaskOutcome::failed("x");
    infinite.cost_usd = Some(f64::INFINITY);
    let mut with_pr = TaskOutcome::completed("pr");
    with_pr.pull_requests.push(anywork_core::PullRequestLink {
        repository: "o/r".into(),
        number: 12,
        url: "https://example.com/o/r/pull/12".into(),
        branch: "b".into(),
        base: "main".into(),
    });
    for outcome in [
        full,
        infinite,
        with_pr,
        TaskOutcome::canceled(),
        TaskOutcome::completed(""),
    ] {
        let event = TaskEvent::Done(outcome);
        let expected = serde_json::to_string(&WireEvent::from(event.clone())).unwrap();
        assert_eq!(event.wire_json().unwrap(), expected);
    }
}
