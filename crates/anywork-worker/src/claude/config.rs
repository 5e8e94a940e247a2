//! [`ClaudeCodeConfig`]: the settings of the Claude Code executor, read from variables, and
//! where the `claude` CLI is found.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anywork_core::{Error, ErrorKind, Result};

use crate::sandbox::Sandbox;

/// How the CLI treats tool permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PermissionMode {
    /// `--dangerously-skip-permissions`: every tool runs without asking (the workspace's
    /// container is the sandbox).
    #[default]
    SkipPermissions,
    /// `--permission-prompt-tool stdio`: each tool call that needs a permission becomes a
    /// [`TaskEvent::InputRequired`](anywork_core::TaskEvent::InputRequired), answered with [`ExecutionControl::respond`](anywork_core::ExecutionControl::respond).
    Prompt,
}

/// The model the CLI gets when neither `ANTHROPIC_MODEL` nor `MODEL` names one: an alias the
/// CLI resolves to its current Sonnet (left alone, the CLI picks its most expensive model).
pub const DEFAULT_MODEL: &str = "sonnet";

/// Settings of [`ClaudeCodeExecutor`](super::ClaudeCodeExecutor).
#[derive(Clone)]
#[non_exhaustive]
pub struct ClaudeCodeConfig {
    /// The `claude` executable.
    pub binary: PathBuf,
    /// `--model`; the CLI's default when `None`.
    pub model: Option<String>,
    /// `--max-turns` (at least 1).
    pub max_turns: u32,
    /// Skip permissions (default) or ask through [`TaskEvent::InputRequired`](anywork_core::TaskEvent::InputRequired).
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
    /// [`TaskEvent::Error`](anywork_core::TaskEvent::Error) (code [`LINE_TOO_LONG`](super::LINE_TOO_LONG)).
    pub max_line_bytes: usize,
    /// Where the CLI runs (default: unconfined). When confined, the CLI itself runs in the
    /// sandbox (with the network, for the model API) and its `Bash` tool in Claude Code's own
    /// sandbox inside it; see the [module documentation](super).
    pub sandbox: Sandbox,
    /// How long a session's CLI process stays up after a successful turn, waiting for the
    /// session's next task (default 5 min; zero: one process per task). See
    /// [the module documentation](super#warm-processes).
    pub warm_idle: Duration,
    /// Most CLI processes resident per worker between tasks, running ones included (default
    /// 4; zero: one process per task). Past it, the least recently used idle one is released.
    pub warm_max: usize,
    /// Whether a worker that serves one session (`WORKER_SESSION_ID`: a container per
    /// session) starts that session's CLI ahead of its first task, as a spare (default on;
    /// `CLAUDE_SPARE=0` turns it off). It counts against [`warm_max`](Self::warm_max) and
    /// needs warm processes on. See [the module documentation](super#a-spare-process).
    pub spare: bool,
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
            .field("sandbox", &self.sandbox.status())
            .field("warm_idle", &self.warm_idle)
            .field("warm_max", &self.warm_max)
            .field("spare", &self.spare)
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
    /// Default of [`warm_idle`](Self::warm_idle): 5 minutes.
    pub const DEFAULT_WARM_IDLE: Duration = Duration::from_secs(300);
    /// Default of [`warm_max`](Self::warm_max): about 4 × 200 MB of resident CLIs.
    pub const DEFAULT_WARM_MAX: usize = 4;

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
            sandbox: Sandbox::default(),
            warm_idle: Self::DEFAULT_WARM_IDLE,
            warm_max: Self::DEFAULT_WARM_MAX,
            spare: true,
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
    /// - `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`, `ANTHROPIC_MODEL` or else `MODEL`
    ///   (→ `model`; [`DEFAULT_MODEL`] when neither is set, so the model is always explicit);
    /// - `CLAUDE_MAX_TURNS`, `CLAUDE_TIMEOUT_SECS`, `CLAUDE_PERMISSION_MODE`
    ///   (`skip` or `prompt`);
    /// - `CLAUDE_WARM_IDLE_SECONDS` (→ [`warm_idle`](Self::warm_idle)) and `CLAUDE_WARM_MAX`
    ///   (→ [`warm_max`](Self::warm_max)); `0` in either turns warm processes off;
    /// - `CLAUDE_SPARE` (`1`/`true`/`on` or `0`/`false`/`off`, → [`spare`](Self::spare)).
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
        config.model = Some(
            get("ANTHROPIC_MODEL")
                .or_else(|| get("MODEL"))
                .unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
        );
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
        if let Some(secs) = get("CLAUDE_WARM_IDLE_SECONDS") {
            let secs: u64 = secs.trim().parse().map_err(|_| {
                Error::invalid_input(format!(
                    "CLAUDE_WARM_IDLE_SECONDS must be a number of seconds (0: off), not `{secs}`"
                ))
            })?;
            config.warm_idle = Duration::from_secs(secs);
        }
        if let Some(max) = get("CLAUDE_WARM_MAX") {
            config.warm_max = max.trim().parse().map_err(|_| {
                Error::invalid_input(format!(
                    "CLAUDE_WARM_MAX must be a number of processes (0: off), not `{max}`"
                ))
            })?;
        }
        if let Some(spare) = get("CLAUDE_SPARE") {
            config.spare = match spare.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" => false,
                _ => {
                    return Err(Error::invalid_input(format!(
                        "CLAUDE_SPARE must be 1 (on) or 0 (off), not `{spare}`"
                    )));
                }
            };
        }
        Ok(config)
    }

    /// Whether a session's CLI process may stay up between its tasks.
    pub fn warm(&self) -> bool {
        self.warm_max > 0 && !self.warm_idle.is_zero()
    }

    /// Sets [`warm_idle`](Self::warm_idle).
    pub fn with_warm_idle(mut self, idle: Duration) -> Self {
        self.warm_idle = idle;
        self
    }

    /// Sets [`warm_max`](Self::warm_max).
    pub fn with_warm_max(mut self, max: usize) -> Self {
        self.warm_max = max;
        self
    }

    /// Sets [`spare`](Self::spare).
    pub fn with_spare(mut self, spare: bool) -> Self {
        self.spare = spare;
        self
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

    /// Sets [`sandbox`](Self::sandbox).
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = sandbox;
        self
    }
}

pub(super) const INSTALL_HINT: &str = "set CLAUDE_BIN to the `claude` executable or put `claude` on PATH \
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

#[cfg(test)]
mod tests {
    use super::*;

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
            ("CLAUDE_WARM_IDLE_SECONDS", "30"),
            ("CLAUDE_WARM_MAX", "2"),
            ("CLAUDE_SPARE", "off"),
        ]))
        .unwrap();
        assert!(!config.spare);
        assert_eq!(config.warm_idle, Duration::from_secs(30));
        assert_eq!(config.warm_max, 2);
        assert!(config.warm());
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
        assert!(
            ClaudeCodeConfig::from_vars(vars(&[("PATH", &path), ("CLAUDE_WARM_MAX", "-1")]))
                .is_err()
        );
        let cold = ClaudeCodeConfig::from_vars(vars(&[
            ("PATH", &path),
            ("CLAUDE_WARM_IDLE_SECONDS", "0"),
        ]))
        .unwrap();
        assert!(!cold.warm());
        let default = ClaudeCodeConfig::from_vars(vars(&[("PATH", &path)])).unwrap();
        assert_eq!(default.warm_idle, ClaudeCodeConfig::DEFAULT_WARM_IDLE);
        assert_eq!(default.warm_max, ClaudeCodeConfig::DEFAULT_WARM_MAX);
        assert!(default.spare, "a spare by default");
        assert!(
            ClaudeCodeConfig::from_vars(vars(&[("PATH", &path), ("CLAUDE_SPARE", "maybe")]))
                .is_err()
        );
    }

    #[test]
    fn the_model_is_always_explicit() {
        let with = |pairs: &[(&str, &str)]| {
            let mut vars: Vec<(String, String)> = vec![("CLAUDE_BIN".into(), "/bin/sh".into())];
            vars.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            ClaudeCodeConfig::from_vars(vars).unwrap().model
        };
        assert_eq!(with(&[]).as_deref(), Some(DEFAULT_MODEL));
        assert_eq!(with(&[("MODEL", "m-plain")]).as_deref(), Some("m-plain"));
        assert_eq!(
            with(&[("MODEL", "m-plain"), ("ANTHROPIC_MODEL", "m-anthropic")]).as_deref(),
            Some("m-anthropic")
        );
    }
}
