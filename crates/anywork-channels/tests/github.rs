//! The GitHub channel against payloads shaped like GitHub's documentation examples, and its
//! comments, reactions and tokens against the fake GitHub API.

mod common;

use std::time::Duration;

use anywork_channels::github::{AppKey, GithubAuth, GithubChannel, GithubConfig};
use anywork_core::{
    Channel, ErrorKind, Inbound, InputKind, InputRequest, TaskOutcome, TaskRequest, TaskStatus,
};
use anywork_test::fake_github::{
    FakeGithub, Fault, TEST_APP_PRIVATE_KEY, TEST_APP_PRIVATE_KEY_PKCS8,
};
use common::{request, sign, stored, task};
use serde_json::{Value, json};

const SECRET: &str = "gh-webhook-secret";
const TOKEN: &str = "ghp_test_token";
const REPO: &str = "octo-org/hello-world";

fn config(api: &str) -> GithubConfig {
    let mut c = GithubConfig::new(SECRET, GithubAuth::Token(TOKEN.into()));
    c.api_url = api.to_owned();
    c
}

fn channel() -> GithubChannel {
    GithubChannel::new(config("http://127.0.0.1:9"))
}

fn user(login: &str, kind: &str) -> Value {
    json!({"login": login, "id": 1, "type": kind, "html_url": format!("https://github.com/{login}")})
}

fn repository() -> Value {
    json!({
        "id": 1296269, "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5", "name": "hello-world",
        "full_name": REPO, "private": false, "owner": user("octo-org", "Organization"),
        "html_url": format!("https://github.com/{REPO}"),
        "clone_url": format!("https://github.com/{REPO}.git"), "default_branch": "main"
    })
}

fn issue(number: u64, pr: bool) -> Value {
    let mut v = json!({
        "url": format!("https://api.github.com/repos/{REPO}/issues/{number}"),
        "html_url": format!("https://github.com/{REPO}/issues/{number}"),
        "id": 1, "number": number, "title": "Found a bug", "state": "open",
        "user": user("octocat", "User"), "body": "I'm having a problem with this.",
        "labels": [], "comments": 1
    });
    if pr {
        v["pull_request"] =
            json!({"url": format!("https://api.github.com/repos/{REPO}/pulls/{number}")});
    }
    v
}

/// An `issue_comment` `created` event, as in GitHub's webhook examples.
fn issue_comment(number: u64, comment_id: u64, author: Value, body: &str) -> Value {
    json!({
        "action": "created",
        "issue": issue(number, false),
        "comment": {
            "id": comment_id, "node_id": "IC_x",
            "html_url": format!("https://github.com/{REPO}/issues/{number}#issuecomment-{comment_id}"),
            "user": author, "created_at": "2024-05-01T12:00:00Z", "updated_at": "2024-05-01T12:00:00Z",
            "author_association": "MEMBER", "body": body
        },
        "repository": repository(),
        "sender": user("octocat", "User"),
        "installation": {"id": 4242, "node_id": "MDIz"}
    })
}

/// A signed delivery of `event` with `payload`.
fn delivery(event: &str, payload: &Value, id: &str) -> anywork_core::InboundRequest {
    let body = payload.to_string();
    let sig = format!("sha256={}", sign(SECRET, &[body.as_bytes()]));
    request(
        &[
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", id),
            ("X-Hub-Signature-256", &sig),
            ("Content-Type", "application/json"),
            ("User-Agent", "GitHub-Hookshot/044aadd"),
        ],
        body.as_bytes(),
    )
}

#[test]
fn the_documentation_example_signature_verifies() {
    // docs.github.com "Validating webhook deliveries": secret and payload of its test values.
    let mut c = GithubConfig::new("It's a Secret to Everybody", GithubAuth::Token("t".into()));
    c.api_url = "http://127.0.0.1:9".into();
    let ch = GithubChannel::new(c);
    let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let req = request(
        &[("X-Hub-Signature-256", sig), ("X-GitHub-Event", "ping")],
        b"Hello, World!",
    );
    ch.verify(&req).unwrap();
    assert!(matches!(
        ch.parse_at(&req, 0).unwrap(),
        Inbound::Skip { .. }
    ));
    let mut altered = req.clone();
    altered.body = b"Hello, World".to_vec();
    assert_eq!(
        ch.verify(&altered).unwrap_err().kind(),
        ErrorKind::Unauthorized
    );
}

#[tokio::test]
async fn a_mention_becomes_a_task_in_the_issue_session() {
    let payload = issue_comment(
        1347,
        11,
        user("octocat", "User"),
        "@anywork please fix this bug",
    );
    let t = task(
        channel()
            .parse(delivery(
                "issue_comment",
                &payload,
                "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            ))
            .await
            .unwrap(),
    );
    assert_eq!(t.channel_type, "github");
    assert_eq!(t.channel_key.as_deref(), Some("octo-org/hello-world#1347"));
    assert_eq!(
        t.idempotency_key.as_deref(),
        Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    );
    assert!(t.message.contains("please fix this bug"), "{}", t.message);
    assert!(!t.message.contains("@anywork"), "{}", t.message);
    assert!(
        t.message.contains("octo-org/hello-world#1347"),
        "{}",
        t.message
    );
    assert!(t.message.contains("Found a bug") && t.message.contains("I'm having a problem"));
    assert!(t.message.contains("@octocat"));
    assert_eq!(t.answer_text(), "please fix this bug");
    let m = &t.channel_meta;
    assert_eq!(m["repo"], REPO);
    assert_eq!(m["number"], 1347);
    assert_eq!(m["comment_id"], 11);
    assert_eq!(m["installation_id"], 4242);
    assert_eq!(m["pull_request"], false);
    assert_eq!(m["clone_url"], format!("https://github.com/{REPO}.git"));
    assert_eq!(m["default_branch"], "main");
    assert!(m.get("review_thread_id").is_none());
    t.validate().unwrap();
}

#[test]
fn a_comment_without_the_trigger_can_only_answer() {
    let payload = issue_comment(5, 12, user("octocat", "User"), "Yes, use the v2 API.");
    match channel()
        .parse_at(&delivery("issue_comment", &payload, "d1"), 0)
        .unwrap()
    {
        Inbound::AnswerOnly(t) => {
            assert_eq!(t.channel_key.as_deref(), Some("octo-org/hello-world#5"));
            assert_eq!(t.answer_text(), "Yes, use the v2 API.");
        }
        other => panic!("expected an answer, got {other:?}"),
    }
    // "@anywork-bot" is someone else; a quote of an old request does not run it again.
    for body in [
        "@anywork-bot do it",
        "> @anywork fix it\n\nthanks!",
        "```\n@anywork\n```",
    ] {
        let payload = issue_comment(5, 13, user("octocat", "User"), body);
        assert!(
            matches!(
                channel()
                    .parse_at(&delivery("issue_comment", &payload, "d2"), 0)
                    .unwrap(),
                Inbound::AnswerOnly(_)
            ),
            "{body}"
        );
    }
}

#[test]
fn bots_and_the_channels_own_comments_are_ignored() {
    let cases = [
        user("dependabot[bot]", "Bot"),
        user("some-app", "Bot"),
        user("anywork[bot]", "User"),
    ];
    for author in cases {
        let payload = issue_comment(5, 14, author.clone(), "@anywork do it");
        assert!(
            matches!(
                channel()
                    .parse_at(&delivery("issue_comment", &payload, "d"), 0)
                    .unwrap(),
                Inbound::Skip { .. }
            ),
            "{author}"
        );
    }
    let own = "Done: @anywork was asked\n\n<!-- anywork:task=0190 kind=result -->";
    let payload = issue_comment(5, 15, user("octocat", "User"), own);
    assert!(matches!(
        channel()
            .parse_at(&delivery("issue_comment", &payload, "d"), 0)
            .unwrap(),
        Inbound::Skip { .. }
    ));
    let mut c = config("http://127.0.0.1:9");
    c.bot_login = Some("Machine-User".into());
    let payload = issue_comment(5, 16, user("machine-user", "User"), "@anywork hi");
    assert!(matches!(
        GithubChannel::new(c)
            .parse_at(&delivery("issue_comment", &payload, "d"), 0)
            .unwrap(),
        Inbound::Skip { .. }
    ));
}

#[test]
fn opened_issues_and_review_comments_that_mention_the_trigger() {
    let mut opened = json!({"action": "opened", "issue": issue(7, false), "repository": repository(),
        "sender": user("octocat", "User")});
    opened["issue"]["body"] = json!("@anywork can you reproduce this?");
    let t = task(
        channel()
            .parse_at(&delivery("issues", &opened, "d"), 0)
            .unwrap(),
    );
    assert_eq!(t.channel_key.as_deref(), Some("octo-org/hello-world#7"));
    assert!(t.channel_meta.get("comment_id").is_none());
    assert!(t.message.contains("opened GitHub issue"), "{}", t.message);
    opened["issue"]["body"] = json!("no mention here");
    assert!(matches!(
        channel()
            .parse_at(&delivery("issues", &opened, "d"), 0)
            .unwrap(),
        Inbound::Skip { .. }
    ));

    let review = json!({
        "action": "created",
        "comment": {"id": 99, "body": "@anywork is this loop off by one?", "user": user("octocat", "User"),
            "path": "src/lib.rs", "line": 42, "diff_hunk": "@@ -40,3 +40,3 @@\n-for i in 0..=n {\n+for i in 0..n {",
            "html_url": format!("https://github.com/{REPO}/pull/8#discussion_r99"), "in_reply_to_id": 90},
        "pull_request": {"number": 8, "title": "Fix loop", "body": "Fixes #7", "html_url": format!("https://github.com/{REPO}/pull/8"),
            "head": {"ref": "fix-loop", "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e"}},
        "repository": repository(), "sender": user("octocat", "User")
    });
    let t = task(
        channel()
            .parse_at(&delivery("pull_request_review_comment", &review, "d"), 0)
            .unwrap(),
    );
    assert_eq!(t.channel_key.as_deref(), Some("octo-org/hello-world#8"));
    assert_eq!(t.channel_meta["review_thread_id"], 90);
    assert_eq!(t.channel_meta["pull_request"], true);
    assert_eq!(t.channel_meta["head_ref"], "fix-loop");
    assert!(t.message.contains("src/lib.rs line 42") && t.message.contains("for i in 0..n"));
}

#[test]
fn pings_other_events_and_other_actions_are_skipped() {
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1});
    for (event, payload) in [
        ("ping", ping),
        ("push", json!({"ref": "refs/heads/main"})),
        ("issue_comment", {
            let mut p = issue_comment(1, 1, user("octocat", "User"), "@anywork x");
            p["action"] = json!("edited");
            p
        }),
        (
            "issues",
            json!({"action": "closed", "issue": issue(1, false), "repository": repository()}),
        ),
    ] {
        assert!(
            matches!(
                channel()
                    .parse_at(&delivery(event, &payload, "d"), 0)
                    .unwrap(),
                Inbound::Skip { .. }
            ),
            "{event}"
        );
    }
}

#[test]
fn bad_signatures_are_refused_before_the_body_is_read() {
    let payload = issue_comment(1, 1, user("octocat", "User"), "@anywork héllo 日本 🚀");
    let good = delivery("issue_comment", &payload, "d");
    assert!(
        channel().parse_at(&good, 0).is_ok(),
        "unicode bodies verify"
    );
    let mut cases = Vec::new();
    let mut r = good.clone();
    r.headers.retain(|(k, _)| k != "x-hub-signature-256");
    cases.push(("missing header", r));
    let mut r = good.clone();
    r.body.truncate(r.body.len() - 1);
    cases.push(("truncated body", r));
    let mut r = good.clone();
    let n = r.body.len();
    r.body[n / 2] ^= 1;
    cases.push(("altered body", r));
    let body = payload.to_string();
    let mut r = good.clone();
    for h in &mut r.headers {
        if h.0 == "x-hub-signature-256" {
            h.1 = format!("sha256={}", sign("wrong secret", &[body.as_bytes()]));
        }
    }
    cases.push(("wrong secret", r));
    let mut r = good.clone();
    for h in &mut r.headers {
        if h.0 == "x-hub-signature-256" {
            h.1 = format!("sha1={}", &h.1[7..47]);
        }
    }
    cases.push(("sha1 signature", r));
    for (what, req) in cases {
        let e = channel().parse_at(&req, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{what}");
        assert!(!e.to_string().contains(SECRET), "{what}: leaks the secret");
    }
    let mut c = config("http://127.0.0.1:9");
    c.max_body_bytes = 100;
    let e = GithubChannel::new(c).parse_at(&good, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn malformed_payloads_are_refused_with_the_reason() {
    let sign_raw = |event: &str, body: &str| {
        let sig = format!("sha256={}", sign(SECRET, &[body.as_bytes()]));
        request(
            &[("X-GitHub-Event", event), ("X-Hub-Signature-256", &sig)],
            body.as_bytes(),
        )
    };
    let mut bad_repo = issue_comment(1, 1, user("octocat", "User"), "@anywork x");
    bad_repo["repository"]["full_name"] = json!("../../etc");
    for (event, body) in [
        ("issue_comment", "not json".to_owned()),
        ("issue_comment", json!(["created", {}, {}]).to_string()),
        (
            "issue_comment",
            "payload=%7B%22action%22%3A%22created%22%7D".to_owned(),
        ),
        ("issue_comment", json!({"action": "created"}).to_string()),
        (
            "issue_comment",
            json!({"action": "created", "repository": repository()}).to_string(),
        ),
        ("issue_comment", bad_repo.to_string()),
        (
            "issues",
            json!({"action": "opened", "repository": repository(), "issue": {"number": "x"}})
                .to_string(),
        ),
    ] {
        let e = channel().parse_at(&sign_raw(event, &body), 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{body}: {e}");
    }
    let mut no_event = sign_raw("issue_comment", "{}");
    no_event.headers.retain(|(k, _)| k != "x-github-event");
    assert_eq!(
        channel().parse_at(&no_event, 0).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

/// A stored task as the runtime would hand it to the hooks.
fn stored_task(ch: &GithubChannel, payload: &Value, event: &str) -> anywork_core::Task {
    let t: TaskRequest = task(ch.parse_at(&delivery(event, payload, "d"), 0).unwrap());
    stored(t)
}

fn question(id: &str) -> InputRequest {
    InputRequest {
        request_id: id.into(),
        kind: InputKind::Question,
        prompt: "Which branch should I target?".into(),
        tool_name: None,
        input: None,
        options: vec!["main".into(), "develop".into()],
    }
}

#[tokio::test]
async fn hooks_and_delivery_make_exactly_the_expected_requests() {
    let gh = FakeGithub::start().await;
    gh.allow_token(TOKEN);
    let ch = GithubChannel::new(config(&gh.url()));
    let comment = gh.add_comment(REPO, 3, "octocat", "@anywork add a test");
    let task = stored_task(
        &ch,
        &issue_comment(3, comment, user("octocat", "User"), "@anywork add a test"),
        "issue_comment",
    );

    ch.on_accepted(&task).await.unwrap();
    ch.on_accepted(&task).await.unwrap();
    assert_eq!(gh.reactions().len(), 1, "a repeat adds no second reaction");
    assert_eq!(gh.reactions()[0].target, format!("comment:{comment}"));
    assert_eq!(gh.reactions()[0].content, "eyes");

    ch.on_started(&task).await.unwrap();
    ch.on_started(&task).await.unwrap();
    let ours: Vec<_> = gh
        .comments_on(REPO, 3)
        .into_iter()
        .filter(|c| c.user == "anywork[bot]")
        .collect();
    assert_eq!(ours.len(), 1, "one placeholder");
    assert!(ours[0].body.starts_with("⏳ Working on it…"));
    assert!(
        ours[0]
            .body
            .contains(&format!("<!-- anywork:task={} kind=status -->", task.id))
    );

    ch.on_input_required(&task, &question("toolu_1"))
        .await
        .unwrap();
    ch.on_input_required(&task, &question("toolu_1"))
        .await
        .unwrap();
    let ours: Vec<_> = gh
        .comments_on(REPO, 3)
        .into_iter()
        .filter(|c| c.user == "anywork[bot]")
        .collect();
    assert_eq!(ours.len(), 2, "one question");
    assert!(ours[1].body.contains("Which branch should I target?"));
    assert!(ours[1].body.contains("main · develop"));
    assert!(ours[1].body.contains("kind=question request=toolu_1"));

    // After a question the answer goes below it, and a retried delivery edits that comment.
    let mut outcome = TaskOutcome::completed("Added `tests/loop.rs`.");
    outcome.num_turns = 3;
    outcome.cost_usd = Some(0.0123);
    ch.deliver(&task, &outcome).await.unwrap();
    ch.deliver(&task, &outcome).await.unwrap();
    let ours: Vec<_> = gh
        .comments_on(REPO, 3)
        .into_iter()
        .filter(|c| c.user == "anywork[bot]")
        .collect();
    assert_eq!(ours.len(), 3);
    let result = &ours[2];
    assert!(
        result.body.starts_with("Added `tests/loop.rs`."),
        "{}",
        result.body
    );
    assert!(
        result
            .body
            .contains(&format!("AnyWork task {} · 3 turns · $0.0123", task.id))
    );
    assert!(result.body.contains("kind=result"));
    assert_eq!(result.edits.len(), 1, "the retry edited, not posted");

    for r in gh.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{}",
            r.line()
        );
        assert_eq!(r.header("x-github-api-version"), Some("2022-11-28"));
        assert_eq!(r.header("accept"), Some("application/vnd.github+json"));
        assert!(
            r.header("user-agent")
                .is_some_and(|u| u.starts_with("anywork/"))
        );
    }
    let posts: Vec<_> = gh
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path_only().ends_with("/comments"))
        .collect();
    assert_eq!(posts.len(), 3);
    assert_eq!(posts[0].path, format!("/repos/{REPO}/issues/3/comments"));
    assert_eq!(
        posts[0].body["body"],
        json!(format!(
            "⏳ Working on it…\n\n<!-- anywork:task={} kind=status -->",
            task.id
        ))
    );
}

#[tokio::test]
async fn the_placeholder_becomes_the_answer_and_is_found_again_after_a_restart() {
    let gh = FakeGithub::start().await;
    gh.allow_token(TOKEN);
    let first = GithubChannel::new(config(&gh.url()));
    let task = stored_task(
        &first,
        &issue_comment(4, 1, user("octocat", "User"), "@anywork hi"),
        "issue_comment",
    );
    first.on_started(&task).await.unwrap();
    gh.clear_requests();
    // Another process (or this one after a restart) delivers: it has no memory of the
    // placeholder and finds it by its marker.
    let second = GithubChannel::new(config(&gh.url()));
    let mut failed = TaskOutcome::completed("x");
    failed.status = TaskStatus::Failed;
    failed.result = None;
    failed.error = Some("the worker was lost; send the request again".into());
    second.deliver(&task, &failed).await.unwrap();
    let ours = gh.comments_on(REPO, 4);
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert!(
        ours[0]
            .body
            .starts_with("❌ The task failed: the worker was lost"),
        "{}",
        ours[0].body
    );
    assert_eq!(ours[0].edits.len(), 1);
    let lines = gh.request_lines();
    assert_eq!(
        lines,
        [
            format!("GET /repos/{REPO}/issues/4/comments"),
            format!("PATCH /repos/{REPO}/issues/comments/{}", ours[0].id)
        ]
    );
    let list = &gh.requests()[0];
    assert!(list.query_param("since").is_some_and(|s| s.ends_with('Z')));
    assert_eq!(list.query_param("per_page").as_deref(), Some("100"));

    // A placeholder deleted by someone meanwhile: the answer is posted instead.
    let third = GithubChannel::new(config(&gh.url()));
    let task2 = stored_task(
        &third,
        &issue_comment(6, 2, user("octocat", "User"), "@anywork hi"),
        "issue_comment",
    );
    third.on_started(&task2).await.unwrap();
    gh.delete_comment(gh.comments_on(REPO, 6)[0].id);
    third
        .deliver(&task2, &TaskOutcome::completed("ok"))
        .await
        .unwrap();
    assert_eq!(gh.comments_on(REPO, 6).len(), 1);
    assert!(gh.comments_on(REPO, 6)[0].body.starts_with("ok"));
}

#[tokio::test]
async fn review_comments_are_answered_in_their_thread() {
    let gh = FakeGithub::start().await;
    gh.allow_token(TOKEN);
    let ch = GithubChannel::new(config(&gh.url()));
    let root = gh.add_review_comment(REPO, 8, "octocat", "@anywork why?");
    let payload = json!({
        "action": "created",
        "comment": {"id": root, "body": "@anywork why?", "user": user("octocat", "User"), "path": "a.rs", "line": 1, "diff_hunk": "@@"},
        "pull_request": {"number": 8, "title": "t"},
        "repository": repository()
    });
    let task = stored_task(&ch, &payload, "pull_request_review_comment");
    ch.on_accepted(&task).await.unwrap();
    ch.on_started(&task).await.unwrap();
    ch.deliver(&task, &TaskOutcome::completed("Because."))
        .await
        .unwrap();
    assert_eq!(gh.reactions()[0].target, format!("review_comment:{root}"));
    let ours: Vec<_> = gh
        .comments_on(REPO, 8)
        .into_iter()
        .filter(|c| c.user == "anywork[bot]")
        .collect();
    assert_eq!(ours.len(), 1);
    assert!(ours[0].review && ours[0].in_reply_to == Some(root));
    assert!(ours[0].body.starts_with("Because."));
    assert_eq!(
        gh.request_lines(),
        [
            format!("POST /repos/{REPO}/pulls/comments/{root}/reactions"),
            format!("GET /repos/{REPO}/pulls/8/comments"),
            format!("POST /repos/{REPO}/pulls/8/comments/{root}/replies"),
            format!("PATCH /repos/{REPO}/pulls/comments/{}", ours[0].id),
        ]
    );
}

#[tokio::test]
async fn failures_map_to_retryable_or_final_errors() {
    let gh = FakeGithub::start().await;
    gh.allow_token(TOKEN);
    let ch = GithubChannel::new(config(&gh.url()));
    let task = stored_task(
        &ch,
        &issue_comment(9, 1, user("octocat", "User"), "@anywork x"),
        "issue_comment",
    );
    let outcome = TaskOutcome::completed("answer");

    gh.inject(Fault::status("/issues/9/comments", 502).method("POST"));
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.is_retryable());

    gh.inject(
        Fault::status("/issues/9/comments", 429)
            .method("POST")
            .header("Retry-After", "30"),
    );
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));

    let reset = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60)
        .to_string();
    gh.inject(
        Fault::status("/issues/9/comments", 403)
            .method("POST")
            .header("x-ratelimit-remaining", "0")
            .header("x-ratelimit-reset", &reset)
            .body(json!({"message": "API rate limit exceeded"})),
    );
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert!(
        e.retry_after()
            .is_some_and(|w| w > Duration::from_secs(30) && w <= Duration::from_secs(61))
    );

    gh.inject(
        Fault::status("/issues/9/comments", 404)
            .method("POST")
            .body(json!({"message": "Not Found"})),
    );
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(!e.is_retryable());

    gh.inject(
        Fault::status("/issues/9/comments", 422)
            .method("POST")
            .body(json!({"message": "Validation Failed"})),
    );
    let e = ch.deliver(&task, &outcome).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("Validation Failed"), "{e}");

    // A revoked token: final, says what to check, never shows the token.
    let mut bad = config(&gh.url());
    bad.auth = GithubAuth::Token("ghp_revoked".into());
    let e = GithubChannel::new(bad)
        .deliver(&task, &outcome)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(
        e.to_string().contains("Bad credentials") && e.to_string().contains("GITHUB_TOKEN"),
        "{e}"
    );
    assert!(!e.to_string().contains("ghp_revoked"));

    // Nothing reachable: retryable.
    let down = GithubChannel::new(config("http://127.0.0.1:9"));
    let e = down.deliver(&task, &outcome).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");

    // After all that, one good delivery posts exactly one answer.
    ch.deliver(&task, &outcome).await.unwrap();
    assert_eq!(gh.comments_on(REPO, 9).len(), 1);
}

fn app_config(api: &str, app_id: &str, pem: &str) -> GithubConfig {
    let mut c = config(api);
    c.auth = GithubAuth::App {
        app_id: app_id.into(),
        key: AppKey::from_pem(pem).unwrap(),
        installation_id: None,
    };
    c
}

#[tokio::test]
async fn a_github_app_trades_its_jwt_for_an_installation_token_and_caches_it() {
    let gh = FakeGithub::start().await;
    gh.set_app("123456", TEST_APP_PRIVATE_KEY);
    let ch = GithubChannel::new(app_config(&gh.url(), "123456", TEST_APP_PRIVATE_KEY));
    let task = stored_task(
        &ch,
        &issue_comment(10, 1, user("octocat", "User"), "@anywork hi"),
        "issue_comment",
    );
    ch.on_accepted(&task).await.unwrap();
    ch.on_started(&task).await.unwrap();
    ch.deliver(&task, &TaskOutcome::completed("done"))
        .await
        .unwrap();
    assert_eq!(
        gh.issued_tokens(),
        [(4242, "ghs_fake1".to_owned())],
        "one token for all calls"
    );
    let exchanges: Vec<_> = gh
        .requests()
        .into_iter()
        .filter(|r| r.path_only() == "/app/installations/4242/access_tokens")
        .collect();
    assert_eq!(exchanges.len(), 1);
    let jwt = exchanges[0]
        .header("authorization")
        .unwrap()
        .trim_start_matches("Bearer ");
    assert_eq!(jwt.split('.').count(), 3);
    for r in gh
        .requests()
        .iter()
        .filter(|r| !r.path.starts_with("/app/"))
    {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer ghs_fake1"),
            "{}",
            r.line()
        );
    }

    // A token close to its expiry is replaced.
    gh.set_token_ttl(Duration::from_secs(120));
    let ch2 = GithubChannel::new(app_config(&gh.url(), "123456", TEST_APP_PRIVATE_KEY_PKCS8));
    ch2.on_accepted(&task).await.unwrap();
    ch2.on_accepted(&task).await.unwrap();
    assert_eq!(
        gh.issued_tokens().len(),
        3,
        "a token with 2 minutes left is not reused"
    );
}

#[tokio::test]
async fn an_event_without_installation_finds_the_repositorys() {
    let gh = FakeGithub::start().await;
    gh.set_app("123456", TEST_APP_PRIVATE_KEY);
    gh.set_installation(REPO, 777);
    let ch = GithubChannel::new(app_config(&gh.url(), "123456", TEST_APP_PRIVATE_KEY));
    let mut payload = issue_comment(11, 1, user("octocat", "User"), "@anywork hi");
    payload.as_object_mut().unwrap().remove("installation");
    let task = stored_task(&ch, &payload, "issue_comment");
    ch.on_accepted(&task).await.unwrap();
    assert_eq!(gh.issued_tokens(), [(777, "ghs_fake1".to_owned())]);
    assert_eq!(
        gh.request_lines()[0],
        format!("GET /repos/{REPO}/installation")
    );
}

#[tokio::test]
async fn a_jwt_for_another_app_is_refused_as_unauthorized() {
    let gh = FakeGithub::start().await;
    gh.set_app("999", TEST_APP_PRIVATE_KEY);
    let ch = GithubChannel::new(app_config(&gh.url(), "123456", TEST_APP_PRIVATE_KEY));
    let task = stored_task(
        &ch,
        &issue_comment(12, 1, user("octocat", "User"), "@anywork hi"),
        "issue_comment",
    );
    let e = ch.on_accepted(&task).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(e.to_string().contains("GitHub App"), "{e}");
    assert!(gh.issued_tokens().is_empty());
}

#[test]
fn configuration_is_read_from_the_environment_names() {
    fn lookup(pairs: &[(&str, &str)]) -> anywork_core::Result<Option<GithubConfig>> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        GithubConfig::from_lookup(move |k| {
            pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }
    assert!(lookup(&[]).unwrap().is_none(), "unset: the channel is off");
    let c = lookup(&[
        ("GITHUB_WEBHOOK_SECRET", "s"),
        ("GITHUB_TOKEN", "ghp_x"),
        ("GITHUB_TRIGGER", "@bot"),
        ("GITHUB_API_URL", "https://ghe.example/api/v3/"),
        ("GITHUB_BOT_LOGIN", "bot-user"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(c.trigger, "@bot");
    assert_eq!(c.api_url, "https://ghe.example/api/v3");
    assert_eq!(c.bot_login.as_deref(), Some("bot-user"));
    assert!(matches!(c.auth, GithubAuth::Token(ref t) if t == "ghp_x"));
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("ghp_x") && !dbg.contains("\"s\""), "{dbg}");
    let d = lookup(&[("GITHUB_WEBHOOK_SECRET", "s"), ("GITHUB_TOKEN", "t")])
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.trigger.as_str(), d.api_url.as_str()),
        ("@anywork", "https://api.github.com")
    );

    // A GitHub App: the key from a file, or squeezed into one variable with \n escapes.
    let dir = std::env::temp_dir().join(format!("anywork-gh-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("app.pem");
    std::fs::write(&file, TEST_APP_PRIVATE_KEY).unwrap();
    let c = lookup(&[
        ("GITHUB_WEBHOOK_SECRET", "s"),
        ("GITHUB_APP_ID", "123456"),
        ("GITHUB_APP_PRIVATE_KEY_FILE", file.to_str().unwrap()),
        ("GITHUB_APP_INSTALLATION_ID", "42"),
    ])
    .unwrap()
    .unwrap();
    assert!(
        matches!(c.auth, GithubAuth::App { ref app_id, installation_id: Some(42), .. } if app_id == "123456")
    );
    assert!(!format!("{c:?}").contains("PRIVATE KEY"));
    let one_line = TEST_APP_PRIVATE_KEY.trim().replace('\n', "\\n");
    assert!(
        lookup(&[
            ("GITHUB_WEBHOOK_SECRET", "s"),
            ("GITHUB_APP_ID", "1"),
            ("GITHUB_APP_PRIVATE_KEY", &one_line),
        ])
        .unwrap()
        .is_some()
    );
    std::fs::remove_dir_all(&dir).ok();

    for (vars, needle) in [
        (vec![("GITHUB_TOKEN", "t")], "GITHUB_WEBHOOK_SECRET"),
        (vec![("GITHUB_WEBHOOK_SECRET", "s")], "GITHUB_TOKEN"),
        (
            vec![
                ("GITHUB_WEBHOOK_SECRET", "s"),
                ("GITHUB_TOKEN", "t"),
                ("GITHUB_APP_ID", "1"),
            ],
            "keep one",
        ),
        (
            vec![("GITHUB_WEBHOOK_SECRET", "s"), ("GITHUB_APP_ID", "1")],
            "GITHUB_APP_PRIVATE_KEY_FILE",
        ),
        (
            vec![
                ("GITHUB_WEBHOOK_SECRET", "s"),
                ("GITHUB_APP_ID", "1"),
                ("GITHUB_APP_PRIVATE_KEY", "nope"),
            ],
            ".pem",
        ),
        (
            vec![
                ("GITHUB_WEBHOOK_SECRET", "s"),
                ("GITHUB_APP_ID", "1"),
                ("GITHUB_APP_PRIVATE_KEY_FILE", "/no/such.pem"),
            ],
            "cannot be read",
        ),
        (
            vec![
                ("GITHUB_WEBHOOK_SECRET", "s"),
                ("GITHUB_TOKEN", "t"),
                ("GITHUB_API_URL", "api.github.com"),
            ],
            "GITHUB_API_URL",
        ),
    ] {
        let e = lookup(&vars).unwrap_err();
        assert!(e.to_string().contains(needle), "{vars:?}: {e}");
    }
    let e = lookup(&[
        ("GITHUB_WEBHOOK_SECRET", "s"),
        ("GITHUB_APP_ID", "1"),
        ("GITHUB_APP_PRIVATE_KEY", TEST_APP_PRIVATE_KEY),
        ("GITHUB_APP_INSTALLATION_ID", "abc"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("GITHUB_APP_INSTALLATION_ID"), "{e}");
}

#[tokio::test]
async fn the_checkout_carries_the_pull_request_target_and_the_reply_links_what_was_opened() {
    let gh = FakeGithub::start().await;
    gh.allow_token(TOKEN);
    let ch = GithubChannel::new(config(&gh.url()));

    // An issue: pull requests go into the default branch, with the channel's token.
    let issue_task = stored_task(
        &ch,
        &issue_comment(3, 31, user("octocat", "User"), "@anywork fix it"),
        "issue_comment",
    );
    let checkout = ch.workspace_repository(&issue_task).await.unwrap().unwrap();
    assert_eq!(checkout.token.as_deref(), Some(TOKEN));
    let target = checkout
        .pull_requests
        .clone()
        .expect("a pull request target");
    assert_eq!(
        (
            target.api_url.as_str(),
            target.repository.as_str(),
            target.base.as_str()
        ),
        (gh.url().as_str(), REPO, "main")
    );
    checkout.validate().unwrap();
    assert!(!format!("{checkout:?}").contains(TOKEN));

    // A review comment: into the pull request's base.
    let payload = json!({
        "action": "created",
        "comment": {"id": 77, "body": "@anywork tidy this", "user": user("octocat", "User"), "path": "a.rs", "line": 1, "diff_hunk": "@@"},
        "pull_request": {"number": 8, "title": "t", "head": {"ref": "feature", "sha": "abc"}, "base": {"ref": "release-1.x", "sha": "def"}},
        "repository": repository()
    });
    let review_task = stored_task(&ch, &payload, "pull_request_review_comment");
    let checkout = ch
        .workspace_repository(&review_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkout.git_ref.as_deref(), Some("refs/pull/8/head"));
    assert_eq!(checkout.pull_requests.unwrap().base, "release-1.x");

    // The answer, then a line per pull request the worker reported.
    let mut outcome = TaskOutcome::completed("I fixed it.");
    outcome.pull_requests = vec![anywork_core::PullRequestLink {
        repository: REPO.into(),
        number: 12,
        url: format!("https://github.com/{REPO}/pull/12"),
        branch: "anywork/fix".into(),
        base: "main".into(),
    }];
    ch.deliver(&issue_task, &outcome).await.unwrap();
    let ours = gh.comments_on(REPO, 3);
    assert_eq!(ours.len(), 1);
    assert!(
        ours[0].body.starts_with(&format!(
            "I fixed it.\n\nOpened pull request #12: https://github.com/{REPO}/pull/12\n\n<sub>"
        )),
        "{}",
        ours[0].body
    );
}
