//! Session notices (a session's title) for the clients of that session only.
//!
//! A WebSocket connection holds one [`Notices`] and watches each session it chats in or
//! resumes a task of; a notice goes to the watchers of its session, so its cost grows with the
//! clients of that session, not with every open connection, and none is lost to a slow client
//! (each watcher's queue holds what it was sent until read — a notice per title change of a
//! session it watches).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anywork_core::SessionId;
use anywork_core::ws::ServerMessage;
use tokio::sync::mpsc;

use crate::shrink::Shrink;

/// Boxed: a queue's block holds 32 slots from its first notice on, and a `ServerMessage` is
/// large (the block would cost every connection that chatted kilobytes).
type Sink = mpsc::UnboundedSender<Box<ServerMessage>>;

/// Per session, the watchers' sinks, each under its [`Notices`]' id.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    sessions: Mutex<HashMap<SessionId, Vec<(u64, Sink)>>>,
    next: AtomicU64,
}

impl Watchers {
    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, Vec<(u64, Sink)>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `message` to the watchers of `session`.
    pub(crate) fn notify(&self, session: &SessionId, message: ServerMessage) {
        let mut sessions = self.lock();
        let Some(watchers) = sessions.get_mut(session) else {
            return;
        };
        // A sink whose receiver is gone (its `Notices` is being dropped) is skipped and
        // forgotten.
        watchers.retain(|(_, sink)| sink.send(Box::new(message.clone())).is_ok());
        if watchers.is_empty() {
            sessions.remove(session);
            sessions.shrink_when_sparse();
        }
    }

    /// Sessions with at least one watcher (for leak checks).
    pub(crate) fn watched_sessions(&self) -> usize {
        self.lock().len()
    }
}

/// One client's session notices: those of the sessions it [`watch`](Self::watch)es. Dropping it
/// stops them. Costs nothing until the first watch (a queue's first block is allocated then).
#[derive(Debug)]
pub struct Notices {
    watchers: Arc<Watchers>,
    id: u64,
    sessions: HashSet<SessionId>,
    queue: Option<(Sink, mpsc::UnboundedReceiver<Box<ServerMessage>>)>,
}

impl Notices {
    pub(crate) fn new(watchers: Arc<Watchers>) -> Self {
        let id = watchers.next.fetch_add(1, Ordering::Relaxed);
        Self {
            watchers,
            id,
            sessions: HashSet::new(),
            queue: None,
        }
    }

    /// From now on, gets the notices of `session` (again watching one is a no-op).
    pub fn watch(&mut self, session: &SessionId) {
        if self.sessions.contains(session) {
            return;
        }
        let sink = self
            .queue
            .get_or_insert_with(mpsc::unbounded_channel)
            .0
            .clone();
        self.watchers
            .lock()
            .entry(session.clone())
            .or_default()
            .push((self.id, sink));
        self.sessions.insert(session.clone());
    }

    /// Whether `session` is watched.
    pub fn watches(&self, session: &SessionId) -> bool {
        self.sessions.contains(session)
    }

    /// The next notice; waits forever while no session is watched.
    pub async fn recv(&mut self) -> Box<ServerMessage> {
        match &mut self.queue {
            // The queue holds a sender of its own, so it never closes.
            Some((_, queue)) => match queue.recv().await {
                Some(message) => message,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        if self.sessions.is_empty() {
            return;
        }
        let mut sessions = self.watchers.lock();
        for session in self.sessions.drain() {
            if let Some(watchers) = sessions.get_mut(&session) {
                watchers.retain(|(id, _)| *id != self.id);
                if watchers.is_empty() {
                    sessions.remove(&session);
                }
            }
        }
        sessions.shrink_when_sparse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(id: &str) -> SessionId {
        SessionId::new(id).unwrap()
    }

    fn title(session: &str, title: &str) -> ServerMessage {
        ServerMessage::SessionTitle {
            session_id: sid(session),
            title: title.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_notice_reaches_the_watchers_of_its_session_only() {
        let watchers = Arc::new(Watchers::default());
        let (mut a, mut b, mut idle) = (
            Notices::new(watchers.clone()),
            Notices::new(watchers.clone()),
            Notices::new(watchers.clone()),
        );
        let (s1, s2) = (sid("s1"), sid("s2"));
        a.watch(&s1);
        a.watch(&s1);
        b.watch(&s1);
        b.watch(&s2);
        assert!(a.watches(&s1) && !a.watches(&s2));
        watchers.notify(&s2, title("s2", "two"));
        watchers.notify(&s1, title("s1", "one"));
        watchers.notify(&sid("s3"), title("s3", "nobody's"));
        assert_eq!(*a.recv().await, title("s1", "one"));
        assert_eq!(*b.recv().await, title("s2", "two"));
        assert_eq!(*b.recv().await, title("s1", "one"));
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), async {
            tokio::join!(a.recv(), idle.recv())
        });
        assert!(
            nothing.await.is_err(),
            "a got s1's once; idle watches nothing"
        );
    }

    #[test]
    fn the_watchers_map_gives_its_room_back_when_the_clients_leave() {
        let watchers = Arc::new(Watchers::default());
        let clients: Vec<Notices> = (0..5_000)
            .map(|i| {
                let mut n = Notices::new(watchers.clone());
                n.watch(&sid(&format!("s{i}")));
                n
            })
            .collect();
        assert!(watchers.lock().capacity() >= 5_000);
        drop(clients);
        assert_eq!(watchers.watched_sessions(), 0);
        assert!(
            watchers.lock().capacity() <= crate::shrink::KEEP,
            "no watcher left, room for {} sessions kept",
            watchers.lock().capacity()
        );
    }

    #[tokio::test]
    async fn a_slow_watcher_loses_nothing_and_a_dropped_one_is_forgotten() {
        let watchers = Arc::new(Watchers::default());
        let mut slow = Notices::new(watchers.clone());
        let mut gone = Notices::new(watchers.clone());
        let s = sid("s");
        slow.watch(&s);
        gone.watch(&s);
        gone.watch(&sid("only-gone"));
        assert_eq!(watchers.watched_sessions(), 2);
        drop(gone);
        assert_eq!(
            watchers.watched_sessions(),
            1,
            "its own session is forgotten"
        );
        for i in 0..1_000 {
            watchers.notify(&s, title("s", &format!("t{i}")));
        }
        for i in 0..1_000 {
            assert_eq!(*slow.recv().await, title("s", &format!("t{i}")));
        }
        drop(slow);
        assert_eq!(watchers.watched_sessions(), 0);
    }
}
