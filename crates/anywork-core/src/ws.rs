//! The WebSocket messages of `/ws`, spelled exactly as the original AnyWork spells them, plus
//! task ids, sequence numbers, `input_required` and resume after reconnect.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::event::{InputResponse, TaskEvent, WireEvent};
use crate::ids::{SessionId, TaskId};
use crate::spec::{McpServers, SkillSpec, deserialize_mcp_servers_any, deserialize_skills_any};

/// A message from the browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Send a message; without `session_id` a new session is made.
    Chat {
        /// Session to continue (`sessionId` is taken too, as the REST answers spell it).
        #[serde(default, alias = "sessionId", skip_serializing_if = "Option::is_none")]
        session_id: Option<SessionId>,
        /// The text.
        message: String,
        /// Skills for this task: names (`["code-review"]`, resolved by the server) and/or
        /// inline objects; `[]` or `null` for none.
        #[serde(
            default,
            skip_serializing_if = "Vec::is_empty",
            deserialize_with = "deserialize_skills_any"
        )]
        skills: Vec<SkillSpec>,
        /// MCP servers for this task: names of the server's catalog, in any form
        /// [`deserialize_mcp_servers_any`](crate::spec::deserialize_mcp_servers_any) takes —
        /// the original's list (`[{"name", "transport", …}]`), the map by name, `[]`, `{}` or
        /// `null`.
        #[serde(
            default,
            skip_serializing_if = "McpServers::is_empty",
            deserialize_with = "deserialize_mcp_servers_any"
        )]
        mcp_servers: McpServers,
    },
    /// Keep-alive; answered by [`ServerMessage::Pong`].
    Ping,
    /// After a reconnect: replay a task's events after `after_seq`, then follow it live.
    Resume {
        /// The task to follow.
        #[serde(alias = "taskId")]
        task_id: TaskId,
        /// The last seq the client saw (0 for all).
        #[serde(default, alias = "afterSeq")]
        after_seq: u64,
    },
    /// Cancel a task.
    Cancel {
        /// The task.
        #[serde(alias = "taskId")]
        task_id: TaskId,
    },
    /// Answer an `input_required` event.
    InputResponse {
        /// The waiting task.
        #[serde(alias = "taskId")]
        task_id: TaskId,
        /// The answer.
        #[serde(flatten)]
        response: InputResponse,
    },
}

/// A message to the browser. Serialized flat: `{"type", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FlatServerMessage", into = "FlatServerMessage")]
#[non_exhaustive]
pub enum ServerMessage {
    /// A task event: `{type, content, metadata, session_id, task_id?, seq?}`.
    Event {
        /// The session, when there is one (an "Invalid JSON" error has none).
        session_id: Option<SessionId>,
        /// The task, when the event belongs to one.
        task_id: Option<TaskId>,
        /// The event's seq in the task log, for resume.
        seq: Option<u64>,
        /// The event.
        event: TaskEvent,
    },
    /// A chat without `session_id` made this session: `{type, session_id}`.
    SessionCreated {
        /// The new session.
        session_id: SessionId,
    },
    /// A chat was accepted as this task: `{type, session_id, task_id}`.
    TaskCreated {
        /// Its session.
        session_id: SessionId,
        /// The task.
        task_id: TaskId,
    },
    /// The session got a title: `{type, content, session_id}`.
    SessionTitle {
        /// The session.
        session_id: SessionId,
        /// The title.
        title: String,
    },
    /// Answer to a ping: `{type}`.
    Pong,
    /// A client message refused before anything was made of it (a chat that created no
    /// session and no task, a message that does not parse):
    /// `{type:"error", content, metadata:{code, created:false}, session_id?, request_id?}`.
    /// It echoes the `session_id` and `request_id` the client sent, so that a client waiting
    /// for its chat's `task_created` knows that this one is its answer and no `done` follows.
    Refused {
        /// The session the client named, when it named a valid one.
        session_id: Option<SessionId>,
        /// The client's own `request_id` (any JSON string or number), echoed.
        request_id: Option<Value>,
        /// A stable code (`not_found`, `invalid_input`, `invalid_message`, …).
        code: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ServerMessage {
    /// The message's JSON text, byte for byte what `serde_json::to_string` writes, without
    /// the copy of the whole message that serializing through `Serialize` makes (it flattens
    /// a clone).
    pub fn into_json(self) -> serde_json::Result<String> {
        serde_json::to_string(&FlatServerMessage::from(self))
    }

    /// The JSON text of the [`ServerMessage::Event`] of an event of `task_id` in `session_id`
    /// at `seq`, made from the event's wire JSON ([`TaskEvent::wire_json`], as stored in the
    /// task log) without encoding the event again: byte for byte what
    /// [`into_json`](Self::into_json) writes (the frame is the wire object with the ids
    /// after its `metadata`). `None` when `wire_json` is not a JSON object's text.
    pub fn event_json(
        session_id: &SessionId,
        task_id: TaskId,
        seq: u64,
        wire_json: &str,
    ) -> Option<String> {
        let body = wire_json.strip_suffix('}')?;
        if !body.starts_with('{') || body.len() < 2 {
            return None;
        }
        let mut out = Vec::with_capacity(wire_json.len() + session_id.as_str().len() + 80);
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b",\"session_id\":");
        serde_json::to_writer(&mut out, session_id.as_str()).ok()?;
        out.extend_from_slice(b",\"task_id\":");
        serde_json::to_writer(&mut out, &task_id).ok()?;
        out.extend_from_slice(b",\"seq\":");
        serde_json::to_writer(&mut out, &seq).ok()?;
        out.push(b'}');
        String::from_utf8(out).ok()
    }

    /// An error not tied to a task (`{"type":"error","content":message}`).
    pub fn error(message: impl Into<String>) -> Self {
        ServerMessage::Event {
            session_id: None,
            task_id: None,
            seq: None,
            event: TaskEvent::error(message),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FlatServerMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_id: Option<SessionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<Value>,
}

impl FlatServerMessage {
    fn control(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            content: None,
            metadata: None,
            session_id: None,
            task_id: None,
            seq: None,
            request_id: None,
        }
    }
}

impl From<ServerMessage> for FlatServerMessage {
    fn from(m: ServerMessage) -> Self {
        match m {
            ServerMessage::Event {
                session_id,
                task_id,
                seq,
                event,
            } => {
                let wire = WireEvent::from(event);
                FlatServerMessage {
                    kind: wire.kind,
                    content: Some(wire.content),
                    metadata: Some(wire.metadata),
                    session_id,
                    task_id,
                    seq,
                    request_id: None,
                }
            }
            ServerMessage::SessionCreated { session_id } => FlatServerMessage {
                session_id: Some(session_id),
                ..Self::control("session_created")
            },
            ServerMessage::TaskCreated {
                session_id,
                task_id,
            } => FlatServerMessage {
                session_id: Some(session_id),
                task_id: Some(task_id),
                ..Self::control("task_created")
            },
            ServerMessage::SessionTitle { session_id, title } => FlatServerMessage {
                session_id: Some(session_id),
                content: Some(title),
                ..Self::control("session_title")
            },
            ServerMessage::Pong => Self::control("pong"),
            ServerMessage::Refused {
                session_id,
                request_id,
                code,
                message,
            } => FlatServerMessage {
                content: Some(message),
                metadata: Some(serde_json::json!({"code": code, "created": false})),
                session_id,
                request_id,
                ..Self::control("error")
            },
        }
    }
}

impl TryFrom<FlatServerMessage> for ServerMessage {
    type Error = Error;
    fn try_from(f: FlatServerMessage) -> Result<Self> {
        let need_session = |s: Option<SessionId>, kind: &str| {
            s.ok_or_else(|| Error::invalid_input(format!("`{kind}` message needs `session_id`")))
        };
        Ok(match f.kind.as_str() {
            "session_created" => ServerMessage::SessionCreated {
                session_id: need_session(f.session_id, &f.kind)?,
            },
            "task_created" => ServerMessage::TaskCreated {
                session_id: need_session(f.session_id, &f.kind)?,
                task_id: f.task_id.ok_or_else(|| {
                    Error::invalid_input("`task_created` message needs `task_id`")
                })?,
            },
            "session_title" => ServerMessage::SessionTitle {
                session_id: need_session(f.session_id, &f.kind)?,
                title: f.content.unwrap_or_default(),
            },
            "pong" => ServerMessage::Pong,
            "error"
                if f.task_id.is_none()
                    && f.metadata
                        .as_ref()
                        .and_then(|m| m.get("created"))
                        .and_then(Value::as_bool)
                        == Some(false) =>
            {
                ServerMessage::Refused {
                    code: f
                        .metadata
                        .as_ref()
                        .and_then(|m| m.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    message: f.content.unwrap_or_default(),
                    session_id: f.session_id,
                    request_id: f.request_id,
                }
            }
            _ => ServerMessage::Event {
                event: TaskEvent::try_from(WireEvent {
                    kind: f.kind,
                    content: f.content.unwrap_or_default(),
                    metadata: f
                        .metadata
                        .unwrap_or_else(|| Value::Object(Default::default())),
                })?,
                session_id: f.session_id,
                task_id: f.task_id,
                seq: f.seq,
            },
        })
    }
}
