//! The AnyWork worker: the process beside each session's agent that the server calls.
//!
//! - [`workspace`]: session workspaces on disk (skills, `.mcp.json`, `SOUL.md`, files), with
//!   injective directory names and no following of symbolic links.
//! - [`history`]: the worker's executor-independent conversation history per session.
//! - [`api`]: the HTTP API ([`api::router`], [`api::serve`]) that runs tasks on an
//!   [`Executor`](anywork_core::Executor) and streams their [`TaskEvent`](anywork_core::TaskEvent)s
//!   as server-sent events.
//! - `claude` (feature `claude-code`): `ClaudeCodeExecutor`, the Claude Code CLI in
//!   stream-json mode.
//! - `native` (feature `native`): `NativeExecutor`, an agent loop in Rust over the Anthropic
//!   or an OpenAI-compatible API; `native::mcp` (feature `mcp`): its MCP client manager.
//! - [`sandbox`]: [`Sandbox`], the confinement (bubblewrap) and clean environment of every
//!   process the agent starts.
//! - [`select`]: the executor named by `EXECUTOR` or the model settings, among those built in.
//! - [`state`]: [`WorkerConfig`] and [`WorkerState`], what the handlers share.
//!
//! Features `claude-code`, `native` and `mcp` are on by default; without any executor the
//! crate still builds (an embedder brings its own [`Executor`](anywork_core::Executor)).

pub mod api;
#[cfg(feature = "claude-code")]
pub mod claude;
pub mod files;
pub mod git;
pub mod history;
#[cfg(feature = "native")]
pub mod native;
pub mod pull_request;
mod run;
pub mod sandbox;
pub mod select;
pub mod state;
pub mod workspace;

pub use api::{ApiError, router, serve};
#[cfg(feature = "claude-code")]
pub use claude::{ClaudeCodeConfig, ClaudeCodeExecutor, PermissionMode};
pub use history::{HistoryMessage, Role, ToolCallRecord};
#[cfg(feature = "mcp")]
pub use native::mcp::{McpClients, McpServerReport, ToolDef, ToolOutcome};
#[cfg(feature = "native")]
pub use native::{NativeConfig, NativeExecutor, Provider, RetryPolicy};
pub use run::NO_RESULT;
pub use sandbox::{Sandbox, SandboxConfig, SandboxMode};
pub use select::{MODEL_HINT, executor_from_env, executor_from_vars, executor_with_sandbox};
pub use state::{WorkerConfig, WorkerState};
pub use workspace::{FileEntry, FileListing, Workspace, WorkspaceDoc, encode_session_id};
