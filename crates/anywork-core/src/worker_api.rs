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

/// Largest file uploaded into a session's `files/` through the worker API (25 MiB).
pub const MAX_UPLOAD_BYTES: usize = 25 * 1024 * 1024;

/// The default `SOUL.md` (who the agent is) of a workspace, until someone edits it.
pub const DEFAULT_SOUL: &str = "\
# Soul

You are a capable, careful assistant working inside a private workspace.

- Be helpful and direct. Answer the question that was asked; say so when you are unsure.
- Work in the `files/` folder of your workspace unless you are told otherwise.
- Before doing anything destructive or irreversible, explain what you are about to do.
- Keep the user informed of progress on long tasks, and finish with a short summary.
";

/// The default `AGENTS.md` (how the agent works) of a workspace, until someone edits it.
pub const DEFAULT_AGENTS: &str = "\
# Agents

Instructions for agents working in this workspace. Edit this file to add project
conventions, commands to run and rules to follow.
";

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
    /// The `SOUL.md` a new session starts with (the server's default), in place of the
    /// worker's own; a session that has one keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_soul: Option<String>,
    /// The `AGENTS.md` a new session starts with, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_agents: Option<String>,
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

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// `ok`.
    pub status: String,
    /// Worker version.
    pub version: String,
    /// Executor name.
    pub executor: String,
    /// Sessions with a running task.
    pub busy_sessions: Vec<SessionId>,
}
