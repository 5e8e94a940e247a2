#![allow(missing_docs)] // criterion_group! makes an undocumented pub fn
//! Verification + parsing of one typical signed request per channel (the target: under
//! 20 µs each). Run: `cargo bench -p anywork-channels --bench intake`; figures in
//! docs/benchmarks.md.

use anywork_channels::github::{GithubAuth, GithubChannel, GithubConfig};
use anywork_channels::slack::{SlackChannel, SlackConfig};
use anywork_channels::verify::hmac_sha256;
use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_core::{Inbound, InboundRequest};
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

const SECRET: &str = "bench-secret";
const NOW: i64 = 1_700_000_000;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn req(headers: Vec<(&str, String)>, body: Vec<u8>) -> InboundRequest {
    InboundRequest::new(
        headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        body,
    )
}

fn check(inbound: anywork_core::Result<Inbound>) {
    assert!(matches!(inbound, Ok(Inbound::Task(_))), "{inbound:?}");
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify+parse");

    // The generic webhook, as the original's clients post it, signed.
    let webhook = WebhookChannel::new(WebhookConfig::new().with_secret(SECRET));
    let body = json!({"message": "Summarize the failing tests of build 4711 and propose a fix.",
        "session_id": "wh-1a2b3c4d", "event": "build.failed", "source": "ci",
        "meta": {"build": 4711, "branch": "main"}, "skills": ["code-review"],
        "mcp_servers": [{"name": "docs", "transport": "http", "url": "https://docs.example/mcp"}],
        "callback_url": "https://ci.example/hook", "callback_auth": "Bearer x"})
    .to_string()
    .into_bytes();
    let ts = NOW.to_string();
    let sig = format!(
        "sha256={}",
        hex(&hmac_sha256(
            SECRET.as_bytes(),
            &[ts.as_bytes(), b".", &body]
        ))
    );
    let signed = req(
        vec![
            ("x-anywork-timestamp", ts.clone()),
            ("x-anywork-signature", sig),
        ],
        body.clone(),
    );
    let shared = req(vec![("x-webhook-secret", SECRET.to_owned())], body.clone());
    check(webhook.parse_at(&signed, NOW));
    check(webhook.parse_at(&shared, NOW));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("webhook (HMAC signature)", |b| {
        b.iter(|| webhook.parse_at(black_box(&signed), NOW))
    });
    g.bench_function("webhook (X-Webhook-Secret)", |b| {
        b.iter(|| webhook.parse_at(black_box(&shared), NOW))
    });
    g.bench_function("webhook verify only (HMAC signature)", |b| {
        b.iter(|| webhook.verify(black_box(&signed), NOW))
    });

    // A GitHub issue_comment of realistic size (~6 kB: GitHub sends whole objects).
    let mut gh_config = GithubConfig::new(SECRET, GithubAuth::Token("t".into()));
    gh_config.api_url = "http://127.0.0.1:9".into();
    let github = GithubChannel::new(gh_config);
    let user = json!({"login": "octocat", "id": 1, "node_id": "MDQ6VXNlcjE=", "type": "User",
        "avatar_url": "https://github.com/images/error/octocat_happy.gif", "site_admin": false,
        "url": "https://api.github.com/users/octocat", "html_url": "https://github.com/octocat"});
    let mut repo = json!({"id": 1296269, "full_name": "octo-org/hello-world", "name": "hello-world",
        "owner": user, "private": false, "clone_url": "https://github.com/octo-org/hello-world.git",
        "default_branch": "main", "description": "This your first repo!"});
    for i in 0..40 {
        repo[format!("extra_url_{i}")] = json!(format!(
            "https://api.github.com/repos/octo-org/hello-world/thing/{i}"
        ));
    }
    let body = json!({"action": "created",
        "issue": {"number": 1347, "title": "Found a bug", "body": "I'm having a problem with this.".repeat(20),
            "user": user, "html_url": "https://github.com/octo-org/hello-world/issues/1347", "labels": [], "state": "open"},
        "comment": {"id": 11, "body": "@anywork please find the cause and open a PR", "user": user,
            "html_url": "https://github.com/octo-org/hello-world/issues/1347#issuecomment-11"},
        "repository": repo, "sender": user, "installation": {"id": 42}})
    .to_string()
    .into_bytes();
    let sig = format!("sha256={}", hex(&hmac_sha256(SECRET.as_bytes(), &[&body])));
    let gh = req(
        vec![
            ("x-github-event", "issue_comment".into()),
            (
                "x-github-delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            ),
            ("x-hub-signature-256", sig),
        ],
        body.clone(),
    );
    check(github.parse_at(&gh, NOW));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("github issue_comment", |b| {
        b.iter(|| github.parse_at(black_box(&gh), NOW))
    });
    g.bench_function("github verify only", |b| {
        b.iter(|| github.verify(black_box(&gh)))
    });

    // A Slack app_mention as the Events API sends it.
    let mut sl_config = SlackConfig::new(SECRET, "xoxb-t");
    sl_config.api_url = "http://127.0.0.1:9".into();
    let slack = SlackChannel::new(sl_config);
    let body = json!({"token": "XXYYZZ", "team_id": "T123ABC456", "api_app_id": "A123ABC456",
        "event": {"type": "app_mention", "user": "U123ABC456", "text": "<@U0LAN0Z89> is it everything a river should be?",
            "ts": "1515449522.000016", "channel": "C123ABC456", "event_ts": "1515449522.000016",
            "blocks": [{"type": "rich_text", "block_id": "x", "elements": [{"type": "rich_text_section",
                "elements": [{"type": "user", "user_id": "U0LAN0Z89"}, {"type": "text", "text": " is it everything a river should be?"}]}]}]},
        "type": "event_callback", "event_id": "Ev123ABC456", "event_time": 1515449522,
        "authorizations": [{"team_id": "T123ABC456", "user_id": "U0LAN0Z89", "is_bot": true}]})
    .to_string()
    .into_bytes();
    let sig = format!(
        "v0={}",
        hex(&hmac_sha256(
            SECRET.as_bytes(),
            &[b"v0:", ts.as_bytes(), b":", &body]
        ))
    );
    let sl = req(
        vec![
            ("x-slack-request-timestamp", ts),
            ("x-slack-signature", sig),
        ],
        body.clone(),
    );
    check(slack.parse_at(&sl, NOW));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("slack app_mention", |b| {
        b.iter(|| slack.parse_at(black_box(&sl), NOW))
    });
    g.bench_function("slack verify only", |b| {
        b.iter(|| slack.verify(black_box(&sl), NOW))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
