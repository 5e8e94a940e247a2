//! The worker image for tests against a real Docker engine, built from the compiled worker
//! binary and the claude CLI without a registry (`deploy/build-worker-image.sh`: a Debian
//! minimal root with bash, git and the CLI, the same image users build), and the check that
//! an engine is there at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The tag tests use unless they need another.
pub const TEST_IMAGE: &str = "anywork-worker:test";

/// Whether `docker info` answers: the CLI is installed and the engine reachable.
pub fn engine_reachable() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// [`engine_reachable`] for test `test`: when there is no engine this panics if `CI` is set
/// (CI must never skip), and otherwise prints a loud skip banner and returns `false`.
pub fn docker_engine(test: &str) -> bool {
    if engine_reachable() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{test}: no Docker engine (`docker info` failed: install docker.io and start dockerd); required when CI is set"
        );
    }
    let bar = "!".repeat(88);
    eprintln!("\n{bar}");
    eprintln!("!! SKIPPED {test}: no Docker engine (`docker info` failed).");
    eprintln!("!! Install docker.io and start dockerd. (With CI set this FAILS.)");
    eprintln!("{bar}");
    false
}

/// Makes sure `tag` holds the current worker binary ([`crate::bins::worker_bin`], built if
/// needed) and the claude CLI ([`crate::bins::find_claude`]): runs
/// `deploy/build-worker-image.sh`, which rebuilds only when one of them changed.
/// Once per process and tag.
///
/// # Panics
/// If the script fails (its output is shown).
pub fn ensure_worker_image(tag: &str) -> String {
    static DONE: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|t| t == tag) {
        return tag.to_owned();
    }
    let bin = crate::bins::worker_bin();
    build_image(&bin, tag);
    done.push(tag.to_owned());
    tag.to_owned()
}

/// Runs `deploy/build-worker-image.sh BIN TAG` with the claude CLI the tests use
/// (`CLAUDE_BIN` or the claude-agent-sdk wheel's; without one, an image without the CLI).
///
/// # Panics
/// If the script fails.
pub fn build_image(bin: &Path, tag: &str) {
    let script = script_path();
    let mut command = Command::new("bash");
    command.arg(&script).arg(bin).arg(tag);
    match crate::bins::find_claude() {
        Some(claude) => command.env("CLAUDE_BIN", claude),
        None => command.env("WITH_CLAUDE", "0"),
    };
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} {} {tag} failed:\n{}{}",
        script.display(),
        bin.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/build-worker-image.sh")
}

/// Removes what a test run left on the engine: containers and volumes labelled with
/// `pool` (the driver's name prefix) and the network `network`. Best effort, synchronous (so
/// it can run from `Drop`, also after a panic).
pub fn remove_pool(pool: &str, network: &str) {
    let label = format!("label=io.anywork.pool={pool}");
    let ids = |args: &[&str]| -> Vec<String> {
        Command::new("docker")
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = ids(&["ps", "-aq", "--filter", &label]);
    if !containers.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v"])
            .args(&containers)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let volumes = ids(&["volume", "ls", "-q", "--filter", &label]);
    if !volumes.is_empty() {
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f"])
            .args(&volumes)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // By id: a name can be ambiguous when racing creators made two networks.
    let mut networks = ids(&["network", "ls", "-q", "--filter", &label]);
    networks.extend(
        ids(&["network", "ls", "--format", "{{.ID}} {{.Name}}"])
            .chunks(2)
            .filter(|pair| pair.get(1).map(String::as_str) == Some(network))
            .map(|pair| pair[0].clone()),
    );
    networks.sort();
    networks.dedup();
    if !networks.is_empty() {
        let _ = Command::new("docker")
            .args(["network", "rm"])
            .args(&networks)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
