//! The Slack channel against Events API payloads shaped like Slack's documentation
//! examples, and its replies and reactions against the fake Slack Web API.

mod common;

use std::time::Duration;

use anywork_channels::slack::{SlackChannel, SlackConfig};
use anywork_core::{
    Channel, ErrorKind, Inbound, InboundRequest, InputKind, InputRequest, Task, TaskOutcome,
    TaskRequest, TaskStatus,
};
use anywork_test::fake_slack::{FakeSlack, Fault};
use common::{request, sign, stored, task};
use serde_json::{Value, json};

const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const TOKEN: &str = "xoxb-test-token";
const BOT: &str = "U0LAN0Z89";
const TEAM: &str = "T123ABC456";
const CHANNEL: &str = "C123ABC456";

fn now() -> i64 {
    anywork_channels::verify::unix_now()
}

fn config(api: &str) -> SlackConfig {
    let mut c = SlackConfig::new(SECRET, TOKEN);
    c.api_url = api.to_owned();
    c
}

fn channel() -> SlackChannel {
    SlackChannel::new(config("http://127.0.0.1:9"))
}

/// A request signed as Slack signs it, at `ts`.
fn signed_at(body: &str, ts: i64) -> InboundRequest {
    let ts = ts.to_string();
    let sig = format!(
        "v0={}",
        sign(SECRET, &[b"v0:", ts.as_bytes(), b":", body.as_bytes()])
    );
    request(
        &[
            ("X-Slack-Request-Timestamp", &ts),
            ("X-Slack-Signature", &sig),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn signed(body: &Value) -> InboundRequest {
    signed_at(&body.to_string(), now())
}

/// An `event_callback` wrapping `event`, as in Slack's Events API documentation.
fn callback(event: Value) -> Value {
    json!({
        "token": "XXYYZZ",
        "team_id": TEAM,
        "api_app_id": "A123ABC456",
        "event": event,
        "type": "event_callback",
        "event_id": "Ev123ABC456",
        "event_time": 1515449522,
        "authorizations": [{"enterprise_id": null, "team_id": TEAM, "user_id": BOT,
            "is_bot": true, "is_enterprise_install": false}]
    })
}

fn app_mention(ts: &str, thread_ts: Option<&str>, text: &str) -> Value {
    let mut e = json!({
        "type": "app_mention", "user": "U123ABC456", "text": text, "ts": ts,
        "channel": CHANNEL, "event_ts": ts
    });
    if let Some(t) = thread_ts {
        e["thread_ts"] = json!(t);
    }
    callback(e)
}

fn message(ts: &str, thread_ts: Option<&str>, text: &str, channel_type: &str) -> Value {
    let mut e = json!({
        "type": "message", "channel": CHANNEL, "user": "U222", "text": text, "ts": ts,
        "event_ts": ts, "channel_type": channel_type
    });
    if let Some(t) = thread_ts {
        e["thread_ts"] = json!(t);
    }
    callback(e)
}

#[test]
fn the_documentation_example_signature_verifies() {
    // api.slack.com/authentication/verifying-requests-from-slack: its secret, timestamp,
    // body and signature.
    let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let req = request(
        &[
            ("X-Slack-Request-Timestamp", "1531420618"),
            (
                "X-Slack-Signature",
                "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
        ],
        body.as_bytes(),
    );
    let ch = channel();
    ch.verify(&req, 1_531_420_618).unwrap();
    ch.verify(&req, 1_531_420_618 + 300).unwrap();
    // A slash command is signed but not handled: skipped, not an error.
    assert!(matches!(
        ch.parse_at(&req, 1_531_420_618).unwrap(),
        Inbound::Skip { .. }
    ));
    // Replayed more than five minutes later, or with its timestamp altered: refused.
    for at in [1_531_420_618 + 301, 1_531_420_618 - 301] {
        assert_eq!(
            ch.verify(&req, at).unwrap_err().kind(),
            ErrorKind::Unauthorized
        );
    }
    let mut altered = req.clone();
    altered.headers[0].1 = "1531420619".into();
    assert_eq!(
        ch.verify(&altered, 1_531_420_618).unwrap_err().kind(),
        ErrorKind::Unauthorized
    );
}

#[tokio::test]
async fn url_verification_is_answered_with_the_challenge() {
    let body = json!({"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"});
    assert_eq!(
        channel().parse(signed(&body)).await.unwrap(),
        Inbound::Respond(
            json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
        )
    );
    // Unsigned, it is refused like anything else.
    let mut unsigned = signed(&body);
    unsigned.headers.retain(|(k, _)| k != "x-slack-signature");
    assert_eq!(
        channel().parse(unsigned).await.unwrap_err().kind(),
        ErrorKind::Unauthorized
    );
}

#[test]
fn an_app_mention_becomes_a_task_in_the_thread_session() {
    let body = app_mention(
        "1515449522.000016",
        None,
        "<@U0LAN0Z89> is it everything a river should be?",
    );
    let t = task(channel().parse_at(&signed(&body), now()).unwrap());
    assert_eq!(t.channel_type, "slack");
    assert_eq!(t.message, "is it everything a river should be?");
    assert_eq!(
        t.channel_key.as_deref(),
        Some("T123ABC456/C123ABC456/1515449522.000016")
    );
    assert_eq!(
        t.idempotency_key.as_deref(),
        Some("T123ABC456/C123ABC456/1515449522.000016")
    );
    let m = &t.channel_meta;
    assert_eq!(m["channel"], CHANNEL);
    assert_eq!(m["ts"], "1515449522.000016");
    assert_eq!(m["thread_ts"], "1515449522.000016");
    assert_eq!(m["user"], "U123ABC456");
    assert_eq!(m["event_id"], "Ev123ABC456");
    assert_eq!(m["mid_thread"], false);
    t.validate().unwrap();

    // Mid-thread: the session is the thread's; Slack's escapes are undone.
    let body = app_mention(
        "1515449600.000100",
        Some("1515449522.000016"),
        "<@U0LAN0Z89> is 1 &lt; 2 &amp;&amp; 3 &gt; 2? 日本 🚀",
    );
    let t = task(channel().parse_at(&signed(&body), now()).unwrap());
    assert_eq!(
        t.channel_key.as_deref(),
        Some("T123ABC456/C123ABC456/1515449522.000016")
    );
    assert_eq!(
        t.idempotency_key.as_deref(),
        Some("T123ABC456/C123ABC456/1515449600.000100")
    );
    assert_eq!(t.message, "is 1 < 2 && 3 > 2? 日本 🚀");
    assert_eq!(t.channel_meta["mid_thread"], true);
}

#[test]
fn thread_replies_follow_up_and_direct_messages_are_tasks() {
    let reply = message(
        "1515449700.000200",
        Some("1515449522.000016"),
        "and the delta?",
        "channel",
    );
    match channel().parse_at(&signed(&reply), now()).unwrap() {
        Inbound::FollowUp(t) => {
            assert_eq!(
                t.channel_key.as_deref(),
                Some("T123ABC456/C123ABC456/1515449522.000016")
            );
            assert_eq!(t.answer_text(), "and the delta?");
        }
        other => panic!("expected a follow-up, got {other:?}"),
    }
    let dm = message("1515449800.000300", None, "hello bot", "im");
    let t = task(channel().parse_at(&signed(&dm), now()).unwrap());
    assert_eq!(
        t.channel_key.as_deref(),
        Some("T123ABC456/C123ABC456/1515449800.000300")
    );
    for (what, body) in [
        (
            "a top-level channel message",
            message("1515449900.000400", None, "lunch?", "channel"),
        ),
        (
            "a message mentioning the app (its app_mention runs it)",
            message(
                "1515449900.000500",
                Some("1515449522.000016"),
                "<@U0LAN0Z89> again",
                "channel",
            ),
        ),
        (
            "an empty thread reply",
            message(
                "1515449900.000600",
                Some("1515449522.000016"),
                "  ",
                "channel",
            ),
        ),
        (
            "a reaction event",
            callback(json!({"type": "reaction_added", "user": "U1", "reaction": "thumbsup"})),
        ),
        (
            "an app_rate_limited notice",
            json!({"type": "app_rate_limited", "team_id": TEAM}),
        ),
    ] {
        assert!(
            matches!(
                channel().parse_at(&signed(&body), now()).unwrap(),
                Inbound::Skip { .. }
            ),
            "{what}"
        );
    }
}

#[test]
fn bots_edits_and_the_apps_own_messages_are_ignored() {
    let mut bot = message("1.1", Some("1.0"), "beep", "channel");
    bot["event"]["bot_id"] = json!("B999");
    let mut own = message("1.2", Some("1.0"), "my own answer", "channel");
    own["event"]["user"] = json!(BOT);
    let mut bot_message = message("1.3", Some("1.0"), "legacy", "channel");
    bot_message["event"]["subtype"] = json!("bot_message");
    let mut edited = message("1.4", Some("1.0"), "edit", "channel");
    edited["event"]["subtype"] = json!("message_changed");
    let mut joined = message("1.5", None, "joined", "channel");
    joined["event"]["subtype"] = json!("channel_join");
    let mut own_mention = app_mention("1.6", None, "<@U0LAN0Z89> loop?");
    own_mention["event"]["user"] = json!(BOT);
    for body in [bot, own, bot_message, edited, joined, own_mention] {
        assert!(
            matches!(
                channel().parse_at(&signed(&body), now()).unwrap(),
                Inbound::Skip { .. }
            ),
            "{body}"
        );
    }
    // A broadcast reply still counts.
    let mut broadcast = message("1.7", Some("1.0"), "fyi", "channel");
    broadcast["event"]["subtype"] = json!("thread_broadcast");
    assert!(matches!(
        channel().parse_at(&signed(&broadcast), now()).unwrap(),
        Inbound::FollowUp(_)
    ));
}

#[test]
fn retries_and_repeated_events_carry_the_same_idempotency_key() {
    let body = app_mention("1515449522.000016", None, "<@U0LAN0Z89> hi");
    let first = task(channel().parse_at(&signed(&body), now()).unwrap());
    let mut retry = signed(&body);
    retry.headers.push(("x-slack-retry-num".into(), "1".into()));
    retry
        .headers
        .push(("x-slack-retry-reason".into(), "http_timeout".into()));
    let second = task(channel().parse_at(&retry, now()).unwrap());
    assert_eq!(first.idempotency_key, second.idempotency_key);
    let mut other_id = body.clone();
    other_id["event_id"] = json!("Ev999");
    let third = task(channel().parse_at(&signed(&other_id), now()).unwrap());
    assert_eq!(first.idempotency_key, third.idempotency_key);
}

#[test]
fn bad_signatures_and_stale_timestamps_are_refused() {
    let body = app_mention("1.1", None, "<@U0LAN0Z89> héllo 日本 🚀").to_string();
    let t = now();
    assert!(
        channel().parse_at(&signed_at(&body, t), t).is_ok(),
        "unicode bodies verify"
    );
    let good = signed_at(&body, t);
    let mut cases: Vec<(&str, InboundRequest)> = vec![
        ("stale", signed_at(&body, t - 301)),
        ("from the future", signed_at(&body, t + 301)),
    ];
    let mut r = good.clone();
    r.headers[0].1 = (t - 1).to_string();
    cases.push(("altered timestamp", r));
    let mut r = good.clone();
    r.body.truncate(r.body.len() - 1);
    cases.push(("truncated body", r));
    let mut r = good.clone();
    r.headers[1].1 = format!(
        "v0={}",
        sign(
            "wrong",
            &[b"v0:", t.to_string().as_bytes(), b":", body.as_bytes()]
        )
    );
    cases.push(("wrong secret", r));
    let mut r = good.clone();
    r.headers.remove(1);
    cases.push(("missing signature", r));
    let mut r = good.clone();
    r.headers.remove(0);
    cases.push(("missing timestamp", r));
    let mut r = good.clone();
    r.headers[1].1 = r.headers[1].1.replace("v0=", "v1=");
    cases.push(("another version", r));
    for (what, req) in cases {
        let e = channel().parse_at(&req, t).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{what}");
        assert!(!e.to_string().contains(SECRET), "{what}: leaks the secret");
    }
    let mut c = config("http://127.0.0.1:9");
    c.max_body_bytes = 50;
    assert_eq!(
        SlackChannel::new(c).parse_at(&good, t).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn malformed_events_are_refused_with_the_reason() {
    for body in [
        "{not json".to_owned(),
        json!({"type": "event_callback"}).to_string(),
        json!({"type": "url_verification"}).to_string(),
        callback(json!({"type": "app_mention", "text": "x", "ts": "1.1"})).to_string(),
        callback(json!({"type": "app_mention", "text": "x", "channel": "C1"})).to_string(),
        callback(json!({"type": "app_mention", "text": "x", "channel": "C1/../x", "ts": "1.1"}))
            .to_string(),
        callback(json!({"type": "app_mention", "text": "x", "channel": "C1", "ts": "1e9"}))
            .to_string(),
    ] {
        let e = channel()
            .parse_at(&signed_at(&body, now()), now())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{body}: {e}");
    }
}

/// A task the runtime stored from a mention of the message `ts` (in `thread`, if given).
fn stored_mention(ch: &SlackChannel, ts: &str, thread: Option<&str>) -> Task {
    let t: TaskRequest = task(
        ch.parse_at(
            &signed(&app_mention(ts, thread, "<@U0LAN0Z89> how many tests?")),
            now(),
        )
        .unwrap(),
    );
    stored(t)
}

#[tokio::test]
async fn hooks_and_delivery_make_exactly_the_expected_calls() {
    let slack = FakeSlack::start(TOKEN, BOT).await;
    let ch = SlackChannel::new(config(&slack.url()));
    let ts = slack.add_user_message(CHANNEL, None, "U123ABC456", "<@U0LAN0Z89> how many tests?");
    let task = stored_mention(&ch, &ts, None);

    ch.on_accepted(&task).await.unwrap();
    ch.on_accepted(&task).await.unwrap();
    assert_eq!(slack.reactions(CHANNEL, &ts), ["eyes"]);

    ch.on_started(&task).await.unwrap();
    ch.on_started(&task).await.unwrap();
    assert_eq!(
        slack.reactions(CHANNEL, &ts),
        ["eyes", "hourglass_flowing_sand"]
    );
    let ours = slack.bot_messages(CHANNEL);
    assert_eq!(ours.len(), 1, "one placeholder");
    assert_eq!(ours[0].thread_ts.as_deref(), Some(ts.as_str()));
    assert_eq!(ours[0].text, "⏳ Working on it…");
    assert_eq!(
        ours[0].metadata,
        Some(json!({"event_type": "anywork_task",
            "event_payload": {"task_id": task.id.to_string(), "kind": "status"}}))
    );

    ch.on_progress(&task, "There are **12** tests so far")
        .await
        .unwrap();
    ch.on_progress(&task, "There are **13** tests so far")
        .await
        .unwrap();
    let ours = slack.bot_messages(CHANNEL);
    assert_eq!(
        ours[0].edits.len(),
        1,
        "the second update came too soon and was dropped"
    );
    assert_eq!(
        ours[0].text,
        "There are *12* tests so far\n\n_⏳ Working on it…_"
    );

    let q = InputRequest {
        request_id: "req-1".into(),
        kind: InputKind::Question,
        prompt: "Count the ignored ones too?".into(),
        tool_name: None,
        input: None,
        options: vec![],
    };
    ch.on_input_required(&task, &q).await.unwrap();
    ch.on_input_required(&task, &q).await.unwrap();
    let ours = slack.bot_messages(CHANNEL);
    assert_eq!(ours.len(), 2, "one question");
    assert_eq!(
        ours[1].text,
        "❓ Count the ignored ones too?\n\nAnswer with a reply in this thread."
    );

    let mut outcome = TaskOutcome::completed("There are **14** tests: see <https://ci|CI>.");
    outcome.num_turns = 2;
    ch.deliver(&task, &outcome).await.unwrap();
    ch.deliver(&task, &outcome).await.unwrap();
    let ours = slack.bot_messages(CHANNEL);
    assert_eq!(ours.len(), 3, "the answer below the question, once");
    assert!(
        ours[2]
            .text
            .starts_with("There are *14* tests: see &lt;https://ci|CI&gt;.\n\n_AnyWork task "),
        "{}",
        ours[2].text
    );
    assert_eq!(ours[2].edits.len(), 1, "the retry updated the answer");
    assert_eq!(slack.reactions(CHANNEL, &ts), ["eyes", "white_check_mark"]);

    for r in slack.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{}",
            r.line()
        );
    }
    let post = slack
        .requests()
        .into_iter()
        .find(|r| r.path_only() == "/api/chat.postMessage")
        .unwrap();
    assert_eq!(
        post.body,
        json!({"channel": CHANNEL, "thread_ts": ts, "text": "⏳ Working on it…", "unfurl_links": false,
            "metadata": {"event_type": "anywork_task", "event_payload": {"task_id": task.id.to_string(), "kind": "status"}}})
    );
    assert_eq!(
        slack.methods(),
        [
            "reactions.add",
            "reactions.add",
            "reactions.add",
            "conversations.replies",
            "chat.postMessage",
            "reactions.add",
            "chat.update",
            "chat.postMessage",
            "chat.postMessage",
            "reactions.remove",
            "reactions.add",
            "chat.update",
            "reactions.remove",
            "reactions.add",
        ]
    );
}

#[tokio::test]
async fn the_placeholder_becomes_the_answer_and_is_found_again_after_a_restart() {
    let slack = FakeSlack::start(TOKEN, BOT).await;
    let first = SlackChannel::new(config(&slack.url()));
    let ts = slack.add_user_message(CHANNEL, None, "U123ABC456", "<@U0LAN0Z89> go");
    let task = stored_mention(&first, &ts, None);
    first.on_started(&task).await.unwrap();
    slack.clear_requests();
    let second = SlackChannel::new(config(&slack.url()));
    let mut failed = TaskOutcome::completed("x");
    failed.status = TaskStatus::Failed;
    failed.result = None;
    failed.error = Some("the model API refused the key".into());
    second.deliver(&task, &failed).await.unwrap();
    let ours = slack.bot_messages(CHANNEL);
    assert_eq!(ours.len(), 1);
    assert!(
        ours[0]
            .text
            .starts_with("❌ The task failed: the model API refused the key"),
        "{}",
        ours[0].text
    );
    assert_eq!(
        ours[0].metadata.as_ref().unwrap()["event_payload"]["kind"],
        "result"
    );
    assert_eq!(slack.reactions(CHANNEL, &ts), ["x"]);
    let search = &slack.requests()[0];
    assert_eq!(search.path_only(), "/api/conversations.replies");
    assert_eq!(
        search.query_param("include_all_metadata").as_deref(),
        Some("true")
    );
    assert_eq!(search.query_param("ts").as_deref(), Some(ts.as_str()));
    assert_eq!(slack.methods()[1], "chat.update");

    // A deleted placeholder: the answer is posted instead.
    let third = SlackChannel::new(config(&slack.url()));
    let ts2 = slack.add_user_message(CHANNEL, None, "U123ABC456", "<@U0LAN0Z89> again");
    let task2 = stored_mention(&third, &ts2, None);
    third.on_started(&task2).await.unwrap();
    let placeholder = slack.bot_messages(CHANNEL).last().unwrap().ts.clone();
    slack.delete_message(CHANNEL, &placeholder);
    third
        .deliver(&task2, &TaskOutcome::completed("fine"))
        .await
        .unwrap();
    let last = slack.bot_messages(CHANNEL).pop().unwrap();
    assert!(last.text.starts_with("fine") && last.thread_ts.as_deref() == Some(ts2.as_str()));
}

#[tokio::test]
async fn a_mention_mid_thread_gets_the_messages_since_the_bot_last_spoke() {
    let slack = FakeSlack::start(TOKEN, BOT).await;
    let ch = SlackChannel::new(config(&slack.url()));
    let root = slack.add_user_message(CHANNEL, None, "U1", "the build is red");
    slack.add_user_message(CHANNEL, Some(&root), "U2", "old news the bot saw");
    // The bot answered once in this thread (as an earlier task).
    let earlier = stored_mention(&ch, &root, None);
    ch.deliver(&earlier, &TaskOutcome::completed("fixed the first one"))
        .await
        .unwrap();
    slack.add_user_message(CHANNEL, Some(&root), "U2", "it is red again: a < b fails");
    slack.add_user_message(CHANNEL, Some(&root), "U3", "since the merge of #12");
    let mention = slack.add_user_message(CHANNEL, Some(&root), "U1", "<@U0LAN0Z89> can you look?");
    slack.add_user_message(CHANNEL, Some(&root), "U4", "a later message");
    let t = task(
        ch.parse(signed(&app_mention(
            &mention,
            Some(&root),
            "<@U0LAN0Z89> can you look?",
        )))
        .await
        .unwrap(),
    );
    assert_eq!(
        t.message,
        "Earlier messages in this Slack thread, for context:\n<@U2>: it is red again: a < b fails\n\
         <@U3>: since the merge of #12\n\nThe message to you:\ncan you look?"
    );
    assert_eq!(t.answer_text(), "can you look?");

    // Without the Web API the task still comes, without context.
    let t = task(
        channel()
            .parse(signed(&app_mention(
                "1.2",
                Some("1.1"),
                "<@U0LAN0Z89> look",
            )))
            .await
            .unwrap(),
    );
    assert_eq!(t.message, "look");
    // And the context can be turned off.
    let mut c = config(&slack.url());
    c.thread_context = false;
    slack.clear_requests();
    let t = task(
        SlackChannel::new(c)
            .parse(signed(&app_mention(
                &mention,
                Some(&root),
                "<@U0LAN0Z89> can you look?",
            )))
            .await
            .unwrap(),
    );
    assert_eq!(t.message, "can you look?");
    assert!(slack.requests().is_empty());
}

#[tokio::test]
async fn failures_map_to_retryable_or_final_errors() {
    let slack = FakeSlack::start(TOKEN, BOT).await;
    let ch = SlackChannel::new(config(&slack.url()));
    let ts = slack.add_user_message(CHANNEL, None, "U1", "<@U0LAN0Z89> x");
    let task = stored_mention(&ch, &ts, None);
    let outcome = TaskOutcome::completed("answer");

    slack.inject(Fault::status("chat.postMessage", 429).header("Retry-After", "7"));
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));

    slack.inject(
        Fault::status("chat.postMessage", 200).body(json!({"ok": false, "error": "ratelimited"})),
    );
    assert_eq!(
        ch.deliver(&task, &outcome).await.unwrap_err().kind(),
        ErrorKind::RateLimited
    );

    slack.inject(Fault::status("chat.postMessage", 503));
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.is_retryable());

    slack.inject(
        Fault::status("chat.postMessage", 200)
            .body(json!({"ok": false, "error": "internal_error"})),
    );
    assert!(
        ch.deliver(&task, &outcome)
            .await
            .unwrap_err()
            .is_retryable()
    );

    slack.inject(
        Fault::status("chat.postMessage", 200)
            .body(json!({"ok": false, "error": "channel_not_found"})),
    );
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(!e.is_retryable());

    let mut bad = config(&slack.url());
    bad.bot_token = "xoxb-revoked".into();
    let e = SlackChannel::new(bad)
        .deliver(&task, &outcome)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(
        e.to_string().contains("invalid_auth") && e.to_string().contains("SLACK_BOT_TOKEN"),
        "{e}"
    );
    assert!(!e.to_string().contains("xoxb-revoked"));

    let e = channel().deliver(&task, &outcome).await.unwrap_err();
    assert!(e.is_retryable(), "unreachable: {e}");

    // A reaction that fails does not fail the delivery (the answer is what matters).
    slack.inject(
        Fault::status("reactions.add", 200).body(json!({"ok": false, "error": "missing_scope"})),
    );
    ch.deliver(&task, &outcome).await.unwrap();
    assert_eq!(slack.bot_messages(CHANNEL).len(), 1);
}

#[test]
fn configuration_is_read_from_the_environment_names() {
    fn lookup(pairs: &[(&str, &str)]) -> anywork_core::Result<Option<SlackConfig>> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        SlackConfig::from_lookup(move |k| {
            pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }
    assert!(lookup(&[]).unwrap().is_none());
    let c = lookup(&[
        ("SLACK_SIGNING_SECRET", "sig"),
        ("SLACK_BOT_TOKEN", "xoxb-1"),
        ("SLACK_API_URL", "http://127.0.0.1:5/api/"),
        ("SLACK_BOT_USER_ID", "U9"),
        ("SLACK_THREAD_CONTEXT", "false"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(c.api_url, "http://127.0.0.1:5/api");
    assert_eq!(c.bot_user_id.as_deref(), Some("U9"));
    assert!(!c.thread_context);
    assert_eq!(c.replay_window, Duration::from_secs(300));
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("xoxb-1") && !dbg.contains("\"sig\""), "{dbg}");
    for (vars, needle) in [
        (vec![("SLACK_BOT_TOKEN", "x")], "SLACK_SIGNING_SECRET"),
        (vec![("SLACK_SIGNING_SECRET", "x")], "SLACK_BOT_TOKEN"),
        (
            vec![
                ("SLACK_SIGNING_SECRET", "x"),
                ("SLACK_BOT_TOKEN", "y"),
                ("SLACK_API_URL", "slack.com"),
            ],
            "SLACK_API_URL",
        ),
        (
            vec![
                ("SLACK_SIGNING_SECRET", "x"),
                ("SLACK_BOT_TOKEN", "y"),
                ("SLACK_THREAD_CONTEXT", "maybe"),
            ],
            "SLACK_THREAD_CONTEXT",
        ),
    ] {
        let e = lookup(&vars).unwrap_err();
        assert!(e.to_string().contains(needle), "{vars:?}: {e}");
    }
}
