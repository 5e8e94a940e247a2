//! A fuzz harness on stable Rust: each channel's verification and parsing (`parse_at`, the
//! whole path of an inbound request except Slack's optional thread-context fetch) over
//! random bytes and headers, and over real payloads mutated byte by byte or with random JSON
//! put anywhere in them — those signed correctly, so that the parser, not only the
//! signature check, sees them. Properties: nothing panics; unsigned input never becomes a
//! task; every task, follow-up or answer a channel returns is well-formed
//! (`TaskRequest::validate_shape`) and of the channel's type.
//!
//! The normal test run tries a few hundred inputs per channel. The full run:
//!
//! ```sh
//! ANYWORK_FUZZ_CASES=1000000 cargo test --release -p anywork-channels --test fuzz -- --nocapture
//! ```
//!
//! Each test prints how many inputs it ran and how long it took.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anywork_channels::github::{GithubAuth, GithubChannel, GithubConfig};
use anywork_channels::slack::{SlackChannel, SlackConfig};
use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_core::{Inbound, InboundRequest, Result};
use common::{request, sign};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

const SECRET: &str = "fuzz-secret";
const NOW: i64 = 1_700_000_000;

fn cases() -> u32 {
    std::env::var("ANYWORK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(300)
}

/// One fuzz input: what to do to which seed payload.
#[derive(Debug, Clone)]
enum Input {
    /// Random headers and body, unsigned.
    Raw(Vec<(String, String)>, Vec<u8>),
    /// A seed with byte edits, then signed.
    Bytes(usize, Vec<(usize, u8, u8)>),
    /// A seed with the JSON value at one of its paths replaced, then signed.
    Json(usize, usize, Value),
    /// A seed signed, with one header replaced by a random value.
    Header(usize, usize, String),
}

fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "message",
            "session_id",
            "event",
            "source",
            "meta",
            "skills",
            "mcp_servers",
            "callback_url",
            "callback_auth",
            "name",
            "transport",
            "type",
            "command",
            "args",
            "env",
            "url",
            "headers",
            "content",
            "files",
            "action",
            "comment",
            "issue",
            "body",
            "user",
            "login",
            "number",
            "repository",
            "full_name",
            "pull_request",
            "installation",
            "id",
            "in_reply_to_id",
            "text",
            "ts",
            "thread_ts",
            "channel",
            "channel_type",
            "bot_id",
            "subtype",
            "team_id",
            "challenge",
            "authorizations",
            "user_id",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec![
            "@anywork",
            "<@U0LAN0Z89> hi",
            "1700000000.000100",
            "T1",
            "C1",
            "U1",
            "Bot",
            "created",
            "opened",
            "app_mention",
            "message",
            "event_callback",
            "url_verification",
            "im",
            "thread_broadcast",
            "stdio",
            "http",
            "https://x.example/cb",
            "../x",
            "<!-- anywork:task=",
            "wh-1a2b3c4d",
            "",
            " ",
            "日本語 🚀",
            "\u{0}",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_input(seeds: usize, headers: usize) -> impl Strategy<Value = Input> {
    let header_name = prop_oneof![
        prop::sample::select(vec![
            "x-webhook-secret",
            "x-anywork-timestamp",
            "x-anywork-signature",
            "idempotency-key",
            "x-hub-signature-256",
            "x-github-event",
            "x-github-delivery",
            "x-slack-signature",
            "x-slack-request-timestamp",
            "x-slack-retry-num",
        ])
        .prop_map(str::to_owned),
        "[a-z-]{1,20}",
    ];
    let raw_headers = prop::collection::vec((header_name, any::<String>()), 0..5);
    prop_oneof![
        (raw_headers, prop::collection::vec(any::<u8>(), 0..1024))
            .prop_map(|(h, b)| Input::Raw(h, b)),
        (
            0..seeds,
            prop::collection::vec((any::<usize>(), 0u8..4, any::<u8>()), 1..12)
        )
            .prop_map(|(s, edits)| Input::Bytes(s, edits)),
        (0..seeds, any::<usize>(), arb_json()).prop_map(|(s, p, v)| Input::Json(s, p, v)),
        (0..seeds, 0..headers, any::<String>()).prop_map(|(s, h, v)| Input::Header(s, h, v)),
    ]
}

/// Every JSON pointer in `v`, the root included.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Applies byte edits: 0 flips bits, 1 inserts, 2 deletes, 3 overwrites.
fn edit_bytes(mut body: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(pos, op, byte) in edits {
        let len = body.len();
        match op {
            0 if len > 0 => body[pos % len] ^= byte | 1,
            1 => body.insert(pos % (len + 1), byte),
            2 if len > 0 => {
                body.remove(pos % len);
            }
            3 if len > 0 => body[pos % len] = byte,
            _ => {}
        }
    }
    body
}

/// How a channel's sender signs a body, given the seed's extra headers.
type Signer<'a> = &'a dyn Fn(&[(String, String)], &[u8]) -> InboundRequest;

/// A channel under fuzzing: its seeds, how it signs, how it parses.
struct Target<'a> {
    name: &'a str,
    seeds: Vec<(Vec<(String, String)>, Value)>,
    sign: Signer<'a>,
    parse: &'a dyn Fn(&InboundRequest) -> Result<Inbound>,
}

fn run(target: Target<'_>) {
    let n = cases();
    let ran = AtomicU64::new(0);
    let tasks = AtomicU64::new(0);
    let header_count = target
        .seeds
        .iter()
        .map(|(h, _)| h.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let start = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: n,
        // A failure prints its minimal input; nothing is written beside the sources.
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&arb_input(target.seeds.len(), header_count), |input| {
            ran.fetch_add(1, Ordering::Relaxed);
            // Only random input must never become work; a replaced header may be a harmless one.
            let (req, may_work) = match &input {
                Input::Raw(h, b) => (InboundRequest::new(h.clone(), b.clone()), false),
                Input::Bytes(s, edits) => {
                    let (h, v) = &target.seeds[*s];
                    let body = edit_bytes(v.to_string().into_bytes(), edits);
                    ((target.sign)(h, &body), true)
                }
                Input::Json(s, p, value) => {
                    let (h, v) = &target.seeds[*s];
                    let mut v = v.clone();
                    let mut all = Vec::new();
                    pointers(&v, String::new(), &mut all);
                    let at = &all[p % all.len()];
                    if at.is_empty() {
                        v = value.clone();
                    } else if let Some(slot) = v.pointer_mut(at) {
                        *slot = value.clone();
                    }
                    ((target.sign)(h, v.to_string().as_bytes()), true)
                }
                Input::Header(s, i, value) => {
                    let (h, v) = &target.seeds[*s];
                    let mut req = (target.sign)(h, v.to_string().as_bytes());
                    if !req.headers.is_empty() {
                        let i = i % req.headers.len();
                        req.headers[i].1 = value.clone();
                    }
                    (req, true)
                }
            };
            let result = (target.parse)(&req);
            if let Ok(Inbound::Task(t) | Inbound::FollowUp(t) | Inbound::AnswerOnly(t)) = &result {
                tasks.fetch_add(1, Ordering::Relaxed);
                prop_assert!(may_work, "an unsigned input became work: {input:?}");
                prop_assert_eq!(t.channel_type.as_str(), target.name);
                prop_assert!(t.validate_shape().is_ok(), "{:?}", t.validate_shape());
            }
            Ok(())
        })
        .unwrap();
    let elapsed = start.elapsed();
    let ran = ran.load(Ordering::Relaxed);
    println!(
        "fuzz {}: {ran} inputs in {:.1} s ({:.1} µs each), {} became work, no panic",
        target.name,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / ran.max(1) as f64,
        tasks.load(Ordering::Relaxed),
    );
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn fuzz_webhook() {
    let ch = WebhookChannel::new(WebhookConfig::new().with_secret(SECRET));
    let seeds = vec![
        (
            headers(&[("idempotency-key", "k1")]),
            json!({"message": "Summarize", "session_id": "wh-1a2b3c4d", "event": "release",
                "source": "ci", "meta": {"tag": "v1"}, "skills": ["code-review",
                {"name": "greet", "content": "---\nname: greet\n---\nhi"}],
                "mcp_servers": [{"name": "gh", "transport": "stdio", "command": "npx", "args": ["-y"], "env": {"A": "b"}},
                    {"name": "docs", "transport": "http", "url": "https://d.example/mcp", "headers": {"A": "b"}}],
                "callback_url": "https://ci.example/hook", "callback_auth": "Bearer t"}),
        ),
        (Vec::new(), json!({"message": "hi"})),
        (
            Vec::new(),
            json!({"message": "hi", "mcp_servers": {"calc": {"command": "python3"}}}),
        ),
    ];
    let sign_fn = |h: &[(String, String)], body: &[u8]| {
        let ts = NOW.to_string();
        let sig = format!("sha256={}", sign(SECRET, &[ts.as_bytes(), b".", body]));
        let mut headers = h.to_vec();
        headers.push(("x-anywork-timestamp".into(), ts));
        headers.push(("x-anywork-signature".into(), sig));
        InboundRequest::new(headers, body.to_vec())
    };
    run(Target {
        name: "webhook",
        seeds,
        sign: &sign_fn,
        parse: &|r| ch.parse_at(r, NOW),
    });
}

#[test]
fn fuzz_github() {
    let mut config = GithubConfig::new(SECRET, GithubAuth::Token("t".into()));
    config.api_url = "http://127.0.0.1:9".into();
    let ch = GithubChannel::new(config);
    let user = json!({"login": "octocat", "type": "User"});
    let repo = json!({"full_name": "octo/repo", "clone_url": "https://github.com/octo/repo.git", "default_branch": "main"});
    let issue = json!({"number": 3, "title": "Bug", "body": "It breaks", "user": user, "html_url": "https://github.com/octo/repo/issues/3"});
    let seeds = vec![
        (
            headers(&[
                ("x-github-event", "issue_comment"),
                ("x-github-delivery", "d-1"),
            ]),
            json!({"action": "created", "issue": issue, "repository": repo, "installation": {"id": 1},
                "comment": {"id": 11, "body": "@anywork fix it", "user": user}}),
        ),
        (
            headers(&[
                ("x-github-event", "issue_comment"),
                ("x-github-delivery", "d-2"),
            ]),
            json!({"action": "created", "issue": issue, "repository": repo,
                "comment": {"id": 12, "body": "yes, main", "user": user}}),
        ),
        (
            headers(&[("x-github-event", "issues"), ("x-github-delivery", "d-3")]),
            json!({"action": "opened", "issue": {"number": 4, "title": "@anywork help", "body": "x", "user": user}, "repository": repo}),
        ),
        (
            headers(&[
                ("x-github-event", "pull_request_review_comment"),
                ("x-github-delivery", "d-4"),
            ]),
            json!({"action": "created", "repository": repo,
                "pull_request": {"number": 5, "title": "t", "head": {"ref": "b", "sha": "abc"}},
                "comment": {"id": 13, "body": "@anywork why", "user": user, "path": "a.rs", "line": 1,
                    "diff_hunk": "@@", "in_reply_to_id": 9}}),
        ),
        (
            headers(&[("x-github-event", "ping")]),
            json!({"zen": "z", "hook_id": 1}),
        ),
    ];
    let sign_fn = |h: &[(String, String)], body: &[u8]| {
        let mut headers = h.to_vec();
        headers.push((
            "x-hub-signature-256".into(),
            format!("sha256={}", sign(SECRET, &[body])),
        ));
        InboundRequest::new(headers, body.to_vec())
    };
    run(Target {
        name: "github",
        seeds,
        sign: &sign_fn,
        parse: &|r| ch.parse_at(r, NOW),
    });
}

#[test]
fn fuzz_slack() {
    let mut config = SlackConfig::new(SECRET, "xoxb-t");
    config.api_url = "http://127.0.0.1:9".into();
    let ch = SlackChannel::new(config);
    let envelope = |event: Value| {
        json!({"type": "event_callback", "team_id": "T1", "event_id": "Ev1", "event": event,
            "authorizations": [{"user_id": "U0LAN0Z89", "is_bot": true}]})
    };
    let seeds = vec![
        (
            Vec::new(),
            envelope(
                json!({"type": "app_mention", "user": "U1", "text": "<@U0LAN0Z89> hi",
            "ts": "1700000000.000100", "channel": "C1"}),
            ),
        ),
        (
            Vec::new(),
            envelope(
                json!({"type": "app_mention", "user": "U1", "text": "<@U0LAN0Z89> more",
            "ts": "1700000000.000300", "thread_ts": "1700000000.000100", "channel": "C1"}),
            ),
        ),
        (
            Vec::new(),
            envelope(
                json!({"type": "message", "user": "U2", "text": "and?", "ts": "1700000000.000200",
            "thread_ts": "1700000000.000100", "channel": "C1", "channel_type": "channel"}),
            ),
        ),
        (
            Vec::new(),
            envelope(
                json!({"type": "message", "user": "U2", "text": "dm", "ts": "1700000000.000400",
            "channel": "D1", "channel_type": "im"}),
            ),
        ),
        (
            Vec::new(),
            json!({"type": "url_verification", "challenge": "abc", "token": "t"}),
        ),
    ];
    let sign_fn = |h: &[(String, String)], body: &[u8]| {
        let ts = NOW.to_string();
        let sig = format!("v0={}", sign(SECRET, &[b"v0:", ts.as_bytes(), b":", body]));
        let mut headers = h.to_vec();
        headers.push(("x-slack-request-timestamp".into(), ts));
        headers.push(("x-slack-signature".into(), sig));
        InboundRequest::new(headers, body.to_vec())
    };
    run(Target {
        name: "slack",
        seeds,
        sign: &sign_fn,
        parse: &|r| ch.parse_at(r, NOW),
    });
}

#[test]
fn deeply_nested_or_huge_json_is_an_error_not_a_crash() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let body = format!(r#"{{"message": "x", "meta": {nested}}}"#);
    let ts = NOW.to_string();
    let sig = format!(
        "sha256={}",
        sign(SECRET, &[ts.as_bytes(), b".", body.as_bytes()])
    );
    let ch = WebhookChannel::new(WebhookConfig::new().with_secret(SECRET));
    let req = request(
        &[("x-anywork-timestamp", &ts), ("x-anywork-signature", &sig)],
        body.as_bytes(),
    );
    assert!(ch.parse_at(&req, NOW).is_err());
    let big_number = format!(r#"{{"message": "x", "meta": 1{}}}"#, "0".repeat(5000));
    let sig = format!(
        "sha256={}",
        sign(SECRET, &[ts.as_bytes(), b".", big_number.as_bytes()])
    );
    let req = request(
        &[("x-anywork-timestamp", &ts), ("x-anywork-signature", &sig)],
        big_number.as_bytes(),
    );
    let _ = ch.parse_at(&req, NOW);
}
