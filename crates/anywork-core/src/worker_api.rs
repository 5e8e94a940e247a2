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
//! | `DELETE /sessions/:id` | | `{"status":"deleted","session_id"}` (409 while a task runs in it) |
//!
//! Errors are `{"error":{"code","message"}}` with the code from
//! [`ErrorKind::as_str`](crate::ErrorKind::as_str).
//!
//! A worker that has a [`WorkerSecret`] (`WORKER_SECRET` / `WORKER_SECRET_FILE`) refuses
//! every call that does not carry it in [`SECRET_HEADER`] with 401 `unauthorized`; only
//! `GET /health` stays open, and without the secret it answers `{"status":"ok"}` alone.

use std::fmt;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::ids::{SessionId, TaskId};
use crate::spec::{McpServers, SkillSpec};

/// Path of [`PrepareRequest`].
pub const PREPARE_PATH: &str = "/prepare";
/// Path of [`ChatRequest`].
pub const CHAT_PATH: &str = "/chat";
/// `GET` with `?task_id=&after_seq=`: a running (or just ended) task's events after the
/// worker's seq `after_seq`, as the `/chat` stream sends them (each SSE event's `id` is its
/// seq, from 1), for a server that lost its `/chat` stream and comes back. 404 when the worker
/// does not have the task.
pub const ATTACH_PATH: &str = "/chat/attach";
/// Path of [`CancelRequest`].
pub const CANCEL_PATH: &str = "/cancel";
/// Path of [`InputAnswer`].
pub const INPUT_PATH: &str = "/input";
/// Path of the health check.
pub const HEALTH_PATH: &str = "/health";
/// Prefix of a session's routes (`/sessions/:id`, `/sessions/:id/messages`).
pub const SESSIONS_PATH: &str = "/sessions";

/// The header that carries the worker's secret on every call from the server.
pub const SECRET_HEADER: &str = "x-anywork-worker-secret";

/// The shared secret between the server and one worker. Its `Debug` never shows the value;
/// [`matches`](Self::matches) compares in constant time.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WorkerSecret(String);

impl WorkerSecret {
    /// Shortest secret accepted from configuration.
    pub const MIN_LEN: usize = 16;

    /// A new random secret: 64 hex digits (244 random bits from the OS generator).
    pub fn generate() -> Self {
        Self(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// A secret from configuration (surrounding whitespace, e.g. a file's newline, is
    /// ignored). `InvalidInput` when it is shorter than [`MIN_LEN`](Self::MIN_LEN) or holds
    /// characters a header cannot carry.
    pub fn new(value: impl AsRef<str>) -> crate::Result<Self> {
        let value = value.as_ref().trim();
        if value.len() < Self::MIN_LEN {
            return Err(crate::Error::invalid_input(format!(
                "a worker secret must have at least {} characters (it has {}); generate one \
                 with `openssl rand -hex 32`",
                Self::MIN_LEN,
                value.len()
            )));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::Error::invalid_input(
                "a worker secret may only hold visible ASCII characters (no spaces)",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The value, to send or to store.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for WorkerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerSecret(<redacted>)")
    }
}

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
    /// Where pull requests from this checkout go. With a [`token`](Self::token), the worker
    /// offers the agent a tool that commits its changes on a new branch, pushes it with the
    /// token and opens a pull request through this API; the token never reaches the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_requests: Option<PullRequestTarget>,
}

/// The forge API that opens pull requests for a [`RepoCheckout`] (GitHub's REST API:
/// `POST {api_url}/repos/{repository}/pulls`, with the checkout's token as a Bearer token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequestTarget {
    /// The REST API's base URL, e.g. `https://api.github.com` (from the server's
    /// configuration, never from the agent).
    pub api_url: String,
    /// `owner/name`.
    pub repository: String,
    /// The branch pull requests ask to merge into (the default branch, or a pull request's
    /// base).
    pub base: String,
}

impl PullRequestTarget {
    /// Checks the API URL (`http(s)://`, no spaces), the repository (`owner/name` of plain
    /// characters) and the base branch.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str| crate::Error::invalid_input(format!("pull request target: {what}"));
        if !(self.api_url.starts_with("https://") || self.api_url.starts_with("http://"))
            || self
                .api_url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(
                "the API URL must be https:// or http:// without spaces",
            ));
        }
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 100
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        match self.repository.split_once('/') {
            Some((owner, name)) if part_ok(owner) && part_ok(name) => {}
            _ => return Err(bad("the repository must be owner/name")),
        }
        crate::executor::validate_branch(&self.base)
            .map_err(|_| bad("the base must be a plain branch name"))
    }
}

impl RepoCheckout {
    /// `url` checked out in `dir`, at the remote's `HEAD`, without a token.
    pub fn new(url: impl Into<String>, dir: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            git_ref: None,
            dir: dir.into(),
            token: None,
            pull_requests: None,
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
        if let Some(target) = &self.pull_requests {
            target.validate()?;
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
            .field("pull_requests", &self.pull_requests)
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

/// `GET /health`. Without the worker's secret only `status` is answered (the others are then
/// empty). The original AnyWork's worker answers `{status, engine, workspace, active_sessions}`:
/// read as `executor` = `engine`, no version and no busy session.
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
