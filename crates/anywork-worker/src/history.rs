//! The worker's own conversation history of a session, independent of the executor.
//!
//! Stored as JSON lines in `<session workspace>/sessions/history.jsonl`: the chat handler
//! appends the user's message when a task starts and the assistant's answer (final text and
//! tool calls) when it ends.

use anywork_core::{TaskEvent, TaskId, TaskOutcome, TaskStatus, Timestamp, TokenUsage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a [`HistoryMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user's message that started a task.
    User,
    /// The agent's answer at the end of a task.
    Assistant,
}

/// A tool call made during a task, with its result when one arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// Tool-use id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Tool arguments.
    #[serde(default)]
    pub input: Value,
    /// The tool's output, when its result arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Whether the tool failed, when its result arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    pub role: Role,
    /// The message text (for the assistant: the final result, else the text it streamed).
    pub content: String,
    /// The task this message belongs to.
    pub task_id: TaskId,
    /// When it was written, in milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    /// Tool calls the assistant made during the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallRecord>,
    /// For assistant messages: how the task ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskStatus>,
    /// For assistant messages of failed tasks: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HistoryMessage {
    /// The user's message that starts `task_id`, stamped now.
    pub fn user(task_id: TaskId, content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
            task_id,
            timestamp: Timestamp::now(),
            tool_calls: Vec::new(),
            status: None,
            error: None,
        }
    }
}

/// The error of the assistant message that marks a turn the worker never finished.
pub const INTERRUPTED: &str =
    "interrupted: the worker stopped before this turn finished; its instruction was not completed";

impl HistoryMessage {
    /// The assistant message written for `task_id`'s turn when the worker stopped before it
    /// ended (found when the next turn starts): `failed`, with [`INTERRUPTED`] as the error.
    pub fn interrupted(task_id: TaskId) -> Self {
        Self {
            role: Role::Assistant,
            content: String::new(),
            task_id,
            timestamp: Timestamp::now(),
            tool_calls: Vec::new(),
            status: Some(TaskStatus::Failed),
            error: Some(INTERRUPTED.to_owned()),
        }
    }
}

/// Parses `history.jsonl`, skipping blank lines and lines that do not parse (a torn last line).
pub fn parse_history(text: &str) -> Vec<HistoryMessage> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .filter_map(|line| match serde_json::from_str(line) {
            Ok(message) => Some(message),
            Err(e) => {
                tracing::debug!(error = %e, "skipping an unreadable history line");
                None
            }
        })
        .collect()
}

/// Collects what the assistant did from a run's events, to write its history message.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    text: String,
    tool_calls: Vec<ToolCallRecord>,
    usage: Option<(TokenUsage, Option<f64>)>,
}

impl Recorder {
    /// Notes one (non-terminal) event.
    pub(crate) fn observe(&mut self, event: &TaskEvent) {
        match event {
            TaskEvent::Text { text } => self.text.push_str(text),
            TaskEvent::ToolCall { id, name, input } => self.tool_calls.push(ToolCallRecord {
                id: id.clone(),
                name: name.clone(),
                input: input.clone(),
                output: None,
                is_error: None,
            }),
            TaskEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                if let Some(call) = self
                    .tool_calls
                    .iter_mut()
                    .rev()
                    .find(|c| &c.id == tool_use_id)
                {
                    call.output = Some(content.clone());
                    call.is_error = Some(*is_error);
                }
            }
            TaskEvent::Usage { usage, cost_usd } => self.usage = Some((*usage, *cost_usd)),
            _ => {}
        }
    }

    /// The last usage reported by the executor, if any.
    pub(crate) fn usage(&self) -> Option<&(TokenUsage, Option<f64>)> {
        self.usage.as_ref()
    }

    /// The assistant's history message for a run that ended with `outcome`.
    pub(crate) fn assistant_message(
        &self,
        task_id: TaskId,
        outcome: &TaskOutcome,
    ) -> HistoryMessage {
        let content = match &outcome.result {
            Some(result) if !result.is_empty() => result.clone(),
            _ => self.text.clone(),
        };
        HistoryMessage {
            role: Role::Assistant,
            content,
            task_id,
            timestamp: Timestamp::now(),
            tool_calls: self.tool_calls.clone(),
            status: Some(outcome.status),
            error: outcome.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn torn_and_blank_lines_are_skipped() {
        let task = TaskId::generate();
        let line = serde_json::to_string(&HistoryMessage::user(task, "hi")).unwrap();
        let text = format!("{line}\n\n{line}\n{{\"role\":\"assist");
        let parsed = parse_history(&text);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].content, "hi");
    }

    #[test]
    fn recorder_pairs_tool_results_and_prefers_the_result() {
        let mut rec = Recorder::default();
        rec.observe(&TaskEvent::text("Let me "));
        rec.observe(&TaskEvent::ToolCall {
            id: "t1".into(),
            name: "Bash".into(),
            input: json!({"command": "ls"}),
        });
        rec.observe(&TaskEvent::ToolResult {
            tool_use_id: "t1".into(),
            content: "a.txt".into(),
            is_error: false,
        });
        rec.observe(&TaskEvent::text("check."));
        let task = TaskId::generate();
        let msg = rec.assistant_message(task, &TaskOutcome::completed("Done."));
        assert_eq!(msg.content, "Done.");
        assert_eq!(msg.tool_calls[0].output.as_deref(), Some("a.txt"));
        let msg = rec.assistant_message(task, &TaskOutcome::failed("boom"));
        assert_eq!(msg.content, "Let me check.");
        assert_eq!(msg.status, Some(TaskStatus::Failed));
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["tool_calls"][0]["name"], "Bash");
    }
}
