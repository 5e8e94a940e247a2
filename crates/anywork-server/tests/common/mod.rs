//! Shared set-up of the server's end-to-end tests: the fake model, a real worker process, the
//! server in-process on SQLite, and a WebSocket client.

#![allow(dead_code)] // each test binary uses a part

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anywork_drivers::StaticDriver;
use anywork_runtime::{
    Backoff, Dispatcher, DispatcherBuilder, DispatcherConfig, FirstWords, TitleGenerator,
};
use anywork_server::{ApiOptions, AppState};
use anywork_store::SqliteStore;
use anywork_test::fake_llm::FakeLlm;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(20);

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The `anywork-worker` binary as a child process, with the native executor on the fake's
/// OpenAI-compatible API.
pub struct WorkerProcess {
    pub url: String,
    pub child: tokio::process::Child,
    _dir: Option<tempfile::TempDir>,
}

impl WorkerProcess {
    pub async fn start(fake: &FakeLlm) -> WorkerProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Self::start_in(fake, dir.path()).await;
        w._dir = Some(dir);
        w
    }

    pub async fn start_in(fake: &FakeLlm, workspace: &Path) -> WorkerProcess {
        Self::start_with_env(fake, workspace, &[]).await
    }

    /// A worker with extra environment variables (e.g. `SSE_KEEP_ALIVE_SECONDS`).
    pub async fn start_with_env(
        fake: &FakeLlm,
        workspace: &Path,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let port = free_port();
        let child = tokio::process::Command::new(anywork_test::bins::worker_bin())
            .env_clear()
            .envs(env.iter().copied())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", workspace)
            .env("WORKER_HOST", "127.0.0.1")
            .env("WORKER_PORT", port.to_string())
            .env("WORKSPACE_DIR", workspace)
            .env("EXECUTOR", "native")
            .env("API_KEY", "test-key")
            .env("API_BASE_URL", format!("{}/v1", fake.url()))
            .env("MODEL", "fake-model")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start anywork-worker");
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy(&format!("{url}/health")).await;
        WorkerProcess {
            url,
            child,
            _dir: None,
        }
    }
}

pub async fn wait_healthy(url: &str) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not become healthy");
}

/// The server in-process: SQLite in a temp dir, the static driver to `worker_url`.
pub struct TestServer {
    pub url: String,
    pub state: AppState,
    pub http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What a [`TestServer::start_full`] is made of besides its worker.
#[derive(Default)]
pub struct Setup {
    pub config: DispatcherConfig,
    pub channels: Vec<Arc<dyn anywork_core::Channel>>,
    /// The SQLite directory (kept by the caller, e.g. to restart on it); a temp dir if `None`.
    pub db_dir: Option<std::path::PathBuf>,
    pub push_secret: Option<String>,
    pub options: ApiOptions,
    /// The store (and the folder it lives in, removed with the server); SQLite in `db_dir` or
    /// a temp dir if `None`.
    pub store: Option<(tempfile::TempDir, Arc<dyn anywork_core::TaskStore>)>,
    /// Anything else on the dispatcher's builder (skills, …), applied last.
    pub customize: Option<Box<dyn FnOnce(DispatcherBuilder) -> DispatcherBuilder + Send>>,
}

impl TestServer {
    pub async fn start(worker_url: &str) -> TestServer {
        Self::start_with(worker_url, DispatcherConfig::default(), FirstWords).await
    }

    pub async fn start_with(
        worker_url: &str,
        config: DispatcherConfig,
        titles: impl TitleGenerator,
    ) -> TestServer {
        let setup = Setup {
            config,
            ..Setup::default()
        };
        Self::start_full(worker_url, setup, titles).await
    }

    /// A server with its own API options (token, limits, CORS origins).
    pub async fn start_with_options(
        worker_url: &str,
        config: DispatcherConfig,
        titles: impl TitleGenerator,
        options: ApiOptions,
    ) -> TestServer {
        let setup = Setup {
            config,
            options,
            ..Setup::default()
        };
        Self::start_full(worker_url, setup, titles).await
    }

    /// The server with the dispatcher's builder set up by `customize` (skills, …).
    pub async fn start_custom(
        worker_url: &str,
        customize: impl FnOnce(DispatcherBuilder) -> DispatcherBuilder + Send + 'static,
    ) -> TestServer {
        let setup = Setup {
            customize: Some(Box::new(customize)),
            ..Setup::default()
        };
        Self::start_full(worker_url, setup, FirstWords).await
    }

    /// The server over `store` (kept in `dir`, removed with the server).
    pub async fn start_on(
        dir: tempfile::TempDir,
        store: Arc<dyn anywork_core::TaskStore>,
        worker_url: &str,
        config: DispatcherConfig,
        titles: impl TitleGenerator,
    ) -> TestServer {
        let setup = Setup {
            config,
            store: Some((dir, store)),
            ..Setup::default()
        };
        Self::start_full(worker_url, setup, titles).await
    }

    /// A server with channels, a store directory, a push secret and API options of choice.
    pub async fn start_full(
        worker_url: &str,
        setup: Setup,
        titles: impl TitleGenerator,
    ) -> TestServer {
        let (dir, store): (Option<tempfile::TempDir>, Arc<dyn anywork_core::TaskStore>) =
            match (setup.store, setup.db_dir) {
                (Some((d, s)), _) => (Some(d), s),
                (None, Some(p)) => (None, Arc::new(SqliteStore::open_in_dir(&p).await.unwrap())),
                (None, None) => {
                    let d = tempfile::tempdir().unwrap();
                    let s = SqliteStore::open_in_dir(d.path()).await.unwrap();
                    (Some(d), Arc::new(s))
                }
            };
        let driver = Arc::new(StaticDriver::new(worker_url).unwrap());
        let mut builder = Dispatcher::builder(store, driver)
            .config(setup.config)
            .titles(titles);
        for c in setup.channels {
            builder = builder.channel(c);
        }
        if let Some(secret) = setup.push_secret {
            builder = builder.push_signing_secret(secret);
        }
        if let Some(customize) = setup.customize {
            builder = customize(builder);
        }
        let dispatcher = builder.start().await.unwrap();
        let mut options = setup.options;
        if options.setup.is_empty() {
            options.setup = dispatcher.check_setup().await;
        }
        let state = AppState::new(dispatcher, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(anywork_server::serve(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        TestServer {
            url,
            state,
            http: reqwest::Client::new(),
            _dir: dir,
            stop: Some(stop),
        }
    }

    /// A server whose static worker URL has nobody listening, retrying the driver per `retry`.
    pub async fn without_worker(retry: Backoff) -> TestServer {
        let mut config = DispatcherConfig::default();
        config.retry = retry;
        let url = format!("http://127.0.0.1:{}", free_port());
        Self::start_with(&url, config, FirstWords).await
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        self.state.dispatcher()
    }

    pub async fn ws(&self) -> Ws {
        Ws::connect(&self.url).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Polls the task until its status is final; returns it.
    pub async fn wait_final(&self, task_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, task) = self.get(&format!("/api/tasks/{task_id}")).await;
            if matches!(
                task["status"].as_str(),
                Some("completed" | "failed" | "canceled")
            ) {
                return task;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {task_id} never ended: {task}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// All logs of a task.
    pub async fn logs(&self, task_id: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/api/tasks/{task_id}/logs?after=0&limit=500"))
            .await;
        assert_eq!(status, 200, "{body}");
        body["logs"].as_array().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A WebSocket client of `/ws`.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(http_url: &str) -> Ws {
        let url = format!("{}/ws", http_url.replacen("http://", "ws://", 1));
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect /ws");
        Ws { stream }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    /// The next JSON message (panics after [`WAIT`]).
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a WebSocket message in time")
                .expect("the socket is open")
                .expect("a good frame");
            if let Message::Text(t) = msg {
                return serde_json::from_str(&t).unwrap();
            }
        }
    }

    /// Messages up to and including the first for which `stop` holds.
    pub async fn recv_until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.recv().await;
            let end = stop(&v);
            out.push(v);
            if end {
                return out;
            }
        }
    }

    /// Sends a chat; returns (session_id, task_id) from `task_created`, and whatever came before.
    pub async fn chat(
        &mut self,
        session: Option<&str>,
        message: &str,
    ) -> (String, String, Vec<Value>) {
        let mut m = json!({"type": "chat", "message": message});
        if let Some(s) = session {
            m["session_id"] = json!(s);
        }
        self.send(m).await;
        let got = self
            .recv_until(|v| v["type"] == "task_created" || v["type"] == "error")
            .await;
        let last = got.last().unwrap().clone();
        assert_eq!(last["type"], "task_created", "chat refused: {got:?}");
        (
            last["session_id"].as_str().unwrap().to_owned(),
            last["task_id"].as_str().unwrap().to_owned(),
            got,
        )
    }

    /// The events of `task` up to its `done`.
    pub async fn events_until_done(&mut self, task: &str) -> Vec<Value> {
        let all = self
            .recv_until(|v| v["type"] == "done" && v["task_id"] == task)
            .await;
        all.into_iter().filter(|v| v["task_id"] == task).collect()
    }
}
