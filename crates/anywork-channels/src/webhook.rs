//! The generic webhook: the original AnyWork's `webhook` channel, same body, safer checks.
//!
//! `POST /api/channel/webhook/webhook` with a JSON object:
//!
//! ```json
//! {"message": "Summarize the release notes", "session_id": "wh-1a2b3c4d",
//!  "event": "release", "source": "ci", "meta": {"tag": "v1.2"},
//!  "skills": ["code-review"], "mcp_servers": [{"name": "docs", "transport": "http", "url": "…"}],
//!  "callback_url": "https://ci.example/hook", "callback_auth": "Bearer …"}
//! ```
//!
//! - `message` is required; a body without one (or with a blank one) is skipped
//!   ([`Inbound::Skip`], the endpoint answers `200 {"ok":true,"skipped":true}`), as the
//!   original did.
//! - `session_id` continues that session, creating it if it does not exist
//!   ([`SessionMode::GetOrCreate`]); without one, a fresh `wh-xxxxxxxx` session is made
//!   ([`SessionMode::CreateNew`]).
//! - `skills`: names and/or inline objects; names come back as name-only
//!   [`SkillSpec`]s that the caller resolves
//!   ([`TaskRequest::resolve_skills`]). `mcp_servers`: the original's list, the map form,
//!   `[]`, `{}` or `null`.
//! - `callback_url` (+ `callback_auth`, sent as the `Authorization` header) becomes the
//!   task's push notification; the outcome is POSTed there by the caller's outbox, and so is
//!   a question the task asks (status `input_required`, with `input`); the next request with
//!   the task's `session_id` answers it. That is
//!   the whole delivery of this channel: [`Channel::deliver`] has nothing to do.
//! - `event`, `source` and `meta` are kept in the task's `channel_meta`.
//! - An `Idempotency-Key` header (1 to 200 visible ASCII characters) makes a resent request
//!   run once.
//!
//! # Authentication
//!
//! With `WEBHOOK_SECRET` set, a request carries either
//!
//! - `X-Webhook-Secret: <the secret>`, as with the original (compared in constant time), or
//! - a signature, for senders that can compute one, so that the secret never travels:
//!   `X-AnyWork-Timestamp: <Unix seconds>` and
//!   `X-AnyWork-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>" keyed with
//!   the secret>`; the timestamp must be within `WEBHOOK_REPLAY_WINDOW_SECONDS` (300) of
//!   the server's clock.
//!
//! A request that carries a signature is judged by it alone. With
//! `WEBHOOK_REQUIRE_SIGNATURE=true` the plain secret header is refused. Without
//! `WEBHOOK_SECRET` the channel is open: anyone who reaches the endpoint can run tasks
//! ([`WebhookChannel::is_open`]; the server should warn at start).

use std::time::Duration;

use anywork_core::channel::{Channel, Inbound, InboundRequest};
use anywork_core::spec::{McpServers, deserialize_mcp_servers_any, deserialize_skills_any};
use anywork_core::{
    Error, PushNotification, Result, SessionId, SessionMode, SkillSpec, Task, TaskOutcome,
    TaskRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::verify;

/// The channel type, as in `/api/channel/webhook/webhook`.
pub const CHANNEL_TYPE: &str = "webhook";
/// The shared-secret header of the original AnyWork.
pub const SECRET_HEADER: &str = "x-webhook-secret";
/// The signature timestamp header (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-anywork-timestamp";
/// The signature header: `sha256=<hex>` of `"<timestamp>.<body>"`.
pub const SIGNATURE_HEADER: &str = "x-anywork-signature";
/// The header that makes a resent request run once.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Settings of the generic webhook.
#[derive(Clone, Default)]
pub struct WebhookConfig {
    /// `WEBHOOK_SECRET`: the shared secret (header or HMAC key); `None` leaves the channel open.
    pub secret: Option<String>,
    /// `WEBHOOK_REQUIRE_SIGNATURE`: refuse the plain `X-Webhook-Secret` header.
    pub require_signature: bool,
    /// `WEBHOOK_REPLAY_WINDOW_SECONDS`: how far a signature's timestamp may be from now.
    pub replay_window: Duration,
    /// Largest body accepted, in bytes (the endpoint usually refuses larger ones first).
    pub max_body_bytes: usize,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("require_signature", &self.require_signature)
            .field("replay_window", &self.replay_window)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl WebhookConfig {
    /// Default replay window of signed requests.
    pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(300);
    /// Default body limit: 1 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

    /// An open webhook (no secret) with the default limits.
    pub fn new() -> Self {
        Self {
            secret: None,
            require_signature: false,
            replay_window: Self::DEFAULT_REPLAY_WINDOW,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// Sets the shared secret.
    pub fn with_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Reads `WEBHOOK_SECRET`, `WEBHOOK_REQUIRE_SIGNATURE` and
    /// `WEBHOOK_REPLAY_WINDOW_SECONDS` through `var` (a variable's value, or `None`).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut c = Self::new();
        c.secret = set("WEBHOOK_SECRET");
        if let Some(v) = set("WEBHOOK_REQUIRE_SIGNATURE") {
            c.require_signature = crate::config::parse_bool("WEBHOOK_REQUIRE_SIGNATURE", &v)?;
        }
        if let Some(v) = set("WEBHOOK_REPLAY_WINDOW_SECONDS") {
            c.replay_window = crate::config::parse_secs("WEBHOOK_REPLAY_WINDOW_SECONDS", &v)?;
        }
        if c.require_signature && c.secret.is_none() {
            return Err(Error::invalid_input(
                "WEBHOOK_REQUIRE_SIGNATURE is set but WEBHOOK_SECRET is not: set the secret \
                 the senders sign with",
            ));
        }
        Ok(c)
    }
}

/// The generic webhook channel. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct WebhookChannel {
    config: WebhookConfig,
}

/// The original's body. Unknown fields are ignored, as the original did.
#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    session_id: Option<Value>,
    #[serde(default)]
    event: Option<Value>,
    #[serde(default)]
    source: Option<Value>,
    #[serde(default)]
    meta: Option<Value>,
    #[serde(default, deserialize_with = "deserialize_skills_any")]
    skills: Vec<SkillSpec>,
    #[serde(default, deserialize_with = "deserialize_mcp_servers_any")]
    mcp_servers: McpServers,
    #[serde(default)]
    callback_url: Option<String>,
    #[serde(default)]
    callback_auth: Option<String>,
}

impl WebhookChannel {
    /// A webhook channel with `config`.
    pub fn new(config: WebhookConfig) -> Self {
        Self { config }
    }

    /// Whether anyone can post tasks (no secret is set).
    pub fn is_open(&self) -> bool {
        self.config.secret.is_none()
    }

    /// [`Channel::parse`] with the clock given (Unix seconds): verification, then parsing.
    pub fn parse_at(&self, request: &InboundRequest, now: i64) -> Result<Inbound> {
        verify::check_size(&request.body, self.config.max_body_bytes)?;
        self.verify(request, now)?;
        self.parse_body(request)
    }

    /// Checks the secret or the signature (nothing when the channel is open).
    pub fn verify(&self, request: &InboundRequest, now: i64) -> Result<()> {
        let Some(secret) = &self.config.secret else {
            return Ok(());
        };
        let signature = request.header(SIGNATURE_HEADER);
        if signature.is_some() || request.header(TIMESTAMP_HEADER).is_some() {
            let ts_header = request.header(TIMESTAMP_HEADER);
            verify::check_timestamp(
                ts_header,
                "X-AnyWork-Timestamp",
                now,
                self.config.replay_window,
            )?;
            let ts = ts_header.unwrap_or_default().trim();
            let hex = signature
                .and_then(|s| s.trim().strip_prefix("sha256="))
                .ok_or_else(|| {
                    Error::unauthorized(
                        "X-AnyWork-Signature must be `sha256=<hex HMAC-SHA256 of \
                         \"<timestamp>.<body>\">` next to X-AnyWork-Timestamp",
                    )
                })?;
            if verify::hmac_sha256_matches(
                secret.as_bytes(),
                &[ts.as_bytes(), b".", &request.body],
                hex,
            ) {
                return Ok(());
            }
            return Err(Error::unauthorized(
                "X-AnyWork-Signature does not match the body: sign \"<timestamp>.<raw body>\" \
                 with WEBHOOK_SECRET (HMAC-SHA256, hex)",
            ));
        }
        if self.config.require_signature {
            return Err(Error::unauthorized(
                "this webhook needs a signature: send X-AnyWork-Timestamp and \
                 X-AnyWork-Signature (HMAC-SHA256 of \"<timestamp>.<body>\" with the secret)",
            ));
        }
        match request.header(SECRET_HEADER) {
            Some(given) if verify::secrets_equal(given.as_bytes(), secret.as_bytes()) => Ok(()),
            Some(_) => Err(Error::unauthorized(
                "X-Webhook-Secret is wrong: send the value of the server's WEBHOOK_SECRET",
            )),
            None => Err(Error::unauthorized(
                "missing X-Webhook-Secret (or X-AnyWork-Timestamp + X-AnyWork-Signature): this \
                 webhook needs the server's WEBHOOK_SECRET",
            )),
        }
    }

    /// Parses a verified body.
    fn parse_body(&self, request: &InboundRequest) -> Result<Inbound> {
        // serde would also take a struct as a JSON array: refuse anything but an object first.
        if request.body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(&request.body) {
                    Ok(_) => Error::invalid_input(
                        "the body must be a JSON object such as {\"message\": \"…\"}",
                    ),
                    Err(e) => Error::invalid_input(format!("the body is not JSON: {e}")),
                },
            );
        }
        let body: Body = serde_json::from_slice(&request.body).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                Error::invalid_input(format!("the body is not JSON: {e}"))
            } else {
                Error::invalid_input(format!("invalid webhook body: {e}"))
            }
        })?;
        let message = match body.message {
            None | Some(Value::Null) => {
                return Ok(Inbound::Skip {
                    reason: "no `message` in the body".into(),
                });
            }
            Some(Value::String(m)) if m.trim().is_empty() => {
                return Ok(Inbound::Skip {
                    reason: "`message` is empty".into(),
                });
            }
            Some(Value::String(m)) => m,
            Some(_) => return Err(Error::invalid_input("`message` must be a string")),
        };
        let mut task = TaskRequest::new(CHANNEL_TYPE, message);
        match body.session_id {
            None | Some(Value::Null) => {
                task.session_id = Some(fresh_session_id());
                task.session_mode = SessionMode::CreateNew;
            }
            Some(Value::String(id)) => {
                task.session_id = Some(SessionId::new(id)?);
                task.session_mode = SessionMode::GetOrCreate;
            }
            Some(_) => return Err(Error::invalid_input("`session_id` must be a string")),
        }
        task.skills = body.skills;
        task.mcp_servers = body.mcp_servers;
        if let Some(url) = body.callback_url.filter(|u| !u.trim().is_empty()) {
            check_callback_url(&url)?;
            task.push_notification = Some(PushNotification {
                url,
                authorization: body.callback_auth.filter(|a| !a.is_empty()),
                // The outcome, and any question the task asks (answered by the next request
                // with this session's `session_id`).
                events: ["input_required", "completed", "failed", "canceled"]
                    .map(str::to_owned)
                    .to_vec(),
            });
        }
        let mut meta = serde_json::Map::new();
        for (k, v) in [
            ("event", body.event),
            ("source", body.source),
            ("meta", body.meta),
        ] {
            if let Some(v) = v.filter(|v| !v.is_null()) {
                meta.insert(k.into(), v);
            }
        }
        task.channel_meta = if meta.is_empty() {
            json!({})
        } else {
            Value::Object(meta)
        };
        if let Some(key) = request.header(IDEMPOTENCY_HEADER) {
            let key = key.trim();
            if key.is_empty() || key.len() > 200 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::invalid_input(
                    "Idempotency-Key must be 1 to 200 visible ASCII characters",
                ));
            }
            task.idempotency_key = Some(key.to_owned());
        }
        task.validate_shape()?;
        Ok(Inbound::Task(Box::new(task)))
    }
}

/// `wh-` and 8 random hex digits, as the original AnyWork named webhook sessions.
pub fn fresh_session_id() -> SessionId {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    match SessionId::new(format!("wh-{}", &hex[..8])) {
        Ok(id) => id,
        Err(_) => SessionId::generate(),
    }
}

fn check_callback_url(url: &str) -> Result<()> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2048
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(
            "`callback_url` must be an http:// or https:// URL of at most 2048 characters",
        ))
    }
}

#[async_trait::async_trait]
impl Channel for WebhookChannel {
    fn channel_type(&self) -> &str {
        CHANNEL_TYPE
    }

    async fn parse(&self, request: InboundRequest) -> Result<Inbound> {
        self.parse_at(&request, verify::unix_now())
    }

    /// Another `wh-xxxxxxxx`: a request without `session_id` always gets a session of its
    /// own, even when the 8 random hex digits repeat an existing session's.
    fn fresh_session_id(&self) -> Option<SessionId> {
        Some(fresh_session_id())
    }

    /// Nothing to do: the outcome reaches the sender through the push notification made
    /// from `callback_url`.
    async fn deliver(&self, _task: &Task, _outcome: &TaskOutcome) -> Result<()> {
        Ok(())
    }
}
