//! Choosing the executor from the environment, shared by the worker binary and by servers
//! that embed a worker.

use std::collections::HashMap;
use std::sync::Arc;

use anywork_core::{Error, Executor, Result};

use crate::sandbox::Sandbox;

#[cfg(feature = "claude-code")]
use crate::claude::{ClaudeCodeConfig, ClaudeCodeExecutor};
#[cfg(feature = "native")]
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
/// The executor gets no sandbox ([`Sandbox::default`]); see [`executor_with_sandbox`].
///
/// An executor left out of this build (cargo features `claude-code`, `native`) is never picked
/// by default; naming it in `EXECUTOR` is an [`Unavailable`](anywork_core::ErrorKind::Unavailable) error that says which
/// feature is missing.
pub fn executor_from_vars(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Arc<dyn Executor>> {
    executor_with_sandbox(vars, &Sandbox::default())
}

/// [`executor_from_vars`] whose executor runs the agent's processes in `sandbox` (build it
/// once with [`Sandbox::detect`] and give the same value to
/// [`WorkerConfig::with_sandbox`](crate::WorkerConfig::with_sandbox)).
pub fn executor_with_sandbox(
    vars: impl IntoIterator<Item = (String, String)>,
    sandbox: &Sandbox,
) -> Result<Arc<dyn Executor>> {
    let vars: HashMap<String, String> = vars
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect();
    match vars.get("EXECUTOR").map(|s| s.trim()) {
        Some("claude-code" | "claude") => claude(&vars, sandbox),
        Some("native") => native(&vars, sandbox),
        Some(other) => Err(Error::invalid_input(format!(
            "EXECUTOR={other:?} is not known: use `claude-code` or `native`"
        ))),
        None => {
            if vars.contains_key("ANTHROPIC_API_KEY") {
                match claude(&vars, sandbox) {
                    Ok(executor) => return Ok(executor),
                    // Without the native executor to fall back to, say why Claude Code failed.
                    Err(e) if !cfg!(feature = "native") => return Err(e),
                    Err(_) => {}
                }
            }
            if vars.contains_key("ANTHROPIC_API_KEY") || vars.contains_key("API_KEY") {
                native(&vars, sandbox)
            } else {
                Err(Error::invalid_input(MODEL_HINT))
            }
        }
    }
}

/// The variables of the file named by `WORKER_ENV_FILE` (a JSON object of strings), read
/// through `lookup`; none when it is unset. Drivers put the model keys there so that they are
/// not in the container's environment; give them to [`executor_with_sandbox`] after the
/// process environment (they win).
pub fn env_file_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>> {
    let Some(path) = lookup("WORKER_ENV_FILE").filter(|p| !p.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path.trim())
        .map_err(|e| Error::invalid_input(format!("cannot read WORKER_ENV_FILE {path}: {e}")))?;
    let vars: HashMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        Error::invalid_input(format!(
            "WORKER_ENV_FILE {path} is not a JSON object of strings: {e}"
        ))
    })?;
    Ok(vars.into_iter().collect())
}

/// The executors of this build, as `EXECUTOR` names them.
#[cfg(not(all(feature = "claude-code", feature = "native")))]
const BUILT_IN: &[&str] = &[
    #[cfg(feature = "claude-code")]
    "claude-code",
    #[cfg(feature = "native")]
    "native",
];

/// The error for an executor whose cargo feature this build lacks.
#[cfg(not(all(feature = "claude-code", feature = "native")))]
fn not_built(executor: &str) -> Error {
    let built = if BUILT_IN.is_empty() {
        "it has no executor".to_owned()
    } else {
        format!("it has only {}", BUILT_IN.join(", "))
    };
    Error::new(
        anywork_core::ErrorKind::Unavailable,
        format!(
            "the `{executor}` executor is not in this build of anywork-worker ({built}): \
             build it with the cargo feature `{executor}` (on by default)"
        ),
    )
}

#[cfg(feature = "native")]
fn native(vars: &HashMap<String, String>, sandbox: &Sandbox) -> Result<Arc<dyn Executor>> {
    let config =
        NativeConfig::from_lookup(|name| vars.get(name).cloned())?.with_sandbox(sandbox.clone());
    let executor = NativeExecutor::new(config)?;
    tracing::info!(executor = "native", model = %executor.model(), "executor ready");
    Ok(Arc::new(executor))
}

#[cfg(not(feature = "native"))]
fn native(_vars: &HashMap<String, String>, _sandbox: &Sandbox) -> Result<Arc<dyn Executor>> {
    Err(not_built("native"))
}

#[cfg(feature = "claude-code")]
fn claude(vars: &HashMap<String, String>, sandbox: &Sandbox) -> Result<Arc<dyn Executor>> {
    let config = ClaudeCodeConfig::from_vars(vars.clone())?.with_sandbox(sandbox.clone());
    let model = config.model.as_deref().unwrap_or("the CLI's default");
    let chosen = ["ANTHROPIC_MODEL", "MODEL"]
        .iter()
        .any(|name| vars.contains_key(*name));
    tracing::info!(
        executor = "claude-code",
        model,
        "executor ready ({})",
        if chosen {
            "model as configured"
        } else {
            "default model: set ANTHROPIC_MODEL to choose another"
        }
    );
    Ok(Arc::new(ClaudeCodeExecutor::new(config)))
}

#[cfg(not(feature = "claude-code"))]
fn claude(_vars: &HashMap<String, String>, _sandbox: &Sandbox) -> Result<Arc<dyn Executor>> {
    Err(not_built("claude-code"))
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
    #[cfg(feature = "native")]
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
    #[cfg(feature = "native")]
    fn anthropic_key_without_the_cli_falls_back_to_native() {
        let e = executor_from_vars(vars(&[
            ("ANTHROPIC_API_KEY", "k"),
            ("PATH", "/nonexistent"),
        ]))
        .unwrap();
        assert_eq!(e.name(), "native");
    }

    #[test]
    #[cfg(feature = "claude-code")]
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
    }

    #[test]
    #[cfg(feature = "native")]
    fn native_without_a_model_is_explained() {
        let err = executor_from_vars(vars(&[("EXECUTOR", "native")]))
            .err()
            .unwrap();
        assert_eq!(err.kind(), anywork_core::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    #[cfg(not(feature = "native"))]
    fn a_build_without_native_says_so() {
        for pairs in [
            &[("EXECUTOR", "native")][..],
            &[("API_KEY", "k"), ("API_BASE_URL", "http://127.0.0.1:9/v1")][..],
        ] {
            let err = executor_from_vars(vars(pairs)).err().unwrap();
            assert_eq!(err.kind(), anywork_core::ErrorKind::Unavailable, "{err}");
            assert!(err.message().contains("cargo feature `native`"), "{err}");
        }
    }

    #[test]
    #[cfg(not(feature = "claude-code"))]
    fn a_build_without_claude_code_says_so() {
        let err = executor_from_vars(vars(&[
            ("EXECUTOR", "claude-code"),
            ("ANTHROPIC_API_KEY", "k"),
        ]))
        .err()
        .unwrap();
        assert_eq!(err.kind(), anywork_core::ErrorKind::Unavailable, "{err}");
        assert!(
            err.message().contains("cargo feature `claude-code`"),
            "{err}"
        );
    }

    #[test]
    #[cfg(not(any(feature = "claude-code", feature = "native")))]
    fn a_build_without_executors_says_so() {
        let err = executor_from_vars(vars(&[("ANTHROPIC_API_KEY", "k")]))
            .err()
            .unwrap();
        assert!(err.message().contains("it has no executor"), "{err}");
    }
}
