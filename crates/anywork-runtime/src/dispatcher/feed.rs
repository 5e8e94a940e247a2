//! Live events of tasks run by other servers sharing the store: the store's change feed
//! ([`TaskStore::change_feed`], PostgreSQL `LISTEN/NOTIFY`) tells which log grew up to which
//! seq; for a task followed here and not run here, the new events are read from the log and
//! published on the hub, where its followers take them as if the run were local. Followers
//! still read the log when their task is quiet for a while, so a lost notification delays
//! events but loses none; a `Gap` (the listener reconnected) re-reads every followed task.
//!
//! The feed also tells when a task's log got its `done` ([`FeedItem::Ended`]): a task run
//! here and ended by another server (a cancel there, lease recovery) has its run stopped at
//! once (`Control::Ended`: the worker is asked to cancel, the chat stream dropped, nothing
//! more written). After a `Gap` the tasks run here are read once for the same reason. A lost
//! notification leaves it to the run's next lease renewal, which then fails.
//!
//! [`TaskStore::change_feed`]: anywork_core::TaskStore::change_feed

use std::collections::HashMap;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anywork_core::{ChangeFeed, FeedItem, SessionId, TaskEvent, TaskId};
use futures_util::StreamExt;

use super::{Control, Inner, lock};
use crate::hub::LiveEvent;

/// Events read per log page.
const PAGE: u32 = 500;

/// Tasks followed here and run elsewhere: their session and the last seq published here.
type Known = HashMap<TaskId, (SessionId, u64)>;

pub(super) async fn feed_loop(inner: Weak<Inner>, mut feed: ChangeFeed) {
    // Changes are taken off the feed as they come, with their arrival time, so that the
    // wait of each before its read is measured.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, FeedItem)>(1024);
    let reader = tokio::spawn(async move {
        while let Some(item) = feed.next().await {
            if tx.send((Instant::now(), item)).await.is_err() {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let mut known = Known::new();
    while let Some((arrived, item)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::Relaxed) {
            return;
        }
        match item {
            FeedItem::Changed(change) => {
                let id = change.task_id;
                if !inner.hub.is_followed(id) || inner.runs_here(id) {
                    inner.metrics.feed_change("skipped");
                    known.remove(&id);
                    continue;
                }
                let after = known
                    .get(&id)
                    .map_or(change.first.saturating_sub(1), |k| k.1);
                if change.last > after {
                    inner.metrics.feed_change("read");
                    forward(&inner, &mut known, id, after, arrived).await;
                } else {
                    inner.metrics.feed_change("covered");
                }
            }
            FeedItem::Ended(id) => end_run(&inner, id),
            FeedItem::Gap => {
                known.retain(|id, _| inner.hub.is_followed(*id));
                let tasks: Vec<(TaskId, u64)> = known.iter().map(|(id, k)| (*id, k.1)).collect();
                for (id, after) in tasks {
                    forward(&inner, &mut known, id, after, arrived).await;
                }
                end_runs_of_ended_tasks(&inner).await;
            }
            _ => {}
        }
    }
}

/// Stops the run of `id` here, if any: its task is over (whoever ended it). A run that wrote
/// the `done` itself is ending anyway and never reads this.
fn end_run(inner: &Inner, id: TaskId) {
    let run = lock(&inner.runs).get(&id).map(|r| r.control.clone());
    if let Some(run) = run {
        // A full queue (a burst of control messages) leaves it to the lease renewal.
        let _ = run.try_send(Control::Ended);
    }
}

/// After a `Gap` (an `Ended` may have been missed): stops the runs here whose task is over.
async fn end_runs_of_ended_tasks(inner: &Inner) {
    let running: Vec<TaskId> = lock(&inner.runs).keys().copied().collect();
    for id in running {
        match inner.store.get_task(id).await {
            Ok(task) if task.status.is_terminal() => end_run(inner, id),
            Ok(_) => {}
            Err(e) => tracing::debug!(task = %id, error = %e, "cannot read a task run here"),
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes the events of `id` after `after` from the log, for a change that `arrived`.
async fn forward(inner: &Inner, known: &mut Known, id: TaskId, mut after: u64, arrived: Instant) {
    let session = match known.get(&id) {
        Some((s, _)) => s.clone(),
        None => match inner.store.get_task(id).await {
            Ok(t) => t.session_id,
            Err(e) => {
                tracing::debug!(task = %id, error = %e, "cannot read a followed task");
                return;
            }
        },
    };
    loop {
        let started = Instant::now();
        let read = inner.store.read_logs(id, after, PAGE).await;
        inner.metrics.feed_read(
            started.saturating_duration_since(arrived),
            started.elapsed(),
        );
        let logs = match read {
            Ok(l) => l,
            Err(e) => {
                // Its followers read the log themselves when it stays quiet.
                tracing::debug!(task = %id, error = %e, "cannot read a followed task's log");
                break;
            }
        };
        let n = logs.len();
        let done = logs.iter().any(|l| matches!(l.event, TaskEvent::Done(_)));
        if let Some(last) = logs.last() {
            after = last.seq;
        }
        inner.hub.publish(logs.into_iter().map(|l| LiveEvent {
            task_id: id,
            session_id: session.clone(),
            seq: l.seq,
            event: l.event,
        }));
        if done {
            known.remove(&id);
            return;
        }
        if n < PAGE as usize {
            break;
        }
    }
    known.insert(id, (session, after));
}
