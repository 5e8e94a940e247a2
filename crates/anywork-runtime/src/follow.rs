//! Following a task: its events after a seq — first from the log, then live — with no gap and
//! no duplicate, as a [`Stream`] ([`Dispatcher::events`], [`Dispatcher::submit_and_follow`]).
//! What makes WebSocket resume and log long-polls exact.
//!
//! A follower pushes events into a small queue ([`follow`], [`follow_submitted`]);
//! [`into_stream`] polls it and the queue together, so the stream needs no task of its own and
//! dropping it stops the follower.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anywork_core::{Result, TaskEvent, TaskId, TaskStatus};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::dispatcher::Dispatcher;
use crate::hub::{LiveEvent, Subscription};

const PAGE: u32 = 500;

/// How long a task already over is followed for its `done` event.
const OVER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a follower waits for a live event before it reads the log (a task run by another
/// server sharing the store publishes nothing here).
const POLL_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Events a follower may queue before the stream's reader takes them.
const QUEUE: usize = 64;

/// The stream of what `follower` sends: its events in order, then its error if it failed.
pub(crate) fn into_stream<F, Fut>(
    follower: F,
) -> impl Stream<Item = Result<LiveEvent>> + Send + 'static
where
    F: FnOnce(mpsc::Sender<Arc<LiveEvent>>) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    struct State {
        follower: Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>>,
        events: mpsc::Receiver<Arc<LiveEvent>>,
        error: Option<anywork_core::Error>,
    }
    let (tx, events) = mpsc::channel(QUEUE);
    let state = State {
        follower: Some(Box::pin(follower(tx))),
        events,
        error: None,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            let Some(follower) = s.follower.as_mut() else {
                // The follower is done (and its sender dropped): drain, then its error.
                return match s.events.recv().await {
                    Some(event) => Some((Ok(Arc::unwrap_or_clone(event)), s)),
                    None => s.error.take().map(|e| (Err(e), s)),
                };
            };
            tokio::select! {
                biased;
                Some(event) = s.events.recv() => return Some((Ok(Arc::unwrap_or_clone(event)), s)),
                result = follower => {
                    s.follower = None;
                    s.error = result.err();
                }
            }
        }
    })
}

/// Sends every event of `task_id` with seq > `after` to `out`, in seq order, until the task's
/// `done` has been sent, the task is over, or `out` is closed. `NotFound` for an unknown task.
pub(crate) async fn follow(
    dispatcher: &Dispatcher,
    task_id: TaskId,
    after: u64,
    out: &mpsc::Sender<Arc<LiveEvent>>,
) -> Result<()> {
    let task = read_task(dispatcher, task_id).await?;
    // Subscribe before reading: whatever the read misses arrives live.
    let mut live = dispatcher.hub().subscribe(task_id, &task.session_id);
    let mut follower = Follower {
        dispatcher,
        task_id,
        session_id: task.session_id,
        last: after,
        out,
    };
    if follower.catch_up().await? {
        return Ok(());
    }
    // A run stores the final status before it appends `done`, and closes the task's channel
    // after that. A task found over is followed a little longer, so its `done` is not missed;
    // one whose `done` never comes (its server died in between) ends the follow after
    // `OVER_GRACE`.
    let over = read_status(dispatcher, task_id).await?.is_terminal();
    if over && (follower.saw_done().await? || follower.catch_up().await?) {
        return Ok(());
    }
    follower.pump(&mut live, over).await
}

/// Sends every event of `task`, just made by
/// [`Dispatcher::submit_and_follow`](crate::Dispatcher::submit_and_follow), to `out`, until
/// its `done` has been sent or `out` is closed. `live` was subscribed before the task was
/// queued, so it holds the run's events from the first: the store is read only when `live`
/// falls behind.
pub(crate) async fn follow_submitted(
    dispatcher: &Dispatcher,
    task_id: TaskId,
    session_id: anywork_core::SessionId,
    mut live: Subscription,
    out: &mpsc::Sender<Arc<LiveEvent>>,
) -> Result<()> {
    let mut follower = Follower {
        dispatcher,
        task_id,
        session_id,
        last: 0,
        out,
    };
    follower.pump(&mut live, false).await
}

/// The task, again after a failure that may pass (see [`Follower::read_logs`]); `NotFound`
/// at once.
async fn read_task(dispatcher: &Dispatcher, task_id: TaskId) -> Result<anywork_core::Task> {
    let store = dispatcher.store();
    crate::dispatcher::retry_if(
        &dispatcher.config().store_retry,
        || store.get_task(task_id),
        anywork_core::Error::is_retryable,
    )
    .await
}

/// The task's status, read as [`read_task`] reads the task.
async fn read_status(dispatcher: &Dispatcher, task_id: TaskId) -> Result<TaskStatus> {
    let store = dispatcher.store();
    crate::dispatcher::retry_if(
        &dispatcher.config().store_retry,
        || store.task_status(task_id),
        anywork_core::Error::is_retryable,
    )
    .await
}

struct Follower<'a> {
    dispatcher: &'a Dispatcher,
    task_id: TaskId,
    session_id: anywork_core::SessionId,
    last: u64,
    out: &'a mpsc::Sender<Arc<LiveEvent>>,
}

impl Follower<'_> {
    /// Forwards live events in seq order, filling gaps from the log, until `done` was sent,
    /// `out` closed, or the channel closed (the run ended). With `over` (the task was found
    /// over), the wait for each event is at most `OVER_GRACE`.
    async fn pump(&mut self, live: &mut Subscription, mut over: bool) -> Result<()> {
        loop {
            let next = if over {
                match tokio::time::timeout(OVER_GRACE, live.recv()).await {
                    Ok(next) => next,
                    Err(_) => Err(RecvError::Closed),
                }
            } else {
                match tokio::time::timeout(POLL_EVERY, live.recv()).await {
                    Ok(next) => next,
                    // Quiet for a while. A run of this server publishes every event here
                    // (a lagging subscription says so), and so will the run of a task queued
                    // here: nothing to read (a queued task's log is empty, and thousands of
                    // queued followers reading it made each dispatch cost grow with the
                    // queue). Otherwise the run may be on another server sharing the store,
                    // whose events reach this hub only through the store's change feed, if it
                    // has one: read the log.
                    Err(_) => {
                        if self.out.is_closed() {
                            return Ok(());
                        }
                        if self
                            .dispatcher
                            .runs_or_queues(self.task_id, &self.session_id)
                        {
                            continue;
                        }
                        if self.fallback_catch_up("quiet").await? {
                            return Ok(());
                        }
                        over = self.status().await?.is_terminal();
                        continue;
                    }
                }
            };
            match next {
                Ok(event) => {
                    if event.seq <= self.last {
                        continue;
                    }
                    if event.seq > self.last + 1 && self.catch_up().await? {
                        return Ok(());
                    }
                    if event.seq == self.last + 1 && self.send(event).await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    if self.catch_up().await? {
                        return Ok(());
                    }
                }
                Err(RecvError::Closed) => {
                    if self.catch_up().await? || over {
                        return Ok(());
                    }
                    // The run ended without its `done` reaching the store (it stayed down
                    // through the run's retries): whoever records the outcome later (lease
                    // recovery) writes it to the log, where this follower reads it.
                    return self.poll_log().await;
                }
            }
        }
    }

    /// Reads the log every [`POLL_EVERY`] until `done` was sent or `out` closed; `Unavailable`
    /// when the task is over and its `done` is still missing after [`OVER_GRACE`]. A store
    /// error ends it with that error, which the follower's client gets.
    async fn poll_log(&mut self) -> Result<()> {
        let mut over_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            if self.out.is_closed() || self.fallback_catch_up("closed").await? {
                return Ok(());
            }
            let status = self.status().await?;
            if status.is_terminal() {
                let since = *over_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= OVER_GRACE {
                    return Err(anywork_core::Error::unavailable(format!(
                        "task {} ended as {} but its last events were not stored; read the \
                         task for its outcome",
                        self.task_id, status
                    )));
                }
            }
        }
    }

    /// Reads the log after `after`, again after a failure that may pass (a pool timeout, a
    /// database restarting) as the run's own store writes are retried
    /// ([`store_retry`](crate::DispatcherConfig::store_retry)): the run goes on meanwhile,
    /// and a follow ended by the first failure would leave its client without the `done`.
    async fn read_logs(&self, after: u64, limit: u32) -> Result<Vec<anywork_core::TaskLog>> {
        let store = self.dispatcher.store();
        crate::dispatcher::retry_if(
            &self.dispatcher.config().store_retry,
            || store.read_logs(self.task_id, after, limit),
            anywork_core::Error::is_retryable,
        )
        .await
    }

    /// The task's status, read as [`read_logs`](Self::read_logs) reads the log.
    async fn status(&self) -> Result<TaskStatus> {
        read_status(self.dispatcher, self.task_id).await
    }

    /// Sends what the log has after `last`. `Ok(true)` once `done` was sent or `out` closed.
    async fn catch_up(&mut self) -> Result<bool> {
        loop {
            let logs = self.read_logs(self.last, PAGE).await?;
            let n = logs.len();
            for log in logs {
                let event = Arc::new(LiveEvent::new(
                    self.task_id,
                    self.session_id.clone(),
                    log.seq,
                    log.event,
                ));
                if self.send(event).await? {
                    return Ok(true);
                }
            }
            if n < PAGE as usize {
                return Ok(false);
            }
        }
    }

    /// [`catch_up`](Self::catch_up) because nothing came live (`why`), counted with whether
    /// it found events (what the live path did not bring).
    async fn fallback_catch_up(&mut self, why: &'static str) -> Result<bool> {
        let before = self.last;
        let over = self.catch_up().await?;
        self.dispatcher
            .metrics()
            .fallback_read(why, self.last != before);
        Ok(over)
    }

    /// Whether the event at `last` (what the caller already has) is the task's `done`.
    async fn saw_done(&self) -> Result<bool> {
        if self.last == 0 {
            return Ok(false);
        }
        let logs = self.read_logs(self.last - 1, 1).await?;
        Ok(logs
            .first()
            .is_some_and(|l| matches!(l.event, TaskEvent::Done(_))))
    }

    /// `Ok(true)` when that was the `done` event, or nobody listens any more.
    async fn send(&mut self, event: Arc<LiveEvent>) -> Result<bool> {
        self.last = event.seq;
        let done = matches!(event.event, TaskEvent::Done(_));
        Ok(self.out.send(event).await.is_err() || done)
    }
}

#[cfg(test)]
mod tests {

    use anywork_core::ErrorKind;
    use anywork_core::{
        NewSession, NewTask, NewTaskLog, TaskChange, TaskOutcome, TaskRequest, TaskStatus,
    };
    use anywork_drivers::StaticDriver;
    use anywork_store::MemoryStore;
    use futures_util::StreamExt;

    use super::*;

    /// A dispatcher (whose worker never answers) and a `pending` task in its store, which no
    /// run of it holds.
    async fn with_task() -> (Dispatcher, anywork_core::Task) {
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
        (d, task)
    }

    /// A dispatcher whose store holds one task that ended (`completed`) with `text` logged and
    /// no `done` yet: the moment between a run's final status and its `done` event.
    async fn ended_without_done() -> (Dispatcher, TaskId) {
        let (d, task) = with_task().await;
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
        d.hub().publish([LiveEvent::new(
            id,
            d.store().get_task(id).await.unwrap().session_id,
            seq,
            done,
        )]);
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

    /// A follower that falls further behind than the live channel holds re-reads the log and
    /// still delivers every event once, in order, up to `done`.
    #[tokio::test]
    async fn a_submitted_task_followed_live_survives_falling_behind() {
        let (d, task) = with_task().await;
        let live = d.hub().subscribe(task.id, &task.session_id);
        // More events than the channel holds (1024), all published before anyone reads.
        let mut events: Vec<TaskEvent> =
            (0..1100).map(|i| TaskEvent::text(format!("{i}"))).collect();
        events.push(TaskEvent::Done(TaskOutcome::completed("ok")));
        for chunk in events.chunks(100) {
            let logs = chunk.iter().cloned().map(NewTaskLog::now).collect();
            let last = d.store().append_logs(task.id, logs).await.unwrap();
            let first = last + 1 - chunk.len() as u64;
            d.hub().publish(chunk.iter().enumerate().map(|(i, e)| {
                LiveEvent::new(
                    task.id,
                    task.session_id.clone(),
                    first + i as u64,
                    e.clone(),
                )
            }));
        }
        d.hub().close(task.id);
        let (tx, mut rx) = mpsc::channel(2048);
        follow_submitted(&d, task.id, task.session_id.clone(), live, &tx)
            .await
            .unwrap();
        drop(tx);
        let mut seqs = Vec::new();
        while let Some(e) = rx.recv().await {
            seqs.push(e.seq);
            if e.seq == 1101 {
                assert!(matches!(e.event, TaskEvent::Done(_)));
            }
        }
        assert_eq!(seqs, (1..=1101).collect::<Vec<_>>());
    }

    /// `submit_and_follow` sees a run from its first event to its `done`, here one that fails
    /// because the worker cannot be reached.
    #[tokio::test]
    async fn submit_and_follow_sees_the_whole_run() {
        let driver = Arc::new(StaticDriver::new("http://127.0.0.1:9").unwrap());
        let config = crate::DispatcherConfig {
            retry: crate::Backoff::none(),
            ..Default::default()
        };
        let d = Dispatcher::builder(Arc::new(MemoryStore::new()), driver)
            .config(config)
            .start()
            .await
            .unwrap();
        let (submitted, events) = d
            .submit_and_follow(TaskRequest::new("web", "hi"))
            .await
            .unwrap();
        let got: Vec<LiveEvent> = events.map(Result::unwrap).collect().await;
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>());
        let Some(TaskEvent::Done(outcome)) = got.last().map(|e| &e.event) else {
            panic!("no done: {got:?}");
        };
        assert_eq!(outcome.status, TaskStatus::Failed);
        let logs = d
            .store()
            .read_logs(submitted.task.id, 0, 100)
            .await
            .unwrap();
        assert_eq!(logs.len(), got.len(), "the follower saw what the log holds");
    }

    /// A task run by another server sharing the store publishes nothing on this server's
    /// hub: the follower reads the log when nothing arrives live, up to the `done`.
    #[tokio::test]
    async fn a_task_run_elsewhere_is_followed_through_the_log() {
        let (here, task) = with_task().await;
        let store = here.store().clone();
        store
            .update_task(
                task.id,
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running),
            )
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let follower = tokio::spawn(async move { follow(&here, task.id, 0, &tx).await });
        // "The other server": writes to the store only.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("elsewhere"))])
            .await
            .unwrap();
        let first = tokio::time::timeout(POLL_EVERY * 3, rx.recv())
            .await
            .expect("the follower reads the log")
            .unwrap();
        assert_eq!(first.event, TaskEvent::text("elsewhere"));
        store
            .update_task_and_append(
                task.id,
                TaskStatus::Running,
                TaskChange::finish(TaskOutcome::completed("ok")),
                vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::completed(
                    "ok",
                )))],
            )
            .await
            .unwrap();
        let last = tokio::time::timeout(POLL_EVERY * 3, rx.recv())
            .await
            .expect("the done is read too")
            .unwrap();
        assert_eq!(last.seq, 2);
        assert!(matches!(last.event, TaskEvent::Done(_)));
        tokio::time::timeout(POLL_EVERY, follower)
            .await
            .expect("the follow ends with the done")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn the_events_of_an_unknown_task_are_one_not_found() {
        let (d, _) = with_task().await;
        let got: Vec<Result<LiveEvent>> = d.events(TaskId::generate(), 0).collect().await;
        assert_eq!(got.len(), 1, "{got:?}");
        let e = got.into_iter().next().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    /// A stream dropped before the task ends stops its follower and forgets the task's
    /// channel: nothing is left behind by a client that went away.
    #[tokio::test]
    async fn a_dropped_event_stream_leaves_nothing_behind() {
        let (d, task) = with_task().await;
        d.store()
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("one"))])
            .await
            .unwrap();
        let mut events = Box::pin(d.events(task.id, 0));
        let first = events.next().await.unwrap().unwrap();
        assert_eq!((first.seq, first.event), (1, TaskEvent::text("one")));
        assert_eq!(d.live_tasks(), 1, "the follower is subscribed");
        drop(events);
        assert_eq!(d.live_tasks(), 0, "the follower's channel is released");
    }
}
