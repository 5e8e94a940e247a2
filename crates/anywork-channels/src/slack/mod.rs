//! Slack: a mention of the app (or a reply in a thread it is in, or a direct message) becomes
//! a task; the answer comes back in the thread.
//!
//! Set the app's Event Subscriptions request URL to `/api/channel/slack/webhook` and
//! subscribe to the bot events `app_mention`, `message.channels`, `message.groups` and
//! `message.im` (manifest in `docs/channels.md`).
//!
//! - Verification: `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:<timestamp>:<raw body>">`
//!   with `SLACK_SIGNING_SECRET`, and `X-Slack-Request-Timestamp` within 5 minutes of the
//!   server's clock (older requests are refused as replays).
//! - `url_verification` → [`Inbound::Respond`] with `{"challenge": …}`.
//! - `app_mention` → [`Inbound::Task`] in the session of `team/channel/thread` (the thread's
//!   root `ts`, or the message's own when it starts one). Mentioned mid-thread, the thread's
//!   earlier messages (those since the bot last spoke) are added as context
//!   (`SLACK_THREAD_CONTEXT`, on by default).
//! - A `message` in a thread → [`Inbound::FollowUp`] (runs only if that thread has a
//!   session, i.e. the bot is in it; also answers a question asked there). A direct message
//!   (`channel_type: im`) → [`Inbound::Task`]. Messages that mention the app are left to
//!   their `app_mention` event; edits, deletions and other subtypes are skipped.
//! - Ignored (no loops): anything with a `bot_id`, `bot_message`s, and the app's own user.
//! - Idempotency key: `team/channel/ts` of the message, the same across Slack's retries
//!   (`X-Slack-Retry-Num`), repeated `event_id`s and the `app_mention` + `message` pair one
//!   message produces.
//!
//! The hooks, through the Web API (`SLACK_API_URL`, `SLACK_BOT_TOKEN`):
//! [`Channel::on_accepted`] 👀 on the message; [`Channel::on_started`] ⏳ and a
//! "Working on it…" reply in the thread; [`Channel::on_progress`] updates that reply with the
//! answer so far (at most every 1.5 s); [`Channel::on_input_required`] replies with the
//! question; [`Channel::deliver`] turns the placeholder into the answer (or replies below a
//! question), removes ⏳ and adds ✅ / ❌ / ⛔. Every reply carries message metadata
//! (`event_type: anywork_task`, `{task_id, kind}`) by which it is found again
//! (`conversations.replies`) after a retry or a restart: nothing is posted twice.
//!
//! Bot token scopes: `app_mentions:read`, `chat:write`, `reactions:write`,
//! `channels:history`, `groups:history`, `im:history` (the last three for thread replies,
//! context and finding replies again).

pub mod mrkdwn;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anywork_core::channel::{Channel, Inbound, InboundRequest};
use anywork_core::{
    Error, ErrorKind, InputRequest, Result, Task, TaskId, TaskOutcome, TaskRequest, TaskStatus,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::posts::{self, Memo, Own, PostKind};
use crate::text::{tail, truncate};
use crate::{api, verify};

/// The channel type, as in `/api/channel/slack/webhook`.
pub const CHANNEL_TYPE: &str = "slack";
/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// The timestamp header.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// The `event_type` of the metadata on every message the channel posts.
pub const METADATA_EVENT_TYPE: &str = "anywork_task";
/// Slack truncates message text past 40,000 characters; answers are cut below it.
const MAX_TEXT_BYTES: usize = 39_000;
/// Progress updates come at most this often per task.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(1500);
/// How long `parse` waits for the thread's history before going on without it.
const CONTEXT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of the Slack channel.
#[derive(Clone)]
pub struct SlackConfig {
    /// `SLACK_SIGNING_SECRET`: the app's signing secret (Basic Information).
    pub signing_secret: String,
    /// `SLACK_BOT_TOKEN`: the bot token (`xoxb-…`).
    pub bot_token: String,
    /// `SLACK_API_URL`: the Web API's base URL (default `https://slack.com/api`).
    pub api_url: String,
    /// `SLACK_BOT_USER_ID`: the app's user id; by default read from each event's
    /// `authorizations`.
    pub bot_user_id: Option<String>,
    /// `SLACK_THREAD_CONTEXT`: give the thread's earlier messages to a mention mid-thread.
    pub thread_context: bool,
    /// How far the request timestamp may be from now (Slack's advice: 5 minutes).
    pub replay_window: Duration,
    /// Largest body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackConfig")
            .field("signing_secret", &"<secret>")
            .field("bot_token", &"<secret>")
            .field("api_url", &self.api_url)
            .field("bot_user_id", &self.bot_user_id)
            .field("thread_context", &self.thread_context)
            .field("replay_window", &self.replay_window)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl SlackConfig {
    /// The default API.
    pub const DEFAULT_API_URL: &'static str = "https://slack.com/api";

    /// A configuration with the defaults.
    pub fn new(signing_secret: impl Into<String>, bot_token: impl Into<String>) -> Self {
        Self {
            signing_secret: signing_secret.into(),
            bot_token: bot_token.into(),
            api_url: Self::DEFAULT_API_URL.into(),
            bot_user_id: None,
            thread_context: true,
            replay_window: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
        }
    }

    /// Reads the `SLACK_*` variables through `var`. `Ok(None)` when neither
    /// `SLACK_SIGNING_SECRET` nor `SLACK_BOT_TOKEN` is set (the channel is off); an error
    /// naming the missing one when only one is.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let set = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let (secret, token) = match (set("SLACK_SIGNING_SECRET"), set("SLACK_BOT_TOKEN")) {
            (None, None) => return Ok(None),
            (Some(s), Some(t)) => (s, t),
            (None, Some(_)) => {
                return Err(Error::invalid_input(
                    "SLACK_BOT_TOKEN is set without SLACK_SIGNING_SECRET: copy the signing \
                     secret from the app's Basic Information page",
                ));
            }
            (Some(_), None) => {
                return Err(Error::invalid_input(
                    "SLACK_SIGNING_SECRET is set without SLACK_BOT_TOKEN: copy the bot token \
                     (xoxb-…) from the app's OAuth & Permissions page",
                ));
            }
        };
        let mut c = Self::new(secret, token);
        if let Some(u) = set("SLACK_API_URL") {
            let u = u.trim_end_matches('/').to_owned();
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(Error::invalid_input(format!(
                    "SLACK_API_URL={u:?}: use an http(s) URL such as https://slack.com/api"
                )));
            }
            c.api_url = u;
        }
        c.bot_user_id = set("SLACK_BOT_USER_ID");
        if let Some(v) = set("SLACK_THREAD_CONTEXT") {
            c.thread_context = crate::config::parse_bool("SLACK_THREAD_CONTEXT", &v)?;
        }
        Ok(Some(c))
    }
}

/// The Slack channel. See the [module docs](self).
pub struct SlackChannel {
    config: SlackConfig,
    http: reqwest::Client,
    posts: Memo<String>,
    last_progress: Mutex<HashMap<TaskId, Instant>>,
}

impl std::fmt::Debug for SlackChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackChannel")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    challenge: Option<Value>,
    team_id: Option<String>,
    event_id: Option<String>,
    event: Option<Event>,
    #[serde(default)]
    authorizations: Vec<Authorization>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: Option<String>,
    subtype: Option<String>,
    user: Option<String>,
    bot_id: Option<String>,
    text: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
    channel: Option<String>,
    channel_type: Option<String>,
    team: Option<String>,
}

#[derive(Deserialize)]
struct Authorization {
    user_id: Option<String>,
    is_bot: Option<bool>,
}

/// An id Slack made (`T…`, `C…`, `U…`): letters and digits.
fn plain_id(what: &str, s: &str) -> Result<()> {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "the event's {what} is not a Slack id"
        )))
    }
}

/// A message timestamp (`1700000000.000100`).
fn plain_ts(what: &str, s: &str) -> Result<()> {
    let ok = s.len() <= 32
        && s.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "the event's {what} is not a Slack timestamp"
        )))
    }
}

/// `ts` as a sortable pair (seconds, fraction).
fn ts_key(ts: &str) -> (u64, u64) {
    let (a, b) = ts.split_once('.').unwrap_or((ts, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn auth_hint() -> &'static str {
    "check SLACK_BOT_TOKEN and the app's scopes (chat:write, reactions:write, \
     channels:history, groups:history, im:history), and that the app is in the channel"
}

/// Slack's `{"ok": false, "error": code}`.
struct Refusal {
    code: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn into_error(self, method: &str) -> Error {
        let (kind, next) = match self.code.as_str() {
            "ratelimited" => (ErrorKind::RateLimited, "it will be tried again later"),
            "invalid_auth"
            | "not_authed"
            | "token_revoked"
            | "token_expired"
            | "account_inactive"
            | "missing_scope"
            | "no_permission"
            | "not_allowed_token_type" => (ErrorKind::Unauthorized, auth_hint()),
            "channel_not_found" | "message_not_found" | "thread_not_found" | "not_in_channel"
            | "is_archived" => (
                ErrorKind::NotFound,
                "check that the channel and message still exist and that the app is in the \
                 channel",
            ),
            "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
                (ErrorKind::Unavailable, "it will be tried again")
            }
            _ => (
                ErrorKind::InvalidInput,
                "this request will not be sent again",
            ),
        };
        let mut e = Error::new(
            kind,
            format!(
                "Slack refused {method}: {}; {next}",
                truncate(&self.code, 100, "…")
            ),
        );
        if let Some(w) = self.retry_after {
            e = e.with_retry_after(w);
        }
        e
    }
}

/// Where a task's replies and reactions go, read back from `channel_meta`.
#[derive(Debug)]
struct Target {
    channel: String,
    /// The message that asked.
    ts: String,
    /// The thread's root.
    thread_ts: String,
}

impl Target {
    fn from_meta(meta: &Value) -> Result<Self> {
        let get = |k: &str| {
            meta[k].as_str().map(str::to_owned).ok_or_else(|| {
                Error::invalid_input(format!(
                    "the task has no Slack `{k}` in its channel_meta: it did not come from the \
                     Slack channel"
                ))
            })
        };
        let t = Self {
            channel: get("channel")?,
            ts: get("ts")?,
            thread_ts: get("thread_ts")?,
        };
        plain_id("channel", &t.channel)?;
        plain_ts("ts", &t.ts)?;
        plain_ts("thread_ts", &t.thread_ts)?;
        Ok(t)
    }
}

impl SlackChannel {
    /// A Slack channel with `config`.
    pub fn new(config: SlackConfig) -> Self {
        Self {
            config,
            http: api::client(),
            posts: Memo::default(),
            last_progress: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    /// [`Channel::parse`] with the clock given (Unix seconds) and without the network: the
    /// verification and the parsing, not the thread context that `parse` adds to a mention
    /// mid-thread.
    pub fn parse_at(&self, request: &InboundRequest, now: i64) -> Result<Inbound> {
        verify::check_size(&request.body, self.config.max_body_bytes)?;
        self.verify(request, now)?;
        self.parse_verified(&request.body)
    }

    /// Checks the v0 signature and the timestamp window.
    pub fn verify(&self, request: &InboundRequest, now: i64) -> Result<()> {
        let ts = request.header(TIMESTAMP_HEADER);
        verify::check_timestamp(
            ts,
            "X-Slack-Request-Timestamp",
            now,
            self.config.replay_window,
        )?;
        let ts = ts.unwrap_or_default().trim();
        let sig = request.header(SIGNATURE_HEADER).ok_or_else(|| {
            Error::unauthorized(
                "missing X-Slack-Signature: only Slack's signed requests are accepted",
            )
        })?;
        let hex = sig.trim().strip_prefix("v0=").unwrap_or("");
        if verify::hmac_sha256_matches(
            self.config.signing_secret.as_bytes(),
            &[b"v0:", ts.as_bytes(), b":", &request.body],
            hex,
        ) {
            Ok(())
        } else {
            Err(Error::unauthorized(
                "X-Slack-Signature does not match: SLACK_SIGNING_SECRET must be the app's \
                 signing secret",
            ))
        }
    }

    fn parse_verified(&self, body: &[u8]) -> Result<Inbound> {
        let skip = |reason: &str| {
            Ok(Inbound::Skip {
                reason: reason.to_owned(),
            })
        };
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return skip(
                "not an Events API request (slash commands and interactivity are not handled)",
            );
        }
        let env: Envelope = serde_json::from_slice(body)
            .map_err(|e| Error::invalid_input(format!("the Slack event is not valid: {e}")))?;
        match env.kind.as_deref() {
            Some("url_verification") => {
                return match env.challenge {
                    Some(Value::String(c)) if c.len() <= 1024 => {
                        Ok(Inbound::Respond(json!({ "challenge": c })))
                    }
                    _ => Err(Error::invalid_input(
                        "url_verification without a string `challenge`",
                    )),
                };
            }
            Some("event_callback") => {}
            _ => return skip("not an event_callback"),
        }
        let Some(ev) = env.event else {
            return Err(Error::invalid_input("event_callback without an `event`"));
        };
        let kind = ev.kind.as_deref().unwrap_or("");
        if !matches!(kind, "app_mention" | "message") {
            return skip("an event type the channel does not handle");
        }
        let bot_user = self.config.bot_user_id.clone().or_else(|| {
            env.authorizations
                .iter()
                .find(|a| a.is_bot.unwrap_or(true))
                .and_then(|a| a.user_id.clone())
        });
        if ev.bot_id.is_some()
            || ev.subtype.as_deref() == Some("bot_message")
            || (ev.user.is_some() && ev.user == bot_user)
        {
            return skip("a bot's message");
        }
        if let Some(sub) = ev.subtype.as_deref()
            && !matches!(sub, "thread_broadcast" | "file_share")
        {
            return skip("a message subtype the channel does not handle (edit, delete, join…)");
        }
        let team = env
            .team_id
            .or(ev.team)
            .ok_or_else(|| Error::invalid_input("the event has no team_id"))?;
        plain_id("team_id", &team)?;
        let channel = ev
            .channel
            .ok_or_else(|| Error::invalid_input("the event has no channel"))?;
        plain_id("channel", &channel)?;
        let ts = ev
            .ts
            .ok_or_else(|| Error::invalid_input("the event has no ts"))?;
        plain_ts("ts", &ts)?;
        if let Some(t) = &ev.thread_ts {
            plain_ts("thread_ts", t)?;
        }
        let raw = ev.text.unwrap_or_default();
        let bot_mention = bot_user.as_ref().map(|u| format!("<@{u}>"));
        let is_im = ev.channel_type.as_deref() == Some("im");
        let in_thread = ev.thread_ts.as_ref().is_some_and(|t| *t != ts);
        let follow_up = match kind {
            "app_mention" => false,
            _ if is_im => false,
            _ if bot_mention
                .as_ref()
                .is_some_and(|m| raw.contains(m.as_str())) =>
            {
                return skip("a message that mentions the app: its app_mention event runs it");
            }
            _ if in_thread => true,
            _ => return skip("a message outside any thread the app is in"),
        };
        let mut text = raw.clone();
        if let Some(m) = &bot_mention {
            text = text.replace(m.as_str(), "");
        }
        let text = mrkdwn::unescape(text.trim());
        if text.is_empty() && follow_up {
            return skip("an empty message");
        }
        let root = ev.thread_ts.clone().unwrap_or_else(|| ts.clone());
        let user = ev.user.unwrap_or_default();
        let message = if text.is_empty() {
            "(a mention without words: read the thread and help)".to_owned()
        } else {
            text.clone()
        };
        let mut task = TaskRequest::new(CHANNEL_TYPE, message);
        task.channel_key = Some(format!("{team}/{channel}/{root}"));
        task.idempotency_key = Some(format!("{team}/{channel}/{ts}"));
        task.channel_meta = json!({
            "team": team,
            "channel": channel,
            "channel_type": ev.channel_type,
            "ts": ts,
            "thread_ts": root,
            "user": user,
            "event_id": env.event_id,
            "mid_thread": in_thread && kind == "app_mention",
            "bot_user_id": bot_user,
            "text": text,
        });
        task.validate_shape()?;
        Ok(if follow_up {
            Inbound::FollowUp(Box::new(task))
        } else {
            Inbound::Task(Box::new(task))
        })
    }

    /// The thread's messages before the mention and since the bot last spoke, as context.
    async fn thread_context(&self, meta: &Value) -> Result<Option<String>> {
        let target = Target::from_meta(meta)?;
        let bot_user = meta["bot_user_id"].as_str();
        let v = self
            .get(
                "conversations.replies",
                &[
                    ("channel", target.channel.as_str()),
                    ("ts", target.thread_ts.as_str()),
                    ("limit", "200"),
                ],
            )
            .await?;
        let here = ts_key(&target.ts);
        let messages = v["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut earlier: Vec<&Value> = messages
            .iter()
            .filter(|m| m["ts"].as_str().is_some_and(|t| ts_key(t) < here))
            .collect();
        earlier.sort_by_key(|m| ts_key(m["ts"].as_str().unwrap_or("0")));
        let is_bot = |m: &Value| {
            m.get("bot_id").is_some_and(|b| !b.is_null())
                || bot_user.is_some_and(|u| m["user"].as_str() == Some(u))
        };
        let since_bot = earlier.iter().rposition(|m| is_bot(m)).map_or(0, |i| i + 1);
        let mut lines: Vec<String> = earlier[since_bot..]
            .iter()
            .filter(|m| !is_bot(m))
            .map(|m| {
                format!(
                    "<@{}>: {}",
                    m["user"].as_str().unwrap_or("someone"),
                    truncate(
                        &mrkdwn::unescape(m["text"].as_str().unwrap_or("")),
                        2000,
                        "…"
                    )
                )
            })
            .collect();
        // Keep the latest lines within 8 kB.
        let mut total = 0;
        let keep = lines
            .iter()
            .rev()
            .take_while(|l| {
                total += l.len() + 1;
                total <= 8000
            })
            .count();
        lines.drain(..lines.len() - keep);
        Ok((!lines.is_empty()).then(|| lines.join("\n")))
    }

    // ---- Web API ----

    fn request(&self, method: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/{method}", self.config.api_url))
            .bearer_auth(&self.config.bot_token)
            .json(body)
    }

    async fn post_api(&self, method: &str, body: &Value) -> Result<Value> {
        let answer = self.send(method, self.request(method, body)).await?;
        answer.map_err(|r| r.into_error(method))
    }

    async fn get(&self, method: &str, query: &[(&str, &str)]) -> Result<Value> {
        let req = self
            .http
            .get(format!("{}/{method}", self.config.api_url))
            .bearer_auth(&self.config.bot_token)
            .query(query);
        self.send(method, req)
            .await?
            .map_err(|r| r.into_error(method))
    }

    /// One call: `Err` when there is no usable answer, `Ok(Err(refusal))` when Slack
    /// answered `{"ok": false, "error": …}`.
    async fn send(
        &self,
        method: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<std::result::Result<Value, Refusal>> {
        let resp = req
            .send()
            .await
            .map_err(|e| api::network_error("Slack", method, &e.without_url()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| api::network_error("Slack", method, &e.without_url()))?;
        if !(200..300).contains(&status) {
            return Err(api::status_error(
                "Slack",
                method,
                status,
                &headers,
                "",
                auth_hint(),
                verify::unix_now(),
            ));
        }
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            Error::new(
                ErrorKind::Protocol,
                format!("Slack answered {method} with no JSON"),
            )
        })?;
        if v["ok"].as_bool() == Some(true) {
            return Ok(Ok(v));
        }
        Ok(Err(Refusal {
            code: v["error"].as_str().unwrap_or("unknown_error").to_owned(),
            retry_after: api::retry_after(&headers, verify::unix_now()),
        }))
    }

    async fn react(&self, target: &Target, name: &str, add: bool) -> Result<()> {
        let method = if add {
            "reactions.add"
        } else {
            "reactions.remove"
        };
        let body = json!({"channel": target.channel, "timestamp": target.ts, "name": name});
        match self.send(method, self.request(method, &body)).await? {
            Ok(_) => Ok(()),
            // Already there / already gone: the wanted state.
            Err(r) if r.code == "already_reacted" || r.code == "no_reaction" => Ok(()),
            Err(r) => Err(r.into_error(method)),
        }
    }

    /// The task's latest reply: remembered, else searched in the thread by metadata.
    async fn latest(&self, task: &Task, target: &Target) -> Result<Option<Own<String>>> {
        if let Some(own) = self.posts.get(task.id) {
            return Ok(Some(own));
        }
        let oldest = (task.created_at.as_secs() - 300).max(0).to_string();
        let id = task.id.to_string();
        let mut cursor = String::new();
        let mut latest: Option<Own<String>> = None;
        for _ in 0..5 {
            let mut query = vec![
                ("channel", target.channel.as_str()),
                ("ts", target.thread_ts.as_str()),
                ("oldest", oldest.as_str()),
                ("include_all_metadata", "true"),
                ("limit", "200"),
            ];
            if !cursor.is_empty() {
                query.push(("cursor", cursor.as_str()));
            }
            let v = self.get("conversations.replies", &query).await?;
            for m in v["messages"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let meta = &m["metadata"];
                if meta["event_type"].as_str() != Some(METADATA_EVENT_TYPE)
                    || meta["event_payload"]["task_id"].as_str() != Some(id.as_str())
                {
                    continue;
                }
                let (Some(ts), Some(kind)) = (
                    m["ts"].as_str(),
                    meta["event_payload"]["kind"]
                        .as_str()
                        .and_then(PostKind::parse),
                ) else {
                    continue;
                };
                if latest.as_ref().is_none_or(|l| ts_key(ts) > ts_key(&l.id)) {
                    latest = Some(Own {
                        id: ts.to_owned(),
                        kind,
                        request: meta["event_payload"]["request"].as_str().map(str::to_owned),
                    });
                }
            }
            cursor = v["response_metadata"]["next_cursor"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if cursor.is_empty() {
                break;
            }
        }
        if let Some(own) = &latest {
            self.posts.set(task.id, own.clone());
        }
        Ok(latest)
    }

    fn metadata(task: &Task, kind: PostKind, request: Option<&str>) -> Value {
        let mut payload = json!({"task_id": task.id.to_string(), "kind": kind.as_str()});
        if let Some(r) = request {
            payload["request"] = json!(r);
        }
        json!({"event_type": METADATA_EVENT_TYPE, "event_payload": payload})
    }

    async fn reply(
        &self,
        task: &Task,
        target: &Target,
        text: &str,
        kind: PostKind,
        request: Option<&str>,
    ) -> Result<()> {
        let v = self
            .post_api(
                "chat.postMessage",
                &json!({
                    "channel": target.channel,
                    "thread_ts": target.thread_ts,
                    "text": text,
                    "metadata": Self::metadata(task, kind, request),
                    "unfurl_links": false,
                }),
            )
            .await?;
        if let Some(ts) = v["ts"].as_str() {
            self.posts.set(
                task.id,
                Own {
                    id: ts.to_owned(),
                    kind,
                    request: request.map(str::to_owned),
                },
            );
        }
        Ok(())
    }

    async fn update(
        &self,
        task: &Task,
        target: &Target,
        ts: &str,
        text: &str,
        kind: PostKind,
    ) -> Result<()> {
        self.post_api(
            "chat.update",
            &json!({
                "channel": target.channel,
                "ts": ts,
                "text": text,
                "metadata": Self::metadata(task, kind, None),
            }),
        )
        .await?;
        self.posts.set(
            task.id,
            Own {
                id: ts.to_owned(),
                kind,
                request: None,
            },
        );
        Ok(())
    }

    fn progress_due(&self, task: TaskId) -> bool {
        let mut last = self.last_progress.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last
            .get(&task)
            .is_some_and(|t| now.duration_since(*t) < PROGRESS_INTERVAL)
        {
            return false;
        }
        if last.len() >= 10_000 {
            last.clear();
        }
        last.insert(task, now);
        true
    }
}

#[async_trait::async_trait]
impl Channel for SlackChannel {
    fn channel_type(&self) -> &str {
        CHANNEL_TYPE
    }

    async fn parse(&self, request: InboundRequest) -> Result<Inbound> {
        let mut inbound = self.parse_at(&request, verify::unix_now())?;
        if let Inbound::Task(task) = &mut inbound
            && self.config.thread_context
            && task.channel_meta["mid_thread"] == json!(true)
        {
            match tokio::time::timeout(CONTEXT_TIMEOUT, self.thread_context(&task.channel_meta))
                .await
            {
                Ok(Ok(Some(context))) => {
                    task.message = format!(
                        "Earlier messages in this Slack thread, for context:\n{context}\n\n\
                         The message to you:\n{}",
                        task.message
                    );
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Slack thread context unavailable; going on without it")
                }
                Err(_) => tracing::warn!("Slack thread context took too long; going on without it"),
            }
        }
        Ok(inbound)
    }

    async fn on_accepted(&self, task: &Task) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        self.react(&target, "eyes", true).await
    }

    async fn on_started(&self, task: &Task) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        self.react(&target, "hourglass_flowing_sand", true).await?;
        let latest = self.latest(task, &target).await?;
        if posts::needs_placeholder(latest.as_ref()) {
            self.reply(task, &target, posts::WORKING, PostKind::Status, None)
                .await?;
        }
        Ok(())
    }

    async fn on_progress(&self, task: &Task, text: &str) -> Result<()> {
        if text.trim().is_empty() || !self.progress_due(task.id) {
            return Ok(());
        }
        let target = Target::from_meta(&task.channel_meta)?;
        let shown = format!(
            "{}\n\n_{}_",
            mrkdwn::from_markdown(&tail(text, 3500)),
            posts::WORKING
        );
        match self.latest(task, &target).await? {
            Some(own) if own.kind == PostKind::Status => {
                self.update(task, &target, &own.id, &shown, PostKind::Status)
                    .await
            }
            Some(own) if own.kind == PostKind::Result => Ok(()),
            _ => {
                self.reply(task, &target, &shown, PostKind::Status, None)
                    .await
            }
        }
    }

    async fn on_input_required(&self, task: &Task, request: &InputRequest) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let latest = self.latest(task, &target).await?;
        let rid = posts::marker_safe(&request.request_id);
        if rid.is_some_and(|r| posts::question_posted(latest.as_ref(), r)) {
            return Ok(());
        }
        let text = mrkdwn::from_markdown(&truncate(
            &posts::question_text(request, "with a reply in this thread"),
            MAX_TEXT_BYTES,
            "\n…",
        ));
        self.reply(task, &target, &text, PostKind::Question, rid)
            .await
    }

    async fn deliver(&self, task: &Task, outcome: &TaskOutcome) -> Result<()> {
        let target = Target::from_meta(&task.channel_meta)?;
        let note = format!(
            "\n\n…(cut: the whole answer is in AnyWork, task {})",
            task.id
        );
        let text = format!(
            "{}\n\n_{}_",
            mrkdwn::from_markdown(&truncate(
                &posts::outcome_text(outcome),
                MAX_TEXT_BYTES,
                &note
            )),
            mrkdwn::escape(&posts::footer(task, outcome))
        );
        let latest = self.latest(task, &target).await?;
        match posts::result_target(latest.as_ref()) {
            Some(ts) => match self
                .update(task, &target, ts, &text, PostKind::Result)
                .await
            {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    self.reply(task, &target, &text, PostKind::Result, None)
                        .await?
                }
                other => other?,
            },
            None => {
                self.reply(task, &target, &text, PostKind::Result, None)
                    .await?
            }
        }
        // Reactions are a courtesy: a failure here never makes the answer be sent again.
        let end = match outcome.status {
            TaskStatus::Completed => "white_check_mark",
            TaskStatus::Canceled => "no_entry",
            _ => "x",
        };
        for (name, add) in [("hourglass_flowing_sand", false), (end, true)] {
            if let Err(e) = self.react(&target, name, add).await {
                tracing::warn!(task = %task.id, error = %e, "Slack reaction failed");
            }
        }
        Ok(())
    }
}
