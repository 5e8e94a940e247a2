//! The `anywork-server` binary registers the channels its environment configures: the webhook
//! by default (with a warning when it is open), GitHub and Slack once set, any of them left
//! off with `DISABLED_CHANNELS`, and the channel body limit; no secret reaches its logs.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anywork_channels::verify::hmac_sha256;
use common::{WorkerProcess, free_port, wait_healthy};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const GH_SECRET: &str = "gh-hook-s3cret-xyz";
const GH_TOKEN: &str = "ghp_binary_token_abc";
const SLACK_SECRET: &str = "slack-signing-s3cret";

fn command(db_dir: &std::path::Path, worker_url: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_anywork-server"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_DIR", db_dir)
        .env("CONTAINER_DRIVER", "static")
        .env("STATIC_WORKER_URL", worker_url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn post(url: &str, headers: &[(&str, &str)], body: String) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_come_from_the_environment_and_can_be_turned_off() {
    let fake = anywork_test::fake_llm::FakeLlm::start().await;
    let worker = WorkerProcess::start(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = command(dir.path(), &worker.url)
        .env("SERVER_PORT", port.to_string())
        .env("GITHUB_WEBHOOK_SECRET", GH_SECRET)
        .env("GITHUB_TOKEN", GH_TOKEN)
        .env("GITHUB_API_URL", "http://127.0.0.1:9")
        .env("SLACK_SIGNING_SECRET", SLACK_SECRET)
        .env("SLACK_BOT_TOKEN", "xoxb-binary")
        .env("DISABLED_CHANNELS", "slack")
        .env("CHANNEL_MAX_BODY_BYTES", "2048")
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{url}/api/health")).await;

    // The webhook is on and open.
    let (s, b) = post(
        &format!("{url}/api/channel/webhook/webhook"),
        &[],
        json!({"message": "hello"}).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    // Slack is configured but turned off.
    let (s, b) = post(
        &format!("{url}/api/channel/slack/webhook"),
        &[],
        "{}".into(),
    )
    .await;
    assert_eq!((s, &b["error"]["code"]), (404, &json!("not_found")), "{b}");
    // GitHub is on: its ping is answered, a bad signature refused.
    let ping = json!({"zen": "Design for failure.", "hook_id": 1}).to_string();
    let sig: String = hmac_sha256(GH_SECRET.as_bytes(), &[ping.as_bytes()])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let gh = format!("{url}/api/channel/github/webhook");
    let (s, b) = post(
        &gh,
        &[
            ("x-github-event", "ping"),
            ("x-hub-signature-256", &format!("sha256={sig}")),
        ],
        ping.clone(),
    )
    .await;
    assert_eq!((s, &b["skipped"]), (200, &json!(true)), "{b}");
    let (s, b) = post(
        &gh,
        &[
            ("x-github-event", "ping"),
            ("x-hub-signature-256", "sha256=bad"),
        ],
        ping,
    )
    .await;
    assert_eq!(s, 401, "{b}");
    // The channel body limit.
    let (s, b) = post(
        &format!("{url}/api/channel/webhook/webhook"),
        &[],
        json!({"message": "y".repeat(3000)}).to_string(),
    )
    .await;
    assert_eq!(s, 413, "{b}");

    child.start_kill().unwrap();
    let _ = child.wait().await;
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(
        logs.contains("the generic webhook (/api/channel/webhook/webhook) is open"),
        "{logs}"
    );
    assert!(logs.contains("GitHub channel on"), "{logs}");
    assert!(!logs.contains("Slack channel on"), "{logs}");
    for secret in [GH_SECRET, GH_TOKEN, SLACK_SECRET, "xoxb-binary"] {
        assert!(!logs.contains(secret), "{secret} leaked: {logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_channel_setting_stops_the_start_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value, says) in [
        ("DISABLED_CHANNELS", "webhook,telegram", "telegram"),
        ("GITHUB_TOKEN", "ghp_x", "GITHUB_WEBHOOK_SECRET"),
    ] {
        let out = command(dir.path(), "http://127.0.0.1:9")
            .env("SERVER_PORT", free_port().to_string())
            .env(name, value)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("the server exits")
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{name}: {err}");
    }
}
