//! The worker's HTTP API (server → worker), defined once for both sides.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `POST /prepare` | [`PrepareRequest`] | `{"status":"ready"}` |
//! | `POST /chat` | [`ChatRequest`] | SSE: `event: <type>` / `data: <TaskEvent JSON>`, ending in one `done` |
//! | `POST /cancel` | [`CancelRequest`] | `{"status": <final status>, "task_id"}` (202 while still canceling) |
//! | `POST /input` | [`InputAnswer`] | `{"status":"accepted"}` |
//! | `GET /health` | | [`WorkerHealth`] |
//! | `GET /sessions/:id/messages` | | `{"messages":[...]}` |
//!
//! Errors are `{"error":{"code","message"}}` with the code from
//! [`ErrorKind::as_str`](crate::ErrorKind::as_str).

use serde::{Deserialize, Serialize};

use crate::ids::{SessionId, TaskId};
use crate::spec::{McpServers, SkillSpec};

/// Path of [`PrepareRequest`].
pub const PREPARE_PATH: &str = "/prepare";
/// Path of [`ChatRequest`].
pub const CHAT_PATH: &str = "/chat";
/// Path of [`CancelRequest`].
pub const CANCEL_PATH: &str = "/cancel";
/// Path of [`InputAnswer`].
pub const INPUT_PATH: &str = "/input";
/// Path of the health check.
pub const HEALTH_PATH: &str = "/health";

/// Sets up a session's workspace before a run. Replaces what the previous call set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// The session.
    pub session_id: SessionId,
    /// Skills to install (others are removed). `null` means none.
    #[serde(default)]
    pub skills: Option<Vec<SkillSpec>>,
    /// MCP servers for `.mcp.json` (others are removed). `null` means none.
    #[serde(default)]
    pub mcp_servers: Option<McpServers>,
    /// Replaces the session's `SOUL.md` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soul: Option<String>,
}

/// Runs one task; answered with a stream of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The task.
    pub task_id: TaskId,
    /// Its session.
    pub session_id: SessionId,
    /// The user's message.
    pub message: String,
}

/// Stops a running task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The task.
    pub task_id: TaskId,
    /// Its session: what the original AnyWork's worker cancels by (it has no task ids). This
    /// worker goes by `task_id` and ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
}

/// Answers a task's `input_required` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputAnswer {
    /// The waiting task.
    pub task_id: TaskId,
    /// The request answered.
    pub request_id: String,
    /// Free-text answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Allow or deny, for permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<bool>,
}

/// `GET /health`. The original AnyWork's worker answers
/// `{status, engine, workspace, active_sessions}`: read as `executor` = `engine`, no version
/// and no busy session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// `ok`.
    pub status: String,
    /// Worker version.
    #[serde(default)]
    pub version: String,
    /// Executor name.
    #[serde(default, alias = "engine")]
    pub executor: String,
    /// Sessions with a running task.
    #[serde(default)]
    pub busy_sessions: Vec<SessionId>,
}
