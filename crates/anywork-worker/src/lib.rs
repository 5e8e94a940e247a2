//! The AnyWork worker: the process beside each session's agent that the server calls.
//!
//! - [`workspace`]: session workspaces on disk (skills, `.mcp.json`, `SOUL.md`, files), with
//!   injective directory names and no following of symbolic links.
//! - [`history`]: the worker's executor-independent conversation history per session.
//! - [`api`]: the HTTP API ([`api::router`], [`api::serve`]) that runs tasks on an
//!   [`Executor`](anywork_core::Executor) and streams their [`TaskEvent`](anywork_core::TaskEvent)s
//!   as server-sent events.
//! - [`state`]: [`WorkerConfig`] and [`WorkerState`], what the handlers share.

pub mod api;
pub mod history;
mod run;
pub mod state;
pub mod workspace;

pub use api::{ApiError, router, serve};
pub use history::{HistoryMessage, Role, ToolCallRecord};
pub use run::NO_RESULT;
pub use state::{WorkerConfig, WorkerState};
pub use workspace::{FileEntry, FileListing, Workspace, WorkspaceDoc, encode_session_id};
