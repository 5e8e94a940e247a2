//! The REST API's task shape, shared by every crate that sends it: `GET /api/tasks/:id`,
//! session task lists, cancel answers and the body POSTed to a task's push-notification URL.
//! Spelled as the original AnyWork spells it: camelCase keys, times in unix seconds.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{SessionId, Task, TaskId, TaskStatus, TokenUsage};

/// A task as REST clients and push receivers see it (`WireTask::from(&task)`).
///
/// The fields are declared in the order the keys are sent (sorted, as the server has always
/// sent them), so the bytes do not change either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct WireTask {
    /// The channel it came from.
    pub channel_type: String,
    /// Cost in US dollars, when known.
    pub cost_usd: Option<f64>,
    /// When it was submitted (unix seconds).
    pub created_at: i64,
    /// Run time of the worker.
    pub duration_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it reached a final status (unix seconds).
    pub finished_at: Option<i64>,
    /// Id.
    pub id: TaskId,
    /// The user's message.
    pub message: String,
    /// Model turns taken.
    pub num_turns: u32,
    /// Final answer text.
    pub result: Option<String>,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// When it first started running (unix seconds).
    pub started_at: Option<i64>,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// Structured output, when the agent produced one.
    pub structured_output: Option<Value>,
    /// Tokens used.
    #[serde(serialize_with = "sorted_keys")]
    pub usage: TokenUsage,
    /// The worker that ran it.
    pub worker_id: Option<String>,
}

/// Serializes `value` with its keys sorted, as the server has always sent nested objects.
fn sorted_keys<T: Serialize, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serde_json::to_value(value)
        .map_err(serde::ser::Error::custom)?
        .serialize(serializer)
}

impl From<&Task> for WireTask {
    fn from(t: &Task) -> Self {
        Self {
            channel_type: t.channel_type.clone(),
            cost_usd: t.cost_usd,
            created_at: t.created_at.as_secs(),
            duration_ms: t.duration_ms,
            error: t.error.clone(),
            finished_at: t.finished_at.map(|t| t.as_secs()),
            id: t.id,
            message: t.message.clone(),
            num_turns: t.num_turns,
            result: t.result.clone(),
            session_id: t.session_id.clone(),
            started_at: t.started_at.map(|t| t.as_secs()),
            status: t.status,
            structured_output: t.structured_output.clone(),
            usage: t.usage,
            worker_id: t.worker_id.clone(),
        }
    }
}
