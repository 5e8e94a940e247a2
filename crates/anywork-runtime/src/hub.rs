//! [`Hub`]: live fan-out of task events to whoever follows a task (WebSocket clients, log
//! long-polls), and of session notices (titles) to the WebSocket clients of their session.
//!
//! Events are published only after the store has them, so a follower that subscribes first
//! and then reads the log cannot miss one: anything not yet in the log arrives live. Only the
//! dispatcher publishes (the hub is private to this crate); callers get events through
//! [`Dispatcher::events`](crate::Dispatcher::events).

use std::sync::{Arc, Mutex, MutexGuard};

use anywork_core::ws::ServerMessage;
use anywork_core::{SessionId, TaskEvent, TaskId};
use tokio::sync::broadcast;

use crate::notices::{Notices, Watchers};
use crate::shrink::Shrink;
use crate::task_map::TaskMap;

/// A stored event of a running task, as fanned out.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LiveEvent {
    /// The task.
    pub task_id: TaskId,
    /// Its session.
    pub session_id: SessionId,
    /// Seq in the task log.
    pub seq: u64,
    /// The event.
    pub event: TaskEvent,
    /// The event's wire JSON as the store got it ([`TaskEvent::wire_json`]), when the run
    /// that stored it encoded it: encoded once, shared by the store and every follower
    /// (`None` for events read back from the log, which are encoded when sent).
    pub(crate) wire: Option<Arc<str>>,
}

impl PartialEq for LiveEvent {
    /// The event and where it is; whether its JSON was made already does not matter.
    fn eq(&self, other: &Self) -> bool {
        self.task_id == other.task_id
            && self.session_id == other.session_id
            && self.seq == other.seq
            && self.event == other.event
    }
}

impl LiveEvent {
    /// An event read from the log (encoded when sent).
    pub(crate) fn new(task_id: TaskId, session_id: SessionId, seq: u64, event: TaskEvent) -> Self {
        Self {
            task_id,
            session_id,
            seq,
            event,
            wire: None,
        }
    }

    /// The WebSocket form.
    pub fn to_message(&self) -> ServerMessage {
        self.clone().into_message()
    }

    /// The WebSocket form, without copying the event.
    pub fn into_message(self) -> ServerMessage {
        ServerMessage::Event {
            session_id: Some(self.session_id),
            task_id: Some(self.task_id),
            seq: Some(self.seq),
            event: self.event,
        }
    }

    /// The WebSocket form's JSON text, byte for byte what
    /// [`ServerMessage::into_json`] writes of [`to_message`](Self::to_message): made from the
    /// event's wire JSON when the run shared it (the event is not encoded again), else
    /// encoded here.
    pub fn to_json(&self) -> serde_json::Result<String> {
        if let Some(text) = self.wire.as_deref().and_then(|wire| {
            ServerMessage::event_json(&self.session_id, self.task_id, self.seq, wire)
        }) {
            return Ok(text);
        }
        self.to_message().into_json()
    }
}

/// A followed task's channel, and its session (what the change feed needs to publish the
/// events of a task run elsewhere without reading the task).
#[derive(Debug)]
struct TaskChannel {
    sender: broadcast::Sender<Arc<LiveEvent>>,
    session: SessionId,
}

type TaskChannels = Mutex<TaskMap<TaskChannel>>;

fn lock(tasks: &TaskChannels) -> MutexGuard<'_, TaskMap<TaskChannel>> {
    // A panic while holding this lock cannot leave the map inconsistent.
    tasks.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-task broadcast channels plus the watchers of session notices.
#[derive(Debug)]
pub(crate) struct Hub {
    tasks: Arc<TaskChannels>,
    watchers: Arc<Watchers>,
    capacity: usize,
}

/// A follower's receiver of one task's live events. Dropping it forgets the task's channel
/// once nobody follows it any more (also when the follower is aborted midway).
#[derive(Debug)]
pub(crate) struct Subscription {
    tasks: Arc<TaskChannels>,
    task_id: TaskId,
    live: Option<broadcast::Receiver<Arc<LiveEvent>>>,
}

impl Subscription {
    /// The next live event; `Closed` once the task is over and everything was received.
    pub(crate) async fn recv(&mut self) -> Result<Arc<LiveEvent>, broadcast::error::RecvError> {
        match &mut self.live {
            Some(live) => live.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.live.take());
        let mut tasks = lock(&self.tasks);
        if tasks
            .get(&self.task_id)
            .is_some_and(|c| c.sender.receiver_count() == 0)
        {
            tasks.remove(&self.task_id);
            tasks.shrink_when_sparse();
        }
    }
}

impl Hub {
    /// A hub whose followers may fall `capacity` events behind before they must re-read the
    /// log.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            tasks: Arc::new(Mutex::new(TaskMap::default())),
            watchers: Arc::default(),
            capacity: capacity.max(16),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, TaskMap<TaskChannel>> {
        lock(&self.tasks)
    }

    /// Follows `task_id` of `session_id` from now on. Pair with a log read to get what came
    /// before.
    pub(crate) fn subscribe(&self, task_id: TaskId, session_id: &SessionId) -> Subscription {
        let live = self
            .tasks()
            .entry(task_id)
            .or_insert_with(|| TaskChannel {
                sender: broadcast::channel(self.capacity).0,
                session: session_id.clone(),
            })
            .sender
            .subscribe();
        Subscription {
            tasks: self.tasks.clone(),
            task_id,
            live: Some(live),
        }
    }

    /// Sends stored events to the task's followers, if any.
    pub(crate) fn publish(&self, events: impl IntoIterator<Item = LiveEvent>) {
        let mut events = events.into_iter().peekable();
        let Some(first) = events.peek() else { return };
        let sender = self.tasks().get(&first.task_id).map(|c| c.sender.clone());
        if let Some(sender) = sender {
            for event in events {
                let _ = sender.send(Arc::new(event));
            }
        }
    }

    /// The task is over: followers get what is buffered, then the end of the stream.
    pub(crate) fn close(&self, task_id: TaskId) {
        let mut tasks = self.tasks();
        tasks.remove(&task_id);
        tasks.shrink_when_sparse();
    }

    /// Whether anyone follows `task_id` here.
    #[cfg(test)]
    pub(crate) fn is_followed(&self, task_id: TaskId) -> bool {
        self.followed_session(task_id).is_some()
    }

    /// The session of `task_id` if anyone follows it here.
    pub(crate) fn followed_session(&self, task_id: TaskId) -> Option<SessionId> {
        self.tasks()
            .get(&task_id)
            .filter(|c| c.sender.receiver_count() > 0)
            .map(|c| c.session.clone())
    }

    /// Tasks with a live channel (for metrics and leak checks).
    pub(crate) fn live_tasks(&self) -> usize {
        self.tasks().len()
    }

    /// Channels the task map has room for (for tests of its shrinking).
    #[cfg(test)]
    fn task_room(&self) -> usize {
        self.tasks().capacity()
    }

    /// Sends a notice of `session` (e.g. `session_title`) to those who watch it.
    pub(crate) fn notify(&self, session: &SessionId, message: ServerMessage) {
        self.watchers.notify(session, message);
    }

    /// A client's session notices, watching no session yet.
    pub(crate) fn notices(&self) -> Notices {
        Notices::new(self.watchers.clone())
    }

    /// Sessions someone watches (for leak checks).
    pub(crate) fn watched_sessions(&self) -> usize {
        self.watchers.watched_sessions()
    }
}

/// Events a follower may fall behind before it re-reads the log. A task's channel allocates
/// all its slots when its first follower subscribes and keeps them until the last one leaves;
/// at 1,024 that was ≈ 40 KiB per followed task, so 10,000 queued WebSocket chats held
/// ≈ 500 MiB (anywork-bench load, 10,000 sessions). A follower that lags reads the log, which
/// holds every event, so a small window costs a read now and then, never an event.
const FOLLOW_WINDOW: usize = 128;

impl Default for Hub {
    fn default() -> Self {
        Self::new(FOLLOW_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_map_gives_its_room_back_after_a_burst() {
        let hub = Hub::default();
        let session = SessionId::new("s").unwrap();
        let ids: Vec<TaskId> = (0..5_000).map(|_| TaskId::generate()).collect();
        // Half end while followed (`close`), half when their follower leaves.
        let subscriptions: Vec<Subscription> =
            ids.iter().map(|&id| hub.subscribe(id, &session)).collect();
        assert!(hub.task_room() >= 5_000);
        for &id in &ids[..2_500] {
            hub.close(id);
        }
        drop(subscriptions);
        assert_eq!(hub.live_tasks(), 0);
        assert!(
            hub.task_room() <= crate::shrink::KEEP,
            "an idle hub kept room for {} task channels",
            hub.task_room()
        );
    }
}
