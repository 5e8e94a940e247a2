//! A scriptable fake of the model APIs on loopback, which records every request.
//!
//! [`FakeLlm`] serves two wire formats on `127.0.0.1`:
//!
//! - `POST /v1/messages` (any query string, e.g. `?beta=true`): the Anthropic Messages API, as an SSE
//!   stream when the body has `"stream": true` and as one JSON message otherwise. The stream has the
//!   shape the real Claude Code CLI accepts (`message_start`, `ping`, per block
//!   `content_block_start`/`content_block_delta`/`content_block_stop`, `message_delta`, `message_stop`).
//! - `POST /v1/chat/completions`: OpenAI chat completions, streaming (`data: {..}` chunks, then
//!   `data: [DONE]`) or not.
//!
//! Any other path answers 404 with a JSON error. Every request, including those, is recorded as a
//! [`RecordedRequest`].
//!
//! Replies are scripted: a FIFO queue ([`FakeLlm::push`]) is used first, then an optional responder
//! closure ([`FakeLlm::set_responder`]), and otherwise a [`Reply`] with the text `ok`. One [`Reply`]
//! renders in either wire format, so the same script drives an Anthropic or an OpenAI client.
//!
//! Strings in a scripted reply (texts and every string inside a tool input) may contain `{cwd}`. It
//! is replaced with the working directory found in the request: the text after
//! `Primary working directory: ` (to the end of that line) in any string of `messages` (then of
//! `system`), which is where Claude Code puts it. Without a match the placeholder is left as is.
//!
//! The server runs on its own thread with its own Tokio runtime, so a test may block its own thread
//! (e.g. on `std::process::Command::output`) while the fake answers.
//!
//! ```no_run
//! # async fn demo() {
//! use anywork_test::fake_llm::{FakeLlm, Reply};
//! use serde_json::json;
//!
//! let fake = FakeLlm::start().await;
//! fake.push(Reply::tool_use(
//!     "toolu_1",
//!     "Write",
//!     json!({"file_path": "{cwd}/out.txt", "content": "hello"}),
//! ));
//! fake.push(Reply::text("done"));
//! // point the agent at fake.url() (ANTHROPIC_BASE_URL, or `{url}/v1` for OpenAI clients) ...
//! assert_eq!(fake.requests().len(), 2);
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// Path of the Anthropic Messages API.
pub const ANTHROPIC_MESSAGES_PATH: &str = "/v1/messages";
/// Path of OpenAI chat completions.
pub const OPENAI_CHAT_PATH: &str = "/v1/chat/completions";
/// The marker Claude Code puts before the working directory in its request.
pub const CWD_MARKER: &str = "Primary working directory: ";
/// How long the server waits for open connections after a shutdown before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Which wire format a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/messages`: the Anthropic Messages API.
    Anthropic,
    /// `POST /v1/chat/completions`: OpenAI chat completions.
    OpenAi,
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path with the query string, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// Headers by lowercased name; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON; [`Value::Null`] when it is empty or not JSON.
    pub body: Value,
    /// The body as text (lossy UTF-8).
    pub raw_body: String,
}

impl RecordedRequest {
    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }

    /// The query string without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// Which API was called, or `None` for an unknown path or a method other than `POST`.
    pub fn api(&self) -> Option<Api> {
        if self.method != "POST" {
            return None;
        }
        match self.path_only() {
            ANTHROPIC_MESSAGES_PATH => Some(Api::Anthropic),
            OPENAI_CHAT_PATH => Some(Api::OpenAi),
            _ => None,
        }
    }

    /// A header's value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body's `model`.
    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    /// Whether the body asked for a stream (`"stream": true`).
    pub fn is_stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool) == Some(true)
    }

    /// The body's `messages` (empty if missing).
    pub fn messages(&self) -> &[Value] {
        self.body
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The body's `tools` (empty if missing).
    pub fn tools(&self) -> &[Value] {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The names of the body's `tools` (Anthropic `name` or OpenAI `function.name`).
    pub fn tool_names(&self) -> Vec<&str> {
        self.tools()
            .iter()
            .filter_map(|t| {
                t.get("name")
                    .or_else(|| t.pointer("/function/name"))
                    .and_then(Value::as_str)
            })
            .collect()
    }

    /// The tool results in `messages`: Anthropic `tool_result` content blocks and OpenAI messages
    /// with role `tool`, in order.
    pub fn tool_results(&self) -> Vec<&Value> {
        let mut out = Vec::new();
        for message in self.messages() {
            if message.get("role").and_then(Value::as_str) == Some("tool") {
                out.push(message);
                continue;
            }
            if let Some(blocks) = message.get("content").and_then(Value::as_array) {
                out.extend(
                    blocks
                        .iter()
                        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")),
                );
            }
        }
        out
    }

    /// Whether any string in `messages` or `system` contains `needle`.
    pub fn contains_text(&self, needle: &str) -> bool {
        let mut found = false;
        for part in [self.body.get("messages"), self.body.get("system")]
            .into_iter()
            .flatten()
        {
            visit_strings(part, &mut |s| found |= s.contains(needle));
        }
        found
    }

    /// The working directory Claude Code reported (`Primary working directory: <path>` in a string
    /// of `messages`, else of `system`), used for the `{cwd}` placeholder.
    pub fn cwd(&self) -> Option<String> {
        for part in [self.body.get("messages"), self.body.get("system")]
            .into_iter()
            .flatten()
        {
            let mut found = None;
            visit_strings(part, &mut |s| {
                if found.is_none()
                    && let Some(pos) = s.find(CWD_MARKER)
                {
                    let rest = &s[pos + CWD_MARKER.len()..];
                    let line = rest.lines().next().unwrap_or_default().trim();
                    if !line.is_empty() {
                        found = Some(line.to_owned());
                    }
                }
            });
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// Calls `f` on every string inside `value`, depth first.
fn visit_strings(value: &Value, f: &mut dyn FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().for_each(|v| visit_strings(v, f)),
        Value::Object(map) => map.values().for_each(|v| visit_strings(v, f)),
        _ => {}
    }
}

/// Replaces `{cwd}` in every string inside `value`.
fn substitute(value: &mut Value, cwd: &str) {
    match value {
        Value::String(s) if s.contains("{cwd}") => *s = s.replace("{cwd}", cwd),
        Value::Array(items) => items.iter_mut().for_each(|v| substitute(v, cwd)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute(v, cwd)),
        _ => {}
    }
}

/// One content block of a scripted reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// Assistant text.
    Text(String),
    /// A tool call: `tool_use` on Anthropic, `tool_calls[]` on OpenAI. An empty `id` is replaced
    /// with a generated `toolu_fake_NNNN`.
    ToolUse {
        /// The call's id, echoed back by the client in its tool result.
        id: String,
        /// The tool's name.
        name: String,
        /// The tool's input (OpenAI: serialized into `function.arguments`).
        input: Value,
    },
}

/// Token counts a reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens. Default 100.
    pub input_tokens: u64,
    /// Output (completion) tokens. Default 20.
    pub output_tokens: u64,
    /// Anthropic `cache_creation_input_tokens`. Default 0.
    pub cache_creation_input_tokens: u64,
    /// Anthropic `cache_read_input_tokens`. Default 0.
    pub cache_read_input_tokens: u64,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            input_tokens: 100,
            output_tokens: 20,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        }
    }
}

/// How a reply ends.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// A complete message.
    Complete,
    /// Never finish (see [`Reply::hang`]).
    Hang,
    /// An error event inside an otherwise successful stream.
    StreamError { error_type: String, message: String },
}

/// An HTTP error answer.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    status: u16,
    error_type: String,
    message: String,
}

/// A scripted answer to one model request. Build one with [`Reply::text`], [`Reply::tool_use`],
/// [`Reply::error`] or [`Reply::hang`] and refine it with the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    blocks: Vec<Block>,
    usage: Usage,
    stop_reason: Option<String>,
    event_delay: Duration,
    ending: Ending,
    error: Option<ApiError>,
    headers: Vec<(String, String)>,
}

impl Default for Reply {
    /// A reply with no content blocks.
    fn default() -> Self {
        Self {
            blocks: Vec::new(),
            usage: Usage::default(),
            stop_reason: None,
            event_delay: Duration::ZERO,
            ending: Ending::Complete,
            error: None,
            headers: Vec::new(),
        }
    }
}

impl Reply {
    /// A reply with no content blocks; add some with [`Reply::with_text`] / [`Reply::with_tool_use`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A reply with one text block (stop reason `end_turn` / `stop`).
    pub fn text(text: impl Into<String>) -> Self {
        Self::new().with_text(text)
    }

    /// A reply with one tool call (stop reason `tool_use` / `tool_calls`). `id` may be empty to
    /// generate one.
    pub fn tool_use(id: impl Into<String>, name: impl Into<String>, input: Value) -> Self {
        Self::new().with_tool_use(id, name, input)
    }

    /// An HTTP error: the given status with the API's error JSON,
    /// `{"type":"error","error":{"type","message"}}` on Anthropic and
    /// `{"error":{"message","type","code"}}` on OpenAI (`code` = `error_type`).
    pub fn error(status: u16, error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: Some(ApiError {
                status,
                error_type: error_type.into(),
                message: message.into(),
            }),
            ..Self::default()
        }
    }

    /// A reply that never finishes, for cancel tests. Streaming: status 200, the headers and
    /// `message_start` + `ping` (OpenAI: the first chunk with the role) are sent, then nothing more
    /// until the client goes away or the fake shuts down. Non-streaming: no answer at all.
    ///
    /// Combine with content through [`Reply::hanging`], e.g. `Reply::text("partial").hanging()`.
    pub fn hang() -> Self {
        Self::new().hanging()
    }

    /// Makes this reply hang after its content: every block is streamed, but the last one's
    /// `content_block_stop` (OpenAI: the final chunk) and everything after it is never sent.
    pub fn hanging(mut self) -> Self {
        self.ending = Ending::Hang;
        self
    }

    /// Ends the stream, after the content, with an in-stream error instead of a normal end:
    /// Anthropic `event: error` with `{"type":"error","error":{..}}` (after the last block's
    /// `content_block_stop`); OpenAI `data: {"error":{..}}`. Non-streaming requests get a 500 with it.
    pub fn with_stream_error(
        mut self,
        error_type: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        self.ending = Ending::StreamError {
            error_type: error_type.into(),
            message: message.into(),
        };
        self
    }

    /// Appends a text block.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Text(text.into()));
        self
    }

    /// Appends a tool call block. `id` may be empty to generate one.
    pub fn with_tool_use(
        mut self,
        id: impl Into<String>,
        name: impl Into<String>,
        input: Value,
    ) -> Self {
        self.blocks.push(Block::ToolUse {
            id: id.into(),
            name: name.into(),
            input,
        });
        self
    }

    /// Appends a block.
    pub fn with_block(mut self, block: Block) -> Self {
        self.blocks.push(block);
        self
    }

    /// Sets the input and output token counts (cache counts stay as they are).
    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.usage.input_tokens = input_tokens;
        self.usage.output_tokens = output_tokens;
        self
    }

    /// Sets all token counts.
    pub fn with_full_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Overrides the Anthropic `stop_reason` (default: `tool_use` when there is a tool call, else
    /// `end_turn`). On OpenAI it maps to `finish_reason`: `end_turn`/`stop_sequence` → `stop`,
    /// `tool_use` → `tool_calls`, `max_tokens` → `length`, anything else as given.
    pub fn with_stop_reason(mut self, stop_reason: impl Into<String>) -> Self {
        self.stop_reason = Some(stop_reason.into());
        self
    }

    /// Streams slowly: waits `delay` between SSE events (non-streaming: before answering).
    pub fn with_event_delay(mut self, delay: Duration) -> Self {
        self.event_delay = delay;
        self
    }

    /// Adds a response header (e.g. `retry-after` on an error reply).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The content blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The token counts.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The HTTP status this reply answers with (200 unless it is an error reply).
    pub fn status(&self) -> u16 {
        self.error.as_ref().map_or(200, |e| e.status)
    }

    fn has_tool_use(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| matches!(b, Block::ToolUse { .. }))
    }

    fn anthropic_stop_reason(&self) -> String {
        match &self.stop_reason {
            Some(s) => s.clone(),
            None if self.has_tool_use() => "tool_use".into(),
            None => "end_turn".into(),
        }
    }

    fn openai_finish_reason(&self) -> String {
        match self.stop_reason.as_deref() {
            None if self.has_tool_use() => "tool_calls".into(),
            None | Some("end_turn") | Some("stop_sequence") => "stop".into(),
            Some("tool_use") => "tool_calls".into(),
            Some("max_tokens") => "length".into(),
            Some(other) => other.into(),
        }
    }
}

/// A closure that picks the reply for a request when the queue is empty.
pub type Responder = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync + 'static>;

/// State shared between the handle and the server.
struct Inner {
    queue: Mutex<VecDeque<Reply>>,
    responder: Mutex<Option<Responder>>,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: watch::Sender<usize>,
    shutdown: watch::Sender<bool>,
    next_id: AtomicU64,
    client_gone: AtomicUsize,
}

/// Locks a mutex, ignoring poisoning (a panicking responder must not break the fake).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn next_reply(&self, request: &RecordedRequest) -> Reply {
        if let Some(reply) = lock(&self.queue).pop_front() {
            return reply;
        }
        let responder = lock(&self.responder).clone();
        match responder {
            Some(f) => f(request),
            None => Reply::text("ok"),
        }
    }
}

/// A fake model API server on `127.0.0.1`. Dropping it stops the server (see
/// [`FakeLlm::shutdown`] to also wait until the port is closed).
pub struct FakeLlm {
    inner: Arc<Inner>,
    addr: SocketAddr,
    done: Option<oneshot::Receiver<()>>,
}

impl fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeLlm")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .field("pending_replies", &self.pending_replies())
            .finish_non_exhaustive()
    }
}

impl FakeLlm {
    /// Binds `127.0.0.1:0` and starts serving on a background thread.
    ///
    /// # Panics
    /// If the port cannot be bound or the thread cannot start.
    pub async fn start() -> FakeLlm {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Binds `ip:0` (e.g. a Docker network's gateway, so that containers reach it) and starts
    /// serving on a background thread.
    ///
    /// # Panics
    /// If the port cannot be bound or the thread cannot start.
    pub async fn start_on(ip: std::net::IpAddr) -> FakeLlm {
        let std_listener = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("fake LLM: bind {ip}:0: {e}"));
        std_listener
            .set_nonblocking(true)
            .expect("fake LLM: set_nonblocking");
        let addr = std_listener.local_addr().expect("fake LLM: local_addr");
        let (shutdown, _) = watch::channel(false);
        let (request_count, _) = watch::channel(0usize);
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            responder: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            request_count,
            shutdown,
            next_id: AtomicU64::new(0),
            client_gone: AtomicUsize::new(0),
        });
        let (done_tx, done_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let server_inner = inner.clone();
        std::thread::Builder::new()
            .name(format!("fake-llm-{}", addr.port()))
            .spawn(move || serve_thread(std_listener, server_inner, ready_tx, done_tx))
            .expect("fake LLM: spawn server thread");
        ready_rx.await.expect("fake LLM: server thread failed");
        FakeLlm {
            inner,
            addr,
            done: Some(done_rx),
        }
    }

    /// The base URL, `http://IP:PORT` (no trailing slash). Use it as
    /// `ANTHROPIC_BASE_URL`; OpenAI clients usually want `format!("{}/v1", fake.url())`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a reply; queued replies are used first, in order.
    pub fn push(&self, reply: Reply) {
        lock(&self.inner.queue).push_back(reply);
    }

    /// Queues several replies, in order.
    pub fn push_all(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.inner.queue).extend(replies);
    }

    /// How many queued replies are still unused.
    pub fn pending_replies(&self) -> usize {
        lock(&self.inner.queue).len()
    }

    /// Drops all queued replies.
    pub fn clear_queue(&self) {
        lock(&self.inner.queue).clear();
    }

    /// Sets the closure that answers when the queue is empty (replacing any earlier one). It runs
    /// on the server's thread; it must not block for long.
    pub fn set_responder(&self, f: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) {
        *lock(&self.inner.responder) = Some(Arc::new(f));
    }

    /// Removes the responder; an empty queue then answers with the text `ok`.
    pub fn clear_responder(&self) {
        *lock(&self.inner.responder) = None;
    }

    /// All requests received so far, oldest first (including 404s and unparsable bodies).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.requests).clone()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        lock(&self.inner.requests).len()
    }

    /// The most recent request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.inner.requests).last().cloned()
    }

    /// The `messages` of the most recent request (empty if there is none).
    pub fn last_messages(&self) -> Vec<Value> {
        lock(&self.inner.requests)
            .last()
            .map(|r| r.messages().to_vec())
            .unwrap_or_default()
    }

    /// Forgets all recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
        self.inner.request_count.send_replace(0);
    }

    /// Waits until at least `n` requests were received; `false` on timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.inner.request_count.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many streamed replies lost their client before they were complete (e.g. a cancelled
    /// [`Reply::hang`] stream). Detected when the client closes the connection.
    pub fn aborted_streams(&self) -> usize {
        self.inner.client_gone.load(Ordering::SeqCst)
    }

    /// Stops the server and waits (up to a few seconds) until it has closed its port and every
    /// connection.
    pub async fn shutdown(mut self) {
        self.inner.shutdown.send_replace(true);
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE * 3, done).await;
        }
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// The server thread: its own runtime, serving until shutdown (plus a grace period).
fn serve_thread(
    listener: std::net::TcpListener,
    inner: Arc<Inner>,
    ready: oneshot::Sender<()>,
    done: oneshot::Sender<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("fake LLM: cannot build runtime: {e}"),
    };
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("fake LLM: listener");
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(inner.clone());
        let mut stop = inner.shutdown.subscribe();
        let mut stop_forced = inner.shutdown.subscribe();
        // Without TCP_NODELAY, small SSE frames wait for the client's delayed ACK (~40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let _ = ready.send(());
        tokio::select! {
            _ = server => {}
            _ = async {
                let _ = stop_forced.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {}
        }
    });
    // Dropping the runtime cancels whatever is left (connections, stream tasks).
    drop(runtime);
    let _ = done.send(());
}

/// Answers every request: records it, then routes by path.
async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut header_map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        header_map
            .entry(name.as_str().to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let request = RecordedRequest {
        method: method.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: header_map,
        body: parsed.clone().unwrap_or(Value::Null),
        raw_body,
    };
    {
        let mut requests = lock(&inner.requests);
        requests.push(request.clone());
        inner.request_count.send_replace(requests.len());
    }

    let api = match request.path_only() {
        ANTHROPIC_MESSAGES_PATH => Api::Anthropic,
        OPENAI_CHAT_PATH => Api::OpenAi,
        other => {
            let message = format!("fake LLM: no route for {method} {other}");
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"type": "error", "error": {"type": "not_found_error", "message": message}}),
                &[],
            );
        }
    };
    if method != Method::POST {
        return error_response(
            api,
            &ApiError {
                status: 405,
                error_type: "invalid_request_error".into(),
                message: format!("fake LLM: method {method} not allowed"),
            },
            &[],
        );
    }
    if !matches!(parsed, Some(Value::Object(_))) {
        return error_response(
            api,
            &ApiError {
                status: 400,
                error_type: "invalid_request_error".into(),
                message: "fake LLM: the body is not a JSON object".into(),
            },
            &[],
        );
    }

    let mut reply = inner.next_reply(&request);
    if let Some(error) = &reply.error {
        if !reply.event_delay.is_zero() {
            tokio::time::sleep(reply.event_delay).await;
        }
        return error_response(api, error, &reply.headers);
    }
    resolve_reply(&inner, &request, &mut reply);
    let model = request.model().unwrap_or("fake-model").to_owned();
    let stream = request.is_stream();
    let id = inner.next_id();

    if stream {
        let frames = match api {
            Api::Anthropic => anthropic_frames(&reply, &model, id),
            Api::OpenAi => {
                let include_usage = request
                    .body
                    .pointer("/stream_options/include_usage")
                    .and_then(Value::as_bool)
                    == Some(true);
                openai_frames(&reply, &model, id, include_usage)
            }
        };
        return sse_response(&inner, frames, &reply);
    }

    if !reply.event_delay.is_zero() {
        tokio::time::sleep(reply.event_delay).await;
    }
    match &reply.ending {
        Ending::Hang => {
            let mut stop = inner.shutdown.subscribe();
            let _ = stop.wait_for(|s| *s).await;
            error_response(
                api,
                &ApiError {
                    status: 503,
                    error_type: "api_error".into(),
                    message: "fake LLM: shutting down".into(),
                },
                &reply.headers,
            )
        }
        Ending::StreamError {
            error_type,
            message,
        } => error_response(
            api,
            &ApiError {
                status: 500,
                error_type: error_type.clone(),
                message: message.clone(),
            },
            &reply.headers,
        ),
        Ending::Complete => {
            let body = match api {
                Api::Anthropic => anthropic_message(&reply, &model, id),
                Api::OpenAi => openai_completion(&reply, &model, id),
            };
            json_response(StatusCode::OK, &body, &reply.headers)
        }
    }
}

/// Fills in generated tool ids and the `{cwd}` placeholder.
fn resolve_reply(inner: &Inner, request: &RecordedRequest, reply: &mut Reply) {
    let cwd = request.cwd();
    for block in &mut reply.blocks {
        match block {
            Block::Text(text) => {
                if let Some(cwd) = &cwd {
                    *text = text.replace("{cwd}", cwd);
                }
            }
            Block::ToolUse { id, input, .. } => {
                if id.is_empty() {
                    *id = format!("toolu_fake_{:04}", inner.next_id());
                }
                if let Some(cwd) = &cwd {
                    substitute(input, cwd);
                }
            }
        }
    }
}

/// Splits `s` into `parts` non-empty pieces of about equal length on char boundaries (fewer if `s`
/// is shorter; one empty piece if `s` is empty).
fn split_pieces(s: &str, parts: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let parts = parts.clamp(1, chars.len());
    let size = chars.len().div_ceil(parts);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn sse_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn sse_data(data: &str) -> String {
    format!("data: {data}\n\n")
}

fn anthropic_usage(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
    })
}

fn anthropic_error_body(error_type: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type, "message": message}})
}

fn openai_error_body(error_type: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": error_type, "code": error_type, "param": null}})
}

/// The whole Anthropic message (non-streaming answer).
fn anthropic_message(reply: &Reply, model: &str, id: u64) -> Value {
    let content: Vec<Value> = reply
        .blocks
        .iter()
        .map(|block| match block {
            Block::Text(text) => json!({"type": "text", "text": text}),
            Block::ToolUse { id, name, input } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        })
        .collect();
    json!({
        "id": format!("msg_fake_{id:04}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reply.anthropic_stop_reason(),
        "stop_sequence": null,
        "usage": anthropic_usage(&reply.usage),
    })
}

/// The SSE frames of an Anthropic stream.
fn anthropic_frames(reply: &Reply, model: &str, id: u64) -> Vec<String> {
    let mut start_usage = anthropic_usage(&reply.usage);
    start_usage["output_tokens"] = json!(1);
    let mut frames = vec![
        sse_event(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": format!("msg_fake_{id:04}"),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": start_usage,
                }
            }),
        ),
        sse_event("ping", &json!({"type": "ping"})),
    ];
    let hang = reply.ending == Ending::Hang;
    let last = reply.blocks.len().saturating_sub(1);
    for (index, block) in reply.blocks.iter().enumerate() {
        let (start, deltas) = match block {
            Block::Text(text) => (
                json!({"type": "text", "text": ""}),
                split_pieces(text, 3)
                    .into_iter()
                    .map(|piece| json!({"type": "text_delta", "text": piece}))
                    .collect::<Vec<_>>(),
            ),
            Block::ToolUse { id, name, input } => (
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                split_pieces(&input.to_string(), 3)
                    .into_iter()
                    .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
                    .collect(),
            ),
        };
        frames.push(sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        for delta in deltas {
            frames.push(sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": delta}),
            ));
        }
        if hang && index == last {
            return frames;
        }
        frames.push(sse_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    match &reply.ending {
        Ending::Hang => {}
        Ending::StreamError {
            error_type,
            message,
        } => frames.push(sse_event(
            "error",
            &anthropic_error_body(error_type, message),
        )),
        Ending::Complete => {
            frames.push(sse_event(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": reply.anthropic_stop_reason(), "stop_sequence": null},
                    "usage": {"output_tokens": reply.usage.output_tokens},
                }),
            ));
            frames.push(sse_event("message_stop", &json!({"type": "message_stop"})));
        }
    }
    frames
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn openai_usage(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    })
}

/// The whole OpenAI chat completion (non-streaming answer).
fn openai_completion(reply: &Reply, model: &str, id: u64) -> Value {
    let mut text = String::new();
    let mut has_text = false;
    let mut tool_calls = Vec::new();
    for block in &reply.blocks {
        match block {
            Block::Text(t) => {
                has_text = true;
                text.push_str(t);
            }
            Block::ToolUse { id, name, input } => tool_calls.push(json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": input.to_string()},
            })),
        }
    }
    let mut message =
        json!({"role": "assistant", "content": if has_text { json!(text) } else { Value::Null }});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": format!("chatcmpl-fake-{id:04}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.openai_finish_reason()}],
        "usage": openai_usage(&reply.usage),
    })
}

/// The SSE frames of an OpenAI stream.
fn openai_frames(reply: &Reply, model: &str, id: u64, include_usage: bool) -> Vec<String> {
    let id = format!("chatcmpl-fake-{id:04}");
    let created = unix_now();
    let chunk = |delta: Value, finish_reason: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        sse_data(&chunk.to_string())
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let mut tool_index = 0usize;
    for block in &reply.blocks {
        match block {
            Block::Text(text) => {
                for piece in split_pieces(text, 3) {
                    frames.push(chunk(json!({"content": piece}), Value::Null));
                }
            }
            Block::ToolUse { id, name, input } => {
                frames.push(chunk(
                    json!({"tool_calls": [{
                        "index": tool_index,
                        "id": id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }]}),
                    Value::Null,
                ));
                for piece in split_pieces(&input.to_string(), 3) {
                    frames.push(chunk(
                        json!({"tool_calls": [{"index": tool_index, "function": {"arguments": piece}}]}),
                        Value::Null,
                    ));
                }
                tool_index += 1;
            }
        }
    }
    match &reply.ending {
        Ending::Hang => {}
        Ending::StreamError {
            error_type,
            message,
        } => frames.push(sse_data(
            &openai_error_body(error_type, message).to_string(),
        )),
        Ending::Complete => {
            frames.push(chunk(json!({}), json!(reply.openai_finish_reason())));
            if include_usage {
                frames.push(sse_data(
                    &json!({
                        "id": id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": openai_usage(&reply.usage),
                    })
                    .to_string(),
                ));
            }
            frames.push(sse_data("[DONE]"));
        }
    }
    frames
}

fn apply_headers(response: &mut Response, extra: &[(String, String)]) {
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            response.headers_mut().append(name, value);
        }
    }
}

fn json_response(status: StatusCode, body: &Value, extra: &[(String, String)]) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    apply_headers(&mut response, extra);
    response
}

fn error_response(api: Api, error: &ApiError, extra: &[(String, String)]) -> Response {
    let body = match api {
        Api::Anthropic => anthropic_error_body(&error.error_type, &error.message),
        Api::OpenAi => openai_error_body(&error.error_type, &error.message),
    };
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &body, extra)
}

/// Streams `frames` (with the reply's delay between them) from a task, then hangs if asked to.
fn sse_response(inner: &Arc<Inner>, frames: Vec<String>, reply: &Reply) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
    let delay = reply.event_delay;
    let hang = reply.ending == Ending::Hang;
    let mut stop = inner.shutdown.subscribe();
    let inner = inner.clone();
    tokio::spawn(async move {
        for (i, frame) in frames.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tx.closed() => {
                        inner.client_gone.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            if tx.send(Ok(Bytes::from(frame))).await.is_err() {
                inner.client_gone.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if hang {
            tokio::select! {
                _ = tx.closed() => {
                    inner.client_gone.fetch_add(1, Ordering::SeqCst);
                }
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    apply_headers(&mut response, &reply.headers);
    response
}
