//! [`Hub`]: live fan-out of task events to whoever follows a task (WebSocket clients, log
//! long-polls), and of session notices (titles) to the WebSocket clients of their session.
//!
//! Events are published only after the store has them, so a follower that subscribes first
//! and then reads the log cannot miss one: anything not yet in the log arrives live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anywork_core::ws::ServerMessage;
use anywork_core::{SessionId, TaskEvent, TaskId};
use tokio::sync::broadcast;

/// A stored event of a running task, as fanned out.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveEvent {
    /// The task.
    pub task_id: TaskId,
    /// Its session.
    pub session_id: SessionId,
    /// Seq in the task log.
    pub seq: u64,
    /// The event.
    pub event: TaskEvent,
}

impl LiveEvent {
    /// The WebSocket form.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::Event {
            session_id: Some(self.session_id.clone()),
            task_id: Some(self.task_id),
            seq: Some(self.seq),
            event: self.event.clone(),
        }
    }
}

/// Per-task broadcast channels plus one channel of session notices.
#[derive(Debug)]
pub struct Hub {
    tasks: Mutex<HashMap<TaskId, broadcast::Sender<Arc<LiveEvent>>>>,
    notices: broadcast::Sender<ServerMessage>,
    capacity: usize,
}

impl Hub {
    /// A hub whose followers may fall `capacity` events behind before they must re-read the
    /// log.
    pub fn new(capacity: usize) -> Self {
        let (notices, _) = broadcast::channel(256);
        Self {
            tasks: Mutex::new(HashMap::new()),
            notices,
            capacity: capacity.max(16),
        }
    }

    fn tasks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TaskId, broadcast::Sender<Arc<LiveEvent>>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `task_id` from now on. Pair with a log read to get what came before.
    pub fn subscribe(&self, task_id: TaskId) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.tasks()
            .entry(task_id)
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    /// Sends stored events to the task's followers, if any.
    pub fn publish(&self, events: impl IntoIterator<Item = LiveEvent>) {
        let mut events = events.into_iter().peekable();
        let Some(first) = events.peek() else { return };
        let sender = self.tasks().get(&first.task_id).cloned();
        if let Some(sender) = sender {
            for event in events {
                let _ = sender.send(Arc::new(event));
            }
        }
    }

    /// The task is over: followers get what is buffered, then the end of the stream.
    pub fn close(&self, task_id: TaskId) {
        self.tasks().remove(&task_id);
    }

    /// Forgets `task_id`'s channel if nobody follows it any more (a follower that found the
    /// task already over calls this after dropping its receiver).
    pub fn release(&self, task_id: TaskId) {
        let mut tasks = self.tasks();
        if tasks.get(&task_id).is_some_and(|s| s.receiver_count() == 0) {
            tasks.remove(&task_id);
        }
    }

    /// Tasks with a live channel (for metrics and leak checks).
    pub fn live_tasks(&self) -> usize {
        self.tasks().len()
    }

    /// Sends a session notice (e.g. `session_title`) to the WebSocket connections, each of
    /// which passes on those of the sessions it chatted in.
    pub fn notify(&self, message: ServerMessage) {
        let _ = self.notices.send(message);
    }

    /// Receives session notices.
    pub fn notices(&self) -> broadcast::Receiver<ServerMessage> {
        self.notices.subscribe()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(1024)
    }
}
