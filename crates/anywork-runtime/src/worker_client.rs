//! [`WorkerClient`]: the server's side of the worker HTTP API (`anywork_core::worker_api`).

use std::pin::Pin;
use std::time::Duration;

use anywork_core::worker_api::{
    CANCEL_PATH, CHAT_PATH, CancelRequest, ChatRequest, INPUT_PATH, InputAnswer, PREPARE_PATH,
    PrepareRequest,
};
use anywork_core::{Error, ErrorKind, Result, SessionId, TaskEvent, WireEvent, WorkerEndpoint};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;

/// The events of one `/chat`, in order. Ends after `done`, or with an error if the worker's
/// stream breaks.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<TaskEvent>> + Send>>;

/// Talks to workers. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    control_timeout: Duration,
}

impl WorkerClient {
    /// A client whose control calls (`/prepare`, `/cancel`, `/input`, reads) give up after
    /// `control_timeout`; `/chat` streams have no overall timeout (the dispatcher has one).
    pub fn new(control_timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            control_timeout,
        })
    }

    /// `POST /prepare`.
    pub async fn prepare(&self, worker: &WorkerEndpoint, request: &PrepareRequest) -> Result<()> {
        self.post(worker, PREPARE_PATH, request).await.map(drop)
    }

    /// `POST /chat`: the worker's SSE stream of task events.
    pub async fn chat(&self, worker: &WorkerEndpoint, request: &ChatRequest) -> Result<ChatStream> {
        let url = format!("{}{CHAT_PATH}", worker.base_url);
        let response = self
            .http
            .post(&url)
            .json(request)
            .send()
            .await
            .map_err(|e| transport_error(worker, CHAT_PATH, e))?;
        let response = check(worker, CHAT_PATH, response).await?;
        let worker_id = worker.worker_id.clone();
        let stream = response
            .bytes_stream()
            .eventsource()
            .filter_map(move |item| {
                let worker_id = worker_id.clone();
                async move {
                    match item {
                        Ok(ev) if ev.data.is_empty() => None,
                        Ok(ev) => Some(
                            serde_json::from_str::<WireEvent>(&ev.data)
                                .map_err(Error::from)
                                .and_then(TaskEvent::try_from)
                                .map_err(|e| {
                                    Error::new(
                                        ErrorKind::Protocol,
                                        format!(
                                            "worker {worker_id} sent an event that is not a task \
                                             event: {}",
                                            e.message()
                                        ),
                                    )
                                }),
                        ),
                        Err(e) => Some(Err(Error::unavailable(format!(
                            "the connection to worker {worker_id} broke: {e}"
                        )))),
                    }
                }
            });
        Ok(Box::pin(stream))
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
    pub async fn messages(&self, worker: &WorkerEndpoint, session: &SessionId) -> Result<Value> {
        let path = format!("/sessions/{}/messages", session.as_str());
        self.get(worker, &path).await
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
        let path = format!("/workspace/{file}");
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .put(&url)
            .timeout(self.control_timeout)
            .json(&serde_json::json!({ "content": content }))
            .send()
            .await
            .map_err(|e| transport_error(worker, &path, e))?;
        json_body(worker, &path, check(worker, &path, response).await?).await
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
        let path = session_doc_path(file, session);
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .put(&url)
            .timeout(self.control_timeout)
            .json(&serde_json::json!({ "content": content }))
            .send()
            .await
            .map_err(|e| transport_error(worker, &path, e))?;
        json_body(worker, &path, check(worker, &path, response).await?).await
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
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .put(&url)
            .timeout(FILE_TIMEOUT)
            .body(bytes)
            .send()
            .await
            .map_err(|e| transport_error(worker, &path, e))?;
        json_body(worker, &path, check(worker, &path, response).await?).await
    }

    async fn get_bytes(&self, worker: &WorkerEndpoint, path: &str) -> Result<Vec<u8>> {
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .get(&url)
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

    async fn get(&self, worker: &WorkerEndpoint, path: &str) -> Result<Value> {
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .get(&url)
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
        let url = format!("{}{path}", worker.base_url);
        let response = self
            .http
            .post(&url)
            .timeout(self.control_timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| transport_error(worker, path, e))?;
        check(worker, path, response).await
    }
}

fn transport_error(worker: &WorkerEndpoint, path: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Unavailable
    };
    Error::new(
        kind,
        format!("worker {} did not answer {path}: {e}", worker.worker_id),
    )
}

/// Turns a non-2xx answer into an error of the matching kind, with the worker's message.
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
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(300).collect());
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
        format!(
            "worker {} answered {path} with {status}: {message}",
            worker.worker_id
        ),
    ))
}

async fn json_body(
    worker: &WorkerEndpoint,
    path: &str,
    response: reqwest::Response,
) -> Result<Value> {
    response.json().await.map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!(
                "worker {} answered {path} with bad JSON: {e}",
                worker.worker_id
            ),
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
