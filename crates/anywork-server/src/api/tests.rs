//! Router tests without sockets: the REST surface, its errors and CORS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::{
    Channel, ContainerDriver, Error, ErrorKind, Inbound, InboundRequest, Result, SessionId, Task,
    TaskOutcome, TaskRequest, WorkerEndpoint, WorkerInfo,
};
use anywork_drivers::StaticDriver;
use anywork_store::MemoryStore;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ApiOptions, AppState, router};
use anywork_runtime::{Backoff, Dispatcher, DispatcherConfig};

/// A channel for the webhook route: `x-secret: s` or 401; body `skip` is skipped.
#[derive(Default)]
struct TestChannel {
    delivered: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Channel for TestChannel {
    fn channel_type(&self) -> &str {
        "test"
    }

    async fn parse(&self, request: InboundRequest) -> Result<Inbound> {
        if request.header("x-secret") != Some("s") {
            return Err(Error::new(ErrorKind::Unauthorized, "bad secret"));
        }
        let body = String::from_utf8(request.body)
            .map_err(|_| Error::invalid_input("the body is not UTF-8"))?;
        if body == "skip" {
            return Ok(Inbound::Skip {
                reason: "asked to skip".into(),
            });
        }
        let mut task = TaskRequest::new("whatever", body.clone());
        task.channel_key = Some("thread-1".into());
        // What a webhook sender may ask for: a callback URL, its own MCP command.
        if let Some(url) = body.strip_prefix("callback ") {
            let mut push = anywork_core::PushNotification::new(url);
            push.authorization = Some("Bearer x".into());
            task.push_notification = Some(push);
        }
        if body == "mcp-command" {
            task.mcp_servers.insert(
                "evil".into(),
                anywork_core::McpServerConfig::Stdio {
                    command: "sh".into(),
                    args: vec!["-c".into(), "id".into()],
                    env: Default::default(),
                },
            );
        }
        Ok(Inbound::Task(Box::new(task)))
    }

    async fn deliver(&self, task: &Task, _outcome: &TaskOutcome) -> Result<()> {
        self.delivered.lock().unwrap().push(task.id.to_string());
        Ok(())
    }
}

async fn app_with(options: ApiOptions) -> (axum::Router, AppState) {
    app_over(silent_driver(), options).await
}

/// The static driver to a worker that never answers (a free port nobody listens on): tasks
/// stay pending while the driver is retried.
fn silent_driver() -> Arc<dyn ContainerDriver> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Arc::new(StaticDriver::new(&format!("http://127.0.0.1:{port}")).unwrap())
}

async fn app_over(
    driver: Arc<dyn ContainerDriver>,
    options: ApiOptions,
) -> (axum::Router, AppState) {
    app_on(Arc::new(MemoryStore::new()), driver, options).await
}

async fn app_on(
    store: Arc<dyn anywork_core::TaskStore>,
    driver: Arc<dyn ContainerDriver>,
    options: ApiOptions,
) -> (axum::Router, AppState) {
    let mut config = DispatcherConfig::default();
    config.retry = Backoff::new(1000, Duration::from_millis(200), Duration::from_millis(200));
    let dispatcher = Dispatcher::builder(store, driver)
        .config(config)
        .channel(Arc::new(TestChannel::default()))
        .start()
        .await
        .unwrap();
    let state = AppState::new(dispatcher, options);
    (router(state.clone()), state)
}

async fn app() -> axum::Router {
    app_with(ApiOptions::default()).await.0
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = to_bytes(res.into_body(), 1 << 20).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes))),
    )
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let app = app().await;
    let (s, b) = call(&app, Method::GET, "/api/health", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "ok");
    assert_eq!(b["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(b["driver"], "static");
    let (s, b) = call(&app, Method::GET, "/api/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&b, "not_found");
    let (s, b) = call(&app, Method::DELETE, "/api/health", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&b, "invalid_input");
}

#[tokio::test]
async fn sessions_crud_and_errors() {
    let app = app().await;
    let (s, created) = call(&app, Method::POST, "/api/sessions", None).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(created["title"], "New Chat");
    assert_eq!(created["channel_type"], "webchat");
    assert!(
        created["created_at"].as_i64().unwrap() > 1_600_000_000,
        "unix seconds"
    );
    let id = created["id"].as_str().unwrap();
    let (s, named) = call(
        &app,
        Method::POST,
        "/api/sessions",
        Some(r#"{"title":"Plans","channelType":"api"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(named["title"], "Plans");
    assert_eq!(named["channel_type"], "api");

    let (s, b) = call(
        &app,
        Method::PATCH,
        &format!("/api/sessions/{id}"),
        Some(r#"{"title":"Renamed"}"#),
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"success": true})));
    let (_, b) = call(&app, Method::GET, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(b["title"], "Renamed");
    let (_, list) = call(&app, Method::GET, "/api/sessions?limit=10", None).await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(list["sessions"][0]["task_count"], 0);

    // Bad input: clear errors, nothing changed.
    let (s, b) = call(
        &app,
        Method::PATCH,
        &format!("/api/sessions/{id}"),
        Some(r#"{"title":""}"#),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "invalid_input");
    let (s, _) = call(
        &app,
        Method::PATCH,
        &format!("/api/sessions/{id}"),
        Some(r#"{"title":"x","extra":1}"#),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = call(&app, Method::POST, "/api/sessions", Some("{not json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b) = call(
        &app,
        Method::PATCH,
        "/api/sessions/unknown",
        Some(r#"{"title":"x"}"#),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "unlike the original, an unknown session is not a success"
    );
    assert_error(&b, "not_found");
    let long = "x".repeat(200);
    let (s, _) = call(&app, Method::GET, &format!("/api/sessions/{long}"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, _) = call(&app, Method::DELETE, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, Method::DELETE, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &app,
        Method::GET,
        &format!("/api/sessions/{id}/tasks"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// `GET /api/sessions?q=`: titles containing the text, case ignored, `%` literal, paged past
/// the first page; a too long text is a 400.
#[tokio::test]
async fn sessions_are_searched_by_title() {
    let app = app().await;
    for i in 0..60 {
        let title = match i % 3 {
            0 => format!("Quarterly report {i}"),
            1 => format!("Groceries {i}"),
            _ => format!("100% REPORT {i}"),
        };
        let (s, _) = call(
            &app,
            Method::POST,
            "/api/sessions",
            Some(&json!({ "title": title }).to_string()),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let titles = |b: &Value| -> Vec<String> {
        b["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["title"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, b) = call(&app, Method::GET, "/api/sessions?q=RePoRt&limit=500", None).await;
    assert_eq!(s, StatusCode::OK);
    let found = titles(&b);
    assert_eq!(found.len(), 40);
    assert!(found.iter().all(|t| t.to_lowercase().contains("report")));
    assert_eq!(b["sessions"][0]["task_count"], 0, "rows as in the list");

    // Paged like the list: the second page holds what the first (default 50) did not.
    let (_, first) = call(&app, Method::GET, "/api/sessions?q=report&limit=30", None).await;
    let (_, second) = call(
        &app,
        Method::GET,
        "/api/sessions?q=report&limit=30&offset=30",
        None,
    )
    .await;
    let mut paged = titles(&first);
    paged.extend(titles(&second));
    assert_eq!(paged, found);

    // % is text, not a wildcard (URL-encoded as %25).
    let (_, b) = call(&app, Method::GET, "/api/sessions?q=0%25%20rep", None).await;
    assert_eq!(titles(&b).len(), 20);
    let (_, b) = call(&app, Method::GET, "/api/sessions?q=gro%25ies", None).await;
    assert!(titles(&b).is_empty());
    // An empty (or blank) q is the plain list.
    let (_, b) = call(&app, Method::GET, "/api/sessions?q=%20&limit=500", None).await;
    assert_eq!(titles(&b).len(), 60);

    let long = "a".repeat(501);
    let (s, b) = call(&app, Method::GET, &format!("/api/sessions?q={long}"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&b, "invalid_input");
    let (s, _) = call(&app, Method::GET, "/api/sessions?q=x&limit=nope", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// `GET /api/usage`: cost and tokens of every task of every session, and the counts.
#[tokio::test]
async fn usage_totals_sum_all_sessions() {
    use anywork_core::{NewSession, NewTask, TaskChange, TaskStatus, TaskStore};
    let store = Arc::new(MemoryStore::new());
    let driver = silent_driver();
    let (app, _) = app_on(store.clone(), driver, ApiOptions::default()).await;

    let (s, b) = call(&app, Method::GET, "/api/usage", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["tasks"], 0);
    assert_eq!(b["costUsd"], 0.0);

    // Two sessions with a finished task each, as a run leaves them.
    for (n, cost, input) in [(1u64, 0.25, 100u64), (2, 0.5, 1000)] {
        let session = store
            .create_session(NewSession::new("webchat"))
            .await
            .unwrap();
        let task = store
            .create_task(NewTask::from_request(
                session.id,
                TaskRequest::new("webchat", format!("task {n}")),
            ))
            .await
            .unwrap();
        store
            .update_task(
                task.id,
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running),
            )
            .await
            .unwrap();
        let mut outcome = TaskOutcome::completed("ok");
        outcome.cost_usd = Some(cost);
        outcome.usage.input_tokens = input;
        outcome.usage.output_tokens = n;
        store
            .update_task(task.id, TaskStatus::Running, TaskChange::finish(outcome))
            .await
            .unwrap();
    }
    let (s, b) = call(&app, Method::GET, "/api/usage", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["sessions"], 2);
    assert_eq!(b["tasks"], 2);
    assert_eq!(b["costUsd"], 0.75);
    assert_eq!(b["usage"]["input_tokens"], 1100);
    assert_eq!(b["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn tasks_submit_read_cancel_and_errors() {
    let app = app().await;
    let (s, b) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"  "}"#),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["error"]["message"].as_str().unwrap().contains("message"));
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"mesage":"typo"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, b) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"hi","session_id":"nope"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&b, "not_found");
    let (s, _) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"hi","skills":[{"name":"../x","content":"y"}]}"#),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "path traversal in a skill name is refused"
    );

    let (s, created) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"hi"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{created}");
    let id = created["taskId"].as_str().unwrap();
    let (s, task) = call(&app, Method::GET, &format!("/api/tasks/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(task["status"], "pending");
    assert_eq!(task["channelType"], "api");
    assert_eq!(task["message"], "hi");
    let (_, logs) = call(&app, Method::GET, &format!("/api/tasks/{id}/logs"), None).await;
    assert_eq!(logs, json!({"logs": [], "hasMore": false, "next": 0}));

    let (s, task) = call(&app, Method::POST, &format!("/api/tasks/{id}/cancel"), None).await;
    assert_eq!(s, StatusCode::OK, "{task}");
    assert_eq!(task["status"], "canceled");
    let (s, b) = call(&app, Method::POST, &format!("/api/tasks/{id}/cancel"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(
        b["error"]["message"],
        "Cannot cancel task in status: canceled"
    );
    let (_, logs) = call(
        &app,
        Method::GET,
        &format!("/api/tasks/{id}/logs?after=0&limit=1"),
        None,
    )
    .await;
    assert_eq!(
        logs["logs"][0]["seq"], 1,
        "seq starts at 1 and after=0 includes it"
    );
    assert_eq!(logs["logs"][0]["type"], "done");
    let (s, _) = call(
        &app,
        Method::POST,
        &format!("/api/tasks/{id}/input"),
        Some(r#"{"request_id":"r","answer":"a"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "not waiting for input");

    let unknown = anywork_core::TaskId::generate();
    let (s, _) = call(&app, Method::GET, &format!("/api/tasks/{unknown}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &app,
        Method::GET,
        &format!("/api/tasks/{unknown}/logs"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, Method::GET, "/api/tasks/not-a-uuid", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = call(
        &app,
        Method::GET,
        &format!("/api/tasks/{id}/logs?after=-1"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn channel_webhook_routes_verifies_and_skips() {
    let app = app().await;
    let webhook = |secret: &'static str, body: &'static str| {
        Request::builder()
            .method(Method::POST)
            .uri("/api/channel/test/webhook")
            .header("x-secret", secret)
            .body(Body::from(body))
            .unwrap()
    };
    let res = app.clone().oneshot(webhook("wrong", "hi")).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app.clone().oneshot(webhook("s", "skip")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&to_bytes(res.into_body(), 1 << 16).await.unwrap()).unwrap();
    assert_eq!(body["skipped"], true);
    let res = app.clone().oneshot(webhook("s", "do it")).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let first: Value =
        serde_json::from_slice(&to_bytes(res.into_body(), 1 << 16).await.unwrap()).unwrap();
    let res = app.clone().oneshot(webhook("s", "again")).await.unwrap();
    let second: Value =
        serde_json::from_slice(&to_bytes(res.into_body(), 1 << 16).await.unwrap()).unwrap();
    assert_eq!(
        first["sessionId"], second["sessionId"],
        "the channel key finds the session again"
    );
    let (_, task) = call(
        &app,
        Method::GET,
        &format!("/api/tasks/{}", first["taskId"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(task["channelType"], "test", "the route's type wins");
    let (s, b) = call(&app, Method::POST, "/api/channel/slack/webhook", Some("{}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&b, "not_found");
    // A sender's callback URL and MCP servers pass the same rules as an API caller's.
    for (body, needle) in [
        ("callback https://169.254.169.254/latest", "link-local"),
        ("callback http://hooks.example/x", "plain http"),
        ("mcp-command", "may not start a command"),
    ] {
        let res = app.clone().oneshot(webhook("s", body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value =
            serde_json::from_slice(&to_bytes(res.into_body(), 1 << 16).await.unwrap()).unwrap();
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{body}: {answer}"
        );
    }
}

#[tokio::test]
async fn every_documented_route_exists_and_metrics_render() {
    let app = app().await;
    let (s, doc) = call(&app, Method::GET, "/api/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in super::openapi::documented_paths() {
        let uri = path
            .replace("{id}", "00000000-0000-7000-8000-000000000000")
            .replace("{type}", "nope")
            .replace("{file}", "nope")
            .replace("{path}", "notes.txt");
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        let (_, b) = call(&app, method.clone(), &uri, Some("{}")).await;
        assert_ne!(
            b["error"]["message"],
            format!("no route for {method} {uri}"),
            "{method} {path} is documented but not routed"
        );
        assert!(doc["paths"][path][method.as_str().to_ascii_lowercase()].is_object());
    }
    // The WebSocket messages are described too.
    assert!(
        doc["paths"]["/ws"]["get"].is_object(),
        "{}",
        doc["paths"]["/ws"]
    );
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["WsClientMessage"]["oneOf"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert!(
        schemas["WsServerMessage"]["oneOf"]
            .as_array()
            .unwrap()
            .len()
            >= 5
    );
    assert!(schemas["CreateTask"]["properties"]["sessionId"].is_object());
    let (s, text) = call(&app, Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap();
    assert!(
        text.contains(
            "anywork_http_requests_total{method=\"GET\",route=\"/api/openapi.json\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(text.contains("anywork_tasks_submitted_total 0"), "{text}");
    assert!(text.contains("anywork_queue_depth 0"));
    let (s, b) = call(&app, Method::GET, "/api/workspace/secrets", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&b, "not_found");
}

#[tokio::test]
async fn cors_answers_configured_origins_only() {
    let options = ApiOptions {
        cors_origins: vec!["http://app.example".into()],
        ..ApiOptions::default()
    };
    let (app, _) = app_with(options).await;
    let preflight = |origin: &'static str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/api/tasks")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let res = app
        .clone()
        .oneshot(preflight("http://app.example"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let res = app
        .clone()
        .oneshot(preflight("http://evil.example"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/api/health")
                .header("origin", "http://app.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://app.example"
    );
}

/// A driver that has no worker to give and records which sessions were released and purged.
#[derive(Default)]
struct RecordingDriver {
    released: Mutex<Vec<SessionId>>,
    purged: Mutex<Vec<SessionId>>,
    fail_purge: bool,
}

#[async_trait::async_trait]
impl ContainerDriver for RecordingDriver {
    fn name(&self) -> &str {
        "recording"
    }

    async fn get_worker(&self, _session_id: &SessionId) -> Result<WorkerEndpoint> {
        Err(Error::new(
            ErrorKind::Unavailable,
            "no workers in this test",
        ))
    }

    async fn release(&self, session_id: &SessionId) -> Result<()> {
        self.released.lock().unwrap().push(session_id.clone());
        Ok(())
    }

    async fn purge(&self, session_id: &SessionId) -> Result<()> {
        self.purged.lock().unwrap().push(session_id.clone());
        if self.fail_purge {
            return Err(Error::new(ErrorKind::Unavailable, "the engine is down"));
        }
        Ok(())
    }

    async fn is_healthy(&self, _endpoint: &WorkerEndpoint) -> bool {
        false
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn deleting_a_session_purges_its_worker_and_workspace() {
    let driver = Arc::new(RecordingDriver::default());
    let (app, _) = app_over(driver.clone(), ApiOptions::default()).await;
    // A session with a task still pending (no worker to run it).
    let (s, created) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"hi"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{created}");
    let id = created["sessionId"].as_str().unwrap();
    let (_, other) = call(&app, Method::POST, "/api/sessions", None).await;
    let other = other["id"].as_str().unwrap();

    let (s, b) = call(&app, Method::DELETE, &format!("/api/sessions/{id}"), None).await;
    assert_eq!((s, b), (StatusCode::OK, json!({"success": true})));
    assert_eq!(
        *driver.purged.lock().unwrap(),
        vec![SessionId::new(id).unwrap()],
        "the deleted session is purged, not merely released"
    );
    assert!(driver.released.lock().unwrap().is_empty());

    // An unknown (or already deleted) session: 404, and nothing is purged.
    let (s, _) = call(&app, Method::DELETE, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(driver.purged.lock().unwrap().len(), 1);
    let (s, _) = call(&app, Method::GET, &format!("/api/sessions/{other}"), None).await;
    assert_eq!(s, StatusCode::OK, "other sessions are untouched");
}

#[tokio::test]
async fn a_failed_purge_does_not_undo_the_deletion() {
    let driver = Arc::new(RecordingDriver {
        fail_purge: true,
        ..RecordingDriver::default()
    });
    let (app, _) = app_over(driver.clone(), ApiOptions::default()).await;
    let (_, created) = call(&app, Method::POST, "/api/sessions", None).await;
    let id = created["id"].as_str().unwrap();
    let (s, _) = call(&app, Method::DELETE, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "the session is deleted; the driver only logs"
    );
    assert_eq!(driver.purged.lock().unwrap().len(), 1);
    let (s, _) = call(&app, Method::GET, &format!("/api/sessions/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Issue 15, item 8: hostile query values and sizes answer JSON errors, never a panic or an
/// empty or plain-text body.
#[tokio::test]
async fn huge_waits_bodies_and_uris_answer_json() {
    let options = ApiOptions {
        max_body_bytes: 1024,
        channel_max_body_bytes: 1024,
        max_wait: Duration::from_millis(50),
        ..ApiOptions::default()
    };
    let (app, state) = app_with(options).await;
    let task = state
        .dispatcher()
        .submit(TaskRequest::new("api", "hi"))
        .await
        .unwrap()
        .task;
    // Far past what a `Duration` holds: clamped to the longest wait, not a panic.
    for wait in ["1e20", "1e308", "18446744073709551616", "inf", "-5", "NaN"] {
        let uri = format!("/api/tasks/{}/logs?after=0&wait={wait}", task.id);
        let (s, b) = call(&app, Method::GET, &uri, None).await;
        assert!(
            s == StatusCode::OK || s == StatusCode::BAD_REQUEST,
            "{wait}: {s} {b}"
        );
        if s == StatusCode::BAD_REQUEST {
            assert_error(&b, "invalid_input");
        }
    }
    // 413 from the routes that take the raw body, as JSON naming the limit.
    let big = "x".repeat(4096);
    for uri in ["/api/sessions", "/api/channel/test/webhook"] {
        let (s, b) = call(&app, Method::POST, uri, Some(&big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{uri}: {b}");
        assert_error(&b, "invalid_input");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("1024"),
            "{b}"
        );
    }
    // 414 as JSON.
    let long = format!(
        "/api/sessions?x={}",
        "y".repeat(anywork_http::MAX_URI_BYTES)
    );
    let (s, b) = call(&app, Method::GET, &long, None).await;
    assert_eq!(s, StatusCode::URI_TOO_LONG, "{b}");
    assert_error(&b, "invalid_input");
}

/// Issue 15, item 1: health is a readiness check — 503 with the reason while the server is
/// shutting down (or its store cannot write), 200 otherwise.
#[tokio::test]
async fn health_is_503_with_the_reason_when_not_ready() {
    let (app, state) = app_with(ApiOptions::default()).await;
    let (s, b) = call(&app, Method::GET, "/api/health", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    state.dispatcher().shutdown(Duration::ZERO).await;
    let (s, b) = call(&app, Method::GET, "/api/health", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["status"], "unavailable");
    assert_error(&b, "unavailable");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{b}"
    );
    // Liveness is not readiness: the process still answers.
    let (s, b) = call(&app, Method::GET, "/api/health/live", None).await;
    assert_eq!((s, &b["ok"]), (StatusCode::OK, &json!(true)), "{b}");
}

/// A title made without I/O (first words, the default) goes into the new session's row in the
/// same write: the session has it as soon as the task is accepted, and nothing sets it later
/// (one write fewer per new session; `set_session_title` fails here if anything calls it).
#[tokio::test]
async fn a_first_words_title_is_stored_with_the_new_session() {
    let store = anywork_test::faulty_store::FaultyStore::new(Arc::new(MemoryStore::new()));
    store.down_for_ops(&["set_session_title"], Duration::from_secs(3600));
    let driver = silent_driver();
    let (app, _state) = app_on(store.clone(), driver, ApiOptions::default()).await;
    let (s, created) = call(
        &app,
        Method::POST,
        "/api/tasks",
        Some(r#"{"message":"Please say hello to me"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{created}");
    let session = created["sessionId"].as_str().unwrap();
    let (_, got) = call(&app, Method::GET, &format!("/api/sessions/{session}"), None).await;
    assert_eq!(got["title"], "Please say hello to me", "{got}");
    // Room for a title task, had one been spawned, to run (and fail on the injected outage).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.injected(),
        0,
        "the title was set again after creation"
    );
}
