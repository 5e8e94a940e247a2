//! The `claude` child process: its process group, stdin/stderr pumps and a bounded line
//! reader for stdout.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anywork_core::{Error, ErrorKind, Result};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::config::{ClaudeCodeConfig, INSTALL_HINT, PermissionMode};
use super::confine::{mcp_config, sandbox_settings};
use super::{CONFIG_DIR, HOME_DIR};

/// Most bytes of stderr kept for error messages (the tail).
const MAX_STDERR_BYTES: usize = 64 * 1024;
/// How long the CLI may take to exit after its `result` (or after stdout closed).
pub(super) const EXIT_GRACE: Duration = Duration::from_secs(2);
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

/// The process group of the running CLI, shared by the driver and the event stream so that
/// whichever goes first kills it. `None` when no process is running.
#[derive(Default)]
pub(super) struct Group(Mutex<Option<Pid>>);

impl Group {
    fn lock(&self) -> MutexGuard<'_, Option<Pid>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set(&self, pgid: Option<Pid>) {
        *self.lock() = pgid;
    }

    /// SIGKILL to the whole group, if one is running.
    pub(super) fn kill(&self) {
        if let Some(pgid) = *self.lock() {
            kill_group(pgid);
        }
    }
}

pub(super) fn kill_group(pgid: Pid) {
    match killpg(pgid, Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(
            pgid = pgid.as_raw(),
            "cannot kill claude's process group: {e}"
        ),
    }
}

/// Kills the group when the driver task goes away without finishing (runtime shut down).
pub(super) struct KillOnDrop(pub(super) Arc<Group>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
    }
}

/// One running CLI process.
pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) pgid: Pid,
    /// Lines for stdin; `None` once stdin is (to be) closed.
    pub(super) stdin: Option<mpsc::UnboundedSender<String>>,
    pub(super) stdout: LineReader<ChildStdout>,
    pub(super) stderr: Arc<Mutex<Vec<u8>>>,
    pub(super) stderr_task: JoinHandle<()>,
    /// Whether it was started with `--resume`.
    pub(super) resumed: bool,
    /// Turns it finished (a warm process has at least one).
    pub(super) turns: u32,
    /// The CLI's cumulative `total_cost_usd` after its last turn.
    pub(super) last_total_cost: Option<f64>,
}

impl Proc {
    pub(super) fn spawn(
        config: &ClaudeCodeConfig,
        workspace: &Path,
        system_prompt: Option<&str>,
        resume: Option<&str>,
        tool_mcp: Option<&(String, serde_json::Value)>,
    ) -> Result<Proc> {
        // In the sandbox when it is confined; always with the network (the model API).
        let mut cmd: Command = config.sandbox.wrapped(&config.binary, workspace, true);
        cmd.args([
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            // Text arrives as it is generated (`stream_event` lines), not per finished block.
            "--include-partial-messages",
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
        if let Some(settings) = sandbox_settings(&config.sandbox, workspace) {
            cmd.arg(format!("--settings={settings}"));
        }
        if let Some(mcp) = mcp_config(workspace, &config.sandbox, tool_mcp) {
            let mut flag = std::ffi::OsString::from("--mcp-config=");
            flag.push(mcp.as_os_str());
            cmd.arg(flag).arg("--strict-mcp-config");
        }

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
            turns: 0,
            last_total_cost: None,
        })
    }

    /// Whether the process is still running.
    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Queues one stdin line; `false` when stdin is closed.
    pub(super) fn send(&self, line: String) -> bool {
        self.stdin.as_ref().is_some_and(|tx| tx.send(line).is_ok())
    }

    /// Closes stdin (after the queued lines), which makes the CLI exit.
    pub(super) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit (killing its group after [`EXIT_GRACE`]), then kills
    /// what is left of its group.
    pub(super) async fn reap(&mut self) -> Option<ExitStatus> {
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
    pub(super) async fn stderr_tail(&mut self) -> String {
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
pub(super) enum Line {
    Complete(Vec<u8>),
    TooLong(usize),
}

/// Reads `\n`-terminated lines of at most `max` bytes; longer lines are skipped. Cancel-safe:
/// the partial line is kept in the reader.
pub(super) struct LineReader<R> {
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

    pub(super) async fn next_line(&mut self) -> io::Result<Option<Line>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
