//! The OpenAI-compatible chat completions backend: `POST {base}/chat/completions`,
//! `stream: true`, tool calls reassembled from `delta.tool_calls[index]` pieces.

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

/// Talks to an OpenAI-compatible chat completions API.
pub struct OpenAi {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
    pub(crate) api_key: String,
    pub(crate) idle_timeout: Duration,
    /// OpenAI itself wants `max_completion_tokens`; compatible servers know `max_tokens`.
    pub(crate) completion_tokens_field: bool,
}

impl OpenAi {
    /// A backend for `base_url` (with the version path, e.g. `.../v1`).
    pub fn new(client: reqwest::Client, base_url: &str, api_key: &str, idle: Duration) -> Self {
        Self {
            client,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key: api_key.to_owned(),
            idle_timeout: idle,
            completion_tokens_field: base_url.contains("api.openai.com"),
        }
    }
}

/// The messages in the API's shape, after the system message.
pub fn messages_json(system: &str, messages: &[Message]) -> Vec<Value> {
    let mut out = vec![json!({"role": "system", "content": system})];
    for message in messages {
        match message.role {
            Role::User => {
                let mut text = String::new();
                for part in &message.content {
                    match part {
                        Part::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                        } => {
                            let content = if *is_error {
                                format!("Error: {content}")
                            } else if content.is_empty() {
                                "(no output)".to_owned()
                            } else {
                                content.clone()
                            };
                            out.push(json!({
                                "role": "tool",
                                "tool_call_id": tool_use_id,
                                "content": content,
                            }));
                        }
                        Part::Text { text: t } => {
                            if !text.is_empty() && !t.is_empty() {
                                text.push_str("\n\n");
                            }
                            text.push_str(t);
                        }
                        _ => {}
                    }
                }
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                let text = message.text();
                let calls: Vec<Value> = message
                    .tool_uses()
                    .map(|(id, name, input)| {
                        json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": input.to_string()},
                        })
                    })
                    .collect();
                if text.is_empty() && calls.is_empty() {
                    continue;
                }
                let mut m = json!({
                    "role": "assistant",
                    "content": if text.is_empty() { Value::Null } else { json!(text) },
                });
                if !calls.is_empty() {
                    m["tool_calls"] = Value::Array(calls);
                }
                out.push(m);
            }
        }
    }
    out
}

/// The request body.
pub fn request_body(request: &TurnRequest<'_>, completion_tokens_field: bool) -> Value {
    let mut body = json!({
        "model": request.model,
        "messages": messages_json(request.system, request.messages),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let field = if completion_tokens_field {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    body[field] = json!(request.max_tokens);
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    },
                })
            })
            .collect();
    }
    body
}

#[derive(Default)]
struct CallBuilder {
    id: String,
    name: String,
    arguments: String,
}

fn read_usage(usage: &Value) -> TokenUsage {
    let n = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("/prompt_tokens_details/cached_tokens");
    TokenUsage {
        input_tokens: n("/prompt_tokens").saturating_sub(cached),
        output_tokens: n("/completion_tokens"),
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: cached,
    }
}

#[async_trait]
impl ModelBackend for OpenAi {
    async fn turn(
        &self,
        request: &TurnRequest<'_>,
        out: &mut Emitter<'_>,
    ) -> Result<TurnResponse, ApiFailure> {
        let send = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .header("accept", "text/event-stream")
            .json(&request_body(request, self.completion_tokens_field))
            .send();
        let response = send_model_request(send, self.idle_timeout).await?;

        let mut events = response.bytes_stream().eventsource();
        let mut text = String::new();
        let mut thinking = String::new();
        let mut calls: BTreeMap<u64, CallBuilder> = BTreeMap::new();
        let mut usage = TokenUsage::default();
        let mut finish: Option<String> = None;
        let mut done = false;
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
            let data = next.data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| error.to_string());
                return fail(
                    out,
                    ApiFailure::fatal(format!("model API error in the stream: {message}")),
                );
            }
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                usage = read_usage(u);
            }
            let Some(choice) = chunk.pointer("/choices/0") else {
                continue;
            };
            if let Some(delta) = choice.get("delta") {
                if let Some(piece) = delta
                    .get("reasoning_content")
                    .or_else(|| delta.get("reasoning"))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    thinking.push_str(piece);
                    out.emit(TaskEvent::Thinking {
                        text: piece.to_owned(),
                    })
                    .await;
                }
                if let Some(piece) = delta
                    .get("content")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    text.push_str(piece);
                    out.emit(TaskEvent::text(piece)).await;
                }
                for call in delta
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let index = call
                        .get("index")
                        .and_then(Value::as_u64)
                        .unwrap_or(calls.len() as u64);
                    let entry = calls.entry(index).or_default();
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        entry.id.push_str(id);
                    }
                    if let Some(name) = call.pointer("/function/name").and_then(Value::as_str) {
                        entry.name.push_str(name);
                    }
                    if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str)
                    {
                        entry.arguments.push_str(args);
                    }
                }
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                finish = Some(reason.to_owned());
            }
        }
        if !done && finish.is_none() {
            return fail(
                out,
                ApiFailure::transient("the model stream ended without a finish_reason"),
            );
        }
        let mut content = Vec::new();
        if !thinking.is_empty() {
            content.push(Part::Thinking {
                text: thinking,
                signature: None,
            });
        }
        if !text.is_empty() {
            content.push(Part::Text { text });
        }
        for (index, call) in calls {
            let id = if call.id.is_empty() {
                format!("call_{index}")
            } else {
                call.id
            };
            let input = parse_tool_input(&call.arguments);
            out.emit(TaskEvent::ToolCall {
                id: id.clone(),
                name: call.name.clone(),
                input: input.clone(),
            })
            .await;
            content.push(Part::ToolUse {
                id,
                name: call.name,
                input,
            });
        }
        let stop = match finish.as_deref() {
            Some("tool_calls") | Some("function_call") => StopReason::ToolUse,
            Some("length") => StopReason::MaxTokens,
            Some("stop") | None => StopReason::EndTurn,
            Some(other) => StopReason::Other(other.to_owned()),
        };
        Ok(TurnResponse {
            message: Message {
                role: Role::Assistant,
                content,
            },
            stop,
            usage,
        })
    }
}
