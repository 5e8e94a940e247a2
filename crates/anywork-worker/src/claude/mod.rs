//! [`ClaudeCodeExecutor`]: runs tasks with the Claude Code CLI (`claude`), one process per task.
//!
//! The CLI runs in its long-lived stream-json mode, so that a run can be interrupted and can ask
//! for permissions:
//!
//! ```text
//! claude --input-format stream-json --output-format stream-json --verbose --max-turns N
//!        [--model=M] [--resume=<id>] [--append-system-prompt=<SOUL.md + AGENTS.md>]
//!        (--dangerously-skip-permissions | --permission-prompt-tool stdio)
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
//! The user's message is written as one stdin line; when the turn's `result` line arrives,
//! stdin is closed and the CLI exits. Each stdout line becomes zero or more [`TaskEvent`]s:
//!
//! | line | events |
//! |---|---|
//! | `system`/`init` | [`TaskEvent::Init`], plus an [`TaskEvent::Error`] (code `mcp_server_failed`) per MCP server whose status is `failed` |
//! | `assistant` | per content block: `text` → [`TaskEvent::Text`], `thinking` → [`TaskEvent::Thinking`], `tool_use` (also `server_tool_use`, `mcp_tool_use`) → [`TaskEvent::ToolCall`]. Text and thinking of sub-agents (`parent_tool_use_id` set) are left out; their tool calls are kept. The synthetic line the CLI writes for an API error (`is_api_error_message`/`error`, model `<synthetic>`) is skipped: the `result` line that follows carries the same text |
//! | `user` | per `tool_result` block: [`TaskEvent::ToolResult`] (string content, or the text parts of a block array joined with `\n`) |
//! | `result` | [`TaskEvent::Usage`]; when `is_error` (and the run was not canceled) an [`TaskEvent::Error`] whose code is `terminal_reason` (`api_error`, `max_turns`, ...); and at the very end [`TaskEvent::Done`] |
//! | `control_request`/`can_use_tool` | [`TaskEvent::InputRequired`] (kind [`InputKind::Permission`]); other control requests are answered with an error |
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
//! Every run ends with exactly one [`TaskEvent::Done`], sent after the CLI has exited:
//! `canceled` after [`ExecutionControl::cancel`] (an `interrupt` control request, then SIGKILL
//! to the process group if no `result` came within a second), `failed` with "timed out after
//! ..." when [`ClaudeCodeConfig::timeout`] passes (the process group is killed), and `failed`
//! with the tail of stderr when the CLI exits without a `result`. Dropping the event stream
//! kills the process group at once.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anywork_core::{
    AgentInit, Error, ErrorKind, Execution, ExecutionControl, ExecutionRequest, Executor,
    InputKind, InputRequest, InputResponse, McpServerStatus, Result, TaskEvent, TaskOutcome,
    TaskStatus, TokenUsage,
};
use async_trait::async_trait;
use futures_util::Stream;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};

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

/// What the CLI says when `--resume` names a conversation it does not have.
const NO_CONVERSATION: &str = "No conversation found with session ID";
/// Most bytes of stderr kept for error messages (the tail).
const MAX_STDERR_BYTES: usize = 64 * 1024;
/// Most bytes read from each of `SOUL.md` and `AGENTS.md` for the system prompt (one argument
/// may not exceed 128 KiB on Linux).
const MAX_PROMPT_FILE_BYTES: usize = 48 * 1024;
/// How long an interrupted run may take to send its `result` before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(1);
/// How long the CLI may take to exit after its `result` (or after stdout closed).
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Events buffered between the driver and the stream's reader.
const EVENT_BUFFER: usize = 64;
/// Environment variables passed from the worker to the CLI (besides the configured ones).
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
];

/// How the CLI treats tool permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PermissionMode {
    /// `--dangerously-skip-permissions`: every tool runs without asking (the workspace's
    /// container is the sandbox).
    #[default]
    SkipPermissions,
    /// `--permission-prompt-tool stdio`: each tool call that needs a permission becomes a
    /// [`TaskEvent::InputRequired`], answered with [`ExecutionControl::respond`].
    Prompt,
}

/// Settings of [`ClaudeCodeExecutor`].
#[derive(Clone)]
pub struct ClaudeCodeConfig {
    /// The `claude` executable.
    pub binary: PathBuf,
    /// `--model`; the CLI's default when `None`.
    pub model: Option<String>,
    /// `--max-turns` (at least 1).
    pub max_turns: u32,
    /// Skip permissions (default) or ask through [`TaskEvent::InputRequired`].
    pub permission_mode: PermissionMode,
    /// Hard limit of one run; the process group is killed after it (default 30 min).
    pub timeout: Duration,
    /// `ANTHROPIC_API_KEY` of the CLI.
    pub api_key: Option<String>,
    /// `ANTHROPIC_BASE_URL` of the CLI.
    pub base_url: Option<String>,
    /// More environment variables for the CLI (e.g. `CLAUDE_CODE_MAX_RETRIES`); they override
    /// everything but `HOME` and `CLAUDE_CONFIG_DIR`.
    pub extra_env: Vec<(String, String)>,
    /// Longest stdout line accepted (default 16 MiB); longer lines are skipped with an
    /// [`TaskEvent::Error`] (code [`LINE_TOO_LONG`]).
    pub max_line_bytes: usize,
}

impl fmt::Debug for ClaudeCodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaudeCodeConfig")
            .field("binary", &self.binary)
            .field("model", &self.model)
            .field("max_turns", &self.max_turns)
            .field("permission_mode", &self.permission_mode)
            .field("timeout", &self.timeout)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("base_url", &self.base_url)
            .field(
                "extra_env",
                &self.extra_env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("max_line_bytes", &self.max_line_bytes)
            .finish()
    }
}

impl ClaudeCodeConfig {
    /// Default of [`max_turns`](Self::max_turns).
    pub const DEFAULT_MAX_TURNS: u32 = 50;
    /// Default of [`timeout`](Self::timeout): 30 minutes.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// Default of [`max_line_bytes`](Self::max_line_bytes): 16 MiB.
    pub const DEFAULT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

    /// Defaults, with the CLI at `binary`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            model: None,
            max_turns: Self::DEFAULT_MAX_TURNS,
            permission_mode: PermissionMode::default(),
            timeout: Self::DEFAULT_TIMEOUT,
            api_key: None,
            base_url: None,
            extra_env: Vec::new(),
            max_line_bytes: Self::DEFAULT_MAX_LINE_BYTES,
        }
    }

    /// Reads the settings from the process environment; see [`from_vars`](Self::from_vars).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Reads the settings from `vars` (name, value):
    ///
    /// - the binary: `CLAUDE_BIN`, else `claude` on `PATH` (an error says what to install or
    ///   set when neither is found);
    /// - `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`, `ANTHROPIC_MODEL` (→ `model`);
    /// - `CLAUDE_MAX_TURNS`, `CLAUDE_TIMEOUT_SECS`, `CLAUDE_PERMISSION_MODE`
    ///   (`skip` or `prompt`).
    ///
    /// Empty values count as unset.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let vars: HashMap<String, String> =
            vars.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let get = |name: &str| vars.get(name).cloned();
        let binary = find_binary(get("CLAUDE_BIN"), get("PATH"))?;
        let mut config = Self::new(binary);
        config.api_key = get("ANTHROPIC_API_KEY");
        config.base_url = get("ANTHROPIC_BASE_URL");
        config.model = get("ANTHROPIC_MODEL");
        if let Some(turns) = get("CLAUDE_MAX_TURNS") {
            config.max_turns = turns
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Error::invalid_input(format!(
                        "CLAUDE_MAX_TURNS must be a positive integer, not `{turns}`"
                    ))
                })?;
        }
        if let Some(secs) = get("CLAUDE_TIMEOUT_SECS") {
            let secs: u64 = secs.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::invalid_input(format!(
                    "CLAUDE_TIMEOUT_SECS must be a positive number of seconds, not `{secs}`"
                ))
            })?;
            config.timeout = Duration::from_secs(secs);
        }
        if let Some(mode) = get("CLAUDE_PERMISSION_MODE") {
            config.permission_mode = match mode.trim().to_ascii_lowercase().as_str() {
                "skip" | "skip_permissions" | "bypass" => PermissionMode::SkipPermissions,
                "prompt" | "ask" => PermissionMode::Prompt,
                _ => {
                    return Err(Error::invalid_input(format!(
                        "CLAUDE_PERMISSION_MODE must be `skip` or `prompt`, not `{mode}`"
                    )));
                }
            };
        }
        Ok(config)
    }

    /// Sets [`model`](Self::model).
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets [`max_turns`](Self::max_turns).
    pub fn with_max_turns(mut self, max_turns: u32) -> Self {
        self.max_turns = max_turns;
        self
    }

    /// Sets [`permission_mode`](Self::permission_mode).
    pub fn with_permission_mode(mut self, mode: PermissionMode) -> Self {
        self.permission_mode = mode;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`api_key`](Self::api_key).
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets [`base_url`](Self::base_url).
    pub fn with_base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Adds one variable to [`extra_env`](Self::extra_env).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_env.push((name.into(), value.into()));
        self
    }

    /// Sets [`max_line_bytes`](Self::max_line_bytes).
    pub fn with_max_line_bytes(mut self, bytes: usize) -> Self {
        self.max_line_bytes = bytes.max(1);
        self
    }
}

const INSTALL_HINT: &str = "set CLAUDE_BIN to the `claude` executable or put `claude` on PATH \
     (install it with `npm install -g @anthropic-ai/claude-code`, or `pip install \
     claude-agent-sdk`, which bundles it at site-packages/claude_agent_sdk/_bundled/claude)";

/// `explicit` (from `CLAUDE_BIN`) if it is a file, else `claude` in one of `path`'s folders.
fn find_binary(explicit: Option<String>, path: Option<String>) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Claude Code CLI not found: CLAUDE_BIN is `{}`, which is not a file; {INSTALL_HINT}",
                    bin.display()
                ),
            ))
        };
    }
    path.iter()
        .flat_map(|p| std::env::split_paths(p).collect::<Vec<_>>())
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("claude"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!("Claude Code CLI not found on PATH; {INSTALL_HINT}"),
            )
        })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs tasks with the Claude Code CLI; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct ClaudeCodeExecutor {
    config: Arc<ClaudeCodeConfig>,
}

impl ClaudeCodeExecutor {
    /// An executor with `config`.
    pub fn new(config: ClaudeCodeConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &ClaudeCodeConfig {
        &self.config
    }
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

        let group = Arc::new(Group::default());
        let proc = Proc::spawn(
            &config,
            &workspace,
            system_prompt.as_deref(),
            session_id.as_deref(),
        )?;
        group.set(Some(proc.pgid));
        tracing::info!(
            task = %request.task_id,
            session = %request.session_id,
            pid = proc.pgid.as_raw(),
            resume = session_id.is_some(),
            "claude started"
        );
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

// ---------------------------------------------------------------------------------------------
// Process group and event stream.

/// The process group of the running CLI, shared by the driver and the event stream so that
/// whichever goes first kills it. `None` when no process is running.
#[derive(Default)]
struct Group(Mutex<Option<Pid>>);

impl Group {
    fn lock(&self) -> MutexGuard<'_, Option<Pid>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, pgid: Option<Pid>) {
        *self.lock() = pgid;
    }

    /// SIGKILL to the whole group, if one is running.
    fn kill(&self) {
        if let Some(pgid) = *self.lock() {
            kill_group(pgid);
        }
    }
}

fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pgid = pgid.as_raw(),
            "cannot kill claude's process group: {e}"
        ),
    }
}

/// Kills the group when the driver task goes away without finishing (runtime shut down).
struct KillOnDrop(Arc<Group>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
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

enum ControlMsg {
    Cancel,
    Respond(InputResponse, oneshot::Sender<Result<()>>),
}

/// [`ExecutionControl`] of one run: messages to its driver.
struct Control {
    tx: mpsc::Sender<ControlMsg>,
}

#[async_trait]
impl ExecutionControl for Control {
    async fn cancel(&self) -> Result<()> {
        // A run that is over needs no cancel.
        let _ = self.tx.send(ControlMsg::Cancel).await;
        Ok(())
    }

    async fn respond(&self, response: InputResponse) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let over = || Error::not_found("the run is over; there is nothing to answer");
        self.tx
            .send(ControlMsg::Respond(response, reply_tx))
            .await
            .map_err(|_| over())?;
        reply_rx.await.unwrap_or_else(|_| Err(over()))
    }
}

// ---------------------------------------------------------------------------------------------
// The child process.

/// One running CLI process.
struct Proc {
    child: Child,
    pgid: Pid,
    /// Lines for stdin; `None` once stdin is (to be) closed.
    stdin: Option<mpsc::UnboundedSender<String>>,
    stdout: LineReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_task: JoinHandle<()>,
    /// Whether it was started with `--resume`.
    resumed: bool,
}

impl Proc {
    fn spawn(
        config: &ClaudeCodeConfig,
        workspace: &Path,
        system_prompt: Option<&str>,
        resume: Option<&str>,
    ) -> Result<Proc> {
        let mut cmd = Command::new(&config.binary);
        cmd.args([
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--max-turns",
        ])
        .arg(config.max_turns.max(1).to_string());
        // `--flag=value`, so that a value starting with `-` is not read as a flag.
        if let Some(model) = &config.model {
            cmd.arg(format!("--model={}", model.replace('\0', "")));
        }
        if let Some(id) = resume {
            cmd.arg(format!("--resume={id}"));
        }
        if let Some(prompt) = system_prompt {
            cmd.arg(format!("--append-system-prompt={prompt}"));
        }
        match config.permission_mode {
            PermissionMode::SkipPermissions => cmd.arg("--dangerously-skip-permissions"),
            PermissionMode::Prompt => cmd.args(["--permission-prompt-tool", "stdio"]),
        };

        cmd.current_dir(workspace).env_clear();
        for name in PASSTHROUGH_ENV {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_ERROR_REPORTING", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("IS_SANDBOX", "1");
        if let Some(key) = &config.api_key {
            cmd.env("ANTHROPIC_API_KEY", key);
        }
        if let Some(url) = &config.base_url {
            cmd.env("ANTHROPIC_BASE_URL", url);
        }
        for (name, value) in &config.extra_env {
            cmd.env(name, value);
        }
        cmd.env("HOME", workspace.join(HOME_DIR))
            .env("CLAUDE_CONFIG_DIR", workspace.join(CONFIG_DIR));

        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Internal
            };
            Error::new(
                kind,
                format!(
                    "cannot start the Claude Code CLI `{}`: {e}; {INSTALL_HINT}",
                    config.binary.display()
                ),
            )
            .with_source(e)
        })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let (Some(pgid), Some(stdin), Some(stdout), Some(stderr)) = (
            pgid,
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
        ) else {
            // Not expected: all three are piped and the child was just started.
            let _ = child.start_kill();
            return Err(Error::internal(
                "the Claude Code CLI started without its pipes or pid",
            ));
        };
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_stdin(stdin, stdin_rx));
        let tail = Arc::new(Mutex::new(Vec::new()));
        let stderr_task = tokio::spawn(read_stderr(stderr, tail.clone()));
        Ok(Proc {
            child,
            pgid,
            stdin: Some(stdin_tx),
            stdout: LineReader::new(stdout, config.max_line_bytes),
            stderr: tail,
            stderr_task,
            resumed: resume.is_some(),
        })
    }

    /// Queues one stdin line; `false` when stdin is closed.
    fn send(&self, line: String) -> bool {
        self.stdin.as_ref().is_some_and(|tx| tx.send(line).is_ok())
    }

    /// Closes stdin (after the queued lines), which makes the CLI exit.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit (killing its group after [`EXIT_GRACE`]), then kills
    /// what is left of its group.
    async fn reap(&mut self) -> Option<ExitStatus> {
        self.close_stdin();
        let status = match timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(e)) => {
                tracing::warn!("cannot wait for claude: {e}");
                None
            }
            Err(_) => {
                tracing::warn!(pid = self.pgid.as_raw(), "claude did not exit; killing it");
                kill_group(self.pgid);
                match timeout(EXIT_GRACE, self.child.wait()).await {
                    Ok(Ok(status)) => Some(status),
                    _ => None,
                }
            }
        };
        // Tools' leftovers (background commands, MCP servers) go with it.
        kill_group(self.pgid);
        status
    }

    /// The tail of stderr, once it closed (or after a short wait).
    async fn stderr_tail(&mut self) -> String {
        if timeout(Duration::from_millis(500), &mut self.stderr_task)
            .await
            .is_err()
        {
            self.stderr_task.abort();
        }
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&tail).trim().to_owned()
    }
}

async fn write_stdin(mut stdin: ChildStdin, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.flush().await
        }
        .await
        {
            tracing::debug!("cannot write to claude's stdin: {e}");
            break;
        }
    }
    // Dropping `stdin` closes it.
}

async fn read_stderr(mut stderr: ChildStderr, tail: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = vec![0u8; 8192];
    loop {
        match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > MAX_STDERR_BYTES {
                    let excess = tail.len() - MAX_STDERR_BYTES;
                    tail.drain(..excess);
                }
            }
        }
    }
}

/// One stdout line, or the news that one was too long.
#[derive(Debug, PartialEq)]
enum Line {
    Complete(Vec<u8>),
    TooLong(usize),
}

/// Reads `\n`-terminated lines of at most `max` bytes; longer lines are skipped. Cancel-safe:
/// the partial line is kept in the reader.
struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    max: usize,
    /// Bytes of an over-long line skipped so far, while skipping it.
    skipped: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R, max: usize) -> Self {
        Self {
            inner: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
            max,
            skipped: None,
        }
    }

    async fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                if let Some(n) = self.skipped.take() {
                    return Ok(Some(Line::TooLong(n)));
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Line::Complete(std::mem::take(&mut self.buf))));
            }
            let newline = chunk.iter().position(|b| *b == b'\n');
            let take = newline.unwrap_or(chunk.len());
            match &mut self.skipped {
                Some(n) => *n = n.saturating_add(take),
                None if self.buf.len().saturating_add(take) > self.max => {
                    self.skipped = Some(self.buf.len().saturating_add(take));
                    self.buf = Vec::new();
                }
                None => self.buf.extend_from_slice(&chunk[..take]),
            }
            let consumed = newline.map_or(take, |i| i + 1);
            self.inner.consume(consumed);
            if newline.is_some() {
                if let Some(n) = self.skipped.take() {
                    return Ok(Some(Line::TooLong(n)));
                }
                return Ok(Some(Line::Complete(std::mem::take(&mut self.buf))));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: one task per run.

struct Driver {
    config: Arc<ClaudeCodeConfig>,
    request: ExecutionRequest,
    system_prompt: Option<String>,
    tx: mpsc::Sender<TaskEvent>,
    control: mpsc::Receiver<ControlMsg>,
    control_open: bool,
    group: Arc<Group>,
    started: Instant,
    deadline: Instant,
    /// The CLI session id as stored in the workspace.
    session_id: Option<String>,
    canceled: bool,
    timed_out: bool,
    interrupts: u64,
    /// Open permission requests: request id → the tool's input.
    pending: HashMap<String, Value>,
}

/// How one process ended.
enum Attempt {
    /// The stream's reader went away; the process group was killed.
    Gone,
    /// `--resume` named a conversation the CLI does not have.
    ResumeNotFound(String),
    /// The run is over.
    Ended(TaskOutcome),
}

impl Driver {
    async fn run(mut self, mut proc: Proc) {
        let _kill = KillOnDrop(self.group.clone());
        let outcome = loop {
            match self.attempt(&mut proc).await {
                Attempt::Gone => {
                    tracing::info!(task = %self.request.task_id, "event stream dropped; claude killed");
                    return;
                }
                Attempt::Ended(outcome) => break outcome,
                Attempt::ResumeNotFound(message) => {
                    tracing::warn!(task = %self.request.task_id, "{message}; starting a new conversation");
                    forget_session_id(&self.request.workspace);
                    self.session_id = None;
                    let lost = TaskEvent::Error {
                        message: format!(
                            "Claude Code no longer has this session's conversation ({message}); \
                             the earlier history is lost and a new conversation was started"
                        ),
                        code: Some(HISTORY_LOST.to_owned()),
                    };
                    if !self.emit(lost).await {
                        return;
                    }
                    match Proc::spawn(
                        &self.config,
                        &self.request.workspace,
                        self.system_prompt.as_deref(),
                        None,
                    ) {
                        Ok(fresh) => {
                            proc = fresh;
                            self.group.set(Some(proc.pgid));
                            proc.send(user_line(&self.request.message));
                        }
                        Err(e) => break TaskOutcome::failed(e.to_string()),
                    }
                }
            }
        };
        let mut outcome = outcome;
        if outcome.duration_ms == 0 {
            outcome.duration_ms =
                u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        tracing::info!(task = %self.request.task_id, status = %outcome.status, "claude run ended");
        let _ = self.tx.send(TaskEvent::Done(outcome)).await;
    }

    /// Drives `proc` until its stdout closes, then reaps it.
    async fn attempt(&mut self, proc: &mut Proc) -> Attempt {
        let mut result: Option<TurnResult> = None;
        let mut resume_missing: Option<String> = None;
        let mut kill_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = self.tx.closed() => {
                    self.group.kill();
                    proc.reap().await;
                    self.group.set(None);
                    return Attempt::Gone;
                }
                command = self.control.recv(), if self.control_open => match command {
                    Some(command) => self.on_command(command, proc, result.is_some(), &mut kill_at),
                    None => self.control_open = false,
                },
                () = sleep_until(self.deadline), if !self.timed_out => self.time_out(),
                () = sleep_until(kill_at.unwrap_or(self.deadline)), if kill_at.is_some() => {
                    kill_at = None;
                    tracing::info!(pid = proc.pgid.as_raw(), "killing claude's process group");
                    self.group.kill();
                }
                line = proc.stdout.next_line() => match line {
                    Ok(Some(Line::Complete(line))) => {
                        let had_end = result.is_some() || resume_missing.is_some();
                        if !self.on_line(&line, proc, &mut result, &mut resume_missing).await {
                            self.group.kill();
                            proc.reap().await;
                            self.group.set(None);
                            return Attempt::Gone;
                        }
                        if !had_end && (result.is_some() || resume_missing.is_some()) {
                            // The turn is over: let the CLI exit.
                            proc.close_stdin();
                            kill_at = Some(Instant::now() + EXIT_GRACE);
                        }
                    }
                    Ok(Some(Line::TooLong(bytes))) => {
                        let event = TaskEvent::Error {
                            message: format!(
                                "skipped a line of Claude Code output of {bytes} bytes (limit {})",
                                self.config.max_line_bytes
                            ),
                            code: Some(LINE_TOO_LONG.to_owned()),
                        };
                        if !self.emit(event).await {
                            self.group.kill();
                            proc.reap().await;
                            self.group.set(None);
                            return Attempt::Gone;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("cannot read claude's stdout: {e}");
                        break;
                    }
                },
            }
        }

        let status = proc.reap().await;
        self.group.set(None);
        let stderr = proc.stderr_tail().await;
        tracing::debug!(?status, "claude exited");
        if let Some(message) = resume_missing
            && result.is_none()
            && !self.canceled
            && !self.timed_out
        {
            return Attempt::ResumeNotFound(message);
        }
        Attempt::Ended(self.outcome(result, status, &stderr))
    }

    fn time_out(&mut self) {
        self.timed_out = true;
        tracing::warn!(
            task = %self.request.task_id,
            timeout = ?self.config.timeout,
            "claude timed out; killing its process group"
        );
        self.group.kill();
    }

    /// Sends `event`; `false` when the stream's reader is gone. Gives up (and times the run
    /// out) if the reader does not take it before the deadline.
    async fn emit(&mut self, event: TaskEvent) -> bool {
        if self.timed_out {
            return self.tx.send(event).await.is_ok();
        }
        tokio::select! {
            sent = self.tx.send(event) => sent.is_ok(),
            () = sleep_until(self.deadline) => {
                self.time_out();
                true
            }
        }
    }

    fn on_command(
        &mut self,
        command: ControlMsg,
        proc: &mut Proc,
        ended: bool,
        kill_at: &mut Option<Instant>,
    ) {
        match command {
            ControlMsg::Cancel => {
                if ended || self.canceled {
                    return;
                }
                self.canceled = true;
                self.interrupts += 1;
                let line = json!({
                    "type": "control_request",
                    "request_id": format!("anywork-interrupt-{}", self.interrupts),
                    "request": {"subtype": "interrupt"},
                });
                tracing::info!(task = %self.request.task_id, "interrupting claude");
                if proc.send(line.to_string()) {
                    *kill_at = Some(Instant::now() + INTERRUPT_GRACE);
                } else {
                    self.group.kill();
                }
            }
            ControlMsg::Respond(response, reply) => {
                let _ = reply.send(self.respond(response, proc));
            }
        }
    }

    fn respond(&mut self, response: InputResponse, proc: &mut Proc) -> Result<()> {
        let Some(input) = self.pending.remove(&response.request_id) else {
            return Err(Error::not_found(format!(
                "no input request `{}` is waiting for an answer",
                response.request_id
            )));
        };
        let answer = response.answer.trim();
        let allow = response.allow.unwrap_or_else(|| {
            matches!(
                answer.to_ascii_lowercase().as_str(),
                "allow" | "yes" | "y" | "approve" | "ok" | "true"
            )
        });
        let decision = if allow {
            json!({"behavior": "allow", "updatedInput": input})
        } else {
            let message = if answer.is_empty() {
                "Denied by the user"
            } else {
                answer
            };
            json!({"behavior": "deny", "message": message})
        };
        let line = json!({
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": response.request_id,
                "response": decision,
            },
        });
        if proc.send(line.to_string()) {
            Ok(())
        } else {
            Err(Error::conflict(
                "the run is ending; the answer came too late",
            ))
        }
    }

    /// Handles one stdout line; `false` when the stream's reader is gone.
    async fn on_line(
        &mut self,
        line: &[u8],
        proc: &mut Proc,
        result: &mut Option<TurnResult>,
        resume_missing: &mut Option<String>,
    ) -> bool {
        let value: Value = match serde_json::from_slice(line) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    tracing::debug!(line = %preview(line), "ignored a non-JSON line from claude");
                }
                return true;
            }
        };
        let kind = str_at(&value, "type").unwrap_or_default();
        let events = match kind {
            "system" if str_at(&value, "subtype") == Some("init") => {
                self.remember_session(str_at(&value, "session_id"));
                init_events(&value)
            }
            "assistant" => assistant_events(&value),
            "user" => user_events(&value),
            "result" => {
                if result.is_some() || resume_missing.is_some() {
                    tracing::debug!("ignored a second result line");
                    return true;
                }
                let turn = TurnResult::parse(&value);
                if proc.resumed
                    && turn.is_error
                    && let Some(message) = turn.no_conversation()
                {
                    *resume_missing = Some(message);
                    return true;
                }
                self.remember_session(turn.session_id.as_deref());
                let mut events = vec![TaskEvent::Usage {
                    usage: turn.usage,
                    cost_usd: turn.cost_usd,
                }];
                if turn.is_error && !self.canceled {
                    events.push(TaskEvent::Error {
                        message: turn.error_message(),
                        code: Some(turn.code.clone()),
                    });
                }
                *result = Some(turn);
                events
            }
            "control_request" => match permission_request(&value) {
                Some((request, input)) => {
                    self.pending.insert(request.request_id.clone(), input);
                    vec![TaskEvent::InputRequired(request)]
                }
                None => {
                    let request_id = value.get("request_id").cloned().unwrap_or(Value::Null);
                    let subtype = value
                        .pointer("/request/subtype")
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    tracing::debug!(
                        subtype,
                        "refused an unsupported control request from claude"
                    );
                    let refusal = json!({
                        "type": "control_response",
                        "response": {
                            "subtype": "error",
                            "request_id": request_id,
                            "error": format!("AnyWork does not support `{subtype}` requests"),
                        },
                    });
                    proc.send(refusal.to_string());
                    Vec::new()
                }
            },
            "control_cancel_request" => {
                if let Some(id) = str_at(&value, "request_id") {
                    self.pending.remove(id);
                }
                Vec::new()
            }
            "control_response" => {
                let response = value.get("response").unwrap_or(&Value::Null);
                tracing::debug!(%response, "claude answered a control request");
                Vec::new()
            }
            other => {
                tracing::debug!(kind = other, "ignored a claude output line");
                Vec::new()
            }
        };
        for event in events {
            if !self.emit(event).await {
                return false;
            }
        }
        true
    }

    /// Stores a new CLI session id in the workspace.
    fn remember_session(&mut self, id: Option<&str>) {
        let Some(id) = id.filter(|id| valid_session_id(id)) else {
            return;
        };
        if self.session_id.as_deref() == Some(id) {
            return;
        }
        match write_session_id(&self.request.workspace, id) {
            Ok(()) => self.session_id = Some(id.to_owned()),
            Err(e) => tracing::warn!(
                workspace = %self.request.workspace.display(),
                "cannot store the Claude Code session id: {e}"
            ),
        }
    }

    fn outcome(
        &self,
        result: Option<TurnResult>,
        status: Option<ExitStatus>,
        stderr: &str,
    ) -> TaskOutcome {
        if let Some(turn) = result {
            let mut outcome = TaskOutcome {
                status: if self.canceled {
                    TaskStatus::Canceled
                } else if turn.is_error {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Completed
                },
                result: None,
                structured_output: turn.structured_output.clone(),
                error: None,
                cost_usd: turn.cost_usd,
                usage: turn.usage,
                num_turns: turn.num_turns,
                duration_ms: turn.duration_ms,
            };
            if !turn.is_error {
                outcome.result = turn.text.clone();
            } else if !self.canceled {
                let mut error = turn.error_message();
                if turn.errors.is_empty() && turn.text.is_none() && !stderr.is_empty() {
                    error = format!("{error}: {stderr}");
                }
                outcome.error = Some(error);
            }
            return outcome;
        }
        if self.timed_out {
            return TaskOutcome::failed(format!("timed out after {:?}", self.config.timeout));
        }
        if self.canceled {
            return TaskOutcome::canceled();
        }
        let how = match status {
            Some(status) => format!("exited ({status})"),
            None => "ended".to_owned(),
        };
        let mut error = format!("Claude Code {how} without a result");
        if !stderr.is_empty() {
            error.push_str(": ");
            error.push_str(stderr);
        }
        TaskOutcome::failed(error)
    }
}

// ---------------------------------------------------------------------------------------------
// Line → events (pure functions).

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn preview(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    text.into_owned()
}

/// The stdin line of a user message.
fn user_line(message: &str) -> String {
    json!({"type": "user", "message": {"role": "user", "content": message}}).to_string()
}

/// `system`/`init` → [`TaskEvent::Init`] and an error per failed MCP server.
fn init_events(line: &Value) -> Vec<TaskEvent> {
    let mcp_servers: Vec<McpServerStatus> = line
        .get("mcp_servers")
        .and_then(Value::as_array)
        .map(|servers| {
            servers
                .iter()
                .filter_map(|s| {
                    Some(McpServerStatus {
                        name: str_at(s, "name")?.to_owned(),
                        status: str_at(s, "status").unwrap_or("unknown").to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let failed: Vec<TaskEvent> = mcp_servers
        .iter()
        .filter(|s| s.status == "failed")
        .map(|s| TaskEvent::Error {
            message: format!("MCP server `{}` failed to start", s.name),
            code: Some(MCP_SERVER_FAILED.to_owned()),
        })
        .collect();
    let init = AgentInit {
        model: str_at(line, "model").unwrap_or_default().to_owned(),
        agent_session_id: str_at(line, "session_id").map(str::to_owned),
        tools: strings(line.get("tools")),
        skills: strings(line.get("skills")),
        mcp_servers,
    };
    let mut events = vec![TaskEvent::Init(init)];
    events.extend(failed);
    events
}

/// `assistant` → text, thinking and tool calls, one per content block.
fn assistant_events(line: &Value) -> Vec<TaskEvent> {
    let synthetic_error = line.get("is_api_error_message").and_then(Value::as_bool) == Some(true)
        || line.get("error").is_some_and(|e| !e.is_null())
        || line.pointer("/message/model").and_then(Value::as_str) == Some("<synthetic>");
    if synthetic_error {
        // The `result` line that follows carries the same text, as the run's error.
        tracing::debug!("skipped claude's synthetic API-error message");
        return Vec::new();
    }
    let sub_agent = line.get("parent_tool_use_id").is_some_and(|p| !p.is_null());
    let Some(blocks) = line.pointer("/message/content").and_then(Value::as_array) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter_map(|block| match str_at(block, "type")? {
            "text" if !sub_agent => {
                let text = str_at(block, "text")?;
                (!text.is_empty()).then(|| TaskEvent::text(text))
            }
            "thinking" if !sub_agent => {
                let text = str_at(block, "thinking")?;
                (!text.is_empty()).then(|| TaskEvent::Thinking {
                    text: text.to_owned(),
                })
            }
            "tool_use" | "server_tool_use" | "mcp_tool_use" => Some(TaskEvent::ToolCall {
                id: str_at(block, "id").unwrap_or_default().to_owned(),
                name: str_at(block, "name").unwrap_or_default().to_owned(),
                input: block.get("input").cloned().unwrap_or_else(|| json!({})),
            }),
            _ => None,
        })
        .collect()
}

/// `user` → one [`TaskEvent::ToolResult`] per `tool_result` block.
fn user_events(line: &Value) -> Vec<TaskEvent> {
    let Some(blocks) = line.pointer("/message/content").and_then(Value::as_array) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter(|block| str_at(block, "type") == Some("tool_result"))
        .map(|block| TaskEvent::ToolResult {
            tool_use_id: str_at(block, "tool_use_id").unwrap_or_default().to_owned(),
            content: tool_result_text(block.get("content")),
            is_error: block.get("is_error").and_then(Value::as_bool) == Some(true),
        })
        .collect()
}

/// A tool result's content: a string, or the text parts of a block array joined with `\n`.
fn tool_result_text(content: Option<&Value>) -> String {
    match content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| str_at(b, "type") == Some("text"))
            .filter_map(|b| str_at(b, "text"))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
    }
}

/// `control_request`/`can_use_tool` → an [`InputRequest`] and the tool's input.
fn permission_request(line: &Value) -> Option<(InputRequest, Value)> {
    let request = line.get("request")?;
    if str_at(request, "subtype") != Some("can_use_tool") {
        return None;
    }
    let request_id = str_at(line, "request_id")?.to_owned();
    let tool_name = str_at(request, "tool_name").unwrap_or("a tool").to_owned();
    let shown = str_at(request, "display_name").unwrap_or(&tool_name);
    let input = request.get("input").cloned().unwrap_or_else(|| json!({}));
    let prompt = match str_at(request, "description").filter(|d| !d.trim().is_empty()) {
        Some(description) => format!("Allow {shown}? {description}"),
        None => format!("Allow {shown}?"),
    };
    Some((
        InputRequest {
            request_id,
            kind: InputKind::Permission,
            prompt,
            tool_name: Some(tool_name),
            input: Some(input.clone()),
            options: vec!["allow".to_owned(), "deny".to_owned()],
        },
        input,
    ))
}

/// What a `result` line says.
#[derive(Debug, Clone, PartialEq)]
struct TurnResult {
    is_error: bool,
    subtype: String,
    /// A stable code for failures: `terminal_reason`, else `subtype`.
    code: String,
    text: Option<String>,
    errors: Vec<String>,
    cost_usd: Option<f64>,
    usage: TokenUsage,
    num_turns: u32,
    duration_ms: u64,
    structured_output: Option<Value>,
    session_id: Option<String>,
}

impl TurnResult {
    fn parse(line: &Value) -> Self {
        let count = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
        let usage = line
            .get("usage")
            .map(|u| TokenUsage {
                input_tokens: count(u, "input_tokens"),
                output_tokens: count(u, "output_tokens"),
                cache_creation_input_tokens: count(u, "cache_creation_input_tokens"),
                cache_read_input_tokens: count(u, "cache_read_input_tokens"),
            })
            .unwrap_or_default();
        let subtype = str_at(line, "subtype").unwrap_or("unknown").to_owned();
        let code = str_at(line, "terminal_reason")
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| subtype.clone());
        Self {
            is_error: line.get("is_error").and_then(Value::as_bool) == Some(true),
            code,
            subtype,
            text: str_at(line, "result").map(str::to_owned),
            errors: strings(line.get("errors"))
                .into_iter()
                .filter(|e| !e.trim().is_empty())
                .collect(),
            cost_usd: line.get("total_cost_usd").and_then(Value::as_f64),
            usage,
            num_turns: u32::try_from(count(line, "num_turns")).unwrap_or(u32::MAX),
            duration_ms: count(line, "duration_ms"),
            structured_output: line
                .get("structured_output")
                .filter(|v| !v.is_null())
                .cloned(),
            session_id: str_at(line, "session_id").map(str::to_owned),
        }
    }

    /// The error text: `errors[]`, else `result`, else a note with the subtype.
    fn error_message(&self) -> String {
        if !self.errors.is_empty() {
            return self.errors.join("; ");
        }
        match &self.text {
            Some(text) if !text.trim().is_empty() => text.clone(),
            _ => format!("Claude Code reported an error ({})", self.subtype),
        }
    }

    /// The "No conversation found" error, if this is one.
    fn no_conversation(&self) -> Option<String> {
        self.errors
            .iter()
            .chain(self.text.iter())
            .find(|e| e.contains(NO_CONVERSATION))
            .cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Workspace files.

fn ensure_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::invalid_input(format!(
            "`{}` exists and is not a directory",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(path).map_err(|e| {
            Error::storage(format!("cannot create `{}`: {e}", path.display())).with_source(e)
        }),
        Err(e) => {
            Err(Error::storage(format!("cannot inspect `{}`: {e}", path.display())).with_source(e))
        }
    }
}

/// Whether `id` can be a CLI session id (it becomes a command-line argument).
fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn session_id_path(workspace: &Path) -> PathBuf {
    workspace.join(SESSIONS_DIR).join(SESSION_ID_FILE)
}

/// The remembered CLI session id; `None` if missing, not a regular file or not valid.
fn read_session_id(workspace: &Path) -> Option<String> {
    let path = session_id_path(workspace);
    let meta = fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 1024 {
        return None;
    }
    let text = fs::read_to_string(&path).ok()?;
    let id = text.trim();
    valid_session_id(id).then(|| id.to_owned())
}

/// Stores `id` atomically (a new temporary file, then a rename; links are not followed).
fn write_session_id(workspace: &Path, id: &str) -> io::Result<()> {
    let dir = workspace.join(SESSIONS_DIR);
    if !fs::symlink_metadata(&dir)?.is_dir() {
        return Err(io::Error::other(format!(
            "`{}` is not a directory",
            dir.display()
        )));
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{SESSION_ID_FILE}.{}.{nanos}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(format!("{id}\n").as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(SESSION_ID_FILE))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn forget_session_id(workspace: &Path) {
    match fs::remove_file(session_id_path(workspace)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot forget the Claude Code session id: {e}"),
    }
}

/// `SOUL.md` and then `AGENTS.md` of the workspace, for `--append-system-prompt`.
fn system_prompt(workspace: &Path) -> Option<String> {
    let parts: Vec<String> = ["SOUL.md", "AGENTS.md"]
        .iter()
        .filter_map(|name| read_prompt_file(&workspace.join(name)))
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// A regular file's text (not through a link), at most [`MAX_PROMPT_FILE_BYTES`], without NULs.
fn read_prompt_file(path: &Path) -> Option<String> {
    if !fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_PROMPT_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let truncated = bytes.len() > MAX_PROMPT_FILE_BYTES;
    bytes.truncate(MAX_PROMPT_FILE_BYTES);
    let mut text = String::from_utf8_lossy(&bytes).replace('\0', "");
    if truncated {
        // Drop a possibly cut last character.
        text.pop();
        text.push_str("\n[truncated]");
    }
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn init_maps_to_init_and_failed_mcp_errors() {
        let events = init_events(&line(
            r#"{"type":"system","subtype":"init","session_id":"s-1","model":"m1",
                "tools":["Bash","Write",3],"skills":["greet","debug"],
                "mcp_servers":[{"name":"calc","status":"connected"},{"name":"broken","status":"failed"},{"status":"x"}]}"#,
        ));
        assert_eq!(events.len(), 2);
        let TaskEvent::Init(init) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(init.model, "m1");
        assert_eq!(init.agent_session_id.as_deref(), Some("s-1"));
        assert_eq!(init.tools, ["Bash", "Write"]);
        assert_eq!(init.skills, ["greet", "debug"]);
        assert_eq!(init.mcp_servers.len(), 2);
        assert!(
            matches!(&events[1], TaskEvent::Error { message, code } if message.contains("broken") && code.as_deref() == Some(MCP_SERVER_FAILED))
        );
        // Garbage does not panic.
        assert_eq!(init_events(&json!({"type": "system"})).len(), 1);
    }

    #[test]
    fn assistant_blocks_map_to_events() {
        let events = assistant_events(&line(
            r#"{"type":"assistant","parent_tool_use_id":null,"message":{"content":[
                {"type":"thinking","thinking":"hmm"},{"type":"text","text":"hi"},
                {"type":"tool_use","id":"t1","name":"Write","input":{"a":1}},{"type":"image"}]}}"#,
        ));
        assert_eq!(
            events,
            vec![
                TaskEvent::Thinking { text: "hmm".into() },
                TaskEvent::text("hi"),
                TaskEvent::ToolCall {
                    id: "t1".into(),
                    name: "Write".into(),
                    input: json!({"a": 1})
                },
            ]
        );
        let synthetic = line(
            r#"{"type":"assistant","message":{"model":"<synthetic>","content":[{"type":"text","text":"API Error: 500"}]},"error":"server_error","is_api_error_message":true}"#,
        );
        assert!(assistant_events(&synthetic).is_empty());
        let sub_agent = line(
            r#"{"type":"assistant","parent_tool_use_id":"toolu_9","message":{"content":[{"type":"text","text":"inner"},{"type":"tool_use","id":"t2","name":"Read"}]}}"#,
        );
        assert_eq!(
            assistant_events(&sub_agent),
            vec![TaskEvent::ToolCall {
                id: "t2".into(),
                name: "Read".into(),
                input: json!({})
            }]
        );
        assert!(assistant_events(&json!({"message": {"content": "text"}})).is_empty());
    }

    #[test]
    fn tool_results_join_text_parts() {
        let events = user_events(&line(
            r#"{"type":"user","message":{"content":[
                {"type":"tool_result","tool_use_id":"a","content":"plain"},
                {"type":"tool_result","tool_use_id":"b","is_error":true,"content":[{"type":"text","text":"one"},{"type":"image"},{"type":"text","text":"two"}]},
                {"type":"text","text":"[Request interrupted by user]"}]}}"#,
        ));
        assert_eq!(
            events,
            vec![
                TaskEvent::ToolResult {
                    tool_use_id: "a".into(),
                    content: "plain".into(),
                    is_error: false
                },
                TaskEvent::ToolResult {
                    tool_use_id: "b".into(),
                    content: "one\ntwo".into(),
                    is_error: true
                },
            ]
        );
        assert!(user_events(&json!({"message": {"content": "hello"}})).is_empty());
    }

    #[test]
    fn results_are_judged_by_is_error() {
        let ok = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"success","is_error":false,"result":"done","num_turns":2,
                "duration_ms":500,"total_cost_usd":0.0016,"session_id":"s",
                "usage":{"input_tokens":200,"output_tokens":40,"cache_read_input_tokens":3}}"#,
        ));
        assert!(!ok.is_error);
        assert_eq!(ok.text.as_deref(), Some("done"));
        assert_eq!(ok.usage.input_tokens, 200);
        assert_eq!(ok.usage.cache_read_input_tokens, 3);
        assert_eq!(ok.cost_usd, Some(0.0016));
        assert_eq!((ok.num_turns, ok.duration_ms), (2, 500));

        let api = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"success","is_error":true,"terminal_reason":"api_error","result":"API Error: 500 boom"}"#,
        ));
        assert!(api.is_error);
        assert_eq!(api.code, "api_error");
        assert_eq!(api.error_message(), "API Error: 500 boom");

        let turns = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"error_max_turns","is_error":true,"terminal_reason":"max_turns","errors":["Reached maximum number of turns (2)"]}"#,
        ));
        assert_eq!(turns.code, "max_turns");
        assert_eq!(turns.error_message(), "Reached maximum number of turns (2)");
        assert_eq!(turns.no_conversation(), None);

        let lost = TurnResult::parse(&line(
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["No conversation found with session ID: abc"]}"#,
        ));
        assert_eq!(lost.code, "error_during_execution");
        assert!(lost.no_conversation().is_some());

        let empty = TurnResult::parse(&json!({"type": "result", "num_turns": -1}));
        assert!(!empty.is_error);
        assert_eq!(empty.num_turns, 0);
    }

    #[test]
    fn permission_requests() {
        let (request, input) = permission_request(&line(
            r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool",
                "tool_name":"Bash","display_name":"Bash","input":{"command":"echo hi"},"description":"Say hi"}}"#,
        ))
        .unwrap();
        assert_eq!(request.request_id, "r1");
        assert_eq!(request.kind, InputKind::Permission);
        assert_eq!(request.tool_name.as_deref(), Some("Bash"));
        assert_eq!(input, json!({"command": "echo hi"}));
        assert!(request.prompt.contains("Say hi"), "{}", request.prompt);
        assert!(
            permission_request(&json!({"request_id": "r", "request": {"subtype": "interrupt"}}))
                .is_none()
        );
        assert!(permission_request(&json!({"request": {"subtype": "can_use_tool"}})).is_none());
    }

    #[tokio::test]
    async fn line_reader_bounds_lines() {
        let data: &[u8] = b"short\n0123456789abc\nok\nlast";
        let mut reader = LineReader::new(data, 8);
        assert_eq!(
            reader.next_line().await.unwrap(),
            Some(Line::Complete(b"short".to_vec()))
        );
        assert_eq!(reader.next_line().await.unwrap(), Some(Line::TooLong(13)));
        assert_eq!(
            reader.next_line().await.unwrap(),
            Some(Line::Complete(b"ok".to_vec()))
        );
        assert_eq!(
            reader.next_line().await.unwrap(),
            Some(Line::Complete(b"last".to_vec()))
        );
        assert_eq!(reader.next_line().await.unwrap(), None);
    }

    #[test]
    fn session_ids_are_checked() {
        assert!(valid_session_id("9cac2560-04ac-45bc-beba-b00e1f4532d0"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("--model=x"));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id("../x"));
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join(SESSIONS_DIR)).unwrap();
        assert_eq!(read_session_id(ws.path()), None);
        write_session_id(ws.path(), "abc-1").unwrap();
        assert_eq!(read_session_id(ws.path()).as_deref(), Some("abc-1"));
        forget_session_id(ws.path());
        assert_eq!(read_session_id(ws.path()), None);
    }

    #[test]
    fn config_from_vars() {
        let vars = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let missing =
            ClaudeCodeConfig::from_vars(vars(&[("PATH", "/nonexistent-dir")])).unwrap_err();
        assert!(missing.message().contains("CLAUDE_BIN"), "{missing}");
        assert!(missing.message().contains("pip install claude-agent-sdk"));
        let bad = ClaudeCodeConfig::from_vars(vars(&[("CLAUDE_BIN", "/nonexistent/claude")]))
            .unwrap_err();
        assert!(bad.message().contains("/nonexistent/claude"), "{bad}");

        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("claude");
        fs::write(&bin, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/nonexistent-dir:{}", dir.path().display());
        let config = ClaudeCodeConfig::from_vars(vars(&[
            ("PATH", &path),
            ("ANTHROPIC_API_KEY", "k"),
            ("ANTHROPIC_BASE_URL", "http://x"),
            ("CLAUDE_MAX_TURNS", "7"),
            ("CLAUDE_PERMISSION_MODE", "prompt"),
            ("CLAUDE_TIMEOUT_SECS", "60"),
        ]))
        .unwrap();
        assert_eq!(config.binary, bin);
        assert_eq!(config.api_key.as_deref(), Some("k"));
        assert_eq!(config.max_turns, 7);
        assert_eq!(config.permission_mode, PermissionMode::Prompt);
        assert_eq!(config.timeout, Duration::from_secs(60));
        assert!(!format!("{config:?}").contains("\"k\""), "key redacted");
        assert!(
            ClaudeCodeConfig::from_vars(vars(&[("PATH", &path), ("CLAUDE_MAX_TURNS", "x")]))
                .is_err()
        );
    }

    #[test]
    fn prompt_files_are_bounded_and_not_followed() {
        let ws = tempfile::tempdir().unwrap();
        assert_eq!(system_prompt(ws.path()), None);
        fs::write(ws.path().join("SOUL.md"), "soul\0 text").unwrap();
        fs::write(
            ws.path().join("AGENTS.md"),
            "é".repeat(MAX_PROMPT_FILE_BYTES),
        )
        .unwrap();
        let prompt = system_prompt(ws.path()).unwrap();
        assert!(prompt.starts_with("soul text\n\n"));
        assert!(prompt.ends_with("[truncated]"));
        assert!(prompt.len() < 2 * MAX_PROMPT_FILE_BYTES);
        fs::remove_file(ws.path().join("SOUL.md")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", ws.path().join("SOUL.md")).unwrap();
        assert!(!system_prompt(ws.path()).unwrap().starts_with("soul"));
    }
}
