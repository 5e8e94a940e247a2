//! How a run ended ([`TaskOutcome`]) and the tokens it used ([`TokenUsage`]).
//!
//! Both the event stream ([`TaskEvent::Done`](crate::TaskEvent::Done)) and the stored
//! [`Task`](crate::Task) carry these, so they live apart from either to keep `event` and
//! `task` from depending on each other.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::status::TaskStatus;

/// How a run ended, carried by [`TaskEvent::Done`](crate::TaskEvent::Done) and stored on the
/// task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// `completed`, `failed` or `canceled`; `completed` when absent, as the original worker's
    /// `done` event has no status.
    #[serde(default = "completed_status")]
    pub status: TaskStatus,
    /// Final answer text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Structured output, when the agent produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_output: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Cost in US dollars, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// Tokens used by the whole run.
    #[serde(default)]
    pub usage: TokenUsage,
    /// Model turns taken.
    #[serde(default)]
    pub num_turns: u32,
    /// Wall-clock time of the run.
    #[serde(default)]
    pub duration_ms: u64,
    /// Pull requests the run opened (through the worker's credentialed tool), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_requests: Vec<PullRequestLink>,
}

/// A pull request a run opened: reported by the worker that pushed the branch and called the
/// API, never taken from the agent's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestLink {
    /// `owner/name`.
    pub repository: String,
    /// Its number.
    pub number: u64,
    /// Its web page.
    pub url: String,
    /// The branch pushed (the pull request's head).
    pub branch: String,
    /// The branch it asks to merge into.
    pub base: String,
}

fn completed_status() -> TaskStatus {
    TaskStatus::Completed
}

impl TaskOutcome {
    /// A completed outcome with `result`.
    pub fn completed(result: impl Into<String>) -> Self {
        Self {
            status: TaskStatus::Completed,
            result: Some(result.into()),
            ..Self::empty(TaskStatus::Completed)
        }
    }

    /// A failed outcome with `error`.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::empty(TaskStatus::Failed)
        }
    }

    /// A canceled outcome.
    pub fn canceled() -> Self {
        Self::empty(TaskStatus::Canceled)
    }

    fn empty(status: TaskStatus) -> Self {
        Self {
            status,
            result: None,
            structured_output: None,
            error: None,
            cost_usd: None,
            usage: TokenUsage::default(),
            num_turns: 0,
            duration_ms: 0,
            pull_requests: Vec::new(),
        }
    }
}

/// Tokens counted by the model API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt tokens, cache excluded.
    #[serde(default)]
    pub input_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Tokens written to the prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Tokens read from the prompt cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl TokenUsage {
    /// Adds `other` to `self` (saturating).
    pub fn add(&mut self, other: &TokenUsage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_creation_input_tokens = self
            .cache_creation_input_tokens
            .saturating_add(other.cache_creation_input_tokens);
        self.cache_read_input_tokens = self
            .cache_read_input_tokens
            .saturating_add(other.cache_read_input_tokens);
    }
}
