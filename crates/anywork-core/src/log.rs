//! Task logs: every event of a task, numbered.

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
#[derive(Debug, Clone, PartialEq)]
pub struct NewTaskLog {
    /// The event.
    pub event: TaskEvent,
    /// When it happened.
    pub timestamp: Timestamp,
}

impl NewTaskLog {
    /// `event`, stamped now.
    pub fn now(event: TaskEvent) -> Self {
        Self {
            event,
            timestamp: Timestamp::now(),
        }
    }
}
