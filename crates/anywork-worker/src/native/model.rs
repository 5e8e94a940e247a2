//! The provider-neutral conversation and the small trait both model APIs implement.

use std::time::Duration;

use anywork_core::{TaskEvent, TokenUsage};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

/// Who said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user, and tool results.
    User,
    /// The model.
    Assistant,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// Model reasoning; the signature (Anthropic) is needed to send it back.
    Thinking {
        /// The reasoning text.
        text: String,
        /// Anthropic's signature of the block.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// A tool call by the model.
    ToolUse {
        /// The call's id.
        id: String,
        /// Tool name.
        name: String,
        /// Arguments.
        input: Value,
    },
    /// The answer to a tool call.
    ToolResult {
        /// The id of the call.
        tool_use_id: String,
        /// Output text.
        content: String,
        /// Whether the tool failed.
        #[serde(default)]
        is_error: bool,
    },
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: Vec<Part>,
}

impl Message {
    /// A user message with one text part.
    pub fn user_text(text: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: vec![Part::Text { text: text.into() }],
        }
    }

    /// An assistant message with one text part.
    pub fn assistant_text(text: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: vec![Part::Text { text: text.into() }],
        }
    }

    /// The text parts joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The tool calls, in order.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.content.iter().filter_map(|p| match p {
            Part::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// It finished its answer.
    EndTurn,
    /// It wants tool results.
    ToolUse,
    /// It hit `max_tokens`.
    MaxTokens,
    /// Anything else the API said.
    Other(String),
}

/// A tool as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    /// Name (`mcp__calc__add` for MCP tools).
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

/// One model call.
pub struct TurnRequest<'a> {
    /// Model name.
    pub model: &'a str,
    /// System prompt.
    pub system: &'a str,
    /// The conversation so far (ends with a user message).
    pub messages: &'a [Message],
    /// Tools the model may call.
    pub tools: &'a [ToolDef],
    /// Output token limit.
    pub max_tokens: u32,
}

/// What one model call produced.
#[derive(Debug, Clone)]
pub struct TurnResponse {
    /// The assistant message.
    pub message: Message,
    /// Why it stopped.
    pub stop: StopReason,
    /// Tokens of this call.
    pub usage: TokenUsage,
}

/// A failed model call.
#[derive(Debug, Clone)]
pub struct ApiFailure {
    /// For people: includes the API's own message when there is one.
    pub message: String,
    /// Whether trying again may help (429, 5xx, 529, connection errors, overload).
    pub retryable: bool,
    /// The server's `retry-after`, if it sent one.
    pub retry_after: Option<Duration>,
    /// Whether events of this call were already sent (then it is never retried).
    pub emitted: bool,
}

impl ApiFailure {
    /// A failure that retrying will not fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
            emitted: false,
        }
    }

    /// A failure that may go away.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            ..Self::fatal(message)
        }
    }
}

/// Where a backend sends `Text` / `Thinking` / `ToolCall` events while it streams.
pub struct Emitter<'a> {
    tx: &'a mpsc::Sender<TaskEvent>,
    emitted: bool,
}

impl<'a> Emitter<'a> {
    /// Emits into `tx`.
    pub fn new(tx: &'a mpsc::Sender<TaskEvent>) -> Self {
        Self { tx, emitted: false }
    }

    /// Sends one event (dropped silently when nobody listens any more: the run is being torn
    /// down then).
    pub async fn emit(&mut self, event: TaskEvent) {
        self.emitted = true;
        let _ = self.tx.send(event).await;
    }

    /// Whether anything was sent.
    pub fn emitted(&self) -> bool {
        self.emitted
    }
}

/// A model API.
#[async_trait]
pub trait ModelBackend: Send + Sync {
    /// Sends one streaming request; emits events as output arrives; returns the whole turn.
    async fn turn(
        &self,
        request: &TurnRequest<'_>,
        out: &mut Emitter<'_>,
    ) -> Result<TurnResponse, ApiFailure>;
}

/// Parses a `retry-after` header (seconds, maybe fractional) or `retry-after-ms`.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(3600.0)));
    }
    let secs = get("retry-after")?.parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// Whether an HTTP status is worth retrying.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429 | 500..=599)
}

/// Turns an error answer into a failure, with the API's message when the body has one
/// (`{"error": {"message": ..}}` on both APIs).
pub fn http_failure(status: u16, headers: &reqwest::header::HeaderMap, body: &str) -> ApiFailure {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let api_message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .and_then(Value::as_str)
            .or_else(|| v.get("message").and_then(Value::as_str))
            .or_else(|| v.get("error").and_then(Value::as_str))
            .map(str::to_owned)
    });
    let error_type = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/type").and_then(Value::as_str))
        .map(str::to_owned);
    let detail = api_message.unwrap_or_else(|| truncate_chars(body.trim(), 500));
    let mut message = match error_type {
        Some(t) => format!("model API error {status} ({t}): {detail}"),
        None => format!("model API error {status}: {detail}"),
    };
    if matches!(status, 401 | 403) {
        // Never retried: only a new key or new rights fix it.
        message.push_str(
            " — the model API refused the credentials: check the key (ANTHROPIC_API_KEY, or \
             API_KEY with API_BASE_URL) and that it may use this model",
        );
    }
    ApiFailure {
        message,
        retryable: retryable_status(status),
        retry_after: retry_after(headers),
        emitted: false,
    }
}

/// The first `max` characters of `s`.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The next event of a model's SSE stream: `Ok(None)` at its end; a silence longer than
/// `idle` or a broken stream is a transient failure (retried if nothing was emitted yet).
pub async fn next_sse_event<S, E>(
    events: &mut S,
    idle: Duration,
) -> Result<Option<eventsource_stream::Event>, ApiFailure>
where
    S: futures_util::Stream<Item = Result<eventsource_stream::Event, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    match tokio::time::timeout(idle, events.next()).await {
        Err(_) => Err(ApiFailure::transient(format!(
            "the model stream was silent for {} s",
            idle.as_secs()
        ))),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(ApiFailure::transient(format!(
            "the model stream broke: {e}"
        ))),
        Ok(Some(Ok(event))) => Ok(Some(event)),
    }
}

/// Awaits a model API request (`send`), giving up after `idle` without an answer; a non-2xx
/// answer becomes the matching [`ApiFailure`] (shared by both backends).
pub async fn send_model_request(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    idle: Duration,
) -> Result<reqwest::Response, ApiFailure> {
    let response = match tokio::time::timeout(idle, send).await {
        Err(_) => {
            return Err(ApiFailure::transient(format!(
                "the model API did not answer within {} s",
                idle.as_secs()
            )));
        }
        Ok(Err(e)) => {
            return Err(ApiFailure::transient(format!(
                "cannot reach the model API: {e}"
            )));
        }
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        let body = read_error_body(response).await;
        return Err(http_failure(status.as_u16(), &headers, &body));
    }
    Ok(response)
}

/// Reads an error body, at most 64 KiB.
pub async fn read_error_body(response: reqwest::Response) -> String {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > 64 * 1024 {
            body.truncate(64 * 1024);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Parses a tool call's accumulated JSON arguments; empty means `{}`. Malformed JSON is kept
/// as a string, so the tool answers with an error instead of the run failing.
pub fn parse_tool_input(raw: &str) -> Value {
    if raw.trim().is_empty() {
        return Value::Object(Default::default());
    }
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}
