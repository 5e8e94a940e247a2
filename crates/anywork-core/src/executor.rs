//! [`Executor`]: what runs an agent inside a worker.

use std::path::{Path, PathBuf};
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
        }
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

    /// Starts ahead of time what the first run in `workspace` will need, so that it does not
    /// wait for it (Claude Code: a spare CLI process bound to that workspace). A worker calls
    /// it only for the one session it serves alone (a container per session), before that
    /// session's first task. `defaults` holds the worker's `SOUL.md` and `AGENTS.md`, which a
    /// workspace without its own will start with. Returns whether anything was started; what
    /// was started is used only if the workspace still matches when the run comes, else it is
    /// released. The default starts nothing.
    async fn prestart(&self, workspace: &Path, defaults: &Path) -> Result<bool> {
        let _ = (workspace, defaults);
        Ok(false)
    }
}
