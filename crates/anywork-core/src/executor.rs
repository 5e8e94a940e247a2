//! [`Executor`]: what runs an agent inside a worker.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures_core::Stream;

use crate::error::Result;
use crate::event::{InputResponse, TaskEvent};
use crate::ids::{SessionId, TaskId};

/// A stream of events that ends with exactly one [`TaskEvent::Done`].
pub type EventStream = Pin<Box<dyn Stream<Item = TaskEvent> + Send + 'static>>;

/// One run of an agent. Build it with [`ExecutionRequest::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExecutionRequest {
    /// The task.
    pub task_id: TaskId,
    /// Its session; runs of one session continue one conversation.
    pub session_id: SessionId,
    /// The user's message.
    pub message: String,
    /// The session's workspace directory (skills, `.mcp.json`, `SOUL.md`, `files/`).
    pub workspace: PathBuf,
    /// Opens pull requests from the session's repository checkout with credentials the run
    /// never sees; `None` when the task has no repository with credentials (then the agent is
    /// not offered the tool).
    pub pull_requests: Option<Arc<dyn PullRequestOpener>>,
}

impl ExecutionRequest {
    /// A run of `task_id` in `session_id` that answers `message` inside `workspace`.
    pub fn new(
        task_id: TaskId,
        session_id: SessionId,
        message: impl Into<String>,
        workspace: impl Into<PathBuf>,
    ) -> Self {
        Self {
            task_id,
            session_id,
            message: message.into(),
            workspace: workspace.into(),
            pull_requests: None,
        }
    }

    /// Sets [`pull_requests`](Self::pull_requests).
    pub fn with_pull_requests(mut self, opener: Option<Arc<dyn PullRequestOpener>>) -> Self {
        self.pull_requests = opener;
        self
    }
}

/// What the agent asks for when it opens a pull request (the tool's arguments).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenPullRequest {
    /// The pull request's title (also the commit message's first line).
    pub title: String,
    /// Its description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The new branch to push; a default name when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Open it as a draft.
    #[serde(default)]
    pub draft: bool,
}

impl OpenPullRequest {
    /// Longest title accepted.
    pub const MAX_TITLE: usize = 256;
    /// Longest description accepted (GitHub's limit is 65,536 characters).
    pub const MAX_BODY: usize = 60_000;

    /// Checks the title (1 to 256 characters, one line), the description's length and the
    /// branch name ([`validate_branch`]).
    pub fn validate(&self) -> Result<()> {
        let title = self.title.trim();
        if title.is_empty() || title.len() > Self::MAX_TITLE || title.contains(['\n', '\r']) {
            return Err(crate::Error::invalid_input(format!(
                "`title` must be one line of 1 to {} characters",
                Self::MAX_TITLE
            )));
        }
        if self.body.as_ref().is_some_and(|b| b.len() > Self::MAX_BODY) {
            return Err(crate::Error::invalid_input(format!(
                "`body` must be at most {} bytes",
                Self::MAX_BODY
            )));
        }
        if let Some(branch) = &self.branch {
            validate_branch(branch)?;
        }
        Ok(())
    }
}

/// Checks a new branch's name: 1 to 100 characters of `A-Z a-z 0-9 - _ . /`, in
/// `/`-separated parts that are not empty and neither start with `.` or `-` nor end with `.`
/// or `.lock`; not `HEAD`. Stricter than git, so that the name is safe in a command line, a
/// ref and a URL.
pub fn validate_branch(name: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.ends_with(".lock")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if name.is_empty()
        || name.len() > 100
        || name == "HEAD"
        || name.contains("..")
        || !name.split('/').all(part_ok)
    {
        return Err(crate::Error::invalid_input(format!(
            "branch name {:?} is not allowed: use 1 to 100 characters of letters, digits, \
             '-', '_', '.' and '/' (e.g. `fix/typo-in-readme`), without `..`, empty parts, or \
             a part starting with '.' or '-'",
            name.chars().take(120).collect::<String>()
        )));
    }
    Ok(())
}

/// Opens a pull request from the session's repository checkout: commits the working tree on
/// a new branch, pushes it and asks the forge's API, with credentials held by the worker.
#[async_trait]
pub trait PullRequestOpener: Send + Sync + std::fmt::Debug {
    /// Opens one; the error says what went wrong (with no secret in it).
    async fn open(&self, request: OpenPullRequest) -> Result<crate::outcome::PullRequestLink>;

    /// The repository's folder in the workspace (for the tool's description).
    fn folder(&self) -> &str;

    /// An MCP server (streamable HTTP, on the worker's own API) that offers the same tool, for
    /// executors that take MCP servers (Claude Code); `None` when the worker has none.
    fn mcp_server(&self) -> Option<crate::spec::McpServerConfig> {
        None
    }
}

/// Controls a run while its events stream.
#[async_trait]
pub trait ExecutionControl: Send + Sync {
    /// Stops the run; its stream then ends with a `canceled` [`TaskEvent::Done`].
    async fn cancel(&self) -> Result<()>;

    /// Answers the pending [`TaskEvent::InputRequired`]; the run goes on.
    async fn respond(&self, response: InputResponse) -> Result<()>;
}

/// A started run: its events, and a handle to steer it.
pub struct Execution {
    /// The events; dropping the stream stops the run and its child processes.
    pub events: EventStream,
    /// Cancel or answer.
    pub control: Arc<dyn ExecutionControl>,
}

/// An agent runtime (the Claude Code CLI, a native tool-use loop, ...).
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Short name (`claude-code`, `native`).
    fn name(&self) -> &str;

    /// Starts a run. Errors here mean it never started (bad configuration, missing binary);
    /// failures after the start arrive as a `failed` [`TaskEvent::Done`].
    async fn start(&self, request: ExecutionRequest) -> Result<Execution>;
}
