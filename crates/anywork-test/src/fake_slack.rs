//! A fake of the Slack Web API on loopback: `chat.postMessage`, `chat.update`,
//! `reactions.add`, `reactions.remove` (JSON bodies) and `conversations.replies` (query
//! string, with `oldest`, `limit`, `cursor` and `include_all_metadata`), answering as Slack
//! does (`{"ok": true, …}` or HTTP 200 `{"ok": false, "error": …}`). It keeps the messages and
//! reactions, records every request and injects faults.
//!
//! Every call needs `Authorization: Bearer <the bot token>` (else `not_authed` /
//! `invalid_auth`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub use crate::fake_http::{Fault, Recorded};
use crate::fake_http::{serve, take_fault, unix_now};

/// A message the fake holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SlackMessage {
    /// Channel id.
    pub channel: String,
    /// Its `ts`.
    pub ts: String,
    /// The thread's root, for replies (and for a root that has replies, its own `ts`).
    pub thread_ts: Option<String>,
    /// The author's user id.
    pub user: String,
    /// Set on the bot's messages.
    pub bot_id: Option<String>,
    /// The text.
    pub text: String,
    /// Message metadata, if any.
    pub metadata: Option<Value>,
    /// Earlier texts, oldest first (one per `chat.update`).
    pub edits: Vec<String>,
}

struct SlackState {
    token: String,
    bot_user_id: String,
    bot_id: String,
    messages: Vec<SlackMessage>,
    reactions: BTreeMap<(String, String), Vec<String>>,
    clock: u64,
    requests: Vec<Recorded>,
    faults: Vec<Fault>,
}

type Shared = Arc<Mutex<SlackState>>;

fn lock(s: &Shared) -> MutexGuard<'_, SlackState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake API. Stops when dropped.
pub struct FakeSlack {
    url: String,
    state: Shared,
    server: JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSlack {
    /// Starts the fake; the bot posts as `bot_user_id` with bot id `B0BOT`.
    pub async fn start(token: &str, bot_user_id: &str) -> Self {
        let state = Arc::new(Mutex::new(SlackState {
            token: token.to_owned(),
            bot_user_id: bot_user_id.to_owned(),
            bot_id: "B0BOT".into(),
            messages: Vec::new(),
            reactions: BTreeMap::new(),
            clock: 0,
            requests: Vec::new(),
            faults: Vec::new(),
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (addr, server) = serve(app).await;
        Self {
            url: format!("http://{addr}/api"),
            state,
            server,
        }
    }

    /// The base URL (`SLACK_API_URL`): `http://127.0.0.1:PORT/api`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Adds a message by `user` (as if typed in Slack); returns its `ts`.
    pub fn add_user_message(
        &self,
        channel: &str,
        thread_ts: Option<&str>,
        user: &str,
        text: &str,
    ) -> String {
        let mut s = lock(&self.state);
        let ts = next_ts(&mut s);
        s.messages.push(SlackMessage {
            channel: channel.into(),
            ts: ts.clone(),
            thread_ts: thread_ts.map(str::to_owned),
            user: user.into(),
            bot_id: None,
            text: text.into(),
            metadata: None,
            edits: Vec::new(),
        });
        ts
    }

    /// The messages of `channel`, in posting order.
    pub fn messages(&self, channel: &str) -> Vec<SlackMessage> {
        lock(&self.state)
            .messages
            .iter()
            .filter(|m| m.channel == channel)
            .cloned()
            .collect()
    }

    /// The bot's messages in `channel`, in posting order.
    pub fn bot_messages(&self, channel: &str) -> Vec<SlackMessage> {
        self.messages(channel)
            .into_iter()
            .filter(|m| m.bot_id.is_some())
            .collect()
    }

    /// The reaction names on a message, in the order added.
    pub fn reactions(&self, channel: &str, ts: &str) -> Vec<String> {
        lock(&self.state)
            .reactions
            .get(&(channel.to_owned(), ts.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Deletes a message (as a user would in Slack).
    pub fn delete_message(&self, channel: &str, ts: &str) {
        lock(&self.state)
            .messages
            .retain(|m| !(m.channel == channel && m.ts == ts));
    }

    /// Every request, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// The Web API methods called, in order (`chat.postMessage`, …).
    pub fn methods(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.path_only().trim_start_matches("/api/").to_owned())
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    /// Injects a fault (a Slack error is `Fault::status(method, 200).body(json!({"ok": false,
    /// "error": "…"}))`).
    pub fn inject(&self, fault: Fault) {
        lock(&self.state).faults.push(fault);
    }
}

fn next_ts(s: &mut SlackState) -> String {
    s.clock += 1;
    format!("{}.{:06}", unix_now(), s.clock)
}

fn ts_key(ts: &str) -> (u64, u64) {
    let (a, b) = ts.split_once('.').unwrap_or((ts, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn reply(status: u16, body: Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn refuse(error: &str) -> Response {
    reply(200, json!({"ok": false, "error": error}))
}

fn message_json(m: &SlackMessage, with_metadata: bool) -> Value {
    let mut v = json!({"type": "message", "ts": m.ts, "user": m.user, "text": m.text});
    if let Some(t) = &m.thread_ts {
        v["thread_ts"] = json!(t);
    }
    if let Some(b) = &m.bot_id {
        v["bot_id"] = json!(b);
    }
    if let (true, Some(meta)) = (with_metadata, &m.metadata) {
        v["metadata"] = meta.clone();
    }
    v
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Recorded::new(&method, &uri, &headers, &body);
    let mut s = lock(&state);
    s.requests.push(req.clone());
    if let Some(f) = take_fault(&mut s.faults, &req) {
        let mut r = reply(f.status, f.body);
        for (k, v) in f.headers {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::from_bytes(k.as_bytes()),
                axum::http::HeaderValue::from_str(&v),
            ) {
                r.headers_mut().insert(k, v);
            }
        }
        return r;
    }
    match req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
    {
        None => return refuse("not_authed"),
        Some(t) if t != s.token => return refuse("invalid_auth"),
        Some(_) => {}
    }
    let b = &req.body;
    let str_of = |k: &str| b[k].as_str().map(str::to_owned);
    let api = req.path_only().trim_start_matches("/api/").to_owned();
    match (req.method.as_str(), api.as_str()) {
        ("POST", "chat.postMessage") => {
            let (Some(channel), Some(text)) = (str_of("channel"), str_of("text")) else {
                return refuse("invalid_arguments");
            };
            let thread_ts = str_of("thread_ts");
            if let Some(t) = &thread_ts
                && !s
                    .messages
                    .iter()
                    .any(|m| m.channel == channel && &m.ts == t)
            {
                return refuse("thread_not_found");
            }
            let ts = next_ts(&mut s);
            let m = SlackMessage {
                channel: channel.clone(),
                ts: ts.clone(),
                thread_ts,
                user: s.bot_user_id.clone(),
                bot_id: Some(s.bot_id.clone()),
                text,
                metadata: b.get("metadata").filter(|v| v.is_object()).cloned(),
                edits: Vec::new(),
            };
            let v = message_json(&m, true);
            s.messages.push(m);
            reply(
                200,
                json!({"ok": true, "channel": channel, "ts": ts, "message": v}),
            )
        }
        ("POST", "chat.update") => {
            let (Some(channel), Some(ts), Some(text)) =
                (str_of("channel"), str_of("ts"), str_of("text"))
            else {
                return refuse("invalid_arguments");
            };
            let bot_id = s.bot_id.clone();
            let Some(m) = s
                .messages
                .iter_mut()
                .find(|m| m.channel == channel && m.ts == ts)
            else {
                return refuse("message_not_found");
            };
            if m.bot_id.as_deref() != Some(bot_id.as_str()) {
                return refuse("cant_update_message");
            }
            let old = std::mem::replace(&mut m.text, text);
            m.edits.push(old);
            if let Some(meta) = b.get("metadata").filter(|v| v.is_object()) {
                m.metadata = Some(meta.clone());
            }
            reply(200, json!({"ok": true, "channel": channel, "ts": ts}))
        }
        ("POST", op @ ("reactions.add" | "reactions.remove")) => {
            let (Some(channel), Some(ts), Some(name)) =
                (str_of("channel"), str_of("timestamp"), str_of("name"))
            else {
                return refuse("invalid_arguments");
            };
            if !s
                .messages
                .iter()
                .any(|m| m.channel == channel && m.ts == ts)
            {
                return refuse("message_not_found");
            }
            let list = s.reactions.entry((channel, ts)).or_default();
            let has = list.contains(&name);
            if op == "reactions.add" {
                if has {
                    return refuse("already_reacted");
                }
                list.push(name);
            } else {
                if !has {
                    return refuse("no_reaction");
                }
                list.retain(|n| *n != name);
            }
            reply(200, json!({"ok": true}))
        }
        ("GET", "conversations.replies") => {
            let (Some(channel), Some(root)) = (req.query_param("channel"), req.query_param("ts"))
            else {
                return refuse("invalid_arguments");
            };
            if !s
                .messages
                .iter()
                .any(|m| m.channel == channel && m.ts == root)
            {
                return refuse("thread_not_found");
            }
            let oldest = req
                .query_param("oldest")
                .map(|o| ts_key(&o))
                .unwrap_or((0, 0));
            let with_meta = req.query_param("include_all_metadata").as_deref() == Some("true");
            let limit: usize = req
                .query_param("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100)
                .clamp(1, 1000);
            let start: usize = req
                .query_param("cursor")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let mut thread: Vec<&SlackMessage> = s
                .messages
                .iter()
                .filter(|m| {
                    m.channel == channel
                        && (m.ts == root || m.thread_ts.as_deref() == Some(root.as_str()))
                })
                .filter(|m| m.ts == root || ts_key(&m.ts) >= oldest)
                .collect();
            thread.sort_by_key(|m| ts_key(&m.ts));
            let page: Vec<Value> = thread
                .iter()
                .skip(start)
                .take(limit)
                .map(|m| message_json(m, with_meta))
                .collect();
            let next = if start + limit < thread.len() {
                (start + limit).to_string()
            } else {
                String::new()
            };
            reply(
                200,
                json!({"ok": true, "messages": page, "has_more": !next.is_empty(),
                "response_metadata": {"next_cursor": next}}),
            )
        }
        _ => refuse("unknown_method"),
    }
}
