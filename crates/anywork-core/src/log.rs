//! Task logs: every event of a task, numbered.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::TaskEvent;
use crate::ids::{TaskId, Timestamp};

/// One stored event of a task.
///
/// `seq` is assigned by the store: 1 for a task's first event, then gap-free, so that
/// "everything after seq N" is exact. Serialized as
/// `{task_id, seq, type, content, metadata, timestamp}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLog {
    /// The task.
    pub task_id: TaskId,
    /// Position in the task's log, from 1.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: TaskEvent,
    /// When the event happened.
    pub timestamp: Timestamp,
}

/// An event to append to a task's log.
#[derive(Debug, Clone)]
pub struct NewTaskLog {
    /// The event.
    pub event: TaskEvent,
    /// When it happened.
    pub timestamp: Timestamp,
    /// The event's wire JSON ([`TaskEvent::wire_json`]), when the caller encoded it already
    /// (to share the bytes with the event's followers): the SQL stores write it as the log's
    /// payload instead of encoding the event again.
    wire: Option<Arc<str>>,
}

impl PartialEq for NewTaskLog {
    /// The event and its time; whether its JSON was made already does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.event == other.event && self.timestamp == other.timestamp
    }
}

impl NewTaskLog {
    /// `event` at `timestamp`.
    pub fn new(event: TaskEvent, timestamp: Timestamp) -> Self {
        Self {
            event,
            timestamp,
            wire: None,
        }
    }

    /// `event`, stamped now.
    pub fn now(event: TaskEvent) -> Self {
        Self::new(event, Timestamp::now())
    }

    /// `event`, stamped now, with its wire JSON encoded once here: the store writes these
    /// bytes, and the caller gets them back to hand to whoever else sends the event on.
    pub fn now_encoded(event: TaskEvent) -> serde_json::Result<(Self, Arc<str>)> {
        let wire: Arc<str> = Arc::from(event.wire_json()?);
        let log = Self {
            event,
            timestamp: Timestamp::now(),
            wire: Some(wire.clone()),
        };
        Ok((log, wire))
    }

    /// The event's wire JSON when it was encoded already ([`now_encoded`](Self::now_encoded)):
    /// the same bytes as `self.event.wire_json()`.
    pub fn wire_json(&self) -> Option<&str> {
        self.wire.as_deref()
    }
}
