//! [`follow`]: a task's events after a seq — first from the log, then live — with no gap and
//! no duplicate. What makes WebSocket resume and log long-polls exact.

use anywork_core::{Result, TaskEvent, TaskId};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::dispatcher::Dispatcher;
use crate::hub::LiveEvent;

const PAGE: u32 = 500;

/// How long a task already over is followed for its `done` event.
const OVER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends every event of `task_id` with seq > `after` to `out`, in seq order, until the task's
/// `done` has been sent, the task is over, or `out` is closed. `NotFound` for an unknown task.
pub async fn follow(
    dispatcher: &Dispatcher,
    task_id: TaskId,
    after: u64,
    out: &mpsc::Sender<LiveEvent>,
) -> Result<()> {
    let store = dispatcher.store();
    let hub = dispatcher.hub();
    let task = store.get_task(task_id).await?;
    // Subscribe before reading: whatever the read misses arrives live.
    let mut live = hub.subscribe(task_id);
    let mut follower = Follower {
        dispatcher,
        task_id,
        session_id: task.session_id,
        last: after,
        out,
    };
    let result = async {
        if follower.catch_up().await? {
            return Ok(());
        }
        // A run stores the final status before it appends `done`, and closes the task's
        // channel after that. A task found over is followed a little longer, so its `done`
        // is not missed; one whose `done` never comes (its server died in between) ends the
        // follow after `OVER_GRACE`.
        let over = store.get_task(task_id).await?.status.is_terminal();
        if over && (follower.saw_done().await? || follower.catch_up().await?) {
            return Ok(());
        }
        loop {
            let next = if over {
                match tokio::time::timeout(OVER_GRACE, live.recv()).await {
                    Ok(next) => next,
                    Err(_) => Err(RecvError::Closed),
                }
            } else {
                live.recv().await
            };
            match next {
                Ok(event) => {
                    if event.seq <= follower.last {
                        continue;
                    }
                    if event.seq > follower.last + 1 && follower.catch_up().await? {
                        return Ok(());
                    }
                    if event.seq == follower.last + 1 && follower.send((*event).clone()).await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    if follower.catch_up().await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Closed) => {
                    follower.catch_up().await?;
                    return Ok(());
                }
            }
        }
    }
    .await;
    drop(live);
    hub.release(task_id);
    result
}

struct Follower<'a> {
    dispatcher: &'a Dispatcher,
    task_id: TaskId,
    session_id: anywork_core::SessionId,
    last: u64,
    out: &'a mpsc::Sender<LiveEvent>,
}

impl Follower<'_> {
    /// Sends what the log has after `last`. `Ok(true)` once `done` was sent or `out` closed.
    async fn catch_up(&mut self) -> Result<bool> {
        loop {
            let logs = self
                .dispatcher
                .store()
                .read_logs(self.task_id, self.last, PAGE)
                .await?;
            let n = logs.len();
            for log in logs {
                let event = LiveEvent {
                    task_id: self.task_id,
                    session_id: self.session_id.clone(),
                    seq: log.seq,
                    event: log.event,
                };
                if self.send(event).await? {
                    return Ok(true);
                }
            }
            if n < PAGE as usize {
                return Ok(false);
            }
        }
    }

    /// Whether the event at `last` (what the caller already has) is the task's `done`.
    async fn saw_done(&self) -> Result<bool> {
        if self.last == 0 {
            return Ok(false);
        }
        let logs = self
            .dispatcher
            .store()
            .read_logs(self.task_id, self.last - 1, 1)
            .await?;
        Ok(logs
            .first()
            .is_some_and(|l| matches!(l.event, TaskEvent::Done(_))))
    }

    /// `Ok(true)` when that was the `done` event, or nobody listens any more.
    async fn send(&mut self, event: LiveEvent) -> Result<bool> {
        self.last = event.seq;
        let done = matches!(event.event, TaskEvent::Done(_));
        Ok(self.out.send(event).await.is_err() || done)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use anywork_core::{
        NewSession, NewTask, NewTaskLog, TaskChange, TaskOutcome, TaskRequest, TaskStatus,
    };
    use anywork_drivers::StaticDriver;
    use anywork_store::MemoryStore;

    use super::*;

    /// A dispatcher whose store holds one task that ended (`completed`) with `text` logged and
    /// no `done` yet: the moment between a run's final status and its `done` event.
    async fn ended_without_done() -> (Dispatcher, TaskId) {
        let driver = Arc::new(StaticDriver::new("http://127.0.0.1:9").unwrap());
        let d = Dispatcher::builder(Arc::new(MemoryStore::new()), driver)
            .start()
            .await
            .unwrap();
        let session = d
            .store()
            .create_session(NewSession::new("web"))
            .await
            .unwrap();
        let task = d
            .store()
            .create_task(NewTask::from_request(
                session.id,
                TaskRequest::new("web", "hi"),
            ))
            .await
            .unwrap();
        let store = d.store();
        store
            .update_task(
                task.id,
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running),
            )
            .await
            .unwrap();
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("answer"))])
            .await
            .unwrap();
        store
            .update_task(
                task.id,
                TaskStatus::Running,
                TaskChange::finish(TaskOutcome::completed("answer")),
            )
            .await
            .unwrap();
        (d, task.id)
    }

    #[tokio::test]
    async fn a_task_found_over_is_followed_until_its_done_arrives() {
        let (d, id) = ended_without_done().await;
        let (tx, mut rx) = mpsc::channel(16);
        let follower = {
            let d = d.clone();
            tokio::spawn(async move { follow(&d, id, 0, &tx).await })
        };
        assert_eq!(rx.recv().await.unwrap().seq, 1);
        // The run appends and publishes its `done`, then closes the channel.
        let done = TaskEvent::Done(TaskOutcome::completed("answer"));
        let seq = d
            .store()
            .append_logs(id, vec![NewTaskLog::now(done.clone())])
            .await
            .unwrap();
        d.hub().publish([LiveEvent {
            task_id: id,
            session_id: d.store().get_task(id).await.unwrap().session_id,
            seq,
            event: done,
        }]);
        d.hub().close(id);
        let last = rx.recv().await.unwrap();
        assert_eq!(last.seq, 2);
        assert!(matches!(last.event, TaskEvent::Done(_)));
        follower.await.unwrap().unwrap();
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_task_over_whose_done_never_comes_ends_the_follow() {
        let (d, id) = ended_without_done().await;
        let (tx, mut rx) = mpsc::channel(16);
        let started = tokio::time::Instant::now();
        follow(&d, id, 0, &tx).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await.unwrap().seq, 1);
        assert!(rx.recv().await.is_none());
        assert!(started.elapsed() >= OVER_GRACE);
        assert_eq!(
            d.hub().live_tasks(),
            0,
            "the follower's channel is released"
        );
    }

    #[tokio::test]
    async fn a_follower_that_already_has_done_returns_at_once() {
        let (d, id) = ended_without_done().await;
        d.store()
            .append_logs(
                id,
                vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::completed(
                    "a",
                )))],
            )
            .await
            .unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let started = tokio::time::Instant::now();
        follow(&d, id, 2, &tx).await.unwrap();
        assert!(started.elapsed() < OVER_GRACE);
    }
}
