//! `anywork-bench soak` end to end, small: the server binary, 20 WebSocket sessions chatting
//! every 0.5 s for 3 s; every chat is done, no error, the CSV and the PNG are written.

use std::path::PathBuf;
use std::process::Command;

/// The `anywork-server` binary of this build profile, built if needed (it is another
/// package's binary, so cargo does not build it for this crate's tests).
fn server_bin() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_anywork-bench"));
    let profile_dir = bench.parent().expect("the profile directory");
    let target_dir = profile_dir.parent().expect("the target directory");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "-p", "anywork-server", "--bin", "anywork-server"])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p anywork-server failed");
    profile_dir.join("anywork-server")
}

#[test]
fn a_short_soak_completes_every_chat_and_writes_the_csv_and_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("soak");
    let output = Command::new(env!("CARGO_BIN_EXE_anywork-bench"))
        .args(["soak", "--sessions", "20", "--chat-every-s", "0.5"])
        .args(["--duration-s", "3", "--sample-s", "1", "--store", "sqlite"])
        .arg("--out")
        .arg(&out)
        .arg("--server-bin")
        .arg(server_bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "soak failed\n{stdout}\n{stderr}");

    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.len() >= 3, "a sample a second over 3 s: {csv}");
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let last = rows.last().unwrap();
    // Each session's chats are at phase + k * 0.5 s < 3 s, its phase under 0.5 s: 6 each.
    assert_eq!(last[column("tasks_done")], "120", "{csv}");
    assert_eq!(last[column("errors")], "0", "{csv}");
    for row in &rows {
        assert!(row[column("rss_kib")].parse::<u64>().unwrap() > 0, "{csv}");
        assert!(row[column("fds")].parse::<u64>().unwrap() >= 20, "{csv}");
        assert!(
            row[column("sqlite_files_bytes")].parse::<u64>().unwrap() > 0,
            "{csv}"
        );
    }
    assert!(
        rows[0][column("websockets")].parse::<u64>().unwrap() >= 20,
        "{csv}"
    );

    let png = std::fs::read(out.with_extension("png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "an empty plot? {} bytes", png.len());
}
