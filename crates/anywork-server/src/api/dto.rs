//! The JSON shapes of the REST API, as the original AnyWork spells them: session rows in
//! snake_case, times in unix seconds. Tasks (camelCase) are [`anywork_core::WireTask`], which
//! push notifications share.

use anywork_core::{Session, SessionSummary, TaskLog, WireEvent};
use serde_json::{Value, json};

/// A session row.
pub fn session_json(s: &Session) -> Value {
    let mut v = json!({
        "id": s.id,
        "channel_type": s.channel_type,
        "title": s.title,
        "created_at": s.created_at.as_secs(),
        "last_active": s.last_active.as_secs(),
    });
    if let Some(key) = &s.channel_key {
        v["channel_key"] = json!(key);
    }
    v
}

/// A session row with its task counts.
pub fn summary_json(s: &SessionSummary) -> Value {
    let mut v = session_json(&s.session);
    v["task_count"] = json!(s.task_count);
    v["active_task_count"] = json!(s.active_task_count);
    v
}

/// A task log entry: `{seq, type, content, metadata, timestamp}`.
pub fn log_json(l: &TaskLog) -> Value {
    let wire = WireEvent::from(l.event.clone());
    json!({
        "seq": l.seq,
        "type": wire.kind,
        "content": wire.content,
        "metadata": wire.metadata,
        "timestamp": l.timestamp.as_secs(),
    })
}
