//! [`Sandbox`]: where the processes the agent starts run — the native executor's `bash` tool,
//! MCP stdio servers and the Claude Code CLI — and with which environment.
//!
//! With bubblewrap (`bwrap`) working on the machine, every such process runs in its own
//! namespaces (user, PID with its own `/proc`, IPC, UTS, and network when
//! [`SandboxConfig::network`] is off), without capabilities and, when the worker is root, as
//! an unprivileged user ([`SANDBOX_UID`]). `/` is read-only; `/tmp`, `/run` and `/dev/shm` are
//! private and empty; each path of [`SandboxConfig::hide`] (the server's data dir, the
//! workspace root with the other sessions) is replaced by an empty read-only folder; the
//! session workspace is bound back in as the only writable path. `--die-with-parent` and the
//! PID namespace make sure nothing outlives the process the worker started.
//!
//! Without a working bwrap the worker still runs (`SANDBOX=auto`, the default), with a loud
//! warning in its log and `"sandbox": "none: <reason>"` in `/health`; `SANDBOX=bwrap` refuses
//! to start instead, and `SANDBOX=off` turns confinement off on purpose.
//!
//! Whatever the confinement, a child never inherits the worker's environment: it gets
//! [`BASE_ENV`] (those set in the worker), `HOME` = the workspace, `TERM=dumb`, `TMPDIR`, the
//! variables named by `CHILD_ENV`, and what its own configuration names (an MCP server's
//! `env`). The model API keys ([`SECRET_ENV`]) thus reach a child only when named explicitly.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anywork_core::{Error, ErrorKind, Result};
use tokio::process::Command;

/// Variables a child gets from the worker's environment when they are set there.
pub const BASE_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "USER",
    "LOGNAME",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
];

/// Secrets of the worker that children never get unless `CHILD_ENV` or their own
/// configuration names them: the model API keys.
pub const SECRET_ENV: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "API_KEY",
    "OPENAI_API_KEY",
];

/// The user and group id processes run as inside the sandbox when the worker is root.
pub const SANDBOX_UID: u32 = 1000;

/// `PATH` of children when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest the start-up check of bwrap may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The `/health` reason of a worker whose embedder configured no sandbox.
pub const NOT_CONFIGURED: &str = "no sandbox configured by the program that embeds this worker";
/// How to get bubblewrap, for error messages.
const INSTALL_HINT: &str =
    "install bubblewrap (Debian/Ubuntu: apt install bubblewrap; Fedora: dnf install bubblewrap)";

/// What `SANDBOX` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// bwrap when it works, else run unconfined with a loud warning (the default).
    #[default]
    Auto,
    /// bwrap or refuse to start.
    Bwrap,
    /// No confinement (children still get a clean environment).
    Off,
}

impl SandboxMode {
    /// The spelling of `SANDBOX`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Auto => "auto",
            SandboxMode::Bwrap => "bwrap",
            SandboxMode::Off => "off",
        }
    }

    /// Parses `auto`, `bwrap` or `off`.
    pub fn parse(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(SandboxMode::Auto),
            "bwrap" | "bubblewrap" => Ok(SandboxMode::Bwrap),
            "off" | "none" => Ok(SandboxMode::Off),
            other => Err(Error::invalid_input(format!(
                "SANDBOX={other:?} is not known: use `auto` (bwrap when it works), `bwrap` \
                 (refuse to start without it) or `off`"
            ))),
        }
    }
}

/// The sandbox settings (`SANDBOX`, `SANDBOX_NETWORK`, `SANDBOX_HIDE`, `SANDBOX_BWRAP`,
/// `CHILD_ENV`). Build with [`SandboxConfig::from_lookup`] or [`Default`], then the `with_*`
/// methods; [`Sandbox::detect`] turns it into a [`Sandbox`].
#[derive(Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `SANDBOX`: `auto` (default), `bwrap` or `off`.
    pub mode: SandboxMode,
    /// `SANDBOX_NETWORK` (`on`, the default, or `off`): whether sandboxed tools and MCP
    /// servers may use the network. The Claude Code CLI itself always has it (it calls the
    /// model API); its `Bash` tool follows this setting through Claude Code's own sandbox.
    pub network: bool,
    /// `SANDBOX_HIDE` (paths separated by `:`): folders that sandboxed processes see as
    /// empty — the server's data dir (`DB_DIR`: the database and the default workspace
    /// root) and the workspace root (other sessions). The session's own workspace stays
    /// visible and writable even when it lies below one of them. Paths that do not exist are
    /// skipped.
    pub hide: Vec<PathBuf>,
    /// `SANDBOX_BWRAP`: the bwrap executable; `bwrap` on `PATH` when `None`.
    pub bwrap: Option<PathBuf>,
    /// What every child gets from the worker: [`BASE_ENV`] and the variables named by
    /// `CHILD_ENV` (comma-separated names), with their values at start-up.
    pub child_env: Vec<(String, String)>,
}

impl fmt::Debug for SandboxConfig {
    // Values of `child_env` may be secrets named by the operator: names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("mode", &self.mode)
            .field("network", &self.network)
            .field("hide", &self.hide)
            .field("bwrap", &self.bwrap)
            .field(
                "child_env",
                &self.child_env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for SandboxConfig {
    /// `auto`, network on, nothing hidden, [`BASE_ENV`] from the process environment.
    fn default() -> Self {
        Self {
            mode: SandboxMode::Auto,
            network: true,
            hide: Vec::new(),
            bwrap: None,
            child_env: inherited_env(|name| std::env::var(name).ok(), &[]),
        }
    }
}

impl SandboxConfig {
    /// Reads the settings from the process environment; see [`from_lookup`](Self::from_lookup).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads `SANDBOX`, `SANDBOX_NETWORK`, `SANDBOX_HIDE`, `SANDBOX_BWRAP` and `CHILD_ENV`
    /// (and the values of [`BASE_ENV`] and of the names in `CHILD_ENV`) through `lookup`.
    /// Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mode = match get("SANDBOX") {
            Some(v) => SandboxMode::parse(&v)?,
            None => SandboxMode::Auto,
        };
        let network = match get("SANDBOX_NETWORK") {
            None => true,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "on" | "1" | "true" | "yes" => true,
                "off" | "0" | "false" | "no" => false,
                other => {
                    return Err(Error::invalid_input(format!(
                        "SANDBOX_NETWORK={other:?} is not known: use `on` or `off`"
                    )));
                }
            },
        };
        let mut hide = Vec::new();
        if let Some(paths) = get("SANDBOX_HIDE") {
            for path in std::env::split_paths(&paths) {
                if path.as_os_str().is_empty() {
                    continue;
                }
                hide.push(absolute(&path)?);
            }
        }
        let bwrap = get("SANDBOX_BWRAP").map(PathBuf::from);
        let named: Vec<String> = get("CHILD_ENV")
            .map(|names| {
                names
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for name in &named {
            if name.contains('=') || name.contains('\0') {
                return Err(Error::invalid_input(format!(
                    "CHILD_ENV names variables separated by commas; {name:?} is not a name"
                )));
            }
        }
        Ok(Self {
            mode,
            network,
            hide,
            bwrap,
            child_env: inherited_env(&lookup, &named),
        })
    }

    /// Sets [`mode`](Self::mode).
    pub fn with_mode(mut self, mode: SandboxMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`network`](Self::network).
    pub fn with_network(mut self, network: bool) -> Self {
        self.network = network;
        self
    }

    /// Adds a folder to [`hide`](Self::hide) (made absolute; kept once).
    pub fn with_hidden(mut self, path: impl AsRef<Path>) -> Self {
        if let Ok(path) = absolute(path.as_ref())
            && !self.hide.contains(&path)
        {
            self.hide.push(path);
        }
        self
    }

    /// Sets [`bwrap`](Self::bwrap).
    pub fn with_bwrap(mut self, path: impl Into<PathBuf>) -> Self {
        self.bwrap = Some(path.into());
        self
    }

    /// Adds (or replaces) a variable every child gets.
    pub fn with_child_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.child_env.retain(|(k, _)| *k != name);
        self.child_env.push((name, value.into()));
        self
    }
}

/// [`BASE_ENV`] and `named`, with their values from `lookup` (`PATH` always).
fn inherited_env(
    lookup: impl Fn(&str) -> Option<String>,
    named: &[String],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for name in BASE_ENV
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        if env.iter().any(|(k, _)| k == name) {
            continue;
        }
        if let Some(value) = lookup(name) {
            env.push((name.to_owned(), value));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    env
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| {
        Error::invalid_input(format!(
            "SANDBOX_HIDE: cannot make {} absolute: {e}",
            path.display()
        ))
    })
}

/// How children are confined: a checked [`SandboxConfig`]. Cheap to clone; build it once at
/// start-up ([`Sandbox::detect`]) and give the same value to the executor and to
/// [`WorkerConfig::with_sandbox`](crate::WorkerConfig::with_sandbox), so that `/health` tells
/// the truth.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    config: SandboxConfig,
    engine: Engine,
    /// Whether `socat` was found (Claude Code's own sandbox needs it on Linux).
    socat: bool,
}

enum Engine {
    Bwrap { path: PathBuf, uid: Option<u32> },
    None { reason: String },
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("status", &self.status())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl Default for Sandbox {
    /// [`Sandbox::unconfined`] with the reason [`NOT_CONFIGURED`].
    fn default() -> Self {
        Self::unconfined(NOT_CONFIGURED)
    }
}

impl Sandbox {
    /// No confinement, for `reason` (shown in `/health`); children still get a clean
    /// environment ([`BASE_ENV`] from the process environment).
    pub fn unconfined(reason: impl Into<String>) -> Self {
        Self::from_parts(
            SandboxConfig::default().with_mode(SandboxMode::Off),
            Engine::None {
                reason: reason.into(),
            },
        )
    }

    fn from_parts(config: SandboxConfig, engine: Engine) -> Self {
        let socat = find_program("socat", path_of(&config.child_env)).is_some();
        Self {
            inner: Arc::new(Inner {
                config,
                engine,
                socat,
            }),
        }
    }

    /// Reads the settings from the process environment and checks them ([`Sandbox::detect`]).
    pub fn from_env() -> Result<Self> {
        Self::detect(SandboxConfig::from_env()?)
    }

    /// Checks `config` on this machine: with `auto` or `bwrap`, finds bwrap and runs it once
    /// with the very options sandboxed processes get (a probe writes a file in a scratch
    /// workspace). `auto` without a working bwrap gives an unconfined sandbox and logs a loud
    /// warning; `bwrap` without one is an [`ErrorKind::Unavailable`] error that says why.
    /// Blocks for the probe (well under a second; at most 10 s).
    pub fn detect(config: SandboxConfig) -> Result<Self> {
        if config.mode == SandboxMode::Off {
            let sandbox = Self::from_parts(
                config,
                Engine::None {
                    reason: "SANDBOX=off".to_owned(),
                },
            );
            tracing::warn!(
                "SANDBOX=off: the agent's shell commands and MCP servers run unconfined, with \
                 the rights of this worker's user"
            );
            return Ok(sandbox);
        }
        match probe(&config) {
            Ok((path, uid)) => {
                let sandbox = Self::from_parts(config, Engine::Bwrap { path, uid });
                tracing::info!(
                    network = sandbox.inner.config.network,
                    hidden = ?sandbox.inner.config.hide,
                    "sandbox: bwrap (the agent's commands and MCP servers run confined to the \
                     session workspace)"
                );
                Ok(sandbox)
            }
            Err(reason) if config.mode == SandboxMode::Bwrap => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "SANDBOX=bwrap but bubblewrap cannot be used: {reason}; {INSTALL_HINT}, or \
                     set SANDBOX=auto to start without a sandbox"
                ),
            )),
            Err(reason) => {
                let sandbox = Self::from_parts(config, Engine::None { reason });
                if let Some(warning) = sandbox.warning() {
                    tracing::warn!("{warning}");
                }
                Ok(sandbox)
            }
        }
    }

    /// The settings.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// Whether children run inside bwrap.
    pub fn is_confined(&self) -> bool {
        matches!(self.inner.engine, Engine::Bwrap { .. })
    }

    /// What `/health` shows: `bwrap`, or `none: <reason>`.
    pub fn status(&self) -> String {
        match &self.inner.engine {
            Engine::Bwrap { .. } => "bwrap".to_owned(),
            Engine::None { reason } => format!("none: {reason}"),
        }
    }

    /// The warning to show (log, UI banner) when children run unconfined because no sandbox
    /// works here; `None` when confined or turned off on purpose.
    pub fn warning(&self) -> Option<String> {
        match &self.inner.engine {
            Engine::None { reason } if self.inner.config.mode != SandboxMode::Off => Some(format!(
                "NO SANDBOX: the agent's shell commands and MCP servers run unconfined with the \
                 rights of this worker's user — they can read and change every file this user \
                 can, the AnyWork database included. Reason: {reason}. To confine them, \
                 {INSTALL_HINT} (SANDBOX=bwrap makes a missing sandbox an error, SANDBOX=off \
                 silences this warning)"
            )),
            _ => None,
        }
    }

    /// Whether `socat` was found on `PATH` (Claude Code's own sandbox needs it on Linux).
    pub fn has_socat(&self) -> bool {
        self.inner.socat
    }

    /// A command that runs `program` in the sandbox for the session `workspace` (absolute),
    /// with the network as configured. Add arguments, extra environment variables and stdio
    /// as usual; its environment is already the clean one of the [module docs](self), and its
    /// working directory is `workspace`.
    pub fn command(&self, program: impl AsRef<OsStr>, workspace: &Path) -> Command {
        self.command_with_network(program, workspace, self.inner.config.network)
    }

    /// [`Sandbox::command`] with the network on or off regardless of the configuration.
    pub fn command_with_network(
        &self,
        program: impl AsRef<OsStr>,
        workspace: &Path,
        network: bool,
    ) -> Command {
        let mut cmd = self.wrapped(program, workspace, network);
        cmd.env_clear();
        self.apply_env(&mut cmd, workspace);
        cmd
    }

    /// A command that runs `program` confined like [`Sandbox::command`] but with the
    /// environment left to the caller (who must clear it): for the Claude Code CLI, which gets
    /// an environment of its own.
    pub(crate) fn wrapped(
        &self,
        program: impl AsRef<OsStr>,
        workspace: &Path,
        network: bool,
    ) -> Command {
        let mut cmd = match &self.inner.engine {
            Engine::Bwrap { path, uid } => {
                let mut cmd = Command::new(path);
                cmd.args(bwrap_args(&self.inner.config, *uid, workspace, network))
                    .arg("--")
                    .arg(program);
                cmd
            }
            Engine::None { .. } => Command::new(program),
        };
        cmd.current_dir(workspace);
        cmd
    }

    /// The clean environment of a child in `workspace`, as (name, value) pairs.
    pub fn child_env(&self, workspace: &Path) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = self
            .inner
            .config
            .child_env
            .iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let tmpdir = if self.is_confined() {
            Some(OsString::from("/tmp"))
        } else {
            std::env::var_os("TMPDIR")
        };
        let mut fixed = vec![
            (OsString::from("HOME"), workspace.as_os_str().to_owned()),
            (OsString::from("TERM"), OsString::from("dumb")),
        ];
        if let Some(tmpdir) = tmpdir {
            fixed.push((OsString::from("TMPDIR"), tmpdir));
        }
        for (name, value) in fixed {
            env.retain(|(k, _)| *k != name);
            env.push((name, value));
        }
        env
    }

    fn apply_env(&self, cmd: &mut Command, workspace: &Path) {
        for (name, value) in self.child_env(workspace) {
            cmd.env(name, value);
        }
    }
}

/// The `PATH` among `env`.
fn path_of(env: &[(String, String)]) -> &str {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
}

/// The first executable `name` on `path`.
pub(crate) fn find_program(name: &str, path: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// The effective user id of this process (the owner of `/proc/self`).
fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The options of a sandboxed process in `workspace`, up to (not including) `--`.
fn bwrap_args(
    config: &SandboxConfig,
    uid: Option<u32>,
    workspace: &Path,
    network: bool,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    push(&[
        "--die-with-parent".as_ref(),
        "--new-session".as_ref(),
        "--unshare-user".as_ref(),
        "--unshare-pid".as_ref(),
        "--unshare-ipc".as_ref(),
        "--unshare-uts".as_ref(),
        "--unshare-cgroup-try".as_ref(),
        "--hostname".as_ref(),
        "anywork-sandbox".as_ref(),
    ]);
    if !network {
        push(&["--unshare-net".as_ref()]);
    }
    if let Some(uid) = uid {
        let id = OsString::from(uid.to_string());
        push(&["--uid".as_ref(), &id, "--gid".as_ref(), &id]);
    }
    push(&[
        "--cap-drop".as_ref(),
        "ALL".as_ref(),
        "--ro-bind".as_ref(),
        "/".as_ref(),
        "/".as_ref(),
        "--dev".as_ref(),
        "/dev".as_ref(),
        "--proc".as_ref(),
        "/proc".as_ref(),
        "--tmpfs".as_ref(),
        "/tmp".as_ref(),
        "--tmpfs".as_ref(),
        "/dev/shm".as_ref(),
        "--tmpfs".as_ref(),
        "/run".as_ref(),
    ]);
    // `/run` hides the sockets of the machine's daemons (Docker's among them); DNS may live
    // there, behind a link from /etc/resolv.conf.
    if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf")
        && resolv.starts_with("/run")
    {
        push(&[
            "--ro-bind-try".as_ref(),
            resolv.as_os_str(),
            resolv.as_os_str(),
        ]);
    }
    let hidden: Vec<PathBuf> = config
        .hide
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .filter(|p| p.is_dir() && p.as_path() != Path::new("/"))
        .collect();
    for dir in &hidden {
        push(&["--tmpfs".as_ref(), dir.as_os_str()]);
    }
    push(&[
        "--bind".as_ref(),
        workspace.as_os_str(),
        workspace.as_os_str(),
    ]);
    // After the bind: the empty folders become read-only, the workspace below one of them
    // keeps its own (writable) mount.
    for dir in &hidden {
        push(&["--remount-ro".as_ref(), dir.as_os_str()]);
    }
    push(&["--chdir".as_ref(), workspace.as_os_str()]);
    args
}

/// Finds bwrap and runs it once with the options of a sandboxed process; returns its path
/// and the uid used inside, or why it does not work.
fn probe(config: &SandboxConfig) -> std::result::Result<(PathBuf, Option<u32>), String> {
    let path = match &config.bwrap {
        Some(path) if is_executable(path) => path.clone(),
        Some(path) => {
            return Err(format!(
                "SANDBOX_BWRAP={} is not an executable file",
                path.display()
            ));
        }
        None => find_program("bwrap", path_of(&config.child_env))
            .ok_or_else(|| "bwrap is not installed (not found on PATH)".to_owned())?,
    };
    let uid = (effective_uid() == Some(0)).then_some(SANDBOX_UID);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let scratch = std::env::temp_dir().join(format!(
        "anywork-sandbox-probe-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("cannot create a scratch folder for the check: {e}"))?;
    let result = run_probe(config, &path, uid, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| (path, uid))
}

fn run_probe(
    config: &SandboxConfig,
    bwrap: &Path,
    uid: Option<u32>,
    scratch: &Path,
) -> std::result::Result<(), String> {
    let scratch = std::fs::canonicalize(scratch).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(bwrap);
    cmd.args(bwrap_args(config, uid, &scratch, config.network))
        .args(["--", "sh", "-c", "echo ok > .probe"])
        .env_clear()
        .envs(config.child_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not finish a test run within {} s",
                    bwrap.display(),
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {}: {e}", bwrap.display())),
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read as _;
        let _ = (&mut pipe).take(4096).read_to_string(&mut stderr);
    }
    let stderr = stderr.trim();
    if !status.success() {
        return Err(if stderr.is_empty() {
            format!("a test run of {} failed ({status})", bwrap.display())
        } else {
            format!("a test run of {} failed: {stderr}", bwrap.display())
        });
    }
    match std::fs::read_to_string(scratch.join(".probe")) {
        Ok(text) if text.trim() == "ok" => Ok(()),
        _ => Err(format!(
            "a test run of {} could not write to its workspace",
            bwrap.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn settings_are_read_and_checked() {
        let config = SandboxConfig::from_lookup(lookup(&[
            ("SANDBOX", "bwrap"),
            ("SANDBOX_NETWORK", "off"),
            ("SANDBOX_HIDE", "/srv/data:/srv/ws"),
            ("CHILD_ENV", "GH_TOKEN, HTTPS_PROXY"),
            ("GH_TOKEN", "gh-secret"),
            ("PATH", "/bin"),
            ("ANTHROPIC_API_KEY", "sk-secret"),
        ]))
        .unwrap();
        assert_eq!(config.mode, SandboxMode::Bwrap);
        assert!(!config.network);
        assert_eq!(
            config.hide,
            vec![PathBuf::from("/srv/data"), PathBuf::from("/srv/ws")]
        );
        let names: Vec<&str> = config.child_env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["PATH", "GH_TOKEN"]);
        assert!(!format!("{config:?}").contains("gh-secret"));

        let defaults = SandboxConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(defaults.mode, SandboxMode::Auto);
        assert!(defaults.network);
        assert_eq!(defaults.child_env, [("PATH".into(), DEFAULT_PATH.into())]);

        for (name, value) in [
            ("SANDBOX", "maybe"),
            ("SANDBOX_NETWORK", "sometimes"),
            ("CHILD_ENV", "A=B"),
        ] {
            let err = SandboxConfig::from_lookup(lookup(&[(name, value)])).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
            assert!(err.message().contains(name), "{err}");
        }
    }

    #[test]
    fn children_get_a_clean_environment() {
        let sandbox = Sandbox::from_parts(
            SandboxConfig::from_lookup(lookup(&[
                ("PATH", "/usr/bin"),
                ("ANTHROPIC_API_KEY", "sk-secret"),
                ("LANG", "C.UTF-8"),
            ]))
            .unwrap()
            .with_child_env("EXTRA", "1"),
            Engine::None {
                reason: "test".into(),
            },
        );
        let env = sandbox.child_env(Path::new("/ws/s1"));
        let get = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("HOME").as_deref(), Some("/ws/s1"));
        assert_eq!(get("PATH").as_deref(), Some("/usr/bin"));
        assert_eq!(get("LANG").as_deref(), Some("C.UTF-8"));
        assert_eq!(get("TERM").as_deref(), Some("dumb"));
        assert_eq!(get("EXTRA").as_deref(), Some("1"));
        for secret in SECRET_ENV {
            assert_eq!(get(secret), None, "{secret}");
        }
        assert_eq!(sandbox.status(), "none: test");
    }

    #[test]
    fn off_is_unconfined_without_a_warning() {
        let sandbox =
            Sandbox::detect(SandboxConfig::default().with_mode(SandboxMode::Off)).unwrap();
        assert!(!sandbox.is_confined());
        assert_eq!(sandbox.status(), "none: SANDBOX=off");
        assert_eq!(sandbox.warning(), None);
    }

    #[test]
    fn a_missing_bwrap_is_refused_or_reported() {
        let missing = SandboxConfig::default().with_bwrap("/nonexistent/bwrap");
        let err = Sandbox::detect(missing.clone().with_mode(SandboxMode::Bwrap)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.message().contains("/nonexistent/bwrap"), "{err}");
        assert!(err.message().contains("apt install bubblewrap"), "{err}");
        let sandbox = Sandbox::detect(missing).unwrap();
        assert!(!sandbox.is_confined());
        assert!(
            sandbox.status().starts_with("none: "),
            "{}",
            sandbox.status()
        );
        let warning = sandbox.warning().unwrap();
        assert!(warning.contains("NO SANDBOX"), "{warning}");
        assert!(warning.contains("/nonexistent/bwrap"), "{warning}");
    }

    #[test]
    fn bwrap_options_confine_the_workspace() {
        let dir = tempfile::tempdir().unwrap();
        let data = std::fs::canonicalize(dir.path()).unwrap();
        let ws = data.join("workspace").join("s1");
        std::fs::create_dir_all(&ws).unwrap();
        let config = SandboxConfig::default()
            .with_hidden(&data)
            .with_hidden("/nonexistent/anywork")
            .with_network(false);
        let args: Vec<String> = bwrap_args(&config, Some(SANDBOX_UID), &ws, false)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        let data = data.display().to_string();
        let ws = ws.display().to_string();
        for expected in [
            "--ro-bind / /".to_owned(),
            "--cap-drop ALL".to_owned(),
            "--unshare-net".to_owned(),
            "--unshare-pid".to_owned(),
            "--die-with-parent".to_owned(),
            "--uid 1000 --gid 1000".to_owned(),
            format!("--tmpfs {data} --bind {ws} {ws} --remount-ro {data}"),
            format!("--chdir {ws}"),
        ] {
            assert!(
                joined.contains(&expected),
                "{expected:?} missing in {joined}"
            );
        }
        assert!(!joined.contains("/nonexistent/anywork"), "{joined}");
        let network_on = bwrap_args(&config, None, Path::new(&ws), true);
        assert!(!network_on.iter().any(|a| a == "--unshare-net"));
        assert!(!network_on.iter().any(|a| a == "--uid"));
    }
}
