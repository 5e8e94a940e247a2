//! External programs the tests run: the real Claude Code CLI and the test MCP server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The Claude Code binary: `$CLAUDE_BIN`, else the one bundled with the `claude-agent-sdk`
/// wheel (`pip install claude-agent-sdk`), else `None`.
pub fn find_claude() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("CLAUDE_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return bin.is_file().then_some(bin);
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import claude_agent_sdk,os;print(os.path.dirname(claude_agent_sdk.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    let bin = PathBuf::from(dir.trim()).join("_bundled").join("claude");
    bin.is_file().then_some(bin)
}

/// [`find_claude`] for test `test`: when the CLI is missing this panics if `CI` is set (CI
/// must never skip), and otherwise prints a loud skip banner and returns `None`.
pub fn claude_cli(test: &str) -> Option<PathBuf> {
    let found = find_claude();
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{test}: Claude Code CLI not found (set CLAUDE_BIN or `pip install claude-agent-sdk`); required when CI is set"
            );
        }
        let bar = "!".repeat(88);
        eprintln!("\n{bar}");
        eprintln!("!! SKIPPED {test}: Claude Code CLI not found.");
        eprintln!(
            "!! Set CLAUDE_BIN or run `pip install claude-agent-sdk`. (With CI set this FAILS.)"
        );
        eprintln!("{bar}");
    }
    found
}

/// The test MCP server binary (`anywork-test-mcp`), built on first use
/// (`ANYWORK_TEST_MCP_BIN` overrides).
pub fn test_mcp_server() -> PathBuf {
    workspace_bin("anywork-test", "anywork-test-mcp", "ANYWORK_TEST_MCP_BIN")
}

/// The worker binary (`anywork-worker`), built on first use (`ANYWORK_WORKER_BIN` overrides).
pub fn worker_bin() -> PathBuf {
    workspace_bin("anywork-worker", "anywork-worker", "ANYWORK_WORKER_BIN")
}

/// A binary of this workspace, built with the test's own profile and target dir the first
/// time it is asked for, so tests of one crate can run another crate's program. `env_override`
/// names a variable that points at a prebuilt binary instead.
pub fn workspace_bin(package: &str, bin: &str, env_override: &str) -> PathBuf {
    static BINS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let bins = BINS.get_or_init(Default::default);
    let mut bins = bins.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = bins.get(bin) {
        return path.clone();
    }
    let path = match std::env::var_os(env_override) {
        Some(path) => PathBuf::from(path),
        None => build_bin(package, bin),
    };
    bins.insert(bin.to_owned(), path.clone());
    path
}

fn build_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps")
        .to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .args(["--profile", &profile])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(workspace_root)
        .status()
        .unwrap_or_else(|e| panic!("run cargo to build {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}
