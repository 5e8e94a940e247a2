//! What confines the CLI's tools: Claude Code's own sandbox settings for its `Bash` tool, and
//! the MCP configuration whose stdio servers start without the model API keys.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::CONFIG_DIR;
use crate::sandbox::{SECRET_ENV, Sandbox, find_program};

/// The file (in [`CONFIG_DIR`]) with the workspace's `.mcp.json` as the CLI gets it.
pub const MCP_CONFIG_FILE: &str = "anywork-mcp.json";
/// Largest `.mcp.json` rewritten.
const MAX_MCP_JSON: u64 = 1024 * 1024;

/// The `--settings` of a confined run: Claude Code's sandbox on for `Bash`, writable only in
/// the workspace, the network as the sandbox says, the model keys unset for its commands, no
/// way out (`allowUnsandboxedCommands: false`). `None` when the sandbox is not confined (Claude
/// Code's sandbox needs bubblewrap too).
///
/// The CLI itself runs inside the worker's bwrap, so Claude Code's sandbox is a nested one:
/// `enableWeakerNestedSandbox` keeps the (already private) `/proc` of the outer one. Passed
/// on the command line rather than as a file of the workspace, which the agent could rewrite.
pub(super) fn sandbox_settings(sandbox: &Sandbox, workspace: &Path) -> Option<String> {
    if !sandbox.is_confined() {
        return None;
    }
    let network = if sandbox.config().network {
        json!({ "allowedDomains": ["*"] })
    } else {
        json!({ "allowedDomains": [], "strictAllowlist": true })
    };
    let env_vars: Vec<Value> = SECRET_ENV
        .iter()
        .map(|name| json!({ "name": name, "mode": "deny" }))
        .collect();
    let settings = json!({
        "sandbox": {
            "enabled": true,
            "failIfUnavailable": false,
            "enableWeakerNestedSandbox": true,
            "autoAllowBashIfSandboxed": true,
            "allowUnsandboxedCommands": false,
            "network": network,
            "filesystem": { "allowWrite": [workspace] },
            "credentials": { "envVars": env_vars },
        }
    });
    Some(settings.to_string())
}

/// Writes `<CONFIG_DIR>/anywork-mcp.json` from the workspace's `.mcp.json`, each stdio server's
/// command run through `env -u <key>...` so that the model API keys of the CLI's environment
/// ([`SECRET_ENV`]) do not reach it unless its own `env` names them; returns its path for
/// `--mcp-config` (with `--strict-mcp-config`). `None` when the workspace has no readable
/// `.mcp.json` (the CLI then reads it, or reports it, itself).
///
/// `extra`: a server of the worker's own (the pull-request tool's), added under its name
/// (replacing one of that name), with or without a `.mcp.json`.
pub(super) fn mcp_config(
    workspace: &Path,
    sandbox: &Sandbox,
    extra: Option<&(String, Value)>,
) -> Option<PathBuf> {
    let source = workspace.join(".mcp.json");
    let read = || -> Option<Value> {
        let meta = fs::symlink_metadata(&source).ok()?;
        if !meta.is_file() || meta.len() > MAX_MCP_JSON {
            return None;
        }
        let doc: Value = serde_json::from_str(&fs::read_to_string(&source).ok()?).ok()?;
        doc.get("mcpServers")?.as_object()?;
        Some(doc)
    };
    let mut doc = match (read(), extra) {
        (Some(doc), _) => doc,
        (None, Some(_)) => serde_json::json!({"mcpServers": {}}),
        (None, None) => return None,
    };
    let servers = doc.get_mut("mcpServers")?.as_object_mut()?;
    if let Some((name, server)) = extra {
        servers.insert(name.clone(), server.clone());
    }
    let path_var = sandbox
        .config()
        .child_env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let env_program = find_program("env", &path_var)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "env".to_owned());
    for server in servers.values_mut() {
        let Some(server) = server.as_object_mut() else {
            continue;
        };
        let stdio = server
            .get("type")
            .and_then(Value::as_str)
            .is_none_or(|t| t == "stdio");
        let Some(command) = server
            .get("command")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            continue;
        };
        if !stdio {
            continue;
        }
        let own_env: Vec<String> = server
            .get("env")
            .and_then(Value::as_object)
            .map(|env| env.keys().cloned().collect())
            .unwrap_or_default();
        let mut args: Vec<Value> = Vec::new();
        for name in SECRET_ENV {
            if !own_env.iter().any(|n| n == name) {
                args.push("-u".into());
                args.push((*name).into());
            }
        }
        args.push("--".into());
        args.push(command.into());
        if let Some(Value::Array(original)) = server.get("args") {
            args.extend(original.iter().cloned());
        }
        server.insert("command".into(), env_program.clone().into());
        server.insert("args".into(), Value::Array(args));
    }
    let dir = workspace.join(CONFIG_DIR);
    let dest = dir.join(MCP_CONFIG_FILE);
    let tmp = dir.join(format!(".{MCP_CONFIG_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(doc.to_string().as_bytes()))
        .and_then(|()| fs::rename(&tmp, &dest));
    match written {
        Ok(()) => Some(dest),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            tracing::warn!("cannot write {}: {e}", dest.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_servers_lose_the_keys_they_do_not_name() {
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join(CONFIG_DIR)).unwrap();
        assert_eq!(mcp_config(ws.path(), &Sandbox::default(), None), None);
        fs::write(
            ws.path().join(".mcp.json"),
            json!({"mcpServers": {
                "calc": {"command": "calc-server", "args": ["--fast"]},
                "keyed": {"type": "stdio", "command": "k", "env": {"API_KEY": "mine"}},
                "remote": {"type": "http", "url": "https://mcp.example/"},
            }})
            .to_string(),
        )
        .unwrap();
        let path = mcp_config(ws.path(), &Sandbox::default(), None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let doc: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let calc = &doc["mcpServers"]["calc"];
        assert!(calc["command"].as_str().unwrap().ends_with("env"), "{calc}");
        let args: Vec<&str> = calc["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.ends_with(&["--", "calc-server", "--fast"]), "{args:?}");
        for name in SECRET_ENV {
            assert!(
                args.windows(2).any(|w| w == ["-u", *name]),
                "{name}: {args:?}"
            );
        }
        let keyed: Vec<&str> = doc["mcpServers"]["keyed"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(!keyed.contains(&"API_KEY"), "{keyed:?}");
        assert_eq!(doc["mcpServers"]["keyed"]["env"]["API_KEY"], "mine");
        assert_eq!(
            doc["mcpServers"]["remote"],
            json!({"type": "http", "url": "https://mcp.example/"})
        );
    }

    #[test]
    fn settings_only_when_confined() {
        assert_eq!(
            sandbox_settings(&Sandbox::default(), Path::new("/ws")),
            None
        );
    }
}
