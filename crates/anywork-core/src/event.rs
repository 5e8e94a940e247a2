//! [`TaskEvent`]: the one event format of AnyWork.
//!
//! The same JSON object travels as a worker SSE `data:` line, is stored as a task log and is
//! relayed to WebSocket clients: `{"type": "...", "content": "...", "metadata": {...}}`, the
//! shape the original AnyWork used. [`TaskEvent`] is the typed view of it; [`WireEvent`] the
//! raw one. Types this version does not know are kept as [`TaskEvent::Other`], so a newer
//! worker never loses events on an older server.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
pub use crate::outcome::TaskOutcome;
use crate::outcome::TokenUsage;
use crate::status::TaskStatus;

/// The raw event object: a type name, a text content and free-form metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    /// Event type (`text`, `tool_call`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The main text of the event (text, tool name, result, error message).
    #[serde(default)]
    pub content: String,
    /// Everything else, as a JSON object.
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// One thing that happened while a task ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireEvent", into = "WireEvent")]
#[non_exhaustive]
pub enum TaskEvent {
    /// The agent runtime started and reports what it sees. Wire: `init`, content = model,
    /// metadata = the rest of [`AgentInit`].
    Init(AgentInit),
    /// Assistant text (a whole block or a streamed piece). Wire: `text`, content = text.
    Text {
        /// The text.
        text: String,
    },
    /// Model reasoning shown to the user. Wire: `thinking`, content = text.
    Thinking {
        /// The text.
        text: String,
    },
    /// The agent calls a tool. Wire: `tool_call`, content = tool name, metadata `{id, input}`.
    ToolCall {
        /// Tool-use id that the matching [`TaskEvent::ToolResult`] names.
        id: String,
        /// Tool name (`Bash`, `mcp__calc__add`).
        name: String,
        /// Tool arguments.
        input: Value,
    },
    /// A tool's answer. Wire: `tool_result`, content = output, metadata `{tool_use_id, is_error}`.
    ToolResult {
        /// The id of the call this answers.
        tool_use_id: String,
        /// Output text.
        content: String,
        /// Whether the tool failed.
        is_error: bool,
    },
    /// The agent waits for the user. Wire: `input_required`, content = prompt.
    InputRequired(InputRequest),
    /// Token usage so far. Wire: `usage`, metadata `{usage, cost_usd?}`.
    Usage {
        /// Tokens counted.
        usage: TokenUsage,
        /// Cost in US dollars, when known.
        cost_usd: Option<f64>,
    },
    /// The task's status changed. Wire: `status`, content = the status name.
    Status {
        /// New status.
        status: TaskStatus,
    },
    /// A problem worth showing; not terminal by itself. Wire: `error`, content = message.
    Error {
        /// What went wrong, for people.
        message: String,
        /// A stable code, when there is one (`api_error`, `max_turns`).
        code: Option<String>,
    },
    /// What the task waits for, told while it waits (a worker being created, a model call
    /// being retried); not terminal, never stored as a result. Wire: `progress`, content =
    /// message, metadata = the rest of [`Progress`].
    Progress(Progress),
    /// The run is over: exactly one per run, always last. Wire: `done`, content = result text.
    Done(TaskOutcome),
    /// An event type this version does not know, kept as it came.
    Other(WireEvent),
}

/// What an agent runtime reports when it starts (Claude Code's `system/init` line).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentInit {
    /// Model name.
    #[serde(skip)]
    pub model: String,
    /// The runtime's own conversation id (Claude Code's `session_id`), used to resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_session_id: Option<String>,
    /// Tool names available to the model.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Skill names discovered in the workspace.
    #[serde(default)]
    pub skills: Vec<String>,
    /// MCP servers and whether they connected.
    #[serde(default)]
    pub mcp_servers: Vec<McpServerStatus>,
}

/// One MCP server as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpServerStatus {
    /// Server name (the key in `.mcp.json`).
    pub name: String,
    /// `connected`, `failed`, ...
    pub status: String,
}

/// What kind of answer an [`InputRequest`] wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A free-text answer to a question.
    Question,
    /// Allow or deny a tool call.
    Permission,
}

/// The agent asks the user something and waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRequest {
    /// Id to quote in the [`InputResponse`].
    pub request_id: String,
    /// Question or permission.
    pub kind: InputKind,
    /// Text to show.
    #[serde(skip)]
    pub prompt: String,
    /// For permissions: the tool that wants to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<String>,
    /// For permissions: the tool's arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Suggested answers, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The user's answer to an [`InputRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputResponse {
    /// The request answered.
    pub request_id: String,
    /// Free-text answer (questions), or a reason (denied permissions).
    #[serde(default)]
    pub answer: String,
    /// For permissions: allow (`true`) or deny (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<bool>,
}

/// What a [`TaskEvent::Progress`] tells.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Progress {
    /// What is in progress: [`Progress::WORKER`], [`Progress::MODEL_RETRY`], ...
    pub stage: String,
    /// For people: what happens and, for a retry, why and when the next try comes.
    #[serde(skip)]
    pub message: String,
    /// The attempt about to be made (1 = the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How many attempts there will be at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// How long until the next try, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// Why the previous attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Progress {
    /// A worker is being found or created for the task.
    pub const WORKER: &'static str = "worker";
    /// A model call failed and will be tried again.
    pub const MODEL_RETRY: &'static str = "model_retry";

    /// `message` at `stage`.
    pub fn new(stage: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            stage: stage.into(),
            message: message.into(),
            ..Self::default()
        }
    }

    /// The attempt about to be made, of at most `max`.
    pub fn attempt(mut self, attempt: u32, max: u32) -> Self {
        self.attempt = Some(attempt);
        self.max_attempts = Some(max);
        self
    }

    /// The next try comes in `ms` milliseconds, after `reason`.
    pub fn retry(mut self, ms: u64, reason: impl Into<String>) -> Self {
        self.retry_in_ms = Some(ms);
        self.reason = Some(reason.into());
        self
    }
}

impl TaskEvent {
    /// The wire type name (`text`, `tool_call`, ...).
    pub fn kind(&self) -> &str {
        match self {
            TaskEvent::Init(_) => "init",
            TaskEvent::Text { .. } => "text",
            TaskEvent::Thinking { .. } => "thinking",
            TaskEvent::ToolCall { .. } => "tool_call",
            TaskEvent::ToolResult { .. } => "tool_result",
            TaskEvent::InputRequired(_) => "input_required",
            TaskEvent::Usage { .. } => "usage",
            TaskEvent::Status { .. } => "status",
            TaskEvent::Error { .. } => "error",
            TaskEvent::Progress(_) => "progress",
            TaskEvent::Done(_) => "done",
            TaskEvent::Other(w) => &w.kind,
        }
    }

    /// Whether this event ends a run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskEvent::Done(_))
    }

    /// Shorthand for a [`TaskEvent::Text`].
    pub fn text(text: impl Into<String>) -> Self {
        TaskEvent::Text { text: text.into() }
    }

    /// Shorthand for a [`TaskEvent::Error`] without a code.
    pub fn error(message: impl Into<String>) -> Self {
        TaskEvent::Error {
            message: message.into(),
            code: None,
        }
    }

    /// The raw form of this event.
    pub fn to_wire(&self) -> WireEvent {
        self.clone().into()
    }

    /// The event's wire JSON (`{"type","content","metadata"}`): byte for byte what
    /// `serde_json::to_string(&self.to_wire())` writes (what the stores keep as a task log's
    /// payload and the start of an event's WebSocket message), without copying the event
    /// first. Encoded once, it can be shared by the store and every follower.
    pub fn wire_json(&self) -> serde_json::Result<String> {
        #[derive(Serialize)]
        struct WireRef<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            content: &'a str,
            metadata: std::borrow::Cow<'a, Value>,
        }
        #[derive(Serialize)]
        struct ToolCallRef<'a> {
            id: &'a str,
            input: &'a Value,
        }
        #[derive(Serialize)]
        struct ToolResultRef<'a> {
            tool_use_id: &'a str,
            is_error: bool,
        }
        #[derive(Serialize)]
        struct UsageRef<'a> {
            usage: &'a TokenUsage,
            #[serde(skip_serializing_if = "Option::is_none")]
            cost_usd: Option<f64>,
        }
        #[derive(Serialize)]
        struct ErrorRef<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            code: Option<&'a str>,
        }
        use std::borrow::Cow;
        let owned = |v: Value| Cow::Owned(v);
        let (content, metadata): (&str, Cow<'_, Value>) = match self {
            TaskEvent::Init(init) => (&init.model, owned(meta(init))),
            TaskEvent::Text { text } | TaskEvent::Thinking { text } => {
                (text, owned(empty_object()))
            }
            TaskEvent::ToolCall { id, name, input } => {
                (name, owned(meta(ToolCallRef { id, input })))
            }
            TaskEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => (
                content,
                owned(meta(ToolResultRef {
                    tool_use_id,
                    is_error: *is_error,
                })),
            ),
            TaskEvent::InputRequired(req) => (&req.prompt, owned(meta(req))),
            TaskEvent::Usage { usage, cost_usd } => (
                "",
                owned(meta(UsageRef {
                    usage,
                    cost_usd: *cost_usd,
                })),
            ),
            TaskEvent::Status { status } => (status.as_str(), owned(empty_object())),
            TaskEvent::Error { message, code } => (
                message,
                owned(meta(ErrorRef {
                    code: code.as_deref(),
                })),
            ),
            TaskEvent::Progress(progress) => (&progress.message, owned(meta(progress))),
            // Written straight out, in the order a `Value` sorts its keys (`done_json`);
            // with pull requests (whose fields are not declared in that order) through a
            // `Value`, as below.
            TaskEvent::Done(outcome) if outcome.pull_requests.is_empty() => {
                return done_json(outcome);
            }
            TaskEvent::Done(outcome) => {
                // The result is the content, not metadata (`From<TaskEvent> for WireEvent`
                // takes it out before encoding the rest).
                let mut metadata = meta(outcome);
                if let Value::Object(map) = &mut metadata {
                    map.remove("result");
                }
                (
                    outcome.result.as_deref().unwrap_or_default(),
                    owned(metadata),
                )
            }
            TaskEvent::Other(wire) => (&wire.content, Cow::Borrowed(&wire.metadata)),
        };
        serde_json::to_string(&WireRef {
            kind: self.kind(),
            content,
            metadata,
        })
    }
}

/// The wire JSON of a `done` without pull requests: byte for byte what encoding its
/// metadata through a `serde_json::Value` writes (keys in sorted order, nested ones too; the
/// result is the content, not metadata), without making the `Value` (its map, a string per
/// key, then freeing them: half of the event's encoding).
fn done_json(outcome: &crate::TaskOutcome) -> serde_json::Result<String> {
    /// `TaskOutcome`'s fields but `result` and `pull_requests`, sorted by name.
    #[derive(Serialize)]
    struct DoneMeta<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        cost_usd: Option<f64>,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a str>,
        num_turns: u32,
        status: crate::TaskStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        structured_output: Option<&'a Value>,
        usage: Usage,
    }
    /// `TokenUsage`'s fields, sorted by name.
    #[derive(Serialize)]
    struct Usage {
        cache_creation_input_tokens: u64,
        cache_read_input_tokens: u64,
        input_tokens: u64,
        output_tokens: u64,
    }
    #[derive(Serialize)]
    struct Done<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        content: &'a str,
        metadata: DoneMeta<'a>,
    }
    let u = &outcome.usage;
    serde_json::to_string(&Done {
        kind: "done",
        content: outcome.result.as_deref().unwrap_or_default(),
        metadata: DoneMeta {
            cost_usd: outcome.cost_usd,
            duration_ms: outcome.duration_ms,
            error: outcome.error.as_deref(),
            num_turns: outcome.num_turns,
            status: outcome.status,
            structured_output: outcome.structured_output.as_ref(),
            usage: Usage {
                cache_creation_input_tokens: u.cache_creation_input_tokens,
                cache_read_input_tokens: u.cache_read_input_tokens,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
            },
        },
    })
}

fn meta<T: Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|_| empty_object())
}

#[derive(Serialize, Deserialize)]
struct ToolCallMeta {
    #[serde(default)]
    id: String,
    #[serde(default)]
    input: Value,
}

#[derive(Serialize, Deserialize)]
struct ToolResultMeta {
    #[serde(default)]
    tool_use_id: String,
    #[serde(default)]
    is_error: bool,
}

#[derive(Serialize, Deserialize)]
struct UsageMeta {
    #[serde(default)]
    usage: TokenUsage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct ErrorMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<String>,
}

impl From<TaskEvent> for WireEvent {
    fn from(event: TaskEvent) -> Self {
        let (kind, content, metadata) = match event {
            TaskEvent::Init(init) => {
                let model = init.model.clone();
                ("init", model, meta(init))
            }
            TaskEvent::Text { text } => ("text", text, empty_object()),
            TaskEvent::Thinking { text } => ("thinking", text, empty_object()),
            TaskEvent::ToolCall { id, name, input } => {
                ("tool_call", name, meta(ToolCallMeta { id, input }))
            }
            TaskEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => (
                "tool_result",
                content,
                meta(ToolResultMeta {
                    tool_use_id,
                    is_error,
                }),
            ),
            TaskEvent::InputRequired(req) => {
                let prompt = req.prompt.clone();
                ("input_required", prompt, meta(req))
            }
            TaskEvent::Usage { usage, cost_usd } => {
                ("usage", String::new(), meta(UsageMeta { usage, cost_usd }))
            }
            TaskEvent::Status { status } => ("status", status.as_str().to_owned(), empty_object()),
            TaskEvent::Error { message, code } => ("error", message, meta(ErrorMeta { code })),
            TaskEvent::Progress(progress) => {
                let message = progress.message.clone();
                ("progress", message, meta(progress))
            }
            TaskEvent::Done(mut outcome) => {
                let content = outcome.result.take().unwrap_or_default();
                ("done", content, meta(outcome))
            }
            TaskEvent::Other(wire) => return wire,
        };
        WireEvent {
            kind: kind.to_owned(),
            content,
            metadata,
        }
    }
}

impl TryFrom<WireEvent> for TaskEvent {
    type Error = Error;

    fn try_from(wire: WireEvent) -> Result<Self> {
        fn parse<T: serde::de::DeserializeOwned>(kind: &str, metadata: Value) -> Result<T> {
            let metadata = if metadata.is_null() {
                empty_object()
            } else {
                metadata
            };
            serde_json::from_value(metadata).map_err(|e| {
                Error::invalid_input(format!("`{kind}` event has invalid metadata: {e}"))
            })
        }
        let WireEvent {
            kind,
            content,
            metadata,
        } = wire;
        Ok(match kind.as_str() {
            "init" => {
                let mut init: AgentInit = parse(&kind, metadata)?;
                init.model = content;
                TaskEvent::Init(init)
            }
            "text" => TaskEvent::Text { text: content },
            "thinking" => TaskEvent::Thinking { text: content },
            "tool_call" => {
                let m: ToolCallMeta = parse(&kind, metadata)?;
                TaskEvent::ToolCall {
                    id: m.id,
                    name: content,
                    input: m.input,
                }
            }
            "tool_result" => {
                let m: ToolResultMeta = parse(&kind, metadata)?;
                TaskEvent::ToolResult {
                    tool_use_id: m.tool_use_id,
                    content,
                    is_error: m.is_error,
                }
            }
            "input_required" => {
                let mut req: InputRequest = parse(&kind, metadata)?;
                req.prompt = content;
                TaskEvent::InputRequired(req)
            }
            "usage" => {
                let m: UsageMeta = parse(&kind, metadata)?;
                TaskEvent::Usage {
                    usage: m.usage,
                    cost_usd: m.cost_usd,
                }
            }
            "status" => TaskEvent::Status {
                status: content.parse()?,
            },
            "error" => {
                let m: ErrorMeta = parse(&kind, metadata)?;
                TaskEvent::Error {
                    message: content,
                    code: m.code,
                }
            }
            "progress" => {
                let mut progress: Progress = parse(&kind, metadata)?;
                progress.message = content;
                TaskEvent::Progress(progress)
            }
            "done" => {
                let mut outcome: TaskOutcome = parse(&kind, metadata)?;
                if !outcome.status.is_terminal() {
                    return Err(Error::invalid_input(format!(
                        "`done` event has non-terminal status {}",
                        outcome.status
                    )));
                }
                if !content.is_empty() {
                    outcome.result = Some(content);
                }
                TaskEvent::Done(outcome)
            }
            _ => TaskEvent::Other(WireEvent {
                kind,
                content,
                metadata,
            }),
        })
    }
}
