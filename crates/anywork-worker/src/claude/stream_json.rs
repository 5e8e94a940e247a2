//! The CLI's stream-json output, line by line, as [`TaskEvent`]s (pure functions).

use anywork_core::{AgentInit, InputKind, InputRequest, McpServerStatus, TaskEvent, TokenUsage};
use serde_json::{Value, json};

use super::MCP_SERVER_FAILED;

/// What the CLI says when `--resume` names a conversation it does not have.
const NO_CONVERSATION: &str = "No conversation found with session ID";

pub(super) fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn preview(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    text.into_owned()
}

/// The stdin line of a user message.
pub(super) fn user_line(message: &str) -> String {
    json!({"type": "user", "message": {"role": "user", "content": message}}).to_string()
}

/// `system`/`init` → [`TaskEvent::Init`] and an error per failed MCP server.
pub(super) fn init_events(line: &Value) -> Vec<TaskEvent> {
    let mcp_servers: Vec<McpServerStatus> = line
        .get("mcp_servers")
        .and_then(Value::as_array)
        .map(|servers| {
            servers
                .iter()
                .filter_map(|s| {
                    Some(McpServerStatus {
                        name: str_at(s, "name")?.to_owned(),
                        status: str_at(s, "status").unwrap_or("unknown").to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let failed: Vec<TaskEvent> = mcp_servers
        .iter()
        .filter(|s| s.status == "failed")
        .map(|s| TaskEvent::Error {
            message: format!("MCP server `{}` failed to start", s.name),
            code: Some(MCP_SERVER_FAILED.to_owned()),
        })
        .collect();
    let init = AgentInit {
        model: str_at(line, "model").unwrap_or_default().to_owned(),
        agent_session_id: str_at(line, "session_id").map(str::to_owned),
        tools: strings(line.get("tools")),
        skills: strings(line.get("skills")),
        mcp_servers,
    };
    let mut events = vec![TaskEvent::Init(init)];
    events.extend(failed);
    events
}

/// `assistant` → text, thinking and tool calls, one per content block. With `streamed`, text
/// blocks are left out: their text was already sent piece by piece ([`text_delta`]).
pub(super) fn assistant_events(line: &Value, streamed: bool) -> Vec<TaskEvent> {
    let synthetic_error = line.get("is_api_error_message").and_then(Value::as_bool) == Some(true)
        || line.get("error").is_some_and(|e| !e.is_null())
        || line.pointer("/message/model").and_then(Value::as_str) == Some("<synthetic>");
    if synthetic_error {
        // The `result` line that follows carries the same text, as the run's error.
        tracing::debug!("skipped claude's synthetic API-error message");
        return Vec::new();
    }
    let sub_agent = line.get("parent_tool_use_id").is_some_and(|p| !p.is_null());
    let Some(blocks) = line.pointer("/message/content").and_then(Value::as_array) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter_map(|block| match str_at(block, "type")? {
            "text" if !sub_agent && !streamed => {
                let text = str_at(block, "text")?;
                (!text.is_empty()).then(|| TaskEvent::text(text))
            }
            "thinking" if !sub_agent => {
                let text = str_at(block, "thinking")?;
                (!text.is_empty()).then(|| TaskEvent::Thinking {
                    text: text.to_owned(),
                })
            }
            "tool_use" | "server_tool_use" | "mcp_tool_use" => Some(TaskEvent::ToolCall {
                id: str_at(block, "id").unwrap_or_default().to_owned(),
                name: str_at(block, "name").unwrap_or_default().to_owned(),
                input: block.get("input").cloned().unwrap_or_else(|| json!({})),
            }),
            _ => None,
        })
        .collect()
}

/// A `stream_event` line (`--include-partial-messages`): the text of a top-level
/// `content_block_delta`/`text_delta`, streamed while the model writes. Sub-agents' streams
/// and every other raw event (block starts and stops, thinking and tool-input deltas) give
/// `None`: their content arrives whole in the `assistant` line.
pub(super) fn text_delta(line: &Value) -> Option<&str> {
    if line.get("parent_tool_use_id").is_some_and(|p| !p.is_null()) {
        return None;
    }
    let event = line.get("event")?;
    if str_at(event, "type") != Some("content_block_delta") {
        return None;
    }
    let delta = event.get("delta")?;
    (str_at(delta, "type") == Some("text_delta"))
        .then(|| str_at(delta, "text"))
        .flatten()
        .filter(|t| !t.is_empty())
}

/// `user` → one [`TaskEvent::ToolResult`] per `tool_result` block.
pub(super) fn user_events(line: &Value) -> Vec<TaskEvent> {
    let Some(blocks) = line.pointer("/message/content").and_then(Value::as_array) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter(|block| str_at(block, "type") == Some("tool_result"))
        .map(|block| TaskEvent::ToolResult {
            tool_use_id: str_at(block, "tool_use_id").unwrap_or_default().to_owned(),
            content: tool_result_text(block.get("content")),
            is_error: block.get("is_error").and_then(Value::as_bool) == Some(true),
        })
        .collect()
}

/// A tool result's content: a string, or the text parts of a block array joined with `\n`.
fn tool_result_text(content: Option<&Value>) -> String {
    match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| str_at(b, "type") == Some("text"))
            .filter_map(|b| str_at(b, "text"))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
    }
}

/// `control_request`/`can_use_tool` → an [`InputRequest`] and the tool's input.
pub(super) fn permission_request(line: &Value) -> Option<(InputRequest, Value)> {
    let request = line.get("request")?;
    if str_at(request, "subtype") != Some("can_use_tool") {
        return None;
    }
    let request_id = str_at(line, "request_id")?.to_owned();
    let tool_name = str_at(request, "tool_name").unwrap_or("a tool").to_owned();
    let shown = str_at(request, "display_name").unwrap_or(&tool_name);
    let input = request.get("input").cloned().unwrap_or_else(|| json!({}));
    let prompt = match str_at(request, "description").filter(|d| !d.trim().is_empty()) {
        Some(description) => format!("Allow {shown}? {description}"),
        None => format!("Allow {shown}?"),
    };
    Some((
        InputRequest {
            request_id,
            kind: InputKind::Permission,
            prompt,
            tool_name: Some(tool_name),
            input: Some(input.clone()),
            options: vec!["allow".to_owned(), "deny".to_owned()],
        },
        input,
    ))
}

/// What a `result` line says.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TurnResult {
    pub(super) is_error: bool,
    pub(super) subtype: String,
    /// A stable code for failures: `terminal_reason`, else `subtype`.
    pub(super) code: String,
    pub(super) text: Option<String>,
    pub(super) errors: Vec<String>,
    pub(super) cost_usd: Option<f64>,
    pub(super) usage: TokenUsage,
    pub(super) num_turns: u32,
    pub(super) duration_ms: u64,
    pub(super) structured_output: Option<Value>,
    pub(super) session_id: Option<String>,
}

impl TurnResult {
    pub(super) fn parse(line: &Value) -> Self {
        let count = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
        let usage = line
            .get("usage")
            .map(|u| TokenUsage {
                input_tokens: count(u, "input_tokens"),
                output_tokens: count(u, "output_tokens"),
                cache_creation_input_tokens: count(u, "cache_creation_input_tokens"),
                cache_read_input_tokens: count(u, "cache_read_input_tokens"),
            })
            .unwrap_or_default();
        let subtype = str_at(line, "subtype").unwrap_or("unknown").to_owned();
        let code = str_at(line, "terminal_reason")
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| subtype.clone());
        Self {
            is_error: line.get("is_error").and_then(Value::as_bool) == Some(true),
            code,
            subtype,
            text: str_at(line, "result").map(str::to_owned),
            errors: strings(line.get("errors"))
                .into_iter()
                .filter(|e| !e.trim().is_empty())
                .collect(),
            cost_usd: line.get("total_cost_usd").and_then(Value::as_f64),
            usage,
            num_turns: u32::try_from(count(line, "num_turns")).unwrap_or(u32::MAX),
            duration_ms: count(line, "duration_ms"),
            structured_output: line
                .get("structured_output")
                .filter(|v| !v.is_null())
                .cloned(),
            session_id: str_at(line, "session_id").map(str::to_owned),
        }
    }

    /// The error text: `errors[]`, else `result`, else a note with the subtype.
    pub(super) fn error_message(&self) -> String {
        if !self.errors.is_empty() {
            return self.errors.join("; ");
        }
        match &self.text {
            Some(text) if !text.trim().is_empty() => text.clone(),
            _ => format!("Claude Code reported an error ({})", self.subtype),
        }
    }

    /// The "No conversation found" error, if this is one.
    pub(super) fn no_conversation(&self) -> Option<String> {
        self.errors
            .iter()
            .chain(self.text.iter())
            .find(|e| e.contains(NO_CONVERSATION))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn init_maps_to_init_and_failed_mcp_errors() {
        let events = init_events(&line(
            r#"{"type":"system","subtype":"init","session_id":"s-1","model":"m1",
                "tools":["Bash","Write",3],"skills":["greet","debug"],
                "mcp_servers":[{"name":"calc","status":"connected"},{"name":"broken","status":"failed"},{"status":"x"}]}"#,
        ));
        assert_eq!(events.len(), 2);
        let TaskEvent::Init(init) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(init.model, "m1");
        assert_eq!(init.agent_session_id.as_deref(), Some("s-1"));
        assert_eq!(init.tools, ["Bash", "Write"]);
        assert_eq!(init.skills, ["greet", "debug"]);
        assert_eq!(init.mcp_servers.len(), 2);
        assert!(
            matches!(&events[1], TaskEvent::Error { message, code } if message.contains("broken") && code.as_deref() == Some(MCP_SERVER_FAILED))
        );
        // Garbage does not panic.
        assert_eq!(init_events(&json!({"type": "system"})).len(), 1);
    }

    #[test]
    fn assistant_blocks_map_to_events() {
        let blocks = line(
            r#"{"type":"assistant","parent_tool_use_id":null,"message":{"content":[
                {"type":"thinking","thinking":"hmm"},{"type":"text","text":"hi"},
                {"type":"tool_use","id":"t1","name":"Write","input":{"a":1}},{"type":"image"}]}}"#,
        );
        let events = assistant_events(&blocks, false);
        assert_eq!(
            events,
            vec![
                TaskEvent::Thinking { text: "hmm".into() },
                TaskEvent::text("hi"),
                TaskEvent::ToolCall {
                    id: "t1".into(),
                    name: "Write".into(),
                    input: json!({"a": 1})
                },
            ]
        );
        let synthetic = line(
            r#"{"type":"assistant","message":{"model":"<synthetic>","content":[{"type":"text","text":"API Error: 500"}]},"error":"server_error","is_api_error_message":true}"#,
        );
        assert!(assistant_events(&synthetic, false).is_empty());
        let sub_agent = line(
            r#"{"type":"assistant","parent_tool_use_id":"toolu_9","message":{"content":[{"type":"text","text":"inner"},{"type":"tool_use","id":"t2","name":"Read"}]}}"#,
        );
        assert_eq!(
            assistant_events(&sub_agent, false),
            vec![TaskEvent::ToolCall {
                id: "t2".into(),
                name: "Read".into(),
                input: json!({})
            }]
        );
        assert!(assistant_events(&json!({"message": {"content": "text"}}), false).is_empty());
        // Streamed text is not sent again; the rest of the blocks are.
        let streamed = assistant_events(&blocks, true);
        assert_eq!(streamed.len(), 2, "{streamed:?}");
        assert!(!streamed.contains(&TaskEvent::text("hi")));
    }

    #[test]
    fn only_top_level_text_deltas_stream() {
        let delta = |parent: &str, delta: &str| {
            line(&format!(
                r#"{{"type":"stream_event","parent_tool_use_id":{parent},"event":{{"type":"content_block_delta","index":0,"delta":{delta}}}}}"#
            ))
        };
        assert_eq!(
            text_delta(&delta("null", r#"{"type":"text_delta","text":"Hel"}"#)),
            Some("Hel")
        );
        assert_eq!(
            text_delta(&delta(
                r#""toolu_1""#,
                r#"{"type":"text_delta","text":"x"}"#
            )),
            None
        );
        assert_eq!(
            text_delta(&delta("null", r#"{"type":"text_delta","text":""}"#)),
            None
        );
        assert_eq!(
            text_delta(&delta(
                "null",
                r#"{"type":"input_json_delta","partial_json":"{"}"#
            )),
            None
        );
        assert_eq!(
            text_delta(&delta(
                "null",
                r#"{"type":"thinking_delta","thinking":"hm"}"#
            )),
            None
        );
        let start = line(
            r#"{"type":"stream_event","event":{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}}"#,
        );
        assert_eq!(text_delta(&start), None);
        assert_eq!(text_delta(&json!({"type":"stream_event"})), None);
    }

    #[test]
    fn tool_results_join_text_parts() {
        let events = user_events(&line(
            r#"{"type":"user","message":{"content":[
                {"type":"tool_result","tool_use_id":"a","content":"plain"},
                {"type":"tool_result","tool_use_id":"b","is_error":true,"content":[{"type":"text","text":"one"},{"type":"image"},{"type":"text","text":"two"}]},
                {"type":"text","text":"[Request interrupted by user]"}]}}"#,
        ));
        assert_eq!(
            events,
            vec![
                TaskEvent::ToolResult {
                    tool_use_id: "a".into(),
                    content: "plain".into(),
                    is_error: false
                },
                TaskEvent::ToolResult {
                    tool_use_id: "b".into(),
                    content: "one\ntwo".into(),
                    is_error: true
                },
            ]
        );
        assert!(user_events(&json!({"message": {"content": "hello"}})).is_empty());
    }

    #[test]
    fn results_are_judged_by_is_error() {
        let ok = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":2,
                "duration_ms":500,"total_cost_usd":0.0016,"session_id":"s",
                "usage":{"input_tokens":200,"output_tokens":40,"cache_read_input_tokens":3}}"#,
        ));
        assert!(!ok.is_error);
        assert_eq!(ok.text.as_deref(), Some("done"));
        assert_eq!(ok.usage.input_tokens, 200);
        assert_eq!(ok.usage.cache_read_input_tokens, 3);
        assert_eq!(ok.cost_usd, Some(0.0016));
        assert_eq!((ok.num_turns, ok.duration_ms), (2, 500));

        let api = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"success","is_error":true,"terminal_reason":"api_error","result":"API Error: 500 boom"}"#,
        ));
        assert!(api.is_error);
        assert_eq!(api.code, "api_error");
        assert_eq!(api.error_message(), "API Error: 500 boom");

        let turns = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"error_max_turns","is_error":true,"terminal_reason":"max_turns","errors":["Reached maximum number of turns (2)"]}"#,
        ));
        assert_eq!(turns.code, "max_turns");
        assert_eq!(turns.error_message(), "Reached maximum number of turns (2)");
        assert_eq!(turns.no_conversation(), None);

        let lost = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["No conversation found with session ID: abc"]}"#,
        ));
        assert_eq!(lost.code, "error_during_execution");
        assert!(lost.no_conversation().is_some());

        let empty = TurnResult::parse(&json!({"type": "result", "num_turns": -1}));
        assert!(!empty.is_error);
        assert_eq!(empty.num_turns, 0);
    }

    #[test]
    fn permission_requests() {
        let (request, input) = permission_request(&line(
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool",
                "tool_name":"Bash","display_name":"Bash","input":{"command":"echo hi"},"description":"Say hi"}}"#,
        ))
        .unwrap();
        assert_eq!(request.request_id, "r1");
        assert_eq!(request.kind, InputKind::Permission);
        assert_eq!(request.tool_name.as_deref(), Some("Bash"));
        assert_eq!(input, json!({"command": "echo hi"}));
        assert!(request.prompt.contains("Say hi"), "{}", request.prompt);
        assert!(
            permission_request(&json!({"request_id": "r", "request": {"subtype": "interrupt"}}))
                .is_none()
        );
        assert!(permission_request(&json!({"request": {"subtype": "can_use_tool"}})).is_none());
    }
}
