//! Channels end to end, through the real server (HTTP in, a real worker process, the fake
//! model) and back out through the outbox: the generic webhook with its callback, GitHub
//! against the fake GitHub API, Slack against the fake Slack API; retries, `Retry-After`,
//! dead letters and their manual retry, a restart with deliveries pending, duplicates.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_channels::github::{GithubAuth, GithubChannel, GithubConfig};
use anywork_channels::slack::{SlackChannel, SlackConfig};
use anywork_channels::verify::hmac_sha256;
use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_core::Channel;
use anywork_runtime::{DispatcherConfig, FirstWords};
use anywork_test::fake_github::FakeGithub;
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_test::fake_slack::FakeSlack;
use common::{Setup, TestServer, WAIT, WorkerProcess};
use serde_json::{Value, json};

const WEBHOOK_SECRET: &str = "wh-s3cret-value";
const PUSH_SECRET: &str = "push-signing-key";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Outbox timings for tests: quick retries.
fn fast() -> DispatcherConfig {
    let mut c = DispatcherConfig::default();
    c.outbox.initial_backoff = Duration::from_millis(100);
    c.outbox.max_backoff = Duration::from_millis(400);
    c.outbox.poll_every = Duration::from_millis(50);
    // The receivers and fakes listen on loopback over http.
    c.outbound = anywork_core::OutboundPolicy::allow_all();
    c
}

fn webhook(secret: Option<&str>) -> Arc<dyn Channel> {
    let mut c = WebhookConfig::new();
    c.secret = secret.map(str::to_owned);
    Arc::new(WebhookChannel::new(c))
}

/// A status to answer, with the `Retry-After` seconds to send.
type Answer = (u16, Option<u64>);

/// A push receiver: answers from a script of `(status, Retry-After)`, then `fallback`, and
/// records every request.
#[derive(Clone)]
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    fallback: Arc<Mutex<u16>>,
}

#[derive(Debug, Clone)]
struct Hit {
    at: Instant,
    headers: HashMap<String, String>,
    raw: Vec<u8>,
    body: Value,
    answered: u16,
}

impl Receiver {
    async fn start(script: &[(u16, Option<u64>)]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, script)
    }

    fn serve(listener: tokio::net::TcpListener, script: &[(u16, Option<u64>)]) -> Receiver {
        let r = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            hits: Arc::default(),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            fallback: Arc::new(Mutex::new(200)),
        };
        let me = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let me = me.clone();
                    async move {
                        let (status, retry_after) = me
                            .script
                            .lock()
                            .unwrap()
                            .pop_front()
                            .unwrap_or((*me.fallback.lock().unwrap(), None));
                        me.hits.lock().unwrap().push(Hit {
                            at: Instant::now(),
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                })
                                .collect(),
                            raw: body.to_vec(),
                            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                            answered: status,
                        });
                        let mut resp = axum::response::Response::new(axum::body::Body::empty());
                        *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                        if let Some(s) = retry_after {
                            resp.headers_mut()
                                .insert("retry-after", s.to_string().parse().unwrap());
                        }
                        resp
                    }
                },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} pushes arrived",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn post_raw(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut r = server
        .http
        .post(format!("{}{path}", server.url))
        .header("content-type", "application/json");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn session_count(server: &TestServer) -> usize {
    let (_, body) = server.get("/api/sessions").await;
    body.as_array()
        .or_else(|| body["sessions"].as_array())
        .map_or(0, Vec::len)
}

/// Polls `GET /api/deliveries?status=` until one for `task` is there; returns it.
async fn wait_delivery(server: &TestServer, status: &str, task: &str) -> Value {
    wait_delivery_to(server, status, task, "").await
}

/// [`wait_delivery`] of a target kind (`push`, `channel`; any if empty).
async fn wait_delivery_to(server: &TestServer, status: &str, task: &str, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = server
            .get(&format!("/api/deliveries?status={status}"))
            .await;
        assert_eq!(code, 200, "{body}");
        if let Some(d) = body["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["task_id"] == task && (kind.is_empty() || d["target"]["kind"] == kind))
        {
            return d.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {status} delivery for {task}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(
        !body.to_string().contains(WEBHOOK_SECRET),
        "no secret in errors: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_runs_the_originals_body_and_the_callback_gets_a_signed_outcome() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Release notes: all good."));
    let worker = WorkerProcess::start(&fake).await;
    let mut setup = Setup {
        config: fast(),
        channels: vec![webhook(Some(WEBHOOK_SECRET))],
        push_secret: Some(PUSH_SECRET.into()),
        ..Setup::default()
    };
    setup.options.channel_max_body_bytes = 4096;
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let receiver = Receiver::start(&[]).await;
    let path = "/api/channel/webhook/webhook";
    let secret = [("x-webhook-secret", WEBHOOK_SECRET)];

    // Refusals first: none of them makes a task.
    let (s, b) = post_raw(&server, "/api/channel/nope/webhook", &secret, "{}").await;
    assert_error(s, &b, 404, "not_found");
    let body = json!({"message": "hi"}).to_string();
    let (s, b) = post_raw(&server, path, &[], body.clone()).await;
    assert_error(s, &b, 401, "unauthorized");
    let (s, b) = post_raw(
        &server,
        path,
        &[("x-webhook-secret", "wrong")],
        body.clone(),
    )
    .await;
    assert_error(s, &b, 401, "unauthorized");
    let (s, b) = post_raw(&server, path, &secret, "{\"message\": ").await;
    assert_error(s, &b, 400, "invalid_input");
    let big = json!({"message": "x".repeat(5000)}).to_string();
    let (s, b) = post_raw(&server, path, &secret, big).await;
    assert_eq!(s, 413, "{b}");
    assert_eq!(b["error"]["code"], "invalid_input");
    assert!(b["error"]["message"].as_str().unwrap().contains("4096"));
    let (s, b) = post_raw(&server, path, &secret, r#"{"event":"ping"}"#).await;
    assert_eq!(
        (s, &b["ok"], &b["skipped"]),
        (200, &json!(true), &json!(true))
    );
    assert_eq!(
        session_count(&server).await,
        0,
        "nothing refused made a task"
    );

    // The original's body, with a callback.
    let body = json!({
        "message": "Summarize the release notes",
        "event": "release", "source": "ci", "meta": {"tag": "v1.2"},
        "mcp_servers": [],
        "callback_url": receiver.url, "callback_auth": "Bearer cb-token"
    });
    let (s, created) = post_raw(&server, path, &secret, body.to_string()).await;
    assert_eq!(s, 202, "{created}");
    let task = created["taskId"].as_str().unwrap().to_owned();
    let session = created["sessionId"].as_str().unwrap();
    assert!(
        session.starts_with("wh-") && session.len() == 11,
        "{session}"
    );

    let hits = receiver.wait_hits(1).await;
    let hit = &hits[0];
    assert_eq!(hit.body["id"], task.as_str());
    assert_eq!(hit.body["status"], "completed");
    assert_eq!(hit.body["result"], "Release notes: all good.");
    assert_eq!(hit.headers["authorization"], "Bearer cb-token");
    assert_eq!(hit.headers["x-anywork-event"], "completed");
    let ts = &hit.headers["x-anywork-timestamp"];
    let want = format!(
        "sha256={}",
        hex(&hmac_sha256(
            PUSH_SECRET.as_bytes(),
            &[ts.as_bytes(), b".", &hit.raw]
        ))
    );
    assert_eq!(hit.headers["x-anywork-signature"], want);
    let sent = wait_delivery_to(&server, "sent", &task, "push").await;
    assert_eq!(hit.headers["idempotency-key"], sent["id"].as_str().unwrap());
    assert_eq!(sent["target"]["kind"], "push");
    assert_eq!(sent["target"]["authorization"], "[redacted]");
    assert_eq!(sent["attempts"], 1);

    // The same session continues with `session_id`; a resent request with the same
    // Idempotency-Key runs once.
    let again = json!({"message": "And the next one?", "session_id": session}).to_string();
    let keyed = [
        ("x-webhook-secret", WEBHOOK_SECRET),
        ("idempotency-key", "ci-run-42"),
    ];
    let (s1, first) = post_raw(&server, path, &keyed, again.clone()).await;
    let (s2, second) = post_raw(&server, path, &keyed, again).await;
    assert_eq!((s1, s2), (202, 202), "{first} {second}");
    assert_eq!(first["sessionId"], session);
    assert_eq!(first["taskId"], second["taskId"]);
    server.wait_final(first["taskId"].as_str().unwrap()).await;
    let (_, tasks) = server.get(&format!("/api/sessions/{session}/tasks")).await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2, "{tasks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_question_reaches_the_callback_and_the_next_request_answers_it() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "call_1",
        "ask_user",
        json!({"question": "Which environment?", "options": ["staging", "prod"]}),
    ));
    fake.push(Reply::text("Deployed to staging."));
    let worker = WorkerProcess::start(&fake).await;
    let setup = Setup {
        config: fast(),
        channels: vec![webhook(None)],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let receiver = Receiver::start(&[]).await;
    let path = "/api/channel/webhook/webhook";
    let body = json!({"message": "deploy it", "callback_url": receiver.url});
    let (s, created) = post_raw(&server, path, &[], body.to_string()).await;
    assert_eq!(s, 202, "{created}");
    let hits = receiver.wait_hits(1).await;
    assert_eq!(hits[0].body["status"], "input_required");
    assert_eq!(hits[0].body["input"]["prompt"], "Which environment?");
    assert_eq!(hits[0].body["input"]["options"], json!(["staging", "prod"]));
    assert_eq!(hits[0].headers["x-anywork-event"], "input_required");
    assert!(
        !hits[0].headers.contains_key("x-anywork-signature"),
        "no signing secret, no signature"
    );

    let answer = json!({"message": "staging", "session_id": created["sessionId"]});
    let (s, answered) = post_raw(&server, path, &[], answer.to_string()).await;
    assert_eq!(s, 202, "{answered}");
    assert_eq!(answered["answered"], true);
    assert_eq!(answered["taskId"], created["taskId"]);
    let hits = receiver.wait_hits(2).await;
    assert_eq!(hits[1].body["status"], "completed");
    assert_eq!(hits[1].body["result"], "Deployed to staging.");
    assert_ne!(
        hits[0].headers["idempotency-key"],
        hits[1].headers["idempotency-key"]
    );
    assert!(fake.last_request().unwrap().contains_text("staging"));
}

/// The store reads of inbound events: a new webhook session is not read at all (its creation
/// checks the id), an event for an existing session reads it once (the submit uses what the
/// lookup found), and the question an event answers is found with one query by session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_event_reads_its_session_once_and_finds_its_question_by_session() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "call_1",
        "ask_user",
        json!({"question": "Which environment?"}),
    ));
    fake.push(Reply::text("Deployed to staging."));
    fake.push(Reply::text("Done again."));
    let worker = WorkerProcess::start(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn anywork_core::TaskStore> = Arc::new(
        anywork_store::SqliteStore::open_in_dir(dir.path())
            .await
            .unwrap(),
    );
    let store = anywork_test::faulty_store::FaultyStore::new(sqlite);
    let setup = Setup {
        config: fast(),
        channels: vec![webhook(None)],
        store: Some((dir, store.clone())),
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let receiver = Receiver::start(&[]).await;
    let path = "/api/channel/webhook/webhook";
    let sessions_read = || store.reads("get_session") + store.reads("find_session");

    let before = sessions_read();
    let body = json!({"message": "deploy it", "callback_url": receiver.url});
    let (s, created) = post_raw(&server, path, &[], body.to_string()).await;
    assert_eq!(s, 202, "{created}");
    assert_eq!(sessions_read(), before, "a new session is not read");
    let hits = receiver.wait_hits(1).await;
    assert_eq!(hits[0].body["status"], "input_required");

    let (before, by_session) = (sessions_read(), store.reads("tasks_by_session_in_status"));
    let answer = json!({"message": "staging", "session_id": created["sessionId"]});
    let (s, answered) = post_raw(&server, path, &[], answer.to_string()).await;
    assert_eq!(s, 202, "{answered}");
    assert_eq!(answered["answered"], true);
    assert_eq!(answered["taskId"], created["taskId"]);
    assert_eq!(sessions_read(), before + 1, "the session is read once");
    assert_eq!(store.reads("tasks_by_session_in_status"), by_session + 1);
    server.wait_final(created["taskId"].as_str().unwrap()).await;

    // A new task in the existing session: read once, not again to submit it.
    let before = sessions_read();
    let again = json!({"message": "once more", "session_id": created["sessionId"]});
    let (s, next) = post_raw(&server, path, &[], again.to_string()).await;
    assert_eq!(s, 202, "{next}");
    assert_eq!(next["sessionId"], created["sessionId"]);
    assert_ne!(next["taskId"], created["taskId"]);
    assert_eq!(sessions_read(), before + 1, "the session is read once");
    let done = server.wait_final(next["taskId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_retried_after_500_and_no_sooner_than_retry_after() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("pushed"));
    let worker = WorkerProcess::start(&fake).await;
    let setup = Setup {
        config: fast(),
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let receiver = Receiver::start(&[(500, None), (429, Some(1)), (200, None)]).await;
    let (status, created) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": receiver.url,
                "auth_header": "Bearer s3cret", "events": ["completed", "failed"]}}),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let task = created["taskId"].as_str().unwrap();
    let hits = receiver.wait_hits(3).await;
    assert_eq!(
        hits.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [500, 429, 200]
    );
    let key = &hits[0].headers["idempotency-key"];
    assert!(
        hits.iter().all(|h| &h.headers["idempotency-key"] == key),
        "one key for every attempt"
    );
    assert!(
        hits.iter()
            .all(|h| h.headers["authorization"] == "Bearer s3cret")
    );
    assert!(
        hits[2].at.duration_since(hits[1].at) >= Duration::from_millis(950),
        "Retry-After: 1 was honoured"
    );
    let sent = wait_delivery(&server, "sent", task).await;
    assert_eq!(sent["attempts"], 3);
    assert_eq!(&sent["id"], key.as_str());
    // No more attempts after it was taken.
    server.dispatcher().send_due_deliveries().await;
    assert_eq!(receiver.hits().len(), 3);

    // A bad push target is refused when the task is created.
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": "ftp://x", "events": []}}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_past_the_budget_is_dead_until_retried_through_the_api() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("late news"));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = fast();
    config.outbox.max_attempts = 3;
    // Settled deliveries are deleted by the retention round the test runs itself.
    config.retention.settled_deliveries_max_age = Some(Duration::ZERO);
    config.retention.every = Duration::from_secs(3600);
    let setup = Setup {
        config,
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let receiver = Receiver::start(&[]).await;
    *receiver.fallback.lock().unwrap() = 503;
    let (_, created) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": receiver.url}}),
        )
        .await;
    let task = created["taskId"].as_str().unwrap();
    let dead = wait_delivery(&server, "dead", task).await;
    assert_eq!(dead["attempts"], 3);
    assert!(
        dead["last_error"].as_str().unwrap().contains("503"),
        "{dead}"
    );
    assert_eq!(receiver.hits().len(), 3);
    let id = dead["id"].as_str().unwrap();

    // Errors of the API: a status that does not exist, an unknown id, a delivery not dead.
    let (s, b) = server.get("/api/deliveries?status=lost").await;
    assert_error(s, &b, 400, "invalid_input");
    let (s, b) = server
        .post(
            "/api/deliveries/0190f5c2-0000-7000-8000-000000000000/retry",
            json!({}),
        )
        .await;
    assert_error(s, &b, 404, "not_found");

    *receiver.fallback.lock().unwrap() = 200;
    let (s, retried) = server
        .post(&format!("/api/deliveries/{id}/retry"), json!({}))
        .await;
    assert_eq!(s, 200, "{retried}");
    assert_eq!(retried["attempts"], 0);
    let sent = wait_delivery(&server, "sent", task).await;
    assert_eq!(sent["id"], id);
    let hits = receiver.hits();
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|h| h.headers["idempotency-key"] == id));
    let (s, b) = server
        .post(&format!("/api/deliveries/{id}/retry"), json!({}))
        .await;
    assert_error(s, &b, 409, "conflict");

    // Retention deletes the settled delivery (here: any age); the task stays.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let round = server.dispatcher().run_retention().await.unwrap();
    assert_eq!(round.deliveries, 1, "{round:?}");
    let (_, sent) = server.get("/api/deliveries?status=sent").await;
    assert!(
        !sent.to_string().contains(id),
        "the settled delivery is gone: {sent}"
    );
    let (s, _) = server.get(&format!("/api/tasks/{task}")).await;
    assert_eq!(s, 200);

    // The attempts and the deletion are counted.
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"anywork_delivery_attempts_total{result="retry"} 2"#,
        r#"anywork_delivery_attempts_total{result="dead"} 1"#,
        r#"anywork_delivery_attempts_total{result="sent"} 1"#,
        r#"anywork_retention_deleted_total{what="deliveries"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pending_at_a_restart_are_sent_by_the_next_server_once() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("survived"));
    let worker = WorkerProcess::start(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens on the receiver's port yet.
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut config = fast();
    config.outbox.initial_backoff = Duration::from_millis(300);
    let first = TestServer::start_full(
        &worker.url,
        Setup {
            config: config.clone(),
            db_dir: Some(dir.path().to_owned()),
            ..Setup::default()
        },
        FirstWords,
    )
    .await;
    let (_, created) = first
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": url}}),
        )
        .await;
    let task = created["taskId"].as_str().unwrap().to_owned();
    let failed = wait_delivery(&first, "failed", &task).await;
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("could not be sent")
    );
    first
        .dispatcher()
        .shutdown(Duration::from_millis(100))
        .await;
    drop(first);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let receiver = Receiver::serve(listener, &[]);
    let second = TestServer::start_full(
        &worker.url,
        Setup {
            config,
            db_dir: Some(dir.path().to_owned()),
            ..Setup::default()
        },
        FirstWords,
    )
    .await;
    let sent = wait_delivery(&second, "sent", &task).await;
    let hits = receiver.wait_hits(1).await;
    assert_eq!(
        hits[0].headers["idempotency-key"],
        sent["id"].as_str().unwrap()
    );
    assert_eq!(hits[0].body["result"], "survived");
    second.dispatcher().send_due_deliveries().await;
    assert_eq!(receiver.hits().len(), 1, "sent once");
}

// ---- GitHub ----

const GH_SECRET: &str = "gh-webhook-secret";
const GH_TOKEN: &str = "ghp_e2e_token";
const REPO: &str = "octo-org/hello-world";

/// The GitHub channel on the fake API; `checkout`: the repository in the workspace (the
/// payloads' clone URL must then be reachable: a `file://` one).
fn github(api: &str, checkout: bool) -> Arc<dyn Channel> {
    let mut c = GithubConfig::new(GH_SECRET, GithubAuth::Token(GH_TOKEN.into()));
    c.api_url = api.to_owned();
    c.checkout = checkout;
    Arc::new(GithubChannel::new(c))
}

fn gh_user(login: &str) -> Value {
    json!({"login": login, "id": 1, "type": "User"})
}

/// An `issue_comment` `created` event shaped like GitHub's documentation example.
fn issue_comment(number: u64, comment_id: u64, body: &str) -> Value {
    json!({
        "action": "created",
        "issue": {
            "url": format!("https://api.github.com/repos/{REPO}/issues/{number}"),
            "html_url": format!("https://github.com/{REPO}/issues/{number}"),
            "id": 1, "number": number, "title": "Found a bug", "state": "open",
            "user": gh_user("octocat"), "body": "I'm having a problem with this.",
            "labels": [], "comments": 1
        },
        "comment": {
            "id": comment_id, "node_id": "IC_x",
            "html_url": format!("https://github.com/{REPO}/issues/{number}#issuecomment-{comment_id}"),
            "user": gh_user("octocat"), "created_at": "2024-05-01T12:00:00Z",
            "updated_at": "2024-05-01T12:00:00Z", "author_association": "MEMBER", "body": body
        },
        "repository": {
            "id": 1296269, "name": "hello-world", "full_name": REPO, "private": false,
            "owner": {"login": "octo-org", "id": 2, "type": "Organization"},
            "html_url": format!("https://github.com/{REPO}"),
            "clone_url": format!("https://github.com/{REPO}.git"), "default_branch": "main"
        },
        "sender": gh_user("octocat"),
    })
}

async fn github_event(server: &TestServer, payload: &Value, delivery: &str) -> (u16, Value) {
    let body = payload.to_string();
    let sig = format!(
        "sha256={}",
        hex(&hmac_sha256(GH_SECRET.as_bytes(), &[body.as_bytes()]))
    );
    post_raw(
        server,
        "/api/channel/github/webhook",
        &[
            ("x-github-event", "issue_comment"),
            ("x-github-delivery", delivery),
            ("x-hub-signature-256", &sig),
        ],
        body,
    )
    .await
}

/// Waits until a comment of ours on `#number` satisfies `done`.
async fn wait_comment(gh: &FakeGithub, number: u64, done: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ours: Vec<String> = gh
            .comments_on(REPO, number)
            .into_iter()
            .filter(|c| c.user == "anywork[bot]")
            .map(|c| c.body)
            .collect();
        if ours.iter().any(|b| done(b)) {
            return ours;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no such comment: {ours:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_mention_is_answered_by_editing_the_placeholder_and_a_redelivery_runs_once() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Fixed it in `src/lib.rs`."));
    let worker = WorkerProcess::start(&fake).await;
    let gh = FakeGithub::start().await;
    gh.allow_token(GH_TOKEN);
    let setup = Setup {
        config: fast(),
        channels: vec![github(&gh.url(), false)],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let comment = gh.add_comment(REPO, 7, "octocat", "@anywork please fix this");
    let payload = issue_comment(7, comment, "@anywork please fix this");

    // A bad signature is refused; the ping is answered.
    let (s, b) = post_raw(
        &server,
        "/api/channel/github/webhook",
        &[
            ("x-github-event", "issue_comment"),
            ("x-hub-signature-256", "sha256=00"),
        ],
        payload.to_string(),
    )
    .await;
    assert_error(s, &b, 401, "unauthorized");
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1}).to_string();
    let sig = format!(
        "sha256={}",
        hex(&hmac_sha256(GH_SECRET.as_bytes(), &[ping.as_bytes()]))
    );
    let (s, b) = post_raw(
        &server,
        "/api/channel/github/webhook",
        &[("x-github-event", "ping"), ("x-hub-signature-256", &sig)],
        ping,
    )
    .await;
    assert_eq!((s, &b["skipped"]), (200, &json!(true)), "{b}");

    let (s, created) = github_event(&server, &payload, "d-1").await;
    assert_eq!(s, 202, "{created}");
    let task = created["taskId"].as_str().unwrap().to_owned();
    let (s, again) = github_event(&server, &payload, "d-1").await;
    assert_eq!(
        (s, &again["taskId"]),
        (202, &created["taskId"]),
        "a redelivery runs once"
    );

    let ours = wait_comment(&gh, 7, |b| b.contains("kind=result")).await;
    assert_eq!(ours.len(), 1, "the placeholder became the answer: {ours:?}");
    let answer = &ours[0];
    assert!(
        answer.starts_with("Fixed it in `src/lib.rs`.\n\n<sub>"),
        "{answer}"
    );
    assert!(answer.ends_with(&format!("<!-- anywork:task={task} kind=result -->")));
    let result = gh
        .comments_on(REPO, 7)
        .into_iter()
        .find(|c| c.user == "anywork[bot]")
        .unwrap();
    assert_eq!(
        result.edits,
        [format!(
            "⏳ Working on it…\n\n<!-- anywork:task={task} kind=status -->"
        )]
    );
    let reactions = gh.reactions();
    assert_eq!(reactions.len(), 1);
    assert_eq!(
        (reactions[0].target.as_str(), reactions[0].content.as_str()),
        (format!("comment:{comment}").as_str(), "eyes")
    );
    for r in gh.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {GH_TOKEN}").as_str()),
            "{}",
            r.line()
        );
    }
    let sent = wait_delivery(&server, "sent", &task).await;
    assert_eq!(
        sent["target"],
        json!({"kind": "channel", "channel_type": "github"})
    );
    let (_, t) = server.get(&format!("/api/tasks/{task}")).await;
    let (_, tasks) = server
        .get(&format!(
            "/api/sessions/{}/tasks",
            t["sessionId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_posted_on_github_and_the_next_comment_answers_it() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "call_1",
        "ask_user",
        json!({"question": "Which branch should I target?", "options": ["main", "develop"]}),
    ));
    fake.push(Reply::text("Targeting develop."));
    let worker = WorkerProcess::start(&fake).await;
    let gh = FakeGithub::start().await;
    gh.allow_token(GH_TOKEN);
    let setup = Setup {
        config: fast(),
        channels: vec![github(&gh.url(), false)],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let c1 = gh.add_comment(REPO, 9, "octocat", "@anywork open a PR");
    let (s, created) =
        github_event(&server, &issue_comment(9, c1, "@anywork open a PR"), "q-1").await;
    assert_eq!(s, 202, "{created}");
    let task = created["taskId"].as_str().unwrap().to_owned();
    wait_comment(&gh, 9, |b| b.contains("kind=question")).await;
    let questions = wait_comment(&gh, 9, |b| b.contains("Which branch should I target?")).await;
    assert!(
        questions.iter().any(|b| b.contains("main · develop")),
        "{questions:?}"
    );

    // The next comment, without the trigger, answers.
    let c2 = gh.add_comment(REPO, 9, "octocat", "develop please");
    let (s, answered) = github_event(&server, &issue_comment(9, c2, "develop please"), "q-2").await;
    assert_eq!(s, 202, "{answered}");
    assert_eq!(answered["answered"], true);
    assert_eq!(answered["taskId"], task.as_str());
    let done = server.wait_final(&task).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(fake.last_request().unwrap().contains_text("develop please"));
    let ours = wait_comment(&gh, 9, |b| b.contains("kind=result")).await;
    assert!(
        ours.last().unwrap().starts_with("Targeting develop."),
        "{ours:?}"
    );
    // A comment without the trigger when nothing waits does nothing.
    let c3 = gh.add_comment(REPO, 9, "octocat", "thanks!");
    let (s, b) = github_event(&server, &issue_comment(9, c3, "thanks!"), "q-3").await;
    assert_eq!((s, &b["skipped"]), (200, &json!(true)), "{b}");
}

// ---- Slack ----

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_TOKEN: &str = "xoxb-e2e-token";
const BOT: &str = "U0LAN0Z89";
const TEAM: &str = "T123ABC456";
const CHANNEL: &str = "C123ABC456";

fn slack(api: &str) -> Arc<dyn Channel> {
    let mut c = SlackConfig::new(SLACK_SECRET, SLACK_TOKEN);
    c.api_url = api.to_owned();
    Arc::new(SlackChannel::new(c))
}

async fn slack_event(server: &TestServer, body: &Value, retry: Option<&str>) -> (u16, Value) {
    let body = body.to_string();
    let ts = anywork_channels::verify::unix_now().to_string();
    let sig = format!(
        "v0={}",
        hex(&hmac_sha256(
            SLACK_SECRET.as_bytes(),
            &[b"v0:", ts.as_bytes(), b":", body.as_bytes()]
        ))
    );
    let mut headers = vec![
        ("x-slack-request-timestamp", ts.as_str()),
        ("x-slack-signature", sig.as_str()),
    ];
    if let Some(n) = retry {
        headers.push(("x-slack-retry-num", n));
    }
    post_raw(server, "/api/channel/slack/webhook", &headers, body).await
}

fn slack_callback(event_id: &str, event: Value) -> Value {
    json!({
        "token": "XXYYZZ", "team_id": TEAM, "api_app_id": "A123ABC456", "event": event,
        "type": "event_callback", "event_id": event_id, "event_time": 1515449522,
        "authorizations": [{"enterprise_id": null, "team_id": TEAM, "user_id": BOT,
            "is_bot": true, "is_enterprise_install": false}]
    })
}

async fn wait_bot_text(fake: &FakeSlack, done: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let texts: Vec<String> = fake
            .bot_messages(CHANNEL)
            .into_iter()
            .map(|m| m.text)
            .collect();
        if texts.iter().any(|t| done(t)) {
            return texts;
        }
        assert!(tokio::time::Instant::now() < deadline, "{texts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_mention_is_answered_in_its_thread_with_reactions_and_retries_run_once() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("There are **12** tests."));
    let worker = WorkerProcess::start(&fake).await;
    let api = FakeSlack::start(SLACK_TOKEN, BOT).await;
    let setup = Setup {
        config: fast(),
        channels: vec![slack(&api.url())],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;

    let (s, b) = slack_event(
        &server,
        &json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
    );

    let ts = api.add_user_message(CHANNEL, None, "U123ABC456", "<@U0LAN0Z89> how many tests?");
    let mention = slack_callback(
        "Ev0001",
        json!({"type": "app_mention", "user": "U123ABC456", "text": "<@U0LAN0Z89> how many tests?",
            "ts": ts, "channel": CHANNEL, "event_ts": ts}),
    );
    let (s, created) = slack_event(&server, &mention, None).await;
    assert_eq!(s, 202, "{created}");
    let (s, retried) = slack_event(&server, &mention, Some("1")).await;
    assert_eq!(
        (s, &retried["taskId"]),
        (202, &created["taskId"]),
        "Slack's retry runs once"
    );
    let task = created["taskId"].as_str().unwrap().to_owned();

    // The answer, not a progress update that shows the same text above "Working on it…".
    let texts = wait_bot_text(&api, |t| {
        t.starts_with("There are *12* tests.") && !t.contains("Working on it")
    })
    .await;
    assert_eq!(
        texts.len(),
        1,
        "the placeholder became the answer: {texts:?}"
    );
    let reply = &api.bot_messages(CHANNEL)[0];
    assert_eq!(reply.thread_ts.as_deref(), Some(ts.as_str()));
    assert_eq!(
        reply.metadata,
        Some(json!({"event_type": "anywork_task",
            "event_payload": {"task_id": task, "kind": "result"}}))
    );
    wait_delivery(&server, "sent", &task).await;
    assert_eq!(
        api.reactions(CHANNEL, &ts),
        ["eyes", "white_check_mark"],
        "⏳ came and went"
    );
    for r in api.requests() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {SLACK_TOKEN}").as_str()),
            "{}",
            r.line()
        );
    }
    let methods = api.methods();
    assert!(
        methods.contains(&"chat.postMessage".to_owned()),
        "{methods:?}"
    );
    assert!(methods.contains(&"chat.update".to_owned()), "{methods:?}");

    // A reply in the thread follows up in the same session; one elsewhere is skipped.
    let reply_ts = api.add_user_message(CHANNEL, Some(&ts), "U222", "and the slow ones?");
    let follow = slack_callback(
        "Ev0002",
        json!({"type": "message", "channel": CHANNEL, "user": "U222", "text": "and the slow ones?",
            "ts": reply_ts, "thread_ts": ts, "event_ts": reply_ts, "channel_type": "channel"}),
    );
    let (s, next) = slack_event(&server, &follow, None).await;
    assert_eq!(s, 202, "{next}");
    assert_eq!(next["sessionId"], created["sessionId"]);
    server.wait_final(next["taskId"].as_str().unwrap()).await;
    let stray = slack_callback(
        "Ev0003",
        json!({"type": "message", "channel": CHANNEL, "user": "U222", "text": "hm",
            "ts": "1700000000.000100", "thread_ts": "1700000000.000001",
            "event_ts": "1700000000.000100", "channel_type": "channel"}),
    );
    let (s, b) = slack_event(&server, &stray, None).await;
    assert_eq!((s, &b["skipped"]), (200, &json!(true)), "{b}");
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The file at `rel` under any session folder of the worker's workspace.
fn find_in_workspace(root: &std::path::Path, rel: &str) -> Option<String> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| std::fs::read_to_string(e.path().join(rel)).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_comment_works_in_the_pull_requests_head_refreshed_per_task() {
    // A repository with a pull request (refs/pull/5/head), served as a bare repo over file://.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    std::fs::write(src.join("README.md"), "base").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "base"]);
    git(&src, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(src.join("README.md"), "pr v1").unwrap();
    git(&src, &["commit", "-q", "-am", "v1"]);
    let bare = tmp.path().join("bare.git");
    git(
        tmp.path(),
        &["clone", "-q", "--bare", src.to_str().unwrap(), "bare.git"],
    );
    let head = git(&src, &["rev-parse", "HEAD"]);
    git(&bare, &["update-ref", "refs/pull/5/head", &head]);

    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Looked at it."));
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(&ws).unwrap();
    let worker = WorkerProcess::start_in(&fake, &ws).await;
    let gh = FakeGithub::start().await;
    gh.allow_token(GH_TOKEN);
    let setup = Setup {
        config: fast(),
        channels: vec![github(&gh.url(), true)],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;
    let event = |comment: u64, body: &str| {
        let mut p = issue_comment(5, comment, body);
        p["issue"]["pull_request"] =
            json!({"url": format!("https://api.github.com/repos/{REPO}/pulls/5")});
        p["repository"]["clone_url"] = json!(format!("file://{}", bare.display()));
        p
    };

    let c1 = gh.add_comment(REPO, 5, "octocat", "@anywork review this");
    let (s, first) = github_event(&server, &event(c1, "@anywork review this"), "pr-1").await;
    assert_eq!(s, 202, "{first}");
    let done = server.wait_final(first["taskId"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        find_in_workspace(&ws, "hello-world/README.md").as_deref(),
        Some("pr v1")
    );
    let asked = fake.last_request().unwrap();
    assert!(
        asked.contains_text("checked out in the folder `hello-world`"),
        "the agent is told where the repository is"
    );

    // The pull request moves on; the next task starts from its new head.
    std::fs::write(src.join("README.md"), "pr v2").unwrap();
    git(&src, &["commit", "-q", "-am", "v2"]);
    git(&src, &["push", "-q", bare.to_str().unwrap(), "feature"]);
    let head = git(&src, &["rev-parse", "HEAD"]);
    git(&bare, &["update-ref", "refs/pull/5/head", &head]);
    let c2 = gh.add_comment(REPO, 5, "octocat", "@anywork again please");
    let (s, second) = github_event(&server, &event(c2, "@anywork again please"), "pr-2").await;
    assert_eq!(s, 202, "{second}");
    assert_eq!(second["sessionId"], first["sessionId"]);
    server.wait_final(second["taskId"].as_str().unwrap()).await;
    assert_eq!(
        find_in_workspace(&ws, "hello-world/README.md").as_deref(),
        Some("pr v2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_opens_a_pull_request_with_the_channels_token_and_the_reply_links_it() {
    // The repository behind a token, over git's smart HTTP, as GitHub serves it.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&src, &["init", "-q", "-b", "main"]);
    std::fs::write(src.join("README.md"), "Hello\n").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "base"]);
    let served = tmp.path().join("served");
    std::fs::create_dir_all(served.join("octo-org")).unwrap();
    let bare = served.join("octo-org/hello-world.git");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    let git_server = anywork_test::fake_git::GitHttpServer::start(&served, GH_TOKEN).await;

    let fake = FakeLlm::start().await;
    fake.push_all([
        Reply::tool_use(
            "t1",
            "write_file",
            json!({"path": "hello-world/README.md", "content": "Hello, world\n"}),
        ),
        Reply::tool_use(
            "t2",
            "open_pull_request",
            json!({"title": "Fix the greeting", "body": "As asked in #7.", "branch": "anywork/fix-greeting"}),
        ),
        Reply::text("Done: the greeting is fixed."),
    ]);
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(&ws).unwrap();
    let worker = WorkerProcess::start_in(&fake, &ws).await;
    let gh = FakeGithub::start().await;
    gh.allow_token(GH_TOKEN);
    let setup = Setup {
        config: fast(),
        channels: vec![github(&gh.url(), true)],
        ..Setup::default()
    };
    let server = TestServer::start_full(&worker.url, setup, FirstWords).await;

    let c = gh.add_comment(REPO, 7, "octocat", "@anywork fix the greeting please");
    let mut event = issue_comment(7, c, "@anywork fix the greeting please");
    event["repository"]["clone_url"] = json!(git_server.repo_url("octo-org/hello-world.git"));
    let (s, accepted) = github_event(&server, &event, "open-pr-1").await;
    assert_eq!(s, 202, "{accepted}");
    let task_id = accepted["taskId"].as_str().unwrap().to_owned();
    let done = server.wait_final(&task_id).await;
    assert_eq!(done["status"], "completed", "{done}");

    // The reply links the pull request, from what the worker reported.
    let ours = wait_comment(&gh, 7, |b| b.contains("Opened pull request")).await;
    let reply = ours
        .iter()
        .find(|b| b.contains("Opened pull request"))
        .unwrap();
    assert!(reply.contains("Done: the greeting is fixed."), "{reply}");
    assert!(
        reply
            .contains("Opened pull request #100: https://github.com/octo-org/hello-world/pull/100"),
        "{reply}"
    );
    // Exactly one pull request, into the default branch, with the channel's token.
    let pulls = gh.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert_eq!(
        (
            pulls[0].head.as_str(),
            pulls[0].base.as_str(),
            pulls[0].title.as_str(),
            pulls[0].body.as_deref()
        ),
        (
            "anywork/fix-greeting",
            "main",
            "Fix the greeting",
            Some("As asked in #7.")
        )
    );
    let create = gh
        .requests()
        .into_iter()
        .find(|r| r.line() == "POST /repos/octo-org/hello-world/pulls")
        .unwrap();
    assert_eq!(
        create.header("authorization"),
        Some(format!("Bearer {GH_TOKEN}").as_str())
    );
    assert_eq!(
        git(&bare, &["show", "anywork/fix-greeting:README.md"]),
        "Hello, world"
    );
    assert!(git_server.pushed());

    // The token is in no task log, and the agent was never given it.
    let logs = server.logs(&task_id).await;
    let text = serde_json::to_string(&logs).unwrap();
    assert!(text.contains("open_pull_request"), "{text}");
    assert!(!text.contains(GH_TOKEN), "the token is in the task logs");
    for request in fake.requests() {
        assert!(!request.contains_text(GH_TOKEN));
    }
    let done_log = logs.iter().rev().find(|l| l["type"] == "done").unwrap();
    assert_eq!(
        done_log["metadata"]["pull_requests"][0]["number"], 100,
        "{done_log}"
    );
}
