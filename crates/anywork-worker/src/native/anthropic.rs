//! The Anthropic Messages API backend: `POST {base}/v1/messages` with `stream: true`.

use std::collections::BTreeMap;
use std::time::Duration;

use anywork_core::{TaskEvent, TokenUsage};
use async_trait::async_trait;
use eventsource_stream::Eventsource;
use serde_json::{Value, json};

use super::model::{
    ApiFailure, Emitter, Message, ModelBackend, Part, Role, StopReason, TurnRequest, TurnResponse,
    next_sse_event, parse_tool_input, send_model_request,
};

/// The API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Talks to the Anthropic Messages API.
pub struct Anthropic {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
    pub(crate) api_key: String,
    pub(crate) idle_timeout: Duration,
}

impl Anthropic {
    /// A backend for `base_url` (without `/v1`).
    pub fn new(client: reqwest::Client, base_url: &str, api_key: &str, idle: Duration) -> Self {
        Self {
            client,
            url: format!("{}/v1/messages", base_url.trim_end_matches('/')),
            api_key: api_key.to_owned(),
            idle_timeout: idle,
        }
    }
}

/// The messages in the API's shape: empty text dropped, unsigned thinking dropped, tool
/// results first in their message, consecutive messages of one role merged.
pub fn messages_json(messages: &[Message]) -> Vec<Value> {
    let mut out: Vec<(Role, Vec<Value>)> = Vec::new();
    for message in messages {
        let mut results = Vec::new();
        let mut blocks = Vec::new();
        for part in &message.content {
            match part {
                Part::Text { text } if !text.is_empty() => {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                Part::Text { .. } => {}
                Part::Thinking {
                    text,
                    signature: Some(signature),
                } if message.role == Role::Assistant => blocks
                    .push(json!({"type": "thinking", "thinking": text, "signature": signature})),
                Part::Thinking { .. } => {}
                Part::ToolUse { id, name, input } if message.role == Role::Assistant => {
                    let input = if input.is_object() {
                        input.clone()
                    } else {
                        json!({})
                    };
                    blocks
                        .push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                }
                Part::ToolUse { .. } => {}
                Part::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } => {
                    let content = if content.is_empty() {
                        "(no output)"
                    } else {
                        content
                    };
                    results.push(json!({
                        "type": "tool_result",
                        "tool_use_id": tool_use_id,
                        "content": content,
                        "is_error": is_error,
                    }));
                }
            }
        }
        results.extend(blocks);
        if results.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((role, blocks)) if *role == message.role => {
                if message.role == Role::User {
                    // Keep every tool_result ahead of text.
                    let (mut r, t): (Vec<Value>, Vec<Value>) = blocks
                        .drain(..)
                        .chain(results)
                        .partition(|b| b["type"] == "tool_result");
                    r.extend(t);
                    *blocks = r;
                } else {
                    blocks.extend(results);
                }
            }
            _ => out.push((message.role, results)),
        }
    }
    out.into_iter()
        .map(|(role, content)| {
            let role = match role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": content})
        })
        .collect()
}

/// The request body.
pub fn request_body(request: &TurnRequest<'_>) -> Value {
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens,
        "system": request.system,
        "messages": messages_json(request.messages),
        "stream": true,
    });
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({"name": t.name, "description": t.description, "input_schema": t.input_schema})
            })
            .collect();
    }
    body
}

/// A content block being streamed.
enum Building {
    Text(String),
    Thinking {
        text: String,
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        json: String,
    },
    Ignored,
}

fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn read_usage(usage: &Value, into: &mut TokenUsage) {
    if let Some(n) = u64_at(usage, "input_tokens") {
        into.input_tokens = n;
    }
    if let Some(n) = u64_at(usage, "output_tokens") {
        into.output_tokens = n;
    }
    if let Some(n) = u64_at(usage, "cache_creation_input_tokens") {
        into.cache_creation_input_tokens = n;
    }
    if let Some(n) = u64_at(usage, "cache_read_input_tokens") {
        into.cache_read_input_tokens = n;
    }
}

#[async_trait]
impl ModelBackend for Anthropic {
    async fn turn(
        &self,
        request: &TurnRequest<'_>,
        out: &mut Emitter<'_>,
    ) -> Result<TurnResponse, ApiFailure> {
        let send = self
            .client
            .post(&self.url)
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("accept", "text/event-stream")
            .json(&request_body(request))
            .send();
        let response = send_model_request(send, self.idle_timeout).await?;

        let mut events = response.bytes_stream().eventsource();
        let mut blocks: BTreeMap<u64, Building> = BTreeMap::new();
        let mut done: BTreeMap<u64, Part> = BTreeMap::new();
        let mut usage = TokenUsage::default();
        let mut stop: Option<String> = None;
        let mut finished = false;
        let fail = |out: &Emitter<'_>, mut f: ApiFailure| {
            f.emitted = out.emitted();
            Err(f)
        };
        loop {
            let next = match next_sse_event(&mut events, self.idle_timeout).await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(f) => return fail(out, f),
            };
            let data: Value = match serde_json::from_str(&next.data) {
                Ok(v) => v,
                Err(_) => continue, // not JSON (e.g. an empty keep-alive): nothing to use
            };
            let kind = data
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or(next.event.as_str())
                .to_owned();
            let index = u64_at(&data, "index").unwrap_or(0);
            match kind.as_str() {
                "message_start" => {
                    if let Some(u) = data.pointer("/message/usage") {
                        read_usage(u, &mut usage);
                    }
                }
                "content_block_start" => {
                    let block = data.get("content_block").cloned().unwrap_or(Value::Null);
                    let str_of = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or("");
                    let building = match str_of("type") {
                        "text" => {
                            let text = str_of("text").to_owned();
                            if !text.is_empty() {
                                out.emit(TaskEvent::text(text.clone())).await;
                            }
                            Building::Text(text)
                        }
                        "thinking" => Building::Thinking {
                            text: str_of("thinking").to_owned(),
                            signature: str_of("signature").to_owned(),
                        },
                        "tool_use" => Building::ToolUse {
                            id: str_of("id").to_owned(),
                            name: str_of("name").to_owned(),
                            json: String::new(),
                        },
                        _ => Building::Ignored,
                    };
                    blocks.insert(index, building);
                }
                "content_block_delta" => {
                    let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                    let str_of = |k: &str| delta.get(k).and_then(Value::as_str).unwrap_or("");
                    let Some(block) = blocks.get_mut(&index) else {
                        continue;
                    };
                    match (str_of("type"), block) {
                        ("text_delta", Building::Text(text)) => {
                            let piece = str_of("text");
                            if !piece.is_empty() {
                                text.push_str(piece);
                                out.emit(TaskEvent::text(piece)).await;
                            }
                        }
                        ("thinking_delta", Building::Thinking { text, .. }) => {
                            let piece = str_of("thinking");
                            if !piece.is_empty() {
                                text.push_str(piece);
                                out.emit(TaskEvent::Thinking {
                                    text: piece.to_owned(),
                                })
                                .await;
                            }
                        }
                        ("signature_delta", Building::Thinking { signature, .. }) => {
                            signature.push_str(str_of("signature"));
                        }
                        ("input_json_delta", Building::ToolUse { json, .. }) => {
                            json.push_str(str_of("partial_json"));
                        }
                        _ => {}
                    }
                }
                "content_block_stop" => {
                    if let Some(block) = blocks.remove(&index) {
                        let part = match block {
                            Building::Text(text) => Some(Part::Text { text }),
                            Building::Thinking { text, signature } => Some(Part::Thinking {
                                text,
                                signature: (!signature.is_empty()).then_some(signature),
                            }),
                            Building::ToolUse { id, name, json } => {
                                let input = parse_tool_input(&json);
                                out.emit(TaskEvent::ToolCall {
                                    id: id.clone(),
                                    name: name.clone(),
                                    input: input.clone(),
                                })
                                .await;
                                Some(Part::ToolUse { id, name, input })
                            }
                            Building::Ignored => None,
                        };
                        if let Some(part) = part {
                            done.insert(index, part);
                        }
                    }
                }
                "message_delta" => {
                    if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str)
                    {
                        stop = Some(reason.to_owned());
                    }
                    if let Some(u) = data.get("usage") {
                        read_usage(u, &mut usage);
                    }
                }
                "message_stop" => {
                    finished = true;
                    break;
                }
                "error" => {
                    let error_type = data
                        .pointer("/error/type")
                        .and_then(Value::as_str)
                        .unwrap_or("error");
                    let message = data
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("no message");
                    let retryable = matches!(
                        error_type,
                        "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error"
                    );
                    let f = ApiFailure {
                        message: format!("model API error ({error_type}): {message}"),
                        retryable,
                        retry_after: None,
                        emitted: false,
                    };
                    return fail(out, f);
                }
                _ => {} // ping and future event types
            }
        }
        if !finished {
            return fail(
                out,
                ApiFailure::transient("the model stream ended before message_stop"),
            );
        }
        let stop = match stop.as_deref() {
            Some("tool_use") => StopReason::ToolUse,
            Some("max_tokens") => StopReason::MaxTokens,
            Some("end_turn") | Some("stop_sequence") | None => StopReason::EndTurn,
            Some(other) => StopReason::Other(other.to_owned()),
        };
        Ok(TurnResponse {
            message: Message {
                role: Role::Assistant,
                content: done.into_values().collect(),
            },
            stop,
            usage,
        })
    }
}
