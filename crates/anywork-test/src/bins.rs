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

/// The `anywork-test-mcp` binary (an MCP server with `add` and `echo`), built once per test
/// process into the calling test's target directory. Cargo does not build the binaries of a
/// dev-dependency, hence the explicit build. `ANYWORK_TEST_MCP_BIN` overrides the path.
pub fn test_mcp_server() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("ANYWORK_TEST_MCP_BIN") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test>-HASH
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
            .args([
                "build",
                "--quiet",
                "-p",
                "anywork-test",
                "--bin",
                "anywork-test-mcp",
            ])
            .args(["--profile", &profile])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(workspace_root)
            .status()
            .expect("run cargo to build anywork-test-mcp");
        assert!(status.success(), "building anywork-test-mcp failed");
        let bin = profile_dir.join("anywork-test-mcp");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}
