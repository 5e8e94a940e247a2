//! Choosing the executor from the environment, shared by the worker binary and by servers
//! that embed a worker.

use std::collections::HashMap;
use std::sync::Arc;

use anywork_core::{Error, Executor, Result};

use crate::claude::{ClaudeCodeConfig, ClaudeCodeExecutor};
use crate::native::{NativeConfig, NativeExecutor};

/// What to set when no model is configured; shown by the worker and the server.
pub const MODEL_HINT: &str = "no model is configured: set ANTHROPIC_API_KEY (Claude Code CLI or \
    the native executor against Anthropic), or API_KEY + API_BASE_URL + MODEL (the native \
    executor against any OpenAI-compatible API)";

/// Picks the executor that `EXECUTOR` names (`claude-code` or `native`), or by default:
/// Claude Code when `ANTHROPIC_API_KEY` is set and the `claude` CLI is found, else the native
/// executor when a model API is configured. With no model configured the error is
/// [`MODEL_HINT`].
pub fn executor_from_env() -> Result<Arc<dyn Executor>> {
    executor_from_vars(
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
    )
}

/// [`executor_from_env`] over explicit variables (name, value), for tests and embedders.
pub fn executor_from_vars(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Arc<dyn Executor>> {
    let vars: HashMap<String, String> = vars
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect();
    let native = || -> Result<Arc<dyn Executor>> {
        let config = NativeConfig::from_lookup(|name| vars.get(name).cloned())?;
        Ok(Arc::new(NativeExecutor::new(config)?))
    };
    let claude = || -> Result<Arc<dyn Executor>> {
        let config = ClaudeCodeConfig::from_vars(vars.clone())?;
        Ok(Arc::new(ClaudeCodeExecutor::new(config)))
    };
    match vars.get("EXECUTOR").map(|s| s.trim()) {
        Some("claude-code" | "claude") => claude(),
        Some("native") => native(),
        Some(other) => Err(Error::invalid_input(format!(
            "EXECUTOR={other:?} is not known: use `claude-code` or `native`"
        ))),
        None => {
            if vars.contains_key("ANTHROPIC_API_KEY")
                && let Ok(executor) = claude()
            {
                return Ok(executor);
            }
            if vars.contains_key("ANTHROPIC_API_KEY") || vars.contains_key("API_KEY") {
                native()
            } else {
                Err(Error::invalid_input(MODEL_HINT))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn nothing_configured_names_the_variables() {
        let err = executor_from_vars(vars(&[("PATH", "/nonexistent")]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("ANTHROPIC_API_KEY"), "{err}");
        assert!(err.to_string().contains("API_BASE_URL"), "{err}");
    }

    #[test]
    fn openai_compatible_settings_pick_the_native_executor() {
        let e = executor_from_vars(vars(&[
            ("API_KEY", "k"),
            ("API_BASE_URL", "http://127.0.0.1:9/v1"),
            ("MODEL", "gpt-x"),
        ]))
        .unwrap();
        assert_eq!(e.name(), "native");
    }

    #[test]
    fn anthropic_key_without_the_cli_falls_back_to_native() {
        let e = executor_from_vars(vars(&[
            ("ANTHROPIC_API_KEY", "k"),
            ("PATH", "/nonexistent"),
        ]))
        .unwrap();
        assert_eq!(e.name(), "native");
    }

    #[test]
    fn anthropic_key_with_the_cli_picks_claude_code() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("claude");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = executor_from_vars(vars(&[
            ("ANTHROPIC_API_KEY", "k"),
            ("CLAUDE_BIN", bin.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(e.name(), "claude-code");
    }

    #[test]
    fn explicit_choice_is_honoured_or_explained() {
        let err = executor_from_vars(vars(&[("EXECUTOR", "gpt")]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("claude-code"), "{err}");
        let err = executor_from_vars(vars(&[("EXECUTOR", "native")]))
            .err()
            .unwrap();
        assert_eq!(err.kind(), anywork_core::ErrorKind::InvalidInput, "{err}");
    }
}
