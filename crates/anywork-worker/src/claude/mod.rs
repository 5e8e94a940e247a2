//! [`ClaudeCodeExecutor`]: runs tasks with the Claude Code CLI (`claude`), one process per
//! session, kept warm between its tasks.
//!
//! The CLI runs in its long-lived stream-json mode, so that a run can be interrupted and can ask
//! for permissions:
//!
//! ```text
//! claude --input-format stream-json --output-format stream-json --verbose
//!        --include-partial-messages --max-turns N
//!        [--model=M] [--resume=<id>] [--append-system-prompt=<SOUL.md + AGENTS.md>]
//!        (--dangerously-skip-permissions | --permission-prompt-tool stdio)
//!        [--settings=<sandbox settings>] [--mcp-config=<ws>/.claude-state/anywork-mcp.json
//!        --strict-mcp-config]
//! ```
//!
//! The child runs in the session workspace, in its own process group, with a cleared
//! environment: `PATH` and a few locale/proxy/CA variables are kept, then come the API key and
//! base URL, `DISABLE_TELEMETRY=1`, `DISABLE_ERROR_REPORTING=1`, `DISABLE_AUTOUPDATER=1`,
//! `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`, `IS_SANDBOX=1` (the CLI refuses
//! `--dangerously-skip-permissions` as root without it), the configured extra variables, and
//! last `HOME=<ws>/.home` and `CLAUDE_CONFIG_DIR=<ws>/.claude-state` (so that `--resume` finds
//! the conversation after a worker restart).
//!
//! Confinement ([`ClaudeCodeConfig::sandbox`], see [`crate::sandbox`]):
//!
//! - When the sandbox is confined (bubblewrap), the CLI itself runs in it, with the network:
//!   `/` read-only, the hidden folders empty, the workspace the only writable path. That
//!   confines everything the CLI does — its file tools (`Read`, `Write`, `Edit`), `Bash`, MCP
//!   servers, hooks — to the workspace, whatever its permission mode.
//! - Inside, Claude Code's own sandbox confines `Bash` further (`--settings`, not a file the
//!   agent could rewrite): `sandbox.enabled`, no unsandboxed escape
//!   (`allowUnsandboxedCommands: false`), writes to the workspace only, the network per
//!   `SANDBOX_NETWORK` (all domains, or none with `strictAllowlist`), and the model keys
//!   unset for its commands (`credentials.envVars` deny). It needs `bwrap` and `socat` on
//!   `PATH`; without `socat` Claude Code runs `Bash` without its own sandbox (still inside
//!   the worker's), so its commands see `ANTHROPIC_API_KEY` and the network.
//! - Not confined by either: the CLI's own network use (the model API, `WebFetch`,
//!   `WebSearch`) and, when the worker's sandbox is not confined, everything (Claude Code's
//!   `Bash` then inherits the CLI's environment, API key included).
//! - MCP stdio servers (confined or not) are started through `env -u <key>...` from a copy of
//!   `.mcp.json` ([`MCP_CONFIG_FILE`], mode 0600, passed with `--strict-mcp-config`), so the
//!   model keys reach them only when their own `env` names them.
//!
//! The user's message is written as one stdin line; when the turn's `result` line arrives the
//! task is over: after a successful turn the process stays up for the session's next task
//! (see [Warm processes](#warm-processes)), otherwise stdin is closed and the CLI exits. Each
//! stdout line becomes zero or more [`TaskEvent`]s:
//!
//! | line | events |
//! |---|---|
//! | `system`/`init` | [`TaskEvent::Init`], plus an [`TaskEvent::Error`] (code `mcp_server_failed`) per MCP server whose status is `failed` |
//! | `stream_event` (`--include-partial-messages`) | a top-level `text_delta` → [`TaskEvent::Text`] with that piece, as the model writes it; other raw events are ignored |
//! | `assistant` | per content block (text blocks only when their text was not streamed): `text` → [`TaskEvent::Text`], `thinking` → [`TaskEvent::Thinking`], `tool_use` (also `server_tool_use`, `mcp_tool_use`) → [`TaskEvent::ToolCall`]. Text and thinking of sub-agents (`parent_tool_use_id` set) are left out; their tool calls are kept. The synthetic line the CLI writes for an API error (`is_api_error_message`/`error`, model `<synthetic>`) is skipped: the `result` line that follows carries the same text |
//! | `user` | per `tool_result` block: [`TaskEvent::ToolResult`] (string content, or the text parts of a block array joined with `\n`) |
//! | `system`/`api_retry` | [`TaskEvent::Progress`] (stage `model_retry`: attempt, delay, reason); a 401/403 instead stops the CLI at once and fails the run with what to fix (an [`TaskEvent::Error`] with code `auth_failed`) |
//! | `result` | [`TaskEvent::Usage`]; when `is_error` (and the run was not canceled) an [`TaskEvent::Error`] whose code is `terminal_reason` (`api_error`, `max_turns`, ...); and at the very end [`TaskEvent::Done`] |
//! | `control_request`/`can_use_tool` | [`TaskEvent::InputRequired`] (kind [`InputKind::Permission`](anywork_core::InputKind::Permission)); other control requests are answered with an error |
//! | anything else, non-JSON lines | ignored (logged at debug level) |
//!
//! Success is judged by `is_error`, never by `subtype` (which says `success` for API errors).
//!
//! The conversation continues across tasks: the CLI's `session_id` is kept in
//! `<ws>/sessions/claude-session-id` and passed to `--resume` next time. If the CLI no longer
//! knows it (`No conversation found with session ID`), the id is forgotten, an
//! [`TaskEvent::Error`] with code [`HISTORY_LOST`] is sent and the message runs again in a new
//! conversation, in the same task.
//!
//! # Warm processes
//!
//! Starting the CLI costs about half a second before its first line (≈ 1 s with the bundled
//! binary on a busy machine). So a session's process is kept between its tasks: after a
//! turn that ended well (`result` with `is_error: false`, not canceled, not timed out) it
//! waits, and the session's next task is written to its stdin as the next turn (which starts
//! with its own `init` and ends with its own `result`). It is released (stdin closed, then
//! its process group killed):
//!
//! - after [`ClaudeCodeConfig::warm_idle`] without a task (`CLAUDE_WARM_IDLE_SECONDS`,
//!   default 300 s);
//! - past [`ClaudeCodeConfig::warm_max`] resident processes per worker, running ones
//!   included (`CLAUDE_WARM_MAX`, default 4): the least recently used idle one goes first;
//! - when the session's workspace folder is removed or replaced (session deleted, workspace
//!   purged), or the CLI exited on its own;
//! - at the next task, when what the process was started with changed: the system prompt
//!   (`SOUL.md`, `AGENTS.md`), `.mcp.json`, `CLAUDE.md` or anything under `.claude/`
//!   (skills, settings, agents, commands), or the remembered conversation id;
//! - when the executor (its last clone) is dropped.
//!
//! A turn that failed, was canceled (interrupted) or timed out never leaves its process for
//! the next task: it exits as above. A task's cost is the difference of the process's
//! cumulative `total_cost_usd` since its previous turn. If a warm process dies before
//! writing anything for a task, the task runs again in a new process (`--resume`).
//! Streaming and confinement are the same as for a new process: it is the same process.
//! Either setting at `0` turns warm processes off (one process per task).
//! [`ClaudeCodeExecutor::warm_stats`] counts processes started, reused and released.
//!
//! Every run ends with exactly one [`TaskEvent::Done`], sent after the CLI has exited (or,
//! for a warm process, once its turn is over):
//! `canceled` after [`ExecutionControl::cancel`](anywork_core::ExecutionControl::cancel) (an `interrupt` control request, then SIGKILL
//! to the process group if no `result` came within a second), `failed` with "timed out after
//! ..." when [`ClaudeCodeConfig::timeout`] passes (the process group is killed), and `failed`
//! with the tail of stderr when the CLI exits without a `result`. Dropping the event stream
//! kills the process group at once.

mod config;
mod confine;
mod driver;
mod process;
mod session_files;
mod stream_json;
mod warm;

use std::collections::HashMap;
use std::fs;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anywork_core::{Error, ErrorKind, Execution, ExecutionRequest, Executor, Result, TaskEvent};
use async_trait::async_trait;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use config::INSTALL_HINT;
pub use config::{ClaudeCodeConfig, DEFAULT_MODEL, PermissionMode};
pub use confine::MCP_CONFIG_FILE;
use driver::{Control, Driver};
use process::{Group, Proc};
use session_files::{ensure_dir, read_session_id, system_prompt};
use stream_json::user_line;
use warm::Pool;
pub use warm::WarmStats;

/// Folder of the session workspace that holds the remembered CLI session id.
pub const SESSIONS_DIR: &str = "sessions";
/// File (inside [`SESSIONS_DIR`]) that remembers the CLI's `session_id` for `--resume`.
pub const SESSION_ID_FILE: &str = "claude-session-id";
/// Folder of the workspace used as `CLAUDE_CONFIG_DIR` (transcripts, `.claude.json`).
pub const CONFIG_DIR: &str = ".claude-state";
/// Folder of the workspace used as the CLI's `HOME`.
pub const HOME_DIR: &str = ".home";
/// [`TaskEvent::Error`] code sent when the CLI lost the conversation and a new one was started.
pub const HISTORY_LOST: &str = "history_lost";
/// [`TaskEvent::Error`] code sent per MCP server that failed to start.
pub const MCP_SERVER_FAILED: &str = "mcp_server_failed";
/// [`TaskEvent::Error`] code sent when a stdout line was longer than
/// [`ClaudeCodeConfig::max_line_bytes`] and was skipped.
pub const LINE_TOO_LONG: &str = "line_too_long";

/// Events buffered between the driver and the stream's reader.
const EVENT_BUFFER: usize = 64;

/// Runs tasks with the Claude Code CLI; see the [module documentation](self).
///
/// Clones share their warm processes; they are released when the last clone is dropped.
#[derive(Clone)]
pub struct ClaudeCodeExecutor {
    config: Arc<ClaudeCodeConfig>,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for ClaudeCodeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaudeCodeExecutor")
            .field("config", &self.config)
            .field("warm", &self.pool.stats())
            .finish()
    }
}

impl ClaudeCodeExecutor {
    /// An executor with `config`.
    pub fn new(config: ClaudeCodeConfig) -> Self {
        if config.sandbox.is_confined() && !config.sandbox.has_socat() {
            tracing::warn!(
                "Claude Code's own sandbox needs socat (apt install socat): until it is \
                 installed, its Bash commands run inside the worker's sandbox only, with the \
                 network and the API key in their environment"
            );
        }
        let pool = Pool::new(config.warm_idle, config.warm_max);
        Self {
            config: Arc::new(config),
            pool,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ClaudeCodeConfig {
        &self.config
    }

    /// Counters of its CLI processes: started, reused warm, released, idle and running now.
    pub fn warm_stats(&self) -> WarmStats {
        self.pool.stats()
    }
}

/// The worker's MCP server of the pull-request tool for this run, as `.mcp.json` has it.
pub(super) fn tool_mcp(request: &ExecutionRequest) -> Option<(String, serde_json::Value)> {
    let server = request.pull_requests.as_ref()?.mcp_server()?;
    let value = serde_json::to_value(server).ok()?;
    Some((crate::pull_request::MCP_SERVER_NAME.to_owned(), value))
}

#[async_trait]
impl Executor for ClaudeCodeExecutor {
    fn name(&self) -> &str {
        "claude-code"
    }

    async fn start(&self, request: ExecutionRequest) -> Result<Execution> {
        let config = self.config.clone();
        if !config.binary.is_file() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Claude Code CLI not found at `{}`; {INSTALL_HINT}",
                    config.binary.display()
                ),
            ));
        }
        // Absolute, so that `HOME` and `CLAUDE_CONFIG_DIR` do not depend on the child's cwd.
        let workspace = fs::canonicalize(&request.workspace)
            .ok()
            .filter(|ws| ws.is_dir())
            .ok_or_else(|| {
                Error::not_found(format!(
                    "the session workspace `{}` is not a directory",
                    request.workspace.display()
                ))
            })?;
        let mut request = request;
        request.workspace = workspace.clone();
        for dir in [HOME_DIR, CONFIG_DIR, SESSIONS_DIR] {
            ensure_dir(&workspace.join(dir))?;
        }
        let session_id = read_session_id(&workspace);
        let system_prompt = system_prompt(&workspace);
        let tool_mcp = tool_mcp(&request);
        // A warm process serves the next task only with the same tool server.
        let keyed = match &tool_mcp {
            Some((name, server)) => Some(format!(
                "{}\0{name}\0{server}",
                system_prompt.as_deref().unwrap_or("")
            )),
            None => system_prompt.clone(),
        };
        let fingerprint = warm::fingerprint(&workspace, keyed.as_deref());

        let group = Arc::new(Group::default());
        let (warm, running) = self
            .pool
            .begin(&workspace, fingerprint, session_id.as_deref());
        let proc = match warm {
            Some(proc) => {
                tracing::info!(
                    task = %request.task_id,
                    session = %request.session_id,
                    pid = proc.pgid.as_raw(),
                    "claude is warm"
                );
                proc
            }
            None => {
                let proc = Proc::spawn(
                    &config,
                    &workspace,
                    system_prompt.as_deref(),
                    session_id.as_deref(),
                    tool_mcp.as_ref(),
                )?;
                self.pool.started();
                tracing::info!(
                    task = %request.task_id,
                    session = %request.session_id,
                    pid = proc.pgid.as_raw(),
                    resume = session_id.is_some(),
                    "claude started"
                );
                proc
            }
        };
        group.set(Some(proc.pgid));
        proc.send(user_line(&request.message));

        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (control_tx, control_rx) = mpsc::channel(16);
        let started = Instant::now();
        let driver = Driver {
            deadline: started + config.timeout,
            config,
            request,
            system_prompt,
            tx,
            control: control_rx,
            control_open: true,
            group: group.clone(),
            started,
            session_id,
            canceled: false,
            timed_out: false,
            interrupts: 0,
            pending: HashMap::new(),
            streamed_text: false,
            fatal: None,
            running,
            fingerprint,
        };
        tokio::spawn(driver.run(proc));
        Ok(Execution {
            events: Box::pin(Events {
                rx,
                group: group.clone(),
            }),
            control: Arc::new(Control { tx: control_tx }),
        })
    }
}

/// The event stream handed out: the driver's channel, and a kill of the process group on drop.
struct Events {
    rx: mpsc::Receiver<TaskEvent>,
    group: Arc<Group>,
}

impl Stream for Events {
    type Item = TaskEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskEvent>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.group.kill();
    }
}
