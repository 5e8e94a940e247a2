//! `/ws`: chat, follow and resume tasks, cancel, answer input requests.
//!
//! A chat is answered by `task_created` (after `session_created` for a new session), or by
//! one `error` with `metadata {code, created: false}` when it is refused: nothing was made,
//! no `done` follows. The refusal echoes the chat's `session_id` and the client's own
//! `request_id` (any string or number the client adds to its message), so that a client
//! knows which of its messages it answers.
//!
//! One Tokio task per connection reads the socket, polls the event streams of the tasks it
//! follows (no task or channel of their own: an event goes from the task's live channel to
//! the socket in this one task; only the streams that were woken are polled) and writes them,
//! and what the hub sends it. A followed task's stream ends with the task's `done`. An idle
//! connection holds no follower, only its task (1.4 KB: the socket's state is held once, the
//! helpers borrow it) and tungstenite's 1 KiB read buffer — 2.9 KB in all with Tokio's and
//! hyper's share (docs/benchmarks.md, "Memory per idle WebSocket").

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use anywork_core::ws::{ClientMessage, ServerMessage};
use anywork_core::{Error, SessionId, TaskId, TaskRequest};
use anywork_runtime::{LiveEvent, Notices};
use std::net::SocketAddr;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::stream::SelectAll;
use futures_util::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use super::{AppState, auth};

/// Channel type of tasks made over the WebSocket.
pub const WEBCHAT: &str = "webchat";

/// Outgoing bytes gathered before a write to the socket; the rest of a batch is flushed.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// Most events taken off the queue for one flush.
const WRITE_BATCH_EVENTS: usize = 64;

/// Replies made off the connection task (cancel, input answers) queued for it.
const OUTBOX_CAPACITY: usize = 64;

/// Largest client message.
const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// Bytes read from the socket at a time, and the read buffer every connection keeps for its
/// life (tungstenite zero-fills all of it on the first read, so an idle connection holds it
/// resident). Client messages are small (a chat is a few hundred bytes); a larger one is read in
/// several reads of this size into a buffer as large as its frame.
const READ_BUFFER_BYTES: usize = 1024;

/// How long a connection that must authenticate with its first message may take to send it.
const AUTH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) async fn upgrade(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    let access = match auth::check_ws(&state, &headers) {
        Ok(a) => a,
        Err(refused) => return *refused,
    };
    let client = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let Some(guard) = state.ws_opened(client) else {
        return auth::refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many WebSocket connections from this address (at most {}); close some first",
                state.options().max_ws_per_client
            ),
        );
    };
    // The subprotocol a browser offered is answered (it must be, or the browser fails the
    // connection): `anywork`, else the token one it sent alone.
    let mut protocols = vec![std::borrow::Cow::Borrowed(auth::WS_PROTOCOL)];
    if let Some(p) = auth::ws_token_protocol(&headers) {
        protocols.push(std::borrow::Cow::Owned(p));
    }
    // Small buffers: most connections sit idle; they grow when a message needs it. Messages
    // that are ready together are written together (see `connection`), up to this much.
    ws.protocols(protocols)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |mut socket| async move {
            // `socket` lives here, once, for the whole connection: the helpers borrow it. (An
            // async fn keeps its own copies of what is moved into it, so passing it on would
            // make each idle connection's task hundreds of bytes larger.) `guard` counts the
            // connection until this block ends.
            let authenticated = match access {
                auth::WsAccess::Authenticated => true,
                auth::WsAccess::AwaitAuth => authenticate(&state, &mut socket).await,
            };
            if authenticated {
                connection(state, &mut socket).await;
            }
            drop(guard);
        })
}

/// Waits for the first message, which must be `{"type":"auth","token":…}`; an error and a
/// close otherwise.
async fn authenticate(state: &AppState, socket: &mut WebSocket) -> bool {
    let first = tokio::time::timeout(AUTH_WAIT, async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(text))) => return Some(text),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten();
    let ok = first
        .as_ref()
        .is_some_and(|t| auth::ws_auth_message(state, t.as_str()));
    let reply = if ok {
        serde_json::json!({"type": "authenticated"})
    } else {
        serde_json::json!({"type": "error", "content": "this server requires its API token: \
            send {\"type\":\"auth\",\"token\":\"…\"} first, or the subprotocol \
            anywork.token.<token>, or Authorization: Bearer <token>", "metadata": {"code": "unauthorized"}})
    };
    let _ = socket
        .send(Message::Text(Utf8Bytes::from(reply.to_string())))
        .await;
    if !ok {
        let _ = socket.send(Message::Close(None)).await;
    }
    ok
}

/// Messages a connection may send: `rate` per second, bursts of twice as many.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        Self {
            rate,
            tokens: rate * 2.0,
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one message's token; false when there is none.
    fn take(&mut self) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Connection {
    state: AppState,
    /// What spawned requests (cancel, input answers) send this connection; made with the
    /// first of them (an idle connection, or one that only chats, has none: a channel's first
    /// block costs kilobytes).
    outbox: Option<mpsc::Sender<Outgoing>>,
    /// The receiving end of a new `outbox`, for the connection's loop to take.
    new_inbox: Option<mpsc::Receiver<Outgoing>>,
    followers: Followers,
    /// Notices (titles) of the sessions this connection chatted in or resumed a task of: the
    /// only ones it gets, so that one client never learns of another's sessions.
    notices: Notices,
    /// The session of this connection's last chat, when it was stored with a title: a chat in
    /// it again is submitted without reading the session first (deleted meanwhile, the chat
    /// is refused `not_found` as before, by the task's create).
    known_session: Option<SessionId>,
}

/// A reply made off the connection task (cancel, input answers). Boxed, so that a channel's
/// block of slots (32 of them, kept as long as the channel) is small.
type Outgoing = Box<ServerMessage>;

/// A followed task's events.
type EventStream = Pin<Box<dyn Stream<Item = anywork_core::Result<LiveEvent>> + Send>>;

/// A followed task's events; it ends after the task's `done` or an error (which ends the
/// follow), or at once when a resume replaced it.
struct Followed {
    task_id: TaskId,
    /// `None` once ended: the stream and what it holds of the hub are dropped then.
    events: Option<EventStream>,
}

impl Stream for Followed {
    type Item = (TaskId, anywork_core::Result<LiveEvent>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(events) = this.events.as_mut() else {
            return Poll::Ready(None);
        };
        match events.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                let last = match &item {
                    Ok(event) => matches!(event.event, anywork_core::TaskEvent::Done(_)),
                    Err(_) => true,
                };
                if last {
                    this.events = None;
                }
                Poll::Ready(Some((this.task_id, item)))
            }
            Poll::Ready(None) => {
                this.events = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The event streams of the tasks a connection follows, polled by the connection's task
/// itself; one that ends is dropped. Only the streams that were woken are polled (a
/// connection that follows many tasks pays per event, not per followed task). Before, each
/// had a task of its own that sent every event to the connection through a channel: a task
/// spawned per chat, and a wake-up of the follower and a hop through that channel per event.
#[derive(Default)]
struct Followers {
    /// Made with the first follow and dropped when the last one ends: an idle connection
    /// holds none.
    streams: Option<SelectAll<Followed>>,
    /// The waker [`ready`](Self::ready) polls with, kept while the set is.
    woken: Option<(Arc<Woken>, std::task::Waker)>,
}

impl Followers {
    /// Follows `task_id` with `events`, instead of its follow so far if any. A replaced
    /// follow would never be woken again (so never polled to its end and out of the set): the
    /// set is made again without it, once per resume of a followed task.
    fn insert(&mut self, task_id: TaskId, events: EventStream) {
        let mut streams = self.streams.take().unwrap_or_default();
        let mut replaced = false;
        for followed in streams.iter_mut() {
            if followed.task_id == task_id {
                replaced |= followed.events.take().is_some();
            }
        }
        if replaced {
            streams = streams.into_iter().filter(|f| f.events.is_some()).collect();
        }
        streams.push(Followed {
            task_id,
            events: Some(events),
        });
        self.streams = Some(streams);
    }

    /// The frame of the next event of any followed task ([`frame_of`]); pending while there is
    /// none (also when nothing is followed: a follow added later is polled by the next call).
    /// A frame, not the event: what the connection's loop waits on stays small, and so does
    /// every idle connection's task.
    fn poll_text(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let polled = poll_set(&mut self.streams, cx);
        if self.streams.is_none() {
            self.woken = None;
        }
        polled
    }

    /// `out` (the answer to a client's message) and, in the same write, the frames of the
    /// events ready now (a chat's `running`, published before its answer is sent): one write
    /// to the client and one wake-up of it, not one each.
    fn ready_after(&mut self, mut out: Vec<String>) -> Vec<String> {
        while out.len() < WRITE_BATCH_EVENTS {
            match self.ready() {
                Some(text) => out.push(text),
                None => break,
            }
        }
        out
    }

    /// The frame of the next event ready now, if any. The set may answer `Pending` with more
    /// ready (it yields after polling each of its streams once in a call, waking its caller):
    /// then it is asked again.
    fn ready(&mut self) -> Option<String> {
        self.streams.as_ref()?;
        let (woken, waker) = self.woken.get_or_insert_with(|| {
            let woken = Arc::new(Woken::default());
            let waker = std::task::Waker::from(woken.clone());
            (woken, waker)
        });
        let mut cx = Context::from_waker(waker);
        let text = loop {
            woken.0.store(false, Ordering::Relaxed);
            match poll_set(&mut self.streams, &mut cx) {
                Poll::Ready(item) => break Some(item),
                Poll::Pending if woken.0.load(Ordering::Relaxed) => continue,
                Poll::Pending => break None,
            }
        };
        if self.streams.is_none() {
            self.woken = None;
        }
        text
    }
}

/// The frame of the next event of any follow in `streams`; the set goes when every follow in
/// it ended (the next follow makes a new one).
fn poll_set(streams: &mut Option<SelectAll<Followed>>, cx: &mut Context<'_>) -> Poll<String> {
    let Some(set) = streams.as_mut() else {
        return Poll::Pending;
    };
    match set.poll_next_unpin(cx) {
        Poll::Ready(Some((task_id, item))) => Poll::Ready(frame_of(task_id, item)),
        Poll::Ready(None) => {
            *streams = None;
            Poll::Pending
        }
        Poll::Pending => Poll::Pending,
    }
}

/// A waker that only notes that it was woken.
#[derive(Default)]
struct Woken(AtomicBool);

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The frame of a followed task's event (or of the error that ended its follow). An event the
/// run encoded is sent as the bytes the store got, with its ids after them
/// ([`LiveEvent::to_json`]), not encoded again.
fn frame_of(task_id: TaskId, item: anywork_core::Result<LiveEvent>) -> String {
    match item {
        Ok(event) => event.to_json().unwrap_or_else(|e| encode_failed(&e)),
        Err(e) => text_of(task_error(None, Some(task_id), &e)),
    }
}

/// A message's frame text.
fn text_of(message: ServerMessage) -> String {
    message.into_json().unwrap_or_else(|e| encode_failed(&e))
}

/// The frame sent instead of a message that could not be encoded.
fn encode_failed(e: &serde_json::Error) -> String {
    serde_json::json!({"type": "error", "content": format!("cannot encode a message: {e}")})
        .to_string()
}

/// The frame texts of `messages`.
fn texts(messages: Vec<ServerMessage>) -> Vec<String> {
    messages.into_iter().map(text_of).collect()
}

/// The next of `inbox`; never, while there is none.
async fn next_of(inbox: &mut Option<mpsc::Receiver<Outgoing>>) -> Option<Outgoing> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until it closes. Borrows `socket` (see `upgrade`).
async fn connection(state: AppState, socket: &mut WebSocket) {
    let mut limit = RateLimit::new(state.options().ws_messages_per_second);
    let mut inbox: Option<mpsc::Receiver<Outgoing>> = None;
    let closing = state.closing().clone();
    let notices = state.dispatcher().notices();
    let mut conn = Connection {
        state,
        outbox: None,
        new_inbox: None,
        followers: Followers::default(),
        notices,
        known_session: None,
    };
    loop {
        if inbox.is_none() {
            inbox = conn.new_inbox.take();
        }
        let out = tokio::select! {
            _ = closing.cancelled() => {
                // Whatever the followers still hold goes out first.
                let mut out = Vec::new();
                while let Some(Ok(item)) = inbox.as_mut().map(mpsc::Receiver::try_recv) {
                    out.push(text_of(*item));
                }
                while let Some(text) = conn.followers.ready() {
                    out.push(text);
                }
                let _ = send_all(socket, out).await;
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::AWAY,
                        reason: Utf8Bytes::from_static("the server is shutting down"),
                    })))
                    .await;
                break;
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(_))) if !limit.take() => vec![text_of(rate_limited(&conn.state))],
                // Boxed: the handling of a message is much larger than an idle connection's
                // state, which would otherwise be as large as it.
                Some(Ok(Message::Text(text))) => {
                    let out = texts(Box::pin(conn.handle(text.as_str())).await);
                    conn.followers.ready_after(out)
                }
                Some(Ok(Message::Binary(_))) => vec![text_of(ServerMessage::error("Binary messages are not supported; send JSON text"))],
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) if is_too_large(&e) => {
                    // Say why before closing: 1009, "message too big".
                    let _ = socket
                        .send(Message::Close(Some(CloseFrame {
                            code: close_code::SIZE,
                            reason: Utf8Bytes::from(format!(
                                "a message is larger than the limit of {MAX_MESSAGE_BYTES} bytes"
                            )),
                        })))
                        .await;
                    break;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
            text = std::future::poll_fn(|cx| conn.followers.poll_text(cx)) => {
                // Whatever else is ready goes out in the same write.
                let mut out = vec![text];
                while out.len() < WRITE_BATCH_EVENTS {
                    match conn.followers.ready() {
                        Some(text) => out.push(text),
                        None => break,
                    }
                }
                out
            }
            Some(item) = next_of(&mut inbox) => {
                let mut out = vec![text_of(*item)];
                while out.len() < WRITE_BATCH_EVENTS {
                    match inbox.as_mut().map(mpsc::Receiver::try_recv) {
                        Some(Ok(item)) => out.push(text_of(*item)),
                        _ => break,
                    }
                }
                out
            }
            notice = conn.notices.recv() => vec![text_of(*notice)],
        };
        if send_all(socket, out).await.is_err() {
            break;
        }
    }
}

/// Whether a read failed because a frame or message was over the size limit.
fn is_too_large(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big")
}

/// Sends the frames `texts` with one flush at the end.
async fn send_all(socket: &mut WebSocket, texts: Vec<String>) -> Result<(), axum::Error> {
    use futures_util::SinkExt as _;
    if texts.is_empty() {
        return Ok(());
    }
    for text in texts {
        socket.feed(Message::Text(Utf8Bytes::from(text))).await?;
    }
    socket.flush().await
}

impl Connection {
    /// The sender to this connection, made with its channel on first use.
    fn outbox(&mut self) -> mpsc::Sender<Outgoing> {
        if let Some(outbox) = &self.outbox {
            return outbox.clone();
        }
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        self.outbox = Some(tx.clone());
        self.new_inbox = Some(rx);
        tx
    }

    async fn handle(&mut self, text: &str) -> Vec<ServerMessage> {
        // Parsed once, straight into a message; the text is read again for the refusal's
        // context only when something is refused.
        let message = match serde_json::from_str::<ClientMessage>(text) {
            Ok(m) => m,
            // Read as before this shortcut: a JSON value first (what is not JSON is told so),
            // then the message from it (whose errors name no text positions).
            Err(_) => {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
                    return vec![ServerMessage::error("Invalid JSON")];
                };
                match serde_json::from_value::<ClientMessage>(value.clone()) {
                    Ok(m) => m,
                    Err(e) => {
                        return vec![RequestContext::of(&value).refused(
                            "invalid_message",
                            format!("Invalid message: {e}; nothing was created"),
                        )];
                    }
                }
            }
        };
        match message {
            ClientMessage::Ping => vec![ServerMessage::Pong],
            ClientMessage::Chat {
                session_id,
                message,
                skills,
                mcp_servers,
            } => {
                self.chat(text, session_id, message, skills, mcp_servers)
                    .await
            }
            ClientMessage::Resume { task_id, after_seq } => {
                match self.state.dispatcher().task(task_id).await {
                    Ok(task) => {
                        self.notices.watch(&task.session_id);
                        self.follow(task_id, after_seq);
                        vec![]
                    }
                    Err(e) => vec![task_error(None, Some(task_id), &e)],
                }
            }
            ClientMessage::Cancel { task_id } => {
                let (d, replies) = (self.state.dispatcher().clone(), self.outbox());
                // Cancel waits for the worker; keep reading meanwhile.
                tokio::spawn(async move {
                    if let Err(e) = d.cancel(task_id).await {
                        let error = task_error(None, Some(task_id), &e);
                        let _ = replies.send(Box::new(error)).await;
                    }
                });
                vec![]
            }
            ClientMessage::InputResponse { task_id, response } => {
                let (d, replies) = (self.state.dispatcher().clone(), self.outbox());
                tokio::spawn(async move {
                    if let Err(e) = d.respond(task_id, response).await {
                        let error = task_error(None, Some(task_id), &e);
                        let _ = replies.send(Box::new(error)).await;
                    }
                });
                vec![]
            }
        }
    }

    /// A chat; `text` is the client's message, whose context a refusal echoes.
    async fn chat(
        &mut self,
        text: &str,
        session_id: Option<SessionId>,
        message: String,
        skills: Vec<anywork_core::SkillSpec>,
        mcp_servers: anywork_core::spec::McpServers,
    ) -> Vec<ServerMessage> {
        let known = session_id.is_some() && session_id == self.known_session;
        let mut request = TaskRequest::new(WEBCHAT, message);
        request.session_id = session_id;
        request.skills = skills;
        request.mcp_servers = mcp_servers;
        let dispatcher = self.state.dispatcher();
        match dispatcher
            .submit_follow_and_watch_known(request, Some(&mut self.notices), known)
            .await
        {
            Ok((submitted, events)) => {
                let task = submitted.task;
                self.known_session = submitted.session_titled.then(|| task.session_id.clone());
                let mut out = Vec::with_capacity(2);
                if submitted.session_created {
                    out.push(ServerMessage::SessionCreated {
                        session_id: task.session_id.clone(),
                    });
                }
                out.push(ServerMessage::TaskCreated {
                    session_id: task.session_id.clone(),
                    task_id: task.id,
                });
                self.spawn_follower(task.id, events);
                out
            }
            Err(e) => {
                if known {
                    self.known_session = None;
                }
                vec![RequestContext::of_text(text).refused(
                    e.kind().as_str(),
                    format!(
                        "{}; nothing was created",
                        e.message().trim_end_matches(['.', ' '])
                    ),
                )]
            }
        }
    }

    fn follow(&mut self, task_id: TaskId, after: u64) {
        let events = self.state.dispatcher().events(task_id, after);
        self.spawn_follower(task_id, events);
    }

    /// Sends `events` to this connection as the one follow of `task_id` (a resume replaces
    /// the old one); an error goes to the client and ends the follow.
    fn spawn_follower(
        &mut self,
        task_id: TaskId,
        events: impl Stream<Item = anywork_core::Result<LiveEvent>> + Send + 'static,
    ) {
        self.followers.insert(task_id, Box::pin(events));
    }
}

fn rate_limited(state: &AppState) -> ServerMessage {
    ServerMessage::Event {
        session_id: None,
        task_id: None,
        seq: None,
        event: anywork_core::TaskEvent::Error {
            message: format!(
                "too many messages: at most {} per second on one connection; this one was dropped, send it again later",
                state.options().ws_messages_per_second
            ),
            code: Some("rate_limited".to_owned()),
        },
    }
}

/// What a client sent along with a message that identifies it: its `session_id` and its own
/// `request_id`, echoed in a refusal.
struct RequestContext {
    session_id: Option<SessionId>,
    request_id: Option<serde_json::Value>,
}

impl RequestContext {
    /// The context of a message that parsed as JSON.
    fn of_text(text: &str) -> Self {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => Self::of(&value),
            Err(_) => Self {
                session_id: None,
                request_id: None,
            },
        }
    }

    fn of(value: &serde_json::Value) -> Self {
        Self {
            session_id: value
                .get("session_id")
                .and_then(serde_json::Value::as_str)
                .and_then(|s| SessionId::new(s).ok()),
            request_id: value
                .get("request_id")
                .filter(|v| v.is_string() || v.is_number())
                .cloned(),
        }
    }

    fn refused(&self, code: &str, message: String) -> ServerMessage {
        ServerMessage::Refused {
            session_id: self.session_id.clone(),
            request_id: self.request_id.clone(),
            code: code.to_owned(),
            message,
        }
    }
}

fn task_error(session_id: Option<SessionId>, task_id: Option<TaskId>, e: &Error) -> ServerMessage {
    ServerMessage::Event {
        session_id,
        task_id,
        seq: None,
        event: anywork_core::TaskEvent::Error {
            message: e.message().to_owned(),
            code: Some(e.kind().as_str().to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A follow's stream that counts its polls and gives what `rx` sends (as errors: the
    /// frame names the task either way).
    fn counted(
        polls: Arc<AtomicUsize>,
        mut rx: mpsc::UnboundedReceiver<String>,
        held: Arc<()>,
    ) -> EventStream {
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            let _held = &held;
            polls.fetch_add(1, Ordering::SeqCst);
            rx.poll_recv(cx)
                .map(|m| m.map(|m| Err(anywork_core::Error::unavailable(m))))
        }))
    }

    /// The answer to a client's message goes out with the events ready by then (a chat's
    /// `running`) in one write, the answer first; with none ready, the answer alone.
    #[test]
    fn an_answer_takes_the_events_ready_with_it() {
        let mut followers = Followers::default();
        assert_eq!(followers.ready_after(vec!["answer".into()]), vec!["answer"]);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = TaskId::generate();
        followers.insert(id, counted(Arc::default(), rx, Arc::new(())));
        assert_eq!(
            followers.ready_after(vec!["created".into()]),
            vec!["created"]
        );
        tx.send("running".into()).unwrap();
        let out = followers.ready_after(vec!["created".into()]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], "created");
        assert!(
            out[1].contains("running") && out[1].contains(&id.to_string()),
            "{out:?}"
        );
        assert_eq!(followers.ready_after(Vec::new()), Vec::<String>::new());
    }

    /// With many tasks followed, an event of one of them polls that one's stream only, not
    /// every followed task's; an error ends its follow; a resume's follow replaces the old
    /// one (dropped at once); and the set goes when the last follow ends.
    /// (A plain test: inside a Tokio task, the channels' cooperative budget would make them
    /// answer `Pending` after 128 messages until the task yields.)
    #[test]
    fn an_event_polls_only_its_own_follow() {
        let mut followers = Followers::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(());
        let mut senders = Vec::new();
        let ids: Vec<TaskId> = (0..1000).map(|_| TaskId::generate()).collect();
        for id in &ids {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            followers.insert(*id, counted(polls.clone(), rx, held.clone()));
        }
        assert_eq!(followers.ready(), None);
        let after_first = polls.load(Ordering::SeqCst);
        assert_eq!(after_first, 1000, "each polled once, to register its waker");

        senders[500].send("stopped".into()).unwrap();
        let frame = followers.ready().expect("the event");
        assert!(frame.contains(&ids[500].to_string()), "{frame}");
        assert!(frame.contains("stopped"), "{frame}");
        let polled = polls.load(Ordering::SeqCst) - after_first;
        assert!(polled <= 2, "{polled} streams polled for one event");

        // The error ended that follow: what its sender sends now goes nowhere.
        let _ = senders[500].send("after the end".into());
        assert_eq!(followers.ready(), None);

        // A resume replaces task 7's follow: the old stream is dropped at once, and the new
        // one gets the task's events.
        let before = Arc::strong_count(&held);
        let (tx, rx) = mpsc::unbounded_channel();
        followers.insert(ids[7], counted(polls.clone(), rx, Arc::new(())));
        assert_eq!(
            Arc::strong_count(&held),
            before - 1,
            "the old follow dropped"
        );
        tx.send("resumed".into()).unwrap();
        assert!(
            senders[7].send("old".into()).is_err(),
            "nobody listens to the old one"
        );
        let frame = followers.ready().expect("the new follow's event");
        assert!(frame.contains("resumed"), "{frame}");

        // Once every follow ended, the set goes: an idle connection holds none.
        for tx in &senders {
            let _ = tx.send("end".into());
        }
        let mut frames = 0;
        while followers.ready().is_some() {
            frames += 1;
        }
        assert_eq!(frames, 998, "every other follow's last frame");
        assert!(
            followers.streams.is_none(),
            "the set dropped with its last follow"
        );
        assert!(followers.woken.is_none(), "and its waker");
    }
}
