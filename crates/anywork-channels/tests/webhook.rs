//! The generic webhook as its senders use it: the original AnyWork's body and secret header,
//! the HMAC signature with its replay window, and everything that must be refused.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_core::{Channel, ErrorKind, Inbound, McpServerConfig, SessionMode};
use common::{request, sign, task};
use serde_json::json;

const SECRET: &str = "s3cret-webhook";
const NOW: i64 = 1_700_000_000;

fn channel() -> WebhookChannel {
    WebhookChannel::new(WebhookConfig::new().with_secret(SECRET))
}

fn with_secret(body: &str) -> anywork_core::InboundRequest {
    request(
        &[
            ("X-Webhook-Secret", SECRET),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn signed(secret: &str, ts: i64, body: &[u8]) -> anywork_core::InboundRequest {
    let ts = ts.to_string();
    let sig = format!("sha256={}", sign(secret, &[ts.as_bytes(), b".", body]));
    request(
        &[("X-AnyWork-Timestamp", &ts), ("X-AnyWork-Signature", &sig)],
        body,
    )
}

#[tokio::test]
async fn the_originals_body_becomes_a_task_with_every_field() {
    let body = json!({
        "message": "Summarize the release notes",
        "session_id": "wh-1a2b3c4d",
        "event": "release",
        "source": "ci",
        "meta": {"tag": "v1.2"},
        "skills": ["code-review", {"name": "greet", "content": "---\nname: greet\n---\nSay hi"}],
        "mcp_servers": [
            {"name": "github", "transport": "stdio", "command": "npx", "args": ["-y", "srv"], "env": {"T": "1"}},
            {"name": "docs", "transport": "http", "url": "https://docs.example/mcp", "headers": {"A": "b"}}
        ],
        "callback_url": "https://ci.example/hook",
        "callback_auth": "Bearer cb-token",
        "unknown_field": "ignored as the original did"
    });
    // Through the trait, as the endpoint calls it.
    let t = task(
        channel()
            .parse(with_secret(&body.to_string()))
            .await
            .unwrap(),
    );
    assert_eq!(t.channel_type, "webhook");
    assert_eq!(t.message, "Summarize the release notes");
    assert_eq!(t.session_id.as_ref().unwrap().as_str(), "wh-1a2b3c4d");
    assert_eq!(t.session_mode, SessionMode::GetOrCreate);
    assert_eq!(t.channel_key, None);
    assert_eq!(
        t.channel_meta,
        json!({"event": "release", "source": "ci", "meta": {"tag": "v1.2"}})
    );
    assert_eq!(t.unresolved_skills(), ["code-review"]);
    assert_eq!(t.skills[1].name, "greet");
    assert!(!t.skills[1].is_name_only());
    assert_eq!(
        t.mcp_servers["github"],
        McpServerConfig::Stdio {
            command: "npx".into(),
            args: vec!["-y".into(), "srv".into()],
            env: BTreeMap::from([("T".into(), "1".into())]),
        }
    );
    assert!(matches!(
        t.mcp_servers["docs"],
        McpServerConfig::Http { .. }
    ));
    let push = t.push_notification.unwrap();
    assert_eq!(push.url, "https://ci.example/hook");
    assert_eq!(push.authorization.as_deref(), Some("Bearer cb-token"));
    assert_eq!(t.idempotency_key, None);
    // What the caller does next: resolve the named skill, then the request is valid.
    let mut t2 = task(
        channel()
            .parse_at(&with_secret(&body.to_string()), NOW)
            .unwrap(),
    );
    assert!(t2.validate().is_err());
    t2.resolve_skills(|n| Ok(anywork_core::SkillSpec::new(n, "body")))
        .unwrap();
    t2.validate().unwrap();
}

#[test]
fn without_session_id_each_request_gets_a_fresh_wh_session() {
    let c = channel();
    let a = task(
        c.parse_at(&with_secret(r#"{"message":"hi"}"#), NOW)
            .unwrap(),
    );
    let b = task(
        c.parse_at(&with_secret(r#"{"message":"hi","session_id":null}"#), NOW)
            .unwrap(),
    );
    for t in [&a, &b] {
        let id = t.session_id.as_ref().unwrap().as_str();
        assert!(
            id.len() == 11
                && id.starts_with("wh-")
                && id[3..]
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{id}"
        );
        assert_eq!(t.session_mode, SessionMode::CreateNew);
    }
    assert_ne!(a.session_id, b.session_id);
    assert_eq!(a.channel_meta, json!({}));
}

#[test]
fn a_body_without_message_is_skipped_like_the_original() {
    for body in [
        "{}",
        r#"{"message":null}"#,
        r#"{"message":""}"#,
        r#"{"message":"  \n"}"#,
        r#"{"event":"push"}"#,
    ] {
        assert!(
            matches!(
                channel().parse_at(&with_secret(body), NOW).unwrap(),
                Inbound::Skip { .. }
            ),
            "{body}"
        );
    }
}

#[test]
fn malformed_bodies_are_refused_with_the_reason() {
    for (body, needle) in [
        ("not json", "not JSON"),
        ("[1,2]", "JSON object"),
        ("\"message\"", "JSON object"),
        (r#"{"message": 42}"#, "`message` must be a string"),
        (
            r#"{"message":"x","session_id":7}"#,
            "`session_id` must be a string",
        ),
        (r#"{"message":"x","session_id":"has space"}"#, "session id"),
        (r#"{"message":"x","skills":["../etc"]}"#, "skill name"),
        (
            r#"{"message":"x","skills":"code-review"}"#,
            "invalid webhook body",
        ),
        // (`[{"name":"a"}]` alone names the server's MCP catalog entry `a`.)
        (
            r#"{"message":"x","mcp_servers":[{"name":"a","transport":"stdio"}]}"#,
            "command",
        ),
        (
            r#"{"message":"x","callback_url":"ftp://x"}"#,
            "callback_url",
        ),
        (
            r#"{"message":"x","callback_url":"javascript:alert(1)"}"#,
            "callback_url",
        ),
        (
            r#"{"message":"x","callback_url":"https://a b"}"#,
            "callback_url",
        ),
    ] {
        let e = channel().parse_at(&with_secret(body), NOW).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{body}: {e}");
        assert!(e.to_string().contains(needle), "{body}: {e}");
    }
}

#[test]
fn mcp_servers_and_skills_come_in_every_form() {
    for (mcp, skills) in [
        (json!([]), json!([])),
        (json!({}), json!(null)),
        (json!(null), json!([])),
    ] {
        let body = json!({"message": "x", "mcp_servers": mcp, "skills": skills});
        let t = task(
            channel()
                .parse_at(&with_secret(&body.to_string()), NOW)
                .unwrap(),
        );
        assert!(t.mcp_servers.is_empty() && t.skills.is_empty());
    }
    let body = json!({"message": "x", "mcp_servers": {"calc": {"command": "python3", "args": ["calc.py"]}}});
    let t = task(
        channel()
            .parse_at(&with_secret(&body.to_string()), NOW)
            .unwrap(),
    );
    assert!(matches!(
        t.mcp_servers["calc"],
        McpServerConfig::Stdio { .. }
    ));
    // Names of the server's MCP catalog, resolved (or refused) by the dispatcher.
    let body = json!({"message": "x", "mcp_servers": ["docs", {"name": "calc"}]});
    let t = task(
        channel()
            .parse_at(&with_secret(&body.to_string()), NOW)
            .unwrap(),
    );
    assert!(t.mcp_servers["docs"].is_catalog_ref());
    assert!(t.mcp_servers["calc"].is_catalog_ref());
}

#[test]
fn the_secret_header_is_compared_whole() {
    let c = channel();
    let body = br#"{"message":"hi"}"#;
    assert!(
        c.parse_at(&request(&[("X-Webhook-Secret", SECRET)], body), NOW)
            .is_ok()
    );
    // Header names are case-insensitive.
    assert!(
        c.parse_at(&request(&[("x-webhook-secret", SECRET)], body), NOW)
            .is_ok()
    );
    for wrong in [
        "",
        "s3cret",
        "s3cret-webhook ",
        "S3CRET-WEBHOOK",
        "s3cret-webhook-and-more",
    ] {
        let e = c
            .parse_at(&request(&[("X-Webhook-Secret", wrong)], body), NOW)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{wrong:?}");
        assert!(
            !e.to_string().contains(SECRET),
            "the error leaks the secret: {e}"
        );
    }
    let e = c.parse_at(&request(&[], body), NOW).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(e.to_string().contains("missing X-Webhook-Secret"), "{e}");
}

#[test]
fn a_signature_of_timestamp_and_body_is_accepted_within_the_window() {
    let c = channel();
    let body = r#"{"message":"héllo 日本 🚀"}"#.as_bytes();
    let t = task(c.parse_at(&signed(SECRET, NOW, body), NOW).unwrap());
    assert_eq!(t.message, "héllo 日本 🚀");
    // Clocks a little apart either way.
    assert!(c.parse_at(&signed(SECRET, NOW - 300, body), NOW).is_ok());
    assert!(c.parse_at(&signed(SECRET, NOW + 300, body), NOW).is_ok());
    // Stale or future: a replay.
    for ts in [NOW - 301, NOW + 301, 0] {
        let e = c.parse_at(&signed(SECRET, ts, body), NOW).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{ts}");
    }
    // The same request replayed later is refused.
    let captured = signed(SECRET, NOW, body);
    assert!(c.parse_at(&captured, NOW + 301).is_err());
}

#[test]
fn anything_altered_breaks_the_signature() {
    let c = channel();
    let body = br#"{"message":"deploy the staging branch"}"#;
    let good = signed(SECRET, NOW, body);
    let cases = [
        ("wrong secret", signed("other-secret", NOW, body)),
        ("altered timestamp", {
            let mut r = good.clone();
            r.headers[0].1 = (NOW - 10).to_string();
            r
        }),
        ("altered body", {
            let mut r = good.clone();
            r.body = br#"{"message":"deploy the prod branch!!!"}"#.to_vec();
            r
        }),
        ("truncated body", {
            let mut r = good.clone();
            r.body.truncate(r.body.len() - 2);
            r
        }),
        ("no sha256= prefix", {
            let mut r = good.clone();
            r.headers[1].1 = r.headers[1].1.trim_start_matches("sha256=").to_owned();
            r
        }),
        ("signature without timestamp", {
            let mut r = good.clone();
            r.headers.remove(0);
            r
        }),
        ("timestamp without signature", {
            let mut r = good.clone();
            r.headers.remove(1);
            r
        }),
    ];
    for (what, req) in cases {
        let e = c.parse_at(&req, NOW).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{what}: {e}");
        assert!(
            !e.to_string().contains(SECRET),
            "{what}: the error leaks the secret"
        );
    }
    // A request carrying a (bad) signature is judged by it, even with the right secret header.
    let mut both = signed("wrong", NOW, body);
    both.headers
        .push(("x-webhook-secret".into(), SECRET.into()));
    assert_eq!(
        c.parse_at(&both, NOW).unwrap_err().kind(),
        ErrorKind::Unauthorized
    );
}

#[test]
fn require_signature_refuses_the_plain_secret() {
    let mut config = WebhookConfig::new().with_secret(SECRET);
    config.require_signature = true;
    let c = WebhookChannel::new(config);
    let body = br#"{"message":"hi"}"#;
    let e = c
        .parse_at(&request(&[("X-Webhook-Secret", SECRET)], body), NOW)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(e.to_string().contains("needs a signature"), "{e}");
    assert!(c.parse_at(&signed(SECRET, NOW, body), NOW).is_ok());
}

#[test]
fn an_open_webhook_takes_anything_and_says_it_is_open() {
    let open = WebhookChannel::new(WebhookConfig::new());
    assert!(open.is_open());
    assert!(!channel().is_open());
    assert!(
        open.parse_at(&request(&[], br#"{"message":"hi"}"#), NOW)
            .is_ok()
    );
}

#[test]
fn oversized_bodies_are_refused_before_anything_else() {
    let mut config = WebhookConfig::new().with_secret(SECRET);
    config.max_body_bytes = 64;
    let c = WebhookChannel::new(config);
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(100));
    let e = c.parse_at(&with_secret(&big), NOW).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("more than the 64"), "{e}");
    // The default limit is 1 MiB, the same as the endpoint's.
    let huge = format!(r#"{{"message":"{}"}}"#, "x".repeat(1 << 20));
    assert!(channel().parse_at(&with_secret(&huge), NOW).is_err());
}

#[test]
fn an_idempotency_key_header_makes_a_resent_request_run_once() {
    let mut req = with_secret(r#"{"message":"hi"}"#);
    req.headers
        .push(("idempotency-key".into(), "order-42".into()));
    let t = task(channel().parse_at(&req, NOW).unwrap());
    assert_eq!(t.idempotency_key.as_deref(), Some("order-42"));
    req.headers.last_mut().unwrap().1 = "two words".into();
    assert_eq!(
        channel().parse_at(&req, NOW).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn delivery_is_left_to_the_push_notification() {
    let t = task(
        channel()
            .parse_at(&with_secret(r#"{"message":"hi"}"#), NOW)
            .unwrap(),
    );
    let task = common::stored(t);
    channel()
        .deliver(&task, &anywork_core::TaskOutcome::completed("done"))
        .await
        .unwrap();
}

#[test]
fn configuration_is_read_from_the_environment_names() {
    let c = WebhookConfig::from_lookup(|_| None).unwrap();
    assert!(c.secret.is_none() && !c.require_signature);
    assert_eq!(c.replay_window, Duration::from_secs(300));
    let vars = |k: &str| match k {
        "WEBHOOK_SECRET" => Some("abc".to_owned()),
        "WEBHOOK_REQUIRE_SIGNATURE" => Some("true".to_owned()),
        "WEBHOOK_REPLAY_WINDOW_SECONDS" => Some("60".to_owned()),
        _ => None,
    };
    let c = WebhookConfig::from_lookup(vars).unwrap();
    assert_eq!(c.secret.as_deref(), Some("abc"));
    assert!(c.require_signature);
    assert_eq!(c.replay_window, Duration::from_secs(60));
    assert!(!format!("{c:?}").contains("abc"), "Debug shows the secret");
    let e = WebhookConfig::from_lookup(|k| {
        (k == "WEBHOOK_REQUIRE_SIGNATURE").then(|| "yes".to_owned())
    })
    .unwrap_err();
    assert!(e.to_string().contains("WEBHOOK_SECRET"), "{e}");
    let e = WebhookConfig::from_lookup(|k| {
        (k == "WEBHOOK_REPLAY_WINDOW_SECONDS").then(|| "5m".to_owned())
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("WEBHOOK_REPLAY_WINDOW_SECONDS"),
        "{e}"
    );
}
