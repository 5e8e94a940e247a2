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
    /// A git repository to check out (or refresh) in the session's workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<RepoCheckout>,
}

/// A git repository a task works in: checked out shallowly (depth 1) in the folder `dir` of
/// the session's workspace, and brought to `git_ref` again before each task (local changes to
/// tracked files are dropped; untracked files stay). Built with [`RepoCheckout::new`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RepoCheckout {
    /// The clone URL (`https://…`, or `file://…` in tests).
    pub url: String,
    /// What to check out: a branch, a tag or a full ref (`refs/pull/12/head`); the remote's
    /// `HEAD` when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// The folder inside the workspace (one plain name, e.g. the repository's name).
    pub dir: String,
    /// A token for HTTPS (sent as `x-access-token` basic auth, never written to disk); a
    /// secret, hidden by `Debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl RepoCheckout {
    /// `url` checked out in `dir`, at the remote's `HEAD`, without a token.
    pub fn new(url: impl Into<String>, dir: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            git_ref: None,
            dir: dir.into(),
            token: None,
        }
    }

    /// Checks the URL (`https://`, `http://` or `file://`, no spaces), the ref (no spaces,
    /// no leading `-`, no `..`) and the folder (one plain name).
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str| crate::Error::invalid_input(format!("repository checkout: {what}"));
        if !["https://", "http://", "file://"]
            .iter()
            .any(|p| self.url.starts_with(p))
            || self
                .url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(
                "the URL must be https://, http:// or file:// without spaces",
            ));
        }
        if let Some(r) = &self.git_ref
            && (r.is_empty()
                || r.starts_with('-')
                || r.contains("..")
                || r.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ':'))
        {
            return Err(bad("the ref must be a branch, tag or refs/… name"));
        }
        crate::spec::validate_name("repository folder", &self.dir)
    }
}

impl std::fmt::Debug for RepoCheckout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoCheckout")
            .field("url", &self.url)
            .field("git_ref", &self.git_ref)
            .field("dir", &self.dir)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
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
