//! `/prepare` is sent only when what it carries changed for the worker (issue 16): the server
//! against a real worker API (in-process, its requests counted) whose state can be lost as a
//! restarted worker's is.

mod common;

use std::sync::{Arc, Mutex};

use anywork_core::{
    Execution, ExecutionControl, ExecutionRequest, Executor, InputResponse, TaskEvent, TaskOutcome,
};
use anywork_worker::{WorkerConfig, WorkerState};
use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use common::{TestServer, Ws};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Answers every run with one text and a completed `done`, after noting the skills its
/// workspace holds as the run starts.
#[derive(Default)]
struct SkillsSeen {
    runs: Mutex<Vec<Vec<String>>>,
}

struct NoControl;

#[async_trait::async_trait]
impl ExecutionControl for NoControl {
    async fn cancel(&self) -> anywork_core::Result<()> {
        Ok(())
    }

    async fn respond(&self, _: InputResponse) -> anywork_core::Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl Executor for SkillsSeen {
    fn name(&self) -> &str {
        "skills-seen"
    }

    async fn start(&self, request: ExecutionRequest) -> anywork_core::Result<Execution> {
        let mut seen: Vec<String> = std::fs::read_dir(request.workspace.join(".claude/skills"))
            .map(|dir| {
                dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        seen.sort();
        self.runs.lock().unwrap().push(seen);
        let events = futures_util::stream::iter([
            TaskEvent::text("ok"),
            TaskEvent::Done(TaskOutcome::completed("ok")),
        ]);
        Ok(Execution {
            events: Box::pin(events),
            control: Arc::new(NoControl),
        })
    }
}

/// The worker API over one workspace folder, served at a fixed address; [`restart`] replaces
/// its state by a fresh one over the same folder (what a restarted worker process has).
struct CountingWorker {
    url: String,
    app: Arc<Mutex<Router>>,
    requests: Arc<Mutex<Vec<String>>>,
    executor: Arc<SkillsSeen>,
    dir: tempfile::TempDir,
}

impl CountingWorker {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let executor = Arc::new(SkillsSeen::default());
        let app = Arc::new(Mutex::new(Self::app(dir.path(), &executor)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (app2, requests2) = (app.clone(), requests.clone());
        let front = Router::new().fallback(move |request: Request| {
            let (app, requests) = (app2.clone(), requests2.clone());
            async move {
                requests.lock().unwrap().push(format!(
                    "{} {}",
                    request.method(),
                    request.uri().path()
                ));
                let current = app.lock().unwrap().clone();
                let response: Response = current.oneshot(request).await.unwrap();
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, front).await });
        Self {
            url,
            app,
            requests,
            executor,
            dir,
        }
    }

    fn app(root: &std::path::Path, executor: &Arc<SkillsSeen>) -> Router {
        let state = WorkerState::new(WorkerConfig::new(root), executor.clone()).unwrap();
        anywork_worker::router(state)
    }

    /// A new worker state over the same workspace: what it remembered is gone.
    fn restart(&self) {
        *self.app.lock().unwrap() = Self::app(self.dir.path(), &self.executor);
    }

    /// How many requests came to `route` (e.g. `POST /prepare`).
    fn count(&self, route: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| *r == route)
            .count()
    }

    /// The skills the last run saw in its workspace.
    fn last_seen(&self) -> Vec<String> {
        self.executor.runs.lock().unwrap().last().unwrap().clone()
    }
}

/// A chat with `skills` in `session` (a new one when `None`), to its `done`; the session id.
async fn chat(ws: &mut Ws, session: Option<&str>, skills: &[&str]) -> String {
    let skills: Vec<Value> = skills
        .iter()
        .map(|name| json!({"name": name, "content": format!("---\nname: {name}\n---\n")}))
        .collect();
    let mut message = json!({"type": "chat", "message": "hi", "skills": skills});
    if let Some(s) = session {
        message["session_id"] = json!(s);
    }
    ws.send(message).await;
    let got = ws
        .recv_until(|v| v["type"] == "task_created" || v["type"] == "error")
        .await;
    let created = got.last().unwrap();
    assert_eq!(created["type"], "task_created", "{got:?}");
    let task = created["task_id"].as_str().unwrap();
    let done = ws.events_until_done(task).await.pop().unwrap();
    assert_eq!(done["metadata"]["status"], "completed", "{done}");
    created["session_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_is_sent_only_when_its_content_changed_or_the_worker_lost_it() {
    let worker = CountingWorker::start().await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;

    // The first task prepares; the next ones with the same skills do not.
    let session = chat(&mut ws, None, &["alpha", "beta"]).await;
    assert_eq!(worker.count("POST /prepare"), 1);
    assert_eq!(worker.last_seen(), ["alpha", "beta"]);
    for _ in 0..2 {
        chat(&mut ws, Some(&session), &["alpha", "beta"]).await;
    }
    assert_eq!(
        worker.count("POST /prepare"),
        1,
        "unchanged: not prepared again"
    );
    assert_eq!(worker.count("POST /chat"), 3);
    assert_eq!(worker.last_seen(), ["alpha", "beta"]);

    // Changed skills: prepared again; the new one is there and the old ones are gone.
    chat(&mut ws, Some(&session), &["gamma"]).await;
    assert_eq!(worker.count("POST /prepare"), 2);
    assert_eq!(worker.last_seen(), ["gamma"], "no stale skills");

    // Another session has its own state: prepared once too.
    let other = chat(&mut ws, None, &["gamma"]).await;
    assert_ne!(other, session);
    assert_eq!(worker.count("POST /prepare"), 3);

    // The worker restarts (its memory of prepared sessions is gone): the chat the server sends
    // without /prepare is refused, and it prepares and sends the chat again.
    worker.restart();
    chat(&mut ws, Some(&session), &["gamma"]).await;
    assert_eq!(worker.count("POST /prepare"), 4);
    assert_eq!(
        worker.count("POST /chat"),
        7,
        "one chat refused, then sent again"
    );
    assert_eq!(worker.last_seen(), ["gamma"]);
    chat(&mut ws, Some(&session), &["gamma"]).await;
    assert_eq!(worker.count("POST /prepare"), 4);

    // The workspace deleted on the worker: prepared again before the next chat.
    let url = format!("{}/sessions/{}", worker.url, session.replace('#', "%23"));
    let deleted = reqwest::Client::new().delete(url).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    chat(&mut ws, Some(&session), &["gamma"]).await;
    assert_eq!(worker.count("POST /prepare"), 5);
    assert_eq!(worker.last_seen(), ["gamma"]);

    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await;
    let text = metrics.unwrap().text().await.unwrap();
    for line in [
        "anywork_worker_prepares_total{result=\"sent\"} 5",
        "anywork_worker_prepares_total{result=\"skipped\"} 3",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
