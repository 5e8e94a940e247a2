//! [`WorkerClient`]: the server's side of the worker HTTP API (`anywork_core::worker_api`).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::worker_api::{
    ATTACH_PATH, CANCEL_PATH, CHAT_PATH, CancelRequest, ChatRequest, INPUT_PATH, InputAnswer,
    NOT_PREPARED_STATUS, PREPARE_KEY_HEADER, PREPARE_PATH, PrepareReply, PrepareRequest,
    SECRET_HEADER,
};
use anywork_core::{
    Error, ErrorKind, Result, SessionId, TaskEvent, TaskOutcome, WireEvent, WorkerEndpoint,
};
use futures_util::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use serde::Serialize;
use serde_json::Value;

/// The events of one `/chat`, in order. Ends after `done`, or with an error if the worker's
/// stream breaks.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<TaskEvent>> + Send>>;

/// Talks to workers, each call carrying the endpoint's secret ([`SECRET_HEADER`]) when it has
/// one. Cheap to clone (one connection pool, one record of prepared sessions).
#[derive(Debug, Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    control_timeout: Duration,
    stream_idle_timeout: Duration,
    /// The prepare key each worker acknowledged last, by session and worker URL.
    prepared: Arc<Mutex<PreparedKeys>>,
    /// The URLs of the per-task routes (`/prepare`, `/chat`) by worker URL, parsed once: a
    /// parse is ≈ 6k instructions, and reqwest parses a string URL on every request.
    routes: Arc<Mutex<Routes>>,
    /// hyper's client, for the per-task routes of plain-HTTP workers ([`Self::post_direct`]);
    /// `None` when the environment names a proxy (reqwest's client, which uses it, does them).
    direct: Option<Direct>,
}

/// hyper's pooled HTTP/1 client under reqwest, used directly for the per-task calls
/// (`/prepare`, `/chat`) to plain-HTTP workers: reqwest parses each request's URL twice more
/// (its redirect policy and its pending request, ≈ 6k instructions each) and goes through
/// its retry and redirect layers, ≈ 50k instructions per task in all (docs/benchmarks.md,
/// "Session 14: per-task CPU"). The same connection settings as reqwest's client.
type Direct = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// Whether the environment names a proxy that reqwest would send a plain-HTTP request
/// through (its system proxy settings).
fn proxy_in_env() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Parsed route URLs by worker URL.
type Routes = HashMap<String, Vec<Route>>;

/// A per-task route of a worker, parsed once.
#[derive(Debug, Clone)]
struct Route {
    path: &'static str,
    url: reqwest::Url,
    /// Its `Host` header.
    host: Option<HeaderValue>,
    /// The URL as hyper takes it, for a plain-HTTP worker.
    uri: Option<http::Uri>,
}

/// The `Host` header hyper's client would make of `url` (the host, and the port when it is
/// not the scheme's default), made once per worker and route: hyper makes it with a
/// `format!` on every request that has none.
fn host_header(url: &reqwest::Url) -> Option<HeaderValue> {
    let host = url.host_str()?;
    let value = match url.port() {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")),
        None => HeaderValue::from_str(host),
    };
    value.ok()
}

/// Sessions whose prepare key is remembered at most; past it the record starts over (a
/// forgotten session costs one `/prepare`).
const PREPARED_KEPT: usize = 100_000;

/// Worker URLs remembered per session at most; past it the oldest is forgotten (a session
/// moves to another worker when its container is replaced).
const PREPARED_WORKERS_PER_SESSION: usize = 4;

/// The prepare key each worker acknowledged last for a session: by session, then by worker
/// URL (a session has one worker, rarely a few). Looked up by borrowed ids: the checks made
/// for every task (twice, plus the forget before each `/prepare`) copy no string, as a map
/// keyed by the pair `(URL, session)` made them do.
#[derive(Debug, Default)]
struct PreparedKeys {
    sessions: HashMap<SessionId, Vec<(String, String)>>,
}

impl PreparedKeys {
    /// The key `worker_url` acknowledged last for `session`.
    fn get(&self, session: &SessionId, worker_url: &str) -> Option<&str> {
        self.sessions
            .get(session)?
            .iter()
            .find(|(url, _)| url == worker_url)
            .map(|(_, key)| key.as_str())
    }

    /// Remembers `key` as what `worker_url` acknowledged for `session`.
    fn insert(&mut self, session: &SessionId, worker_url: &str, key: String) {
        if let Some(workers) = self.sessions.get_mut(session) {
            match workers.iter_mut().find(|(url, _)| url == worker_url) {
                Some((_, kept)) => *kept = key,
                None => {
                    if workers.len() >= PREPARED_WORKERS_PER_SESSION {
                        workers.remove(0);
                    }
                    workers.push((worker_url.to_owned(), key));
                }
            }
            return;
        }
        if self.sessions.len() >= PREPARED_KEPT {
            self.sessions.clear();
        }
        self.sessions
            .insert(session.clone(), vec![(worker_url.to_owned(), key)]);
    }

    /// Forgets what `worker_url` acknowledged for `session`.
    fn remove(&mut self, session: &SessionId, worker_url: &str) {
        let Some(workers) = self.sessions.get_mut(session) else {
            return;
        };
        workers.retain(|(url, _)| url != worker_url);
        if workers.is_empty() {
            self.sessions.remove(session);
        }
    }
}

/// A `/prepare` encoded once, with its key ([`PREPARE_KEY_HEADER`]) when it may be left out
/// while unchanged: a request that checks out a repository is sent before every task (the
/// checkout is refreshed each time).
#[derive(Debug, Clone)]
pub struct PreparedBody {
    session: SessionId,
    body: bytes::Bytes,
    key: Option<String>,
}

impl PreparedBody {
    /// `request`, encoded.
    pub fn new(request: &PrepareRequest) -> Result<Self> {
        let body = serde_json::to_vec(request)
            .map_err(|e| Error::internal(format!("cannot encode /prepare: {e}")))?;
        let key = request.repository.is_none().then(|| {
            // Only compared with what this process sent: a hash of the bytes sent is enough.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            body.hash(&mut h);
            format!("{:016x}-{:x}", h.finish(), body.len())
        });
        Ok(Self {
            session: request.session_id.clone(),
            body: body.into(),
            key,
        })
    }

    /// The key, when the request may be left out while unchanged.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// How a `/chat` began.
pub enum ChatStart {
    /// The worker took it: its events.
    Started(ChatStream),
    /// The worker refused it: the session is not prepared as the chat's prepare key says
    /// (the worker restarted, or another worker answers at that address now).
    NotPrepared,
}

fn lock_routes<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Inserts only: consistent even after a panic.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Idle connections kept to one worker address.
const MAX_IDLE_CONNECTIONS_PER_WORKER: usize = 256;

/// How long a connection to a worker stays open unused. Each keeps the buffers its `/chat`
/// streams grew (≈ 50 KiB): 256 of them held ≈ 13 MiB after a 10,000-session burst on SQLite
/// (≈ 6 MiB on PostgreSQL) until they closed, a minute after their last use at 60 s
/// (docs/benchmarks.md, "Memory after the connections close"). A busy server reuses its
/// connections long before this; after a lull the next task opens a new one.
const WORKER_POOL_IDLE: Duration = Duration::from_secs(15);

impl WorkerClient {
    /// A client whose control calls (`/prepare`, `/cancel`, `/input`, reads) give up after
    /// `control_timeout`; `/chat` streams have no overall timeout (the dispatcher has one).
    pub fn new(control_timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(WORKER_POOL_IDLE)
            // One shared worker may have taken a thousand `/chat`s at once: keep enough idle
            // connections for the next round of a busy server, not all of them (each holds
            // buffers and a descriptor on both sides for the idle timeout).
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS_PER_WORKER)
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        let direct = (!proxy_in_env()).then(|| {
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(Duration::from_secs(5)));
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(WORKER_POOL_IDLE)
                .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS_PER_WORKER)
                .build(connector)
        });
        Ok(Self {
            http,
            control_timeout,
            stream_idle_timeout: Duration::from_secs(60),
            prepared: Arc::default(),
            routes: Arc::default(),
            direct,
        })
    }

    /// A `/chat` stream that sends nothing for `idle` (no event and no keep-alive comment,
    /// which workers send every 15 s) ends with a `Timeout` error: the worker is hung or the
    /// connection stalled. Default 60 s.
    pub fn with_stream_idle_timeout(mut self, idle: Duration) -> Self {
        self.stream_idle_timeout = idle.max(Duration::from_millis(10));
        self
    }

    /// `POST /prepare`.
    pub async fn prepare(&self, worker: &WorkerEndpoint, request: &PrepareRequest) -> Result<()> {
        self.prepare_body(worker, &PreparedBody::new(request)?)
            .await
    }

    /// `POST /prepare` of an encoded request, with its key; the key is remembered for the
    /// worker and session when the worker answers it back (this worker API's workers do;
    /// older and original ones do not, and get every `/prepare`).
    pub async fn prepare_body(
        &self,
        worker: &WorkerEndpoint,
        prepared: &PreparedBody,
    ) -> Result<()> {
        // Unknown until the worker says, whatever happens to this call.
        self.lock_prepared()
            .remove(&prepared.session, &worker.base_url);
        let deadline = tokio::time::Instant::now() + self.control_timeout;
        let key = prepared.key.as_deref();
        let response = match self.post_direct(worker, PREPARE_PATH, prepared.body.clone(), key) {
            // reqwest's timeout covers the whole call, the answer's body included.
            Some(sent) => {
                let response = tokio::time::timeout_at(deadline, sent)
                    .await
                    .map_err(|_| timed_out(worker, PREPARE_PATH))??;
                tokio::time::timeout_at(deadline, check(worker, PREPARE_PATH, response))
                    .await
                    .map_err(|_| timed_out(worker, PREPARE_PATH))??
            }
            None => {
                let mut request = self
                    .route(worker, PREPARE_PATH)
                    .timeout(self.control_timeout)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(prepared.body.clone());
                if let Some(key) = key {
                    request = request.header(PREPARE_KEY_HEADER, key);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| transport_error(worker, PREPARE_PATH, e))?;
                check(worker, PREPARE_PATH, response).await?
            }
        };
        // The answer only matters for its key: anything else is an answer without one.
        let reply = tokio::time::timeout_at(deadline, response.bytes())
            .await
            .ok()
            .and_then(|r| r.ok());
        let acknowledged = reply
            .and_then(|b| serde_json::from_slice::<PrepareReply>(&b).ok())
            .and_then(|r| r.prepared);
        if let Some(key) = acknowledged
            && prepared.key.as_ref() == Some(&key)
        {
            self.lock_prepared()
                .insert(&prepared.session, &worker.base_url, key);
        }
        Ok(())
    }

    /// Whether `worker` acknowledged `prepared`'s key last for its session: then `/prepare`
    /// may be left out and the chat sent with [`chat_prepared`](Self::chat_prepared).
    pub fn is_prepared(&self, worker: &WorkerEndpoint, prepared: &PreparedBody) -> bool {
        let Some(key) = &prepared.key else {
            return false;
        };
        self.lock_prepared()
            .get(&prepared.session, &worker.base_url)
            .is_some_and(|k| k == key.as_str())
    }

    /// Forgets what `worker` acknowledged for `session` (it refused a chat as unprepared).
    pub fn forget_prepared(&self, worker: &WorkerEndpoint, session: &SessionId) {
        self.lock_prepared().remove(session, &worker.base_url);
    }

    fn lock_prepared(&self) -> std::sync::MutexGuard<'_, PreparedKeys> {
        // One insert or remove at a time: consistent even after a panic.
        self.prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `POST /chat`: the worker's SSE stream of task events.
    ///
    /// Workers that speak the original AnyWork's protocol are understood too: their events
    /// carry their type only on the SSE `event:` line (`data: {"content", "metadata"}`), their
    /// `done` has `{result, cost_usd, num_turns, duration_ms}`, and a failed run sends an
    /// `error` and then either nothing or a `done` with empty metadata; such a run ends here
    /// with a failed `done` carrying the error.
    pub async fn chat(&self, worker: &WorkerEndpoint, request: &ChatRequest) -> Result<ChatStream> {
        match self.chat_prepared(worker, request, None).await? {
            ChatStart::Started(stream) => Ok(stream),
            ChatStart::NotPrepared => Err(Error::new(
                ErrorKind::Protocol,
                "the worker refused a chat as unprepared though it was sent no prepare key",
            )),
        }
    }

    /// [`chat`](Self::chat) that asks the worker to refuse it unless the session's workspace
    /// is as the `/prepare` of `prepare_key` left it ([`ChatStart::NotPrepared`]).
    pub async fn chat_prepared(
        &self,
        worker: &WorkerEndpoint,
        request: &ChatRequest,
        prepare_key: Option<&str>,
    ) -> Result<ChatStart> {
        let body = serde_json::to_vec(request)
            .map_err(|e| Error::internal(format!("cannot encode /chat: {e}")))?;
        let response = match self.post_direct(worker, CHAT_PATH, body.into(), prepare_key) {
            Some(sent) => sent.await?,
            None => {
                let mut builder = self.route(worker, CHAT_PATH).json(request);
                if let Some(key) = prepare_key {
                    builder = builder.header(PREPARE_KEY_HEADER, key);
                }
                builder
                    .send()
                    .await
                    .map_err(|e| transport_error(worker, CHAT_PATH, e))?
            }
        };
        if prepare_key.is_some() && response.status().as_u16() == NOT_PREPARED_STATUS {
            tracing::debug!(worker = %worker.worker_id, session = %request.session_id, "the worker has the session unprepared; preparing it again");
            self.forget_prepared(worker, &request.session_id);
            return Ok(ChatStart::NotPrepared);
        }
        let response = check(worker, CHAT_PATH, response).await?;
        Ok(ChatStart::Started(self.events_of(worker, response)))
    }

    /// `GET /chat/attach`: the events of a task the worker still runs (or ran lately) after
    /// its seq `after` (the worker's count of events, `done` excluded), for a server that lost
    /// the `/chat` stream. `NotFound` when the worker does not have the task.
    pub async fn attach(
        &self,
        worker: &WorkerEndpoint,
        task_id: anywork_core::TaskId,
        after: u64,
    ) -> Result<ChatStream> {
        let path = format!("{ATTACH_PATH}?task_id={task_id}&after_seq={after}");
        let response = self
            .request(reqwest::Method::GET, worker, &path)
            .send()
            .await
            .map_err(|e| transport_error(worker, ATTACH_PATH, e))?;
        let response = check(worker, ATTACH_PATH, response).await?;
        Ok(self.events_of(worker, response))
    }

    /// The task events of a worker's SSE answer; silence past the idle timeout ends them with
    /// a `Timeout` error.
    fn events_of(&self, worker: &WorkerEndpoint, response: reqwest::Response) -> ChatStream {
        struct State<S> {
            bytes: Pin<Box<S>>,
            reader: SseReader,
            ready: VecDeque<SseEvent>,
            adapter: OriginalAdapter,
            over: bool,
            worker_id: String,
            idle: Duration,
        }
        let state = State {
            bytes: Box::pin(response.bytes_stream()),
            reader: SseReader::default(),
            ready: VecDeque::new(),
            adapter: OriginalAdapter::default(),
            over: false,
            worker_id: worker.worker_id.clone(),
            idle: self.stream_idle_timeout,
        };
        let stream = futures_util::stream::unfold(state, |mut s| async move {
            if s.over {
                return None;
            }
            loop {
                if let Some(ev) = s.ready.pop_front() {
                    if ev.data.is_empty() {
                        continue;
                    }
                    let item = s.adapter.event(&ev.event, &ev.data).map_err(|e| {
                        tracing::warn!(worker = %s.worker_id, error = %e, data = %ev.data.chars().take(300).collect::<String>(), "the worker sent an event that is not a task event");
                        Error::new(
                            ErrorKind::Protocol,
                            format!("the worker sent an event that is not a task event: {}", e.message()),
                        )
                    });
                    s.over = item.is_err();
                    return Some((item, s));
                }
                // Every chunk, keep-alive comments included, proves the worker alive.
                let err = match tokio::time::timeout(s.idle, s.bytes.next()).await {
                    Ok(Some(Ok(chunk))) => match s.reader.feed(&chunk, &mut s.ready) {
                        Ok(()) => continue,
                        Err(e) => {
                            tracing::warn!(worker = %s.worker_id, error = %e, "the worker's stream is not UTF-8");
                            Error::new(
                                ErrorKind::Protocol,
                                "the worker sent an event that is not a task event: its text is not UTF-8",
                            )
                        }
                    },
                    Ok(Some(Err(e))) => {
                        tracing::warn!(worker = %s.worker_id, error = %e, "the connection to the worker broke");
                        Error::unavailable("the connection to the worker broke")
                    }
                    Ok(None) => {
                        s.over = true;
                        return s.adapter.finish().map(|done| (Ok(done), s));
                    }
                    Err(_) => {
                        tracing::warn!(worker = %s.worker_id, "the worker's stream went silent");
                        Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "the worker sent nothing for {} s, not even a keep-alive: it \
                                 is hung or the connection to it stalled \
                                 (STREAM_IDLE_TIMEOUT_SECONDS)",
                                s.idle.as_secs_f64()
                            ),
                        )
                    }
                };
                s.over = true;
                return Some((Err(err), s));
            }
        });
        Box::pin(stream)
    }

    /// `POST /cancel`.
    pub async fn cancel(&self, worker: &WorkerEndpoint, request: &CancelRequest) -> Result<()> {
        self.post(worker, CANCEL_PATH, request).await.map(drop)
    }

    /// `POST /input`.
    pub async fn input(&self, worker: &WorkerEndpoint, answer: &InputAnswer) -> Result<()> {
        self.post(worker, INPUT_PATH, answer).await.map(drop)
    }

    /// `GET /sessions/:id/messages`: the conversation as the worker keeps it.
    /// A worker of the original AnyWork has it at `GET /sessions/:id`, asked when this path is
    /// missing.
    pub async fn messages(&self, worker: &WorkerEndpoint, session: &SessionId) -> Result<Value> {
        let path = format!("/sessions/{}/messages", session.as_str());
        match self.get(worker, &path).await {
            Err(e) if e.kind() == ErrorKind::Protocol => {
                self.get(worker, &format!("/sessions/{}", session.as_str()))
                    .await
            }
            other => other,
        }
    }

    /// `GET /workspace/:file` (`soul` or `agents`).
    pub async fn get_doc(&self, worker: &WorkerEndpoint, file: &str) -> Result<Value> {
        self.get(worker, &format!("/workspace/{file}")).await
    }

    /// `PUT /workspace/:file` with `{content}`.
    pub async fn put_doc(
        &self,
        worker: &WorkerEndpoint,
        file: &str,
        content: &str,
    ) -> Result<Value> {
        self.put_content(worker, &format!("/workspace/{file}"), content)
            .await
    }

    /// `GET /workspace/:file?session_id=` — the session's copy.
    pub async fn get_session_doc(
        &self,
        worker: &WorkerEndpoint,
        file: &str,
        session: &SessionId,
    ) -> Result<Value> {
        self.get(worker, &session_doc_path(file, session)).await
    }

    /// `PUT /workspace/:file?session_id=` with `{content}` — the session's copy.
    pub async fn put_session_doc(
        &self,
        worker: &WorkerEndpoint,
        file: &str,
        session: &SessionId,
        content: &str,
    ) -> Result<Value> {
        self.put_content(worker, &session_doc_path(file, session), content)
            .await
    }

    /// `PUT path` with `{content}`, answered with JSON.
    async fn put_content(
        &self,
        worker: &WorkerEndpoint,
        path: &str,
        content: &str,
    ) -> Result<Value> {
        let response = self
            .request(reqwest::Method::PUT, worker, path)
            .timeout(self.control_timeout)
            .json(&serde_json::json!({ "content": content }))
            .send()
            .await
            .map_err(|e| transport_error(worker, path, e))?;
        json_body(worker, path, check(worker, path, response).await?).await
    }

    /// `GET /sessions/:id/files`: the session's `files/` listing.
    pub async fn list_files(&self, worker: &WorkerEndpoint, session: &SessionId) -> Result<Value> {
        self.get(
            worker,
            &format!("/sessions/{}/files", encode(session.as_str())),
        )
        .await
    }

    /// `GET /sessions/:id/files/*path`: one file's bytes (`path` relative to `files/`).
    pub async fn read_file(
        &self,
        worker: &WorkerEndpoint,
        session: &SessionId,
        path: &str,
    ) -> Result<Vec<u8>> {
        let path = format!(
            "/sessions/{}/files/{}",
            encode(session.as_str()),
            encode_path(path)
        );
        self.get_bytes(worker, &path).await
    }

    /// `GET /sessions/:id/files.zip`: the session's `files/` as a zip.
    pub async fn zip_files(&self, worker: &WorkerEndpoint, session: &SessionId) -> Result<Vec<u8>> {
        let path = format!("/sessions/{}/files.zip", encode(session.as_str()));
        self.get_bytes(worker, &path).await
    }

    /// `PUT /sessions/:id/files/*path` with the file's bytes.
    pub async fn write_file(
        &self,
        worker: &WorkerEndpoint,
        session: &SessionId,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<Value> {
        let path = format!(
            "/sessions/{}/files/{}",
            encode(session.as_str()),
            encode_path(path)
        );
        let response = self
            .request(reqwest::Method::PUT, worker, &path)
            .timeout(FILE_TIMEOUT)
            .body(bytes)
            .send()
            .await
            .map_err(|e| transport_error(worker, &path, e))?;
        json_body(worker, &path, check(worker, &path, response).await?).await
    }

    async fn get_bytes(&self, worker: &WorkerEndpoint, path: &str) -> Result<Vec<u8>> {
        let response = self
            .request(reqwest::Method::GET, worker, path)
            .timeout(FILE_TIMEOUT)
            .send()
            .await
            .map_err(|e| transport_error(worker, path, e))?;
        let response = check(worker, path, response).await?;
        response
            .bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| transport_error(worker, path, e))
    }

    /// A request to `path` of `worker`, with its secret.
    fn request(
        &self,
        method: reqwest::Method,
        worker: &WorkerEndpoint,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let builder = self
            .http
            .request(method, format!("{}{path}", worker.base_url));
        match &worker.secret {
            Some(secret) => builder.header(SECRET_HEADER, secret.expose()),
            None => builder,
        }
    }

    /// A `POST` to the per-task route `path` of `worker`, with its secret: the URL is the
    /// one [`request`](Self::request) makes, parsed once per worker and route.
    fn route(&self, worker: &WorkerEndpoint, path: &'static str) -> reqwest::RequestBuilder {
        // reqwest says what is wrong with a URL that does not parse.
        let Some(Route { url, host, .. }) = self.route_of(worker, path) else {
            return self.request(reqwest::Method::POST, worker, path);
        };
        let mut builder = self.http.post(url);
        if let Some(host) = host {
            builder = builder.header(reqwest::header::HOST, host);
        }
        match &worker.secret {
            Some(secret) => builder.header(SECRET_HEADER, secret.expose()),
            None => builder,
        }
    }

    /// The route `path` of `worker`, parsed once; `None` when its URL does not parse.
    fn route_of(&self, worker: &WorkerEndpoint, path: &'static str) -> Option<Route> {
        let kept = lock_routes(&self.routes)
            .get(worker.base_url.as_str())
            .and_then(|routes| routes.iter().find(|r| r.path == path))
            .cloned();
        if kept.is_some() {
            return kept;
        }
        let url = reqwest::Url::parse(&format!("{}{path}", worker.base_url)).ok()?;
        let route = Route {
            path,
            host: host_header(&url),
            uri: (url.scheme() == "http")
                .then(|| url.as_str().parse::<http::Uri>().ok())
                .flatten(),
            url,
        };
        let mut routes = lock_routes(&self.routes);
        if routes.len() >= PREPARED_KEPT {
            routes.clear();
        }
        routes
            .entry(worker.base_url.clone())
            .or_default()
            .push(route.clone());
        Some(route)
    }

    /// `POST` of the JSON `body` to the per-task route `path` of a plain-HTTP `worker`, with
    /// its secret and the prepare `key`, through hyper's client: the request reqwest's
    /// client sends (the same headers: `accept`, `content-type`, `host`, `content-length`),
    /// without its layers. `None` when this client does not serve the worker (HTTPS, a
    /// proxy in the environment, a URL that does not parse): reqwest's does then.
    fn post_direct(
        &self,
        worker: &WorkerEndpoint,
        path: &'static str,
        body: bytes::Bytes,
        key: Option<&str>,
    ) -> Option<impl std::future::Future<Output = Result<reqwest::Response>> + Send + 'static> {
        use reqwest::header;
        let direct = self.direct.as_ref()?;
        let route = self.route_of(worker, path)?;
        let uri = route.uri?;
        let mut request = http::Request::new(http_body_util::Full::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(host) = route.host {
            headers.insert(header::HOST, host);
        }
        if let Some(secret) = &worker.secret {
            headers.insert(
                header::HeaderName::from_static(SECRET_HEADER),
                HeaderValue::from_str(secret.expose()).ok()?,
            );
        }
        if let Some(key) = key {
            headers.insert(
                header::HeaderName::from_static(PREPARE_KEY_HEADER),
                HeaderValue::from_str(key).ok()?,
            );
        }
        let sent = direct.request(request);
        let (worker_id, url) = (worker.worker_id.clone(), route.url);
        Some(async move {
            let response = sent.await.map_err(|e| {
                tracing::warn!(worker = %worker_id, path, error = %e, "a worker call failed");
                let what = if e.is_connect() {
                    "could not be reached"
                } else {
                    "broke the connection"
                };
                Error::new(
                    ErrorKind::Unavailable,
                    format!("the worker {what} ({path})"),
                )
            })?;
            // As a reqwest response (with its URL, which it would parse again otherwise), so
            // that it is read as reqwest's are.
            use reqwest::ResponseBuilderExt as _;
            let (parts, body) = response.into_parts();
            let mut response = http::Response::builder()
                .status(parts.status)
                .version(parts.version)
                .url(url)
                .body(reqwest::Body::wrap(body))
                .map_err(|e| Error::internal(format!("a worker's answer: {e}")))?;
            *response.headers_mut() = parts.headers;
            Ok(reqwest::Response::from(response))
        })
    }

    async fn get(&self, worker: &WorkerEndpoint, path: &str) -> Result<Value> {
        let response = self
            .request(reqwest::Method::GET, worker, path)
            .timeout(self.control_timeout)
            .send()
            .await
            .map_err(|e| transport_error(worker, path, e))?;
        json_body(worker, path, check(worker, path, response).await?).await
    }

    async fn post<T: Serialize + ?Sized>(
        &self,
        worker: &WorkerEndpoint,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response> {
        let response = self
            .request(reqwest::Method::POST, worker, path)
            .timeout(self.control_timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| transport_error(worker, path, e))?;
        check(worker, path, response).await
    }
}

/// What a client may see of a failed request to a worker: what failed, never where (the
/// worker's address goes to the server log only).
fn transport_error(worker: &WorkerEndpoint, path: &str, e: reqwest::Error) -> Error {
    tracing::warn!(worker = %worker.worker_id, path, error = %e, "a worker call failed");
    let (kind, what) = if e.is_timeout() {
        (ErrorKind::Timeout, "did not answer in time")
    } else if e.is_connect() {
        (ErrorKind::Unavailable, "could not be reached")
    } else {
        (ErrorKind::Unavailable, "broke the connection")
    };
    Error::new(kind, format!("the worker {what} ({path})"))
}

/// A per-task call that took longer than the control timeout, as [`transport_error`] tells
/// reqwest's.
fn timed_out(worker: &WorkerEndpoint, path: &str) -> Error {
    tracing::warn!(worker = %worker.worker_id, path, "a worker call timed out");
    Error::new(
        ErrorKind::Timeout,
        format!("the worker did not answer in time ({path})"),
    )
}

/// Turns a non-2xx answer into an error of the matching kind, with the worker's message. A
/// route the worker does not have (404 without this worker API's JSON error, or 405) is a
/// `Protocol` error: the worker is another kind or version, not the thing asked for missing.
async fn check(
    worker: &WorkerEndpoint,
    path: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let json = serde_json::from_str::<Value>(&body).ok();
    let api_message = json
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let message = api_message
        .clone()
        .or_else(|| {
            json.as_ref()
                .and_then(|v| v.get("error").or_else(|| v.get("detail")))
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
        })
        .unwrap_or_else(|| body.chars().take(300).collect());
    tracing::warn!(worker = %worker.worker_id, path, %status, %message, "a worker call was refused");
    let missing_route = (status.as_u16() == 404
        && api_message
            .as_deref()
            .is_none_or(|m| m.starts_with("no route for")))
        || status.as_u16() == 405;
    if missing_route {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "the worker has no {path} (it answered {status}): it is another kind or version \
                 of worker; run anywork-worker {} for this to work",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    let kind = match status.as_u16() {
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        400 | 413 | 415 | 422 => ErrorKind::InvalidInput,
        429 => ErrorKind::RateLimited,
        502..=504 => ErrorKind::Unavailable,
        _ => ErrorKind::Protocol,
    };
    Err(Error::new(
        kind,
        format!("the worker answered {path} with {status}: {message}"),
    ))
}

async fn json_body(
    worker: &WorkerEndpoint,
    path: &str,
    response: reqwest::Response,
) -> Result<Value> {
    response.json().await.map_err(|e| {
        tracing::warn!(worker = %worker.worker_id, path, error = %e, "a worker answered bad JSON");
        Error::new(
            ErrorKind::Protocol,
            format!("the worker answered {path} with something that is not the expected JSON"),
        )
    })
}

/// How long a file transfer with a worker may take.
const FILE_TIMEOUT: Duration = Duration::from_secs(120);

/// `s` percent-encoded for a URL path segment or query value.
fn encode(s: &str) -> String {
    let mut encoded = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// A `/`-separated path, each segment percent-encoded.
fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// `/workspace/:file?session_id=…`, the session id percent-encoded.
fn session_doc_path(file: &str, session: &SessionId) -> String {
    format!("/workspace/{file}?session_id={}", encode(session.as_str()))
}

/// One event of a `text/event-stream`: its `event:` field (empty when absent) and its data.
#[derive(Debug, PartialEq)]
struct SseEvent {
    event: String,
    data: String,
}

/// Reads a worker's `text/event-stream` into events by the HTML spec's rules: lines end with
/// CRLF, LF or CR; `event` and `data` fields (one space after the colon dropped), comments
/// and other fields ignored; a blank line ends an event, which is dropped when it has no
/// data; a leading BOM is skipped; an event cut off by the end of the stream is dropped.
/// (What eventsource-stream did, without copying the rest of its buffer once per line.)
#[derive(Debug, Default)]
struct SseReader {
    /// The bytes of a line not ended yet.
    line: Vec<u8>,
    /// The `event` field of the event being read.
    event: String,
    /// Its data lines, each followed by LF.
    data: String,
    /// The last line ended with CR: an LF right after it ends nothing.
    after_cr: bool,
    /// Bytes came already (a BOM is skipped only at the start).
    started: bool,
}

/// The BOM a stream may start with.
const BOM: &[u8] = "\u{feff}".as_bytes();

impl SseReader {
    /// Takes in `chunk`, pushing the events it completes to `out`. An error for a line that
    /// is not UTF-8.
    fn feed(
        &mut self,
        mut chunk: &[u8],
        out: &mut VecDeque<SseEvent>,
    ) -> std::result::Result<(), std::str::Utf8Error> {
        if !self.started {
            // The BOM may come split over chunks: held until it is whole or cannot be one.
            self.line.extend_from_slice(chunk);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Ok(());
            }
            self.started = true;
            let start = std::mem::take(&mut self.line);
            return self.feed(start.strip_prefix(BOM).unwrap_or(&start), out);
        }
        while !chunk.is_empty() {
            if std::mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
                chunk = &chunk[1..];
                continue;
            }
            let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.line.extend_from_slice(chunk);
                break;
            };
            if self.line.is_empty() {
                self.take_line(&chunk[..end], out)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[..end]);
                let taken = self.take_line(&line, out);
                line.clear();
                self.line = line;
                taken?;
            }
            self.after_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
        }
        Ok(())
    }

    fn take_line(
        &mut self,
        line: &[u8],
        out: &mut VecDeque<SseEvent>,
    ) -> std::result::Result<(), std::str::Utf8Error> {
        if line.is_empty() {
            if self.data.is_empty() {
                self.event.clear();
            } else {
                self.data.pop();
                out.push_back(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = std::str::from_utf8(line)?;
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            _ => {}
        }
        Ok(())
    }
}

/// An SSE event's data as [`WireEvent`] reads it, with its `type` optional (the original
/// protocol puts it on the `event:` line).
#[derive(serde::Deserialize)]
struct RawEvent {
    /// Present means a string (`null` is an error, as for [`WireEvent`]).
    #[serde(rename = "type", default, deserialize_with = "some_string")]
    kind: Option<String>,
    #[serde(default)]
    content: String,
    #[serde(default = "empty_object")]
    metadata: Value,
}

fn some_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    <String as serde::Deserialize>::deserialize(d).map(Some)
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// Reads `/chat` events in this worker API's form and in the original AnyWork's (see
/// [`WorkerClient::chat`]).
#[derive(Debug, Default)]
struct OriginalAdapter {
    /// An event came without `type` in its data: the worker speaks the original protocol.
    original: bool,
    /// The last `error` event's text.
    last_error: Option<String>,
    /// A `done` came.
    done: bool,
}

impl OriginalAdapter {
    /// One SSE event: `kind` from its `event:` line (`message` when absent), `data` its data.
    /// The data is read straight into the event's parts (no JSON value of the whole object
    /// on the way): a JSON object with a string `type`, a string `content` and any
    /// `metadata`, as before; anything else is an error.
    fn event(&mut self, kind: &str, data: &str) -> Result<TaskEvent> {
        if !data.trim_start().starts_with('{') {
            // Also what a struct would take as a sequence (`["text","x",{}]`).
            serde_json::from_str::<serde::de::IgnoredAny>(data)?;
            return Err(Error::invalid_input("the data is not a JSON object"));
        }
        let raw: RawEvent = serde_json::from_str(data)?;
        let kind = match raw.kind {
            Some(kind) => kind,
            None => {
                if kind.is_empty() || kind == "message" {
                    return Err(Error::invalid_input(
                        "the event has no type: neither a `type` in its data nor an `event:` line",
                    ));
                }
                self.original = true;
                kind.to_owned()
            }
        };
        let original_done_without_result = self.original
            && kind == "done"
            && raw
                .metadata
                .as_object()
                .is_none_or(|m| !m.contains_key("result") && !m.contains_key("status"));
        let event = TaskEvent::try_from(WireEvent {
            kind,
            content: raw.content,
            metadata: raw.metadata,
        })?;
        match &event {
            TaskEvent::Error { message, .. } => self.last_error = Some(message.clone()),
            TaskEvent::Done(_) => self.done = true,
            _ => {}
        }
        if original_done_without_result && let Some(error) = &self.last_error {
            // The original's failed run: `error`, then a `done` with nothing in it.
            return Ok(TaskEvent::Done(TaskOutcome::failed(error.clone())));
        }
        Ok(event)
    }

    /// The `done` an original-protocol worker leaves out after a failed run (it sends only an
    /// `error`); `None` when the stream had its `done`, is not of the original protocol, or
    /// ended with no error (a stream cut short, which the run reports).
    fn finish(&mut self) -> Option<TaskEvent> {
        if self.done || !self.original {
            return None;
        }
        let error = self.last_error.clone()?;
        self.done = true;
        Some(TaskEvent::Done(TaskOutcome::failed(error)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anywork_core::TaskStatus;

    #[test]
    fn prepare_keys_are_kept_per_session_and_worker() {
        let (s1, s2) = (SessionId::new("s1").unwrap(), SessionId::new("s2").unwrap());
        let (a, b) = ("http://10.0.0.1:8080", "http://10.0.0.2:8080");
        let mut keys = PreparedKeys::default();
        assert_eq!(keys.get(&s1, a), None);
        keys.insert(&s1, a, "k1".to_owned());
        keys.insert(&s1, b, "k2".to_owned());
        keys.insert(&s2, a, "k3".to_owned());
        assert_eq!(keys.get(&s1, a), Some("k1"));
        assert_eq!(keys.get(&s1, b), Some("k2"));
        assert_eq!(keys.get(&s2, a), Some("k3"));
        assert_eq!(keys.get(&s2, b), None);
        // A newer key for the same pair replaces the old one.
        keys.insert(&s1, a, "k4".to_owned());
        assert_eq!(keys.get(&s1, a), Some("k4"));
        // Forgetting one pair leaves the session's other worker and the other session.
        keys.remove(&s1, a);
        assert_eq!(keys.get(&s1, a), None);
        assert_eq!(keys.get(&s1, b), Some("k2"));
        assert_eq!(keys.get(&s2, a), Some("k3"));
        keys.remove(&s1, b);
        assert!(
            !keys.sessions.contains_key(&s1),
            "an emptied session is dropped"
        );
        keys.remove(&s1, b);
        // A session that moves from worker to worker keeps only the latest few.
        let urls: Vec<String> = (0..PREPARED_WORKERS_PER_SESSION + 2)
            .map(|i| format!("http://10.0.1.{i}:8080"))
            .collect();
        for (i, url) in urls.iter().enumerate() {
            keys.insert(&s2, url, format!("key{i}"));
        }
        assert_eq!(keys.sessions[&s2].len(), PREPARED_WORKERS_PER_SESSION);
        assert_eq!(keys.get(&s2, a), None, "the oldest went first");
        let last = urls.len() - 1;
        assert_eq!(
            keys.get(&s2, &urls[last]),
            Some(format!("key{last}").as_str())
        );
    }

    /// The request heads a one-shot HTTP server got (each answered `200 {}`).
    async fn heads_of_requests(n: usize) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            while heads.len() < n {
                let (mut socket, _) = listener.accept().await.unwrap();
                // One request per connection is enough: each is answered with `close`.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let read = socket.read(&mut buf).await.unwrap();
                    assert!(read > 0, "the request ended before its head");
                    head.extend_from_slice(&buf[..read]);
                }
                heads.push(String::from_utf8(head).unwrap());
                socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                    .await
                    .unwrap();
            }
            heads
        });
        (url, server)
    }

    /// The `Host` lines of a request head.
    fn host_lines(head: &str) -> Vec<&str> {
        head.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("host:"))
            .collect()
    }

    /// A per-task route (`/prepare`) carries the `Host` header made once per worker: the one
    /// hyper makes for a request without it (a control call here), once.
    #[tokio::test]
    async fn a_route_request_carries_the_same_host_header_once() {
        let (url, server) = heads_of_requests(3).await;
        let client = WorkerClient::new(Duration::from_secs(5)).unwrap();
        let worker = WorkerEndpoint::new("w", url.clone());
        let prepare = PrepareRequest {
            session_id: SessionId::new("s1").unwrap(),
            skills: None,
            mcp_servers: None,
            soul: None,
            default_soul: None,
            default_agents: None,
            repository: None,
        };
        client.prepare(&worker, &prepare).await.unwrap();
        client.prepare(&worker, &prepare).await.unwrap();
        client.get_doc(&worker, "soul").await.unwrap();
        let heads = server.await.unwrap();
        let authority = url.trim_start_matches("http://");
        for head in &heads {
            assert_eq!(host_lines(head), [format!("host: {authority}")], "{head}");
        }
        assert!(heads[0].starts_with("POST /prepare "), "{}", heads[0]);
        assert!(heads[2].starts_with("GET /workspace/soul "), "{}", heads[2]);
    }

    /// The header lines of a request head (lower-cased), sorted, without its request line.
    fn header_set(head: &str) -> Vec<String> {
        let head = head.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines: Vec<String> = head
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        lines.sort();
        lines
    }

    /// `/prepare` and `/chat` through hyper's client (a plain-HTTP worker) send what reqwest's
    /// client sends for them: the same request line and headers (the secret, the prepare key,
    /// `content-type`, `accept`, `host`, `content-length`), the same body.
    #[tokio::test]
    async fn per_task_calls_send_what_reqwest_sends() {
        let (url, server) = heads_of_requests(4).await;
        let direct = WorkerClient::new(Duration::from_secs(5)).unwrap();
        assert!(direct.direct.is_some() || proxy_in_env());
        let through_reqwest = WorkerClient {
            direct: None,
            ..direct.clone()
        };
        let worker = WorkerEndpoint::new("w", url)
            .with_secret(Some(anywork_core::worker_api::WorkerSecret::generate()));
        let prepare = PreparedBody::new(&PrepareRequest {
            session_id: SessionId::new("s1").unwrap(),
            skills: None,
            mcp_servers: None,
            soul: Some("be brief".into()),
            default_soul: None,
            default_agents: None,
            repository: None,
        })
        .unwrap();
        let chat = ChatRequest {
            task_id: anywork_core::TaskId::generate(),
            session_id: SessionId::new("s1").unwrap(),
            message: "hi".into(),
        };
        for client in [&direct, &through_reqwest] {
            client.prepare_body(&worker, &prepare).await.unwrap();
            // The one-shot server answers `{}`, not an event stream: only the request matters.
            let _ = client.chat_prepared(&worker, &chat, prepare.key()).await;
        }
        let heads = server.await.unwrap();
        for (ours, theirs) in [(&heads[0], &heads[2]), (&heads[1], &heads[3])] {
            assert_eq!(ours.lines().next(), theirs.lines().next());
            assert_eq!(header_set(ours), header_set(theirs), "{ours}\n{theirs}");
        }
        assert!(
            heads[1]
                .to_ascii_lowercase()
                .contains("x-anywork-prepare-key: "),
            "{}",
            heads[1]
        );
        assert!(
            heads[0]
                .to_ascii_lowercase()
                .contains("x-anywork-worker-secret: "),
            "{}",
            heads[0]
        );
    }

    #[test]
    fn the_host_header_leaves_out_the_default_port() {
        let host = |u: &str| host_header(&reqwest::Url::parse(u).unwrap()).unwrap();
        assert_eq!(host("http://worker:80/chat"), "worker");
        assert_eq!(host("http://worker:8080/chat"), "worker:8080");
        assert_eq!(host("https://worker/chat"), "worker");
        assert_eq!(host("https://worker:8443/chat"), "worker:8443");
        assert_eq!(host("http://[::1]:9000/chat"), "[::1]:9000");
        assert_eq!(host("http://10.0.0.5:8080/chat"), "10.0.0.5:8080");
    }

    #[test]
    fn original_events_take_their_type_from_the_event_line() {
        let mut a = OriginalAdapter::default();
        assert_eq!(
            a.event("text", r#"{"content":"Hi","metadata":{}}"#)
                .unwrap(),
            TaskEvent::text("Hi")
        );
        let call = a
            .event(
                "tool_call",
                r#"{"content":"Bash","metadata":{"tool_id":"t1","input":{"command":"ls"}}}"#,
            )
            .unwrap();
        assert!(matches!(call, TaskEvent::ToolCall { ref name, .. } if name == "Bash"));
        let TaskEvent::Done(o) = a
            .event(
                "done",
                r#"{"content":"","metadata":{"result":"Hi","cost_usd":0.25,"num_turns":2,"duration_ms":1500}}"#,
            )
            .unwrap()
        else {
            panic!("not done")
        };
        assert_eq!(o.status, TaskStatus::Completed);
        assert_eq!(o.result.as_deref(), Some("Hi"));
        assert_eq!(
            (o.cost_usd, o.num_turns, o.duration_ms),
            (Some(0.25), 2, 1500)
        );
        assert_eq!(a.finish(), None);
    }

    #[test]
    fn an_original_failed_run_ends_failed_with_its_error() {
        // A non-success result: only an `error`, then the stream ends.
        let mut a = OriginalAdapter::default();
        a.event("error", r#"{"content":"max turns reached","metadata":{}}"#)
            .unwrap();
        let Some(TaskEvent::Done(o)) = a.finish() else {
            panic!("no done")
        };
        assert_eq!(o.status, TaskStatus::Failed);
        assert_eq!(o.error.as_deref(), Some("max turns reached"));
        // An exception: `error`, then a `done` with empty metadata.
        let mut a = OriginalAdapter::default();
        a.event("error", r#"{"content":"boom","metadata":{}}"#)
            .unwrap();
        let TaskEvent::Done(o) = a.event("done", r#"{"content":"","metadata":{}}"#).unwrap() else {
            panic!("not done")
        };
        assert_eq!(
            (o.status, o.error.as_deref()),
            (TaskStatus::Failed, Some("boom"))
        );
        assert_eq!(a.finish(), None);
        // Cut short without an error: no done made up here (the run says the worker was lost).
        let mut a = OriginalAdapter::default();
        a.event("text", r#"{"content":"half","metadata":{}}"#)
            .unwrap();
        assert_eq!(a.finish(), None);
    }

    /// `input` read by [`SseReader`] in chunks ending at `cuts`.
    fn sse_events(input: &[u8], cuts: &[usize]) -> Vec<(String, String)> {
        let mut reader = SseReader::default();
        let mut out = VecDeque::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&input.len()]) {
            reader.feed(&input[from..cut], &mut out).unwrap();
            from = cut;
        }
        out.into_iter().map(|e| (e.event, e.data)).collect()
    }

    /// `input` read by eventsource-stream in one chunk (the empty type as it names it).
    async fn library_events(input: &[u8]) -> Vec<(String, String)> {
        use eventsource_stream::Eventsource;
        // It panics on a BOM (it slices the 3-byte character at its byte 1): given without.
        let input = input.strip_prefix(BOM).unwrap_or(input);
        let chunks =
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(input.to_vec())]);
        chunks
            .eventsource()
            .map(|e| {
                let e = e.unwrap();
                let kind = if e.event == "message" {
                    String::new()
                } else {
                    e.event
                };
                (kind, e.data)
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn the_sse_reader_reads_as_eventsource_stream_did_in_any_chunks() {
        let streams: [&[u8]; 9] = [
            b"event: text\ndata: {\"content\":\"x\",\"metadata\":{}}\n\nevent: done\ndata: {}\n\n",
            b"data: {\"type\":\"text\",\"content\":\"h\xc3\xa9llo \xf0\x9f\xa6\x80\"}\n\n: keep-alive\n\n",
            "\u{feff}data: after a BOM\r\n\r\ndata:no space\rdata:  two spaces\r\r\n".as_bytes(),
            b"id: 7\nretry: 10\nevent: x\nunknown: y\ndata: a\ndata\ndata: b\n\n",
            b"event: lost\n\nevent: kept\ndata: 1\n\n",
            b"data: \n\n",
            b"data: cut off\n",
            b"data: cut off, no newline",
            b":only a comment\n\n\n\nevent:  sp\ndata:x:y\n\n",
        ];
        for input in streams {
            let whole = sse_events(input, &[]);
            let expected = library_events(input).await;
            // Events without data are skipped by the reader of the stream either way.
            let expected: Vec<_> = expected
                .into_iter()
                .filter(|(_, d)| !d.is_empty())
                .collect();
            let got: Vec<_> = whole
                .iter()
                .filter(|(_, d)| !d.is_empty())
                .cloned()
                .collect();
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(input));
            // Cut anywhere (inside a CRLF, a BOM or a character), the same events.
            for a in 0..=input.len() {
                for b in a..=input.len() {
                    assert_eq!(
                        sse_events(input, &[a, b]),
                        whole,
                        "{} cut at {a}, {b}",
                        String::from_utf8_lossy(input)
                    );
                }
            }
        }
        let mut reader = SseReader::default();
        assert!(
            reader
                .feed(b"data: \xff\xfe\n\n", &mut VecDeque::new())
                .is_err()
        );
    }

    /// How events were read before they were parsed straight into their parts: a JSON value
    /// first, then the wire event from it.
    fn read_as_before(kind: &str, data: &str) -> Option<TaskEvent> {
        let mut value: Value = serde_json::from_str(data).ok()?;
        let object = value.as_object_mut()?;
        if !object.contains_key("type") {
            if kind.is_empty() || kind == "message" {
                return None;
            }
            object.insert("type".into(), Value::String(kind.to_owned()));
        }
        let wire: WireEvent = serde_json::from_value(value).ok()?;
        TaskEvent::try_from(wire).ok()
    }

    #[test]
    fn events_are_read_and_encoded_as_before_byte_for_byte() {
        let cases = [
            (
                "message",
                r#"{"type":"text","content":"h\u00e9llo \"q\" \\ \u0000 \ud83e\udd80 \u202e</script>\n","metadata":{}}"#,
            ),
            (
                "message",
                "{\"type\":\"text\",\"content\":\"raw h\u{e9}llo \u{1F980}\"}",
            ),
            (
                "message",
                r#" {"metadata":{"z":1,"a":[1.5e300,null,"\t"]},"content":"Write","type":"tool_call"}"#,
            ),
            (
                "message",
                r#"{"type":"tool_call","content":"Bash","metadata":{"id":"t1","input":{"command":"ls"}}}"#,
            ),
            (
                "message",
                r#"{"type":"done","content":"The answer","metadata":{"status":"completed","cost_usd":0.01,"num_turns":2,"usage":{"input_tokens":7},"extra":"x"}}"#,
            ),
            (
                "message",
                r#"{"type":"percent_done","content":"50%","metadata":{"pct":50,"a":"b"}}"#,
            ),
            (
                "message",
                r#"{"type":"error","content":"boom","metadata":null,"unknown":[1,2]}"#,
            ),
            ("text", r#"{"content":"original \u00fc","metadata":{}}"#),
            ("message", r#"{"type":"text","content":"no metadata"}"#),
            // Refused both ways.
            ("message", r#"{"type":null,"content":"x"}"#),
            ("message", r#"{"type":5,"content":"x"}"#),
            ("message", r#"{"type":"text","content":null}"#),
            ("message", r#"["text","x",{}]"#),
            ("message", r#""text""#),
            ("message", "{\"type\":\"text\""),
            (
                "message",
                r#"{"type":"tool_result","content":"x","metadata":{"is_error":"no"}}"#,
            ),
        ];
        let mut read = 0;
        for (kind, data) in cases {
            let before = read_as_before(kind, data);
            let now = OriginalAdapter::default().event(kind, data).ok();
            assert_eq!(now, before, "{data}");
            if let (Some(now), Some(before)) = (now, before) {
                read += 1;
                // What the store and the WebSocket get: the same bytes.
                assert_eq!(
                    now.wire_json().unwrap(),
                    serde_json::to_string(&WireEvent::from(before)).unwrap(),
                    "{data}"
                );
            }
        }
        assert_eq!(read, 9);
    }

    #[test]
    fn this_workers_events_are_read_as_they_are() {
        let mut a = OriginalAdapter::default();
        let e = a
            .event("message", r#"{"type":"text","content":"x","metadata":{}}"#)
            .unwrap();
        assert_eq!(e, TaskEvent::text("x"));
        // Our worker's stream without a done is the run loop's business, not a failed done.
        assert_eq!(a.finish(), None);
        for bad in [r#"{"content":"x"}"#, "[1]", "not json"] {
            assert!(a.event("message", bad).is_err(), "{bad}");
        }
    }
}
