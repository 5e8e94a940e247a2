//! The AnyWork worker: the process beside each session's agent that the server calls.
//!
//! - [`workspace`]: session workspaces on disk (skills, `.mcp.json`, `SOUL.md`, files), with
//!   injective directory names and no following of symbolic links.
//! - [`history`]: the worker's executor-independent conversation history per session.
//! - [`api`]: the HTTP API ([`api::router`], [`api::serve`]) that runs tasks on an
//!   [`Executor`](anywork_core::Executor) and streams their [`TaskEvent`](anywork_core::TaskEvent)s
//!   as server-sent events.
//! - [`native`]: [`NativeExecutor`], an agent loop in Rust over the Anthropic or an
//!   OpenAI-compatible API; [`native::mcp`]: its MCP client manager.
//! - [`state`]: [`WorkerConfig`] and [`WorkerState`], what the handlers share.

pub mod api;
pub mod claude;
pub mod history;
pub mod native;
mod run;
pub mod select;
pub mod state;
pub mod workspace;

pub use api::{ApiError, router, serve};
pub use claude::{ClaudeCodeConfig, ClaudeCodeExecutor, PermissionMode};
pub use history::{HistoryMessage, Role, ToolCallRecord};
#[cfg(feature = "mcp")]
pub use native::mcp::McpClients;
pub use native::mcp::{McpServerReport, ToolDef, ToolOutcome};
pub use native::{NativeConfig, NativeExecutor, Provider, RetryPolicy};
pub use run::NO_RESULT;
pub use select::{MODEL_HINT, executor_from_env, executor_from_vars};
pub use state::{WorkerConfig, WorkerState};
pub use workspace::{FileEntry, FileListing, Workspace, WorkspaceDoc, encode_session_id};
