//! Live events of tasks run by other servers sharing the store: the store's change feed
//! ([`TaskStore::change_feed`], PostgreSQL `LISTEN/NOTIFY`) tells which log grew up to which
//! seq; for a task followed here and not run here, the new events are read from the log and
//! published on the hub, where its followers take them as if the run were local. Followers
//! still read the log when their task is quiet for a while, so a lost notification delays
//! events but loses none; a `Gap` (the listener reconnected) re-reads every followed task.
//!
//! The feed is taken off as it comes, whatever reads are under way, and the reads run apart
//! from it: at most one per task at a time, from the last seq published here to the end of
//! the log, so the changes told while a task's read runs are served by one more read (or by
//! none, when that read already saw their events), never by one read each; reads of
//! different tasks run side by side (up to [`READS_AT_ONCE`]), so one slow read delays only
//! its own task. A change of a task nobody follows here, or that this server runs, costs no
//! read; the session of a followed task comes with its followers' subscription, not from
//! the store.
//!
//! The feed also tells when a task's log got its `done` ([`FeedItem::Ended`]): a task run
//! here and ended by another server (a cancel there, lease recovery) has its run stopped at
//! once (`Control::Ended`: the worker is asked to cancel, the chat stream dropped, nothing
//! more written). After a `Gap` the tasks run here are read once for the same reason. A lost
//! notification leaves it to the run's next lease renewal, which then fails.
//!
//! [`TaskStore::change_feed`]: anywork_core::TaskStore::change_feed

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anywork_core::{
    ChangeFeed, FeedItem, LogChange, Result, SessionId, TaskEvent, TaskId, TaskLog,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::{Control, Inner, lock};
use crate::hub::LiveEvent;
use crate::shrink::Shrink;
use crate::task_map::TaskMap;

/// Events read per log page.
const PAGE: u32 = 500;

/// Log reads of the feed under way at once (each of another task).
const READS_AT_ONCE: usize = 4;

/// How often the feed drops the entries of tasks nobody follows here any more (their
/// followers left while the task was quiet: no change came to drop them), and of tasks
/// that run here now.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Remote tasks the feed keeps track of, at most: past it, the quiet ones heard of longest
/// ago go first. A task dropped while followed loses nothing: its next change makes a new
/// entry from that change's first seq (the log up to there was published, or its followers
/// read it), and a follower reads the log itself when its task is quiet.
const MAX_REMOTES: usize = 10_000;

/// A task followed here and run elsewhere.
struct Remote {
    session: SessionId,
    /// When the feed last told of it or read it.
    touched: Instant,
    /// The last seq published here.
    last: u64,
    /// The highest seq the feed told of.
    told: u64,
    /// Read to the end once more, whatever `told` says (after a `Gap`, or a full page).
    again: bool,
    /// A read of its log is under way.
    reading: bool,
    /// It waits in [`Forwarder::ready`] for a read.
    queued: bool,
    /// When the oldest change not read yet arrived.
    since: Option<Instant>,
}

impl Remote {
    fn wants_read(&self) -> bool {
        !self.reading && (self.told > self.last || self.again)
    }
}

/// What one read of a task's log brought, and how long it waited and took.
struct Read {
    id: TaskId,
    logs: Result<Vec<TaskLog>>,
}

type ReadFuture = Pin<Box<dyn Future<Output = Read> + Send>>;

/// The feed's bookkeeping: which followed remote tasks have events to read.
#[derive(Default)]
struct Forwarder {
    remotes: TaskMap<Remote>,
    /// Tasks waiting for a read, oldest first (an id may be stale: see `queued`).
    ready: VecDeque<TaskId>,
}

pub(super) async fn feed_loop(inner: Weak<Inner>, mut feed: ChangeFeed) {
    let mut forwarder = Forwarder::default();
    let mut reads: FuturesUnordered<ReadFuture> = FuturesUnordered::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let step = tokio::select! {
            item = feed.next() => match item {
                Some(item) => Step::Told(item, Instant::now()),
                None => return,
            },
            Some(read) = reads.next(), if !reads.is_empty() => Step::Read(read),
            _ = sweep.tick() => Step::Sweep,
        };
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::Relaxed) {
            return;
        }
        match step {
            Step::Told(item, arrived) => forwarder.told(&inner, item, arrived),
            Step::Read(read) => forwarder.read_done(&inner, read),
            Step::Sweep => forwarder.sweep(&inner, MAX_REMOTES),
        }
        while reads.len() < READS_AT_ONCE {
            let Some((id, after, waited)) = forwarder.next_read() else {
                break;
            };
            reads.push(Box::pin(read(inner.clone(), id, after, waited)));
        }
    }
}

/// What woke the feed loop.
enum Step {
    Told(FeedItem, Instant),
    Read(Read),
    Sweep,
}

/// Reads the log of `id` after `after` (one page).
async fn read(inner: Arc<Inner>, id: TaskId, after: u64, waited: Duration) -> Read {
    let started = Instant::now();
    let logs = inner.store.read_logs(id, after, PAGE).await;
    inner.metrics.feed_read(waited, started.elapsed());
    Read { id, logs }
}

impl Forwarder {
    /// Takes in what the feed told.
    fn told(&mut self, inner: &Arc<Inner>, item: FeedItem, arrived: Instant) {
        match item {
            FeedItem::Changed(change) => self.changed(inner, change, arrived),
            FeedItem::Ended(id) => end_run(inner, id),
            FeedItem::Gap => {
                self.remotes
                    .retain(|id, r| r.reading || inner.hub.followed_session(*id).is_some());
                let ids: Vec<TaskId> = self.remotes.keys().copied().collect();
                for id in ids {
                    if let Some(r) = self.remotes.get_mut(&id) {
                        r.again = true;
                        r.since.get_or_insert(arrived);
                    }
                    self.queue(id);
                }
                // The tasks run here may have been ended elsewhere meanwhile.
                let inner = inner.clone();
                tokio::spawn(async move { end_runs_of_ended_tasks(&inner).await });
            }
            _ => {}
        }
    }

    fn changed(&mut self, inner: &Inner, change: LogChange, arrived: Instant) {
        let id = change.task_id;
        let followed = inner
            .hub
            .followed_session(id)
            .filter(|_| !inner.runs_here(id));
        let Some(session) = followed else {
            inner.metrics.feed_change("skipped");
            if self.remotes.get(&id).is_some_and(|r| !r.reading) {
                self.remotes.remove(&id);
            }
            return;
        };
        let r = self.remotes.entry(id).or_insert_with(|| Remote {
            session,
            touched: arrived,
            // Its followers read the log up to here themselves when they subscribed.
            last: change.first.saturating_sub(1),
            told: 0,
            again: false,
            reading: false,
            queued: false,
            since: None,
        });
        let was_waiting = r.queued || r.reading || r.told > r.last || r.again;
        r.touched = arrived;
        r.told = r.told.max(change.last);
        if r.told <= r.last {
            // Its events were read already.
            inner.metrics.feed_change("covered");
            return;
        }
        r.since.get_or_insert(arrived);
        inner
            .metrics
            .feed_change(if was_waiting { "covered" } else { "read" });
        self.queue(id);
    }

    /// Drops the entries of tasks nobody follows here any more or that run here now, then,
    /// past `max` entries, the quiet ones (nothing to read) heard of longest ago. Entries
    /// with a read under way or waiting stay: their read ends them.
    fn sweep(&mut self, inner: &Inner, max: usize) {
        let busy = |r: &Remote| r.reading || r.queued || r.wants_read();
        self.remotes.retain(|id, r| {
            busy(r) || (inner.hub.followed_session(*id).is_some() && !inner.runs_here(*id))
        });
        if self.remotes.len() > max {
            let mut quiet: Vec<(Instant, TaskId)> = self
                .remotes
                .iter()
                .filter(|(_, r)| !busy(r))
                .map(|(id, r)| (r.touched, *id))
                .collect();
            quiet.sort_unstable();
            let excess = self.remotes.len() - max;
            for (_, id) in quiet.into_iter().take(excess) {
                self.remotes.remove(&id);
            }
        }
        // Room taken by a burst of followed tasks goes back once they are over.
        self.remotes.shrink_when_sparse();
        self.ready.shrink_when_sparse();
        inner.metrics.feed_tasks(self.remotes.len());
    }

    /// Puts `id` in line for a read if it wants one and is not in line yet.
    fn queue(&mut self, id: TaskId) {
        if let Some(r) = self.remotes.get_mut(&id)
            && r.wants_read()
            && !r.queued
        {
            r.queued = true;
            self.ready.push_back(id);
        }
    }

    /// The next task to read (its id, the seq to read after, how long its changes waited),
    /// marked as being read.
    fn next_read(&mut self) -> Option<(TaskId, u64, Duration)> {
        while let Some(id) = self.ready.pop_front() {
            let Some(r) = self.remotes.get_mut(&id) else {
                continue;
            };
            if !r.queued {
                continue;
            }
            r.queued = false;
            if !r.wants_read() {
                continue;
            }
            r.reading = true;
            r.again = false;
            let waited = r.since.take().map_or(Duration::ZERO, |s| s.elapsed());
            return Some((id, r.last, waited));
        }
        None
    }

    /// Publishes what a read brought; reads again if more was told meanwhile.
    fn read_done(&mut self, inner: &Inner, read: Read) {
        let id = read.id;
        let Some(r) = self.remotes.get_mut(&id) else {
            return;
        };
        r.reading = false;
        r.touched = Instant::now();
        let logs = match read.logs {
            Ok(logs) => logs,
            Err(e) => {
                // Its followers read the log themselves when it stays quiet; the next change
                // reads it again.
                tracing::debug!(task = %id, error = %e, "cannot read a followed task's log");
                r.told = r.last;
                r.since = None;
                return;
            }
        };
        if logs.len() >= PAGE as usize {
            r.again = true;
        }
        let done = logs.iter().any(|l| matches!(l.event, TaskEvent::Done(_)));
        if let Some(last) = logs.last() {
            r.last = r.last.max(last.seq);
        }
        if !r.wants_read() {
            // The changes told during the read were served by it.
            r.since = None;
        }
        let session = r.session.clone();
        inner.hub.publish(
            logs.into_iter()
                .map(|l| LiveEvent::new(id, session.clone(), l.seq, l.event)),
        );
        if done || inner.hub.followed_session(id).is_none() {
            self.remotes.remove(&id);
            self.remotes.shrink_when_sparse();
            return;
        }
        self.queue(id);
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
        match inner.store.task_status(id).await {
            Ok(status) if status.is_terminal() => end_run(inner, id),
            Ok(_) => {}
            Err(e) => tracing::debug!(task = %id, error = %e, "cannot read a task run here"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use anywork_core::{
        NewSession, NewTask, NewTaskLog, Page, Session, SessionSummary, Task, TaskChange,
        TaskOutcome, TaskRequest, TaskStatus, TaskStore, Timestamp,
    };
    use anywork_drivers::StaticDriver;
    use anywork_store::MemoryStore;
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::Dispatcher;
    use crate::hub::Subscription;

    /// A memory store with a change feed the test feeds by hand, whose log reads of the
    /// `held` tasks wait while the gate is shut, and which counts its task reads.
    struct FedStore {
        inner: MemoryStore,
        feed: Mutex<Option<mpsc::UnboundedReceiver<FeedItem>>>,
        open: watch::Sender<bool>,
        held: Mutex<HashSet<TaskId>>,
        /// Log reads waiting at the shut gate.
        waiting: watch::Sender<usize>,
        task_reads: AtomicUsize,
    }

    impl FedStore {
        fn new() -> (Arc<Self>, mpsc::UnboundedSender<FeedItem>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let store = Self {
                inner: MemoryStore::new(),
                feed: Mutex::new(Some(rx)),
                open: watch::channel(true).0,
                held: Mutex::default(),
                waiting: watch::channel(0).0,
                task_reads: AtomicUsize::new(0),
            };
            (Arc::new(store), tx)
        }

        /// Holds the log reads of `id` until [`open`](Self::open).
        fn hold(&self, id: TaskId) {
            lock(&self.held).insert(id);
            self.open.send_replace(false);
        }

        fn open(&self) {
            self.open.send_replace(true);
        }

        /// Task reads (`get_task`) so far.
        fn task_reads(&self) -> usize {
            self.task_reads.load(Ordering::Relaxed)
        }

        /// Waits until `n` log reads wait at the gate.
        async fn until_waiting(&self, n: usize) {
            let mut w = self.waiting.subscribe();
            guard(w.wait_for(|k| *k >= n)).await.unwrap();
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for FedStore {
        async fn create_session(&self, new: NewSession) -> Result<Session> {
            self.inner.create_session(new).await
        }
        async fn get_session(&self, id: &SessionId) -> Result<Session> {
            self.inner.get_session(id).await
        }
        async fn find_session(&self, channel_type: &str, key: &str) -> Result<Option<Session>> {
            self.inner.find_session(channel_type, key).await
        }
        async fn list_sessions(&self, page: Page) -> Result<Vec<SessionSummary>> {
            self.inner.list_sessions(page).await
        }
        async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()> {
            self.inner.set_session_title(id, title).await
        }
        async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()> {
            self.inner.touch_session(id, at).await
        }
        async fn delete_session(&self, id: &SessionId) -> Result<()> {
            self.inner.delete_session(id).await
        }
        async fn create_task(&self, new: NewTask) -> Result<Task> {
            self.inner.create_task(new).await
        }
        async fn create_session_with_task(
            &self,
            session: NewSession,
            task: NewTask,
        ) -> Result<(Session, Task)> {
            self.inner.create_session_with_task(session, task).await
        }
        async fn get_task(&self, id: TaskId) -> Result<Task> {
            self.task_reads.fetch_add(1, Ordering::Relaxed);
            self.inner.get_task(id).await
        }
        async fn update_task(
            &self,
            id: TaskId,
            expected: TaskStatus,
            change: TaskChange,
        ) -> Result<Task> {
            self.inner.update_task(id, expected, change).await
        }
        async fn update_task_and_append(
            &self,
            id: TaskId,
            expected: TaskStatus,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
        ) -> Result<(Task, u64)> {
            self.inner
                .update_task_and_append(id, expected, change, logs)
                .await
        }
        async fn update_task_lean(
            &self,
            id: TaskId,
            expected: TaskStatus,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
        ) -> Result<u64> {
            self.inner
                .update_task_lean(id, expected, change, logs, deliveries)
                .await
        }
        async fn claim_task_lean(
            &self,
            id: TaskId,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
        ) -> Result<anywork_core::Claim<()>> {
            self.inner
                .claim_task_lean(id, change, logs, deliveries)
                .await
        }
        async fn tasks_by_session(&self, id: &SessionId, page: Page) -> Result<Vec<Task>> {
            self.inner.tasks_by_session(id, page).await
        }
        async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>> {
            self.inner.tasks_by_status(status, page).await
        }
        async fn tasks_by_session_in_status(
            &self,
            session_id: &SessionId,
            status: TaskStatus,
            page: Page,
        ) -> Result<Vec<Task>> {
            self.inner
                .tasks_by_session_in_status(session_id, status, page)
                .await
        }
        async fn renew_lease(&self, id: TaskId, owner: &str, until: Timestamp) -> Result<()> {
            self.inner.renew_lease(id, owner, until).await
        }
        async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
            self.inner.expired_leases(now, limit).await
        }
        async fn append_logs(&self, id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
            self.inner.append_logs(id, logs).await
        }
        async fn read_logs(&self, id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
            if lock(&self.held).contains(&id) {
                let mut open = self.open.subscribe();
                if !*open.borrow() {
                    self.waiting.send_modify(|n| *n += 1);
                    let _ = open.wait_for(|o| *o).await;
                    self.waiting.send_modify(|n| *n -= 1);
                }
            }
            self.inner.read_logs(id, after, limit).await
        }
        fn change_feed(&self) -> Option<ChangeFeed> {
            let rx = lock(&self.feed).take()?;
            Some(Box::pin(tokio_stream_of(rx)))
        }
    }

    fn tokio_stream_of(
        mut rx: mpsc::UnboundedReceiver<FeedItem>,
    ) -> impl futures_util::Stream<Item = FeedItem> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    /// A dispatcher on `store` (its worker never answers), and a task `running` in its store as
    /// if another server ran it.
    async fn remote_task(store: &Arc<FedStore>) -> (Dispatcher, Task) {
        let driver = Arc::new(StaticDriver::new("http://127.0.0.1:9").unwrap());
        let d = Dispatcher::builder(store.clone(), driver)
            .start()
            .await
            .unwrap();
        let task = new_running_task(store).await;
        (d, task)
    }

    async fn new_running_task(store: &Arc<FedStore>) -> Task {
        let session = store.create_session(NewSession::new("web")).await.unwrap();
        let task = store
            .create_task(NewTask::from_request(
                session.id,
                TaskRequest::new("web", "hi"),
            ))
            .await
            .unwrap();
        store
            .update_task(
                task.id,
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running),
            )
            .await
            .unwrap()
    }

    /// "The other server" appends `event` to the log of `task` and notifies it.
    async fn append(
        store: &FedStore,
        feed: &mpsc::UnboundedSender<FeedItem>,
        task: TaskId,
        event: TaskEvent,
    ) -> u64 {
        let seq = store
            .append_logs(task, vec![NewTaskLog::now(event)])
            .await
            .unwrap();
        feed.send(FeedItem::Changed(LogChange {
            task_id: task,
            first: seq,
            last: seq,
        }))
        .unwrap();
        seq
    }

    /// Subscribes to the live events of `task` here, as a follower does.
    fn follow(d: &Dispatcher, task: &Task) -> Subscription {
        d.hub().subscribe(task.id, &task.session_id)
    }

    /// The next live event.
    async fn next(live: &mut Subscription) -> (u64, TaskEvent) {
        let e = guard(live.recv()).await.unwrap();
        (e.seq, e.event.clone())
    }

    /// Waits until the feed took in `n` changes.
    async fn until_told(d: &Dispatcher, n: u64) {
        guard(async {
            while d.metrics().feed_changes_told() < n {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    /// `f`, or a panic after 30 s: a guard against a hang, not a timing.
    async fn guard<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("hung for 30 s")
    }

    /// The changes told while a task's log read is under way cost one more read at most
    /// (here none: that read already sees their events), not one read each; the followers
    /// get every event once, in order.
    #[tokio::test]
    async fn a_burst_of_changes_of_one_task_is_read_once() {
        let (store, feed) = FedStore::new();
        let (d, task) = remote_task(&store).await;
        let mut live = follow(&d, &task);
        store.hold(task.id);
        append(&store, &feed, task.id, TaskEvent::text("0")).await;
        store.until_waiting(1).await;
        // The burst, told while that read waits.
        const BURST: u64 = 50;
        for i in 1..BURST {
            append(&store, &feed, task.id, TaskEvent::text(format!("{i}"))).await;
        }
        until_told(&d, BURST).await;
        store.open();
        for seq in 1..=BURST {
            assert_eq!(
                next(&mut live).await,
                (seq, TaskEvent::text(format!("{}", seq - 1)))
            );
        }
        assert_eq!(d.metrics().feed_reads(), 1, "one read for the whole burst");
        let done = TaskEvent::Done(TaskOutcome::completed("ok"));
        append(&store, &feed, task.id, done.clone()).await;
        assert_eq!(next(&mut live).await, (BURST + 1, done));
        assert_eq!(d.metrics().feed_reads(), 2);
    }

    /// A lost notification costs nothing but its own: the next change of the task reads the
    /// log from the last seq forwarded here, so its events arrive with the next one's.
    #[tokio::test]
    async fn a_lost_change_is_caught_up_by_the_next_one() {
        let (store, feed) = FedStore::new();
        let (d, task) = remote_task(&store).await;
        let mut live = follow(&d, &task);
        append(&store, &feed, task.id, TaskEvent::text("1")).await;
        assert_eq!(next(&mut live).await.0, 1);
        // Appended, but its notification is lost.
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("2"))])
            .await
            .unwrap();
        append(&store, &feed, task.id, TaskEvent::text("3")).await;
        assert_eq!(next(&mut live).await, (2, TaskEvent::text("2")));
        assert_eq!(next(&mut live).await, (3, TaskEvent::text("3")));
        assert_eq!(d.metrics().feed_reads(), 2, "one read per change heard");
    }

    /// After a `Gap` (the listener reconnected: what was told meanwhile is lost) every
    /// followed task is read again from the last seq forwarded here.
    #[tokio::test]
    async fn a_gap_reads_every_followed_task_again() {
        let (store, feed) = FedStore::new();
        let (d, task) = remote_task(&store).await;
        let mut live = follow(&d, &task);
        append(&store, &feed, task.id, TaskEvent::text("1")).await;
        assert_eq!(next(&mut live).await.0, 1);
        for text in ["2", "3"] {
            store
                .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text(text))])
                .await
                .unwrap();
        }
        feed.send(FeedItem::Gap).unwrap();
        assert_eq!(next(&mut live).await, (2, TaskEvent::text("2")));
        assert_eq!(next(&mut live).await, (3, TaskEvent::text("3")));
    }

    /// A read that hangs holds up only its own task: another followed task's events go on
    /// arriving meanwhile.
    #[tokio::test]
    async fn a_slow_read_holds_up_only_its_own_task() {
        let (store, feed) = FedStore::new();
        let (d, slow) = remote_task(&store).await;
        let quick = new_running_task(&store).await;
        let mut slow_live = follow(&d, &slow);
        let mut quick_live = follow(&d, &quick);
        store.hold(slow.id);
        append(&store, &feed, slow.id, TaskEvent::text("slow")).await;
        store.until_waiting(1).await;
        for seq in 1..=3 {
            append(&store, &feed, quick.id, TaskEvent::text(format!("{seq}"))).await;
            assert_eq!(
                next(&mut quick_live).await,
                (seq, TaskEvent::text(format!("{seq}"))),
                "the quick task's events arrive while the slow read hangs"
            );
        }
        store.open();
        assert_eq!(next(&mut slow_live).await, (1, TaskEvent::text("slow")));
    }

    /// A change of a task nobody follows here costs no read, and neither does the session
    /// of a followed one (it comes with the subscription).
    #[tokio::test]
    async fn only_followed_tasks_are_read() {
        let (store, feed) = FedStore::new();
        let (d, task) = remote_task(&store).await;
        let followed = new_running_task(&store).await;
        let mut live = follow(&d, &followed);
        let task_reads = store.task_reads();
        for i in 0..10 {
            append(&store, &feed, task.id, TaskEvent::text(format!("{i}"))).await;
        }
        append(&store, &feed, followed.id, TaskEvent::text("x")).await;
        assert_eq!(next(&mut live).await, (1, TaskEvent::text("x")));
        assert_eq!(d.metrics().feed_reads(), 1);
        assert_eq!(
            store.task_reads(),
            task_reads,
            "no task was read for its session"
        );
    }

    /// A task whose followers left while it was quiet (so no change came to drop it) is
    /// forgotten by the feed's next sweep; a task still followed stays and is still forwarded.
    #[tokio::test]
    async fn tasks_nobody_follows_any_more_are_forgotten() {
        let (store, feed) = FedStore::new();
        let (d, left) = remote_task(&store).await;
        let kept = new_running_task(&store).await;
        let mut left_live = follow(&d, &left);
        let mut kept_live = follow(&d, &kept);
        append(&store, &feed, left.id, TaskEvent::text("l")).await;
        append(&store, &feed, kept.id, TaskEvent::text("k")).await;
        assert_eq!(next(&mut left_live).await.0, 1);
        assert_eq!(next(&mut kept_live).await.0, 1);
        let tracked = |n: i64| {
            let d = d.clone();
            guard(async move {
                while d.metrics().feed_tasks_now() != n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        tracked(2).await;
        // Its followers leave; the task stays quiet.
        drop(left_live);
        tracked(1).await;
        append(&store, &feed, kept.id, TaskEvent::text("k2")).await;
        assert_eq!(next(&mut kept_live).await, (2, TaskEvent::text("k2")));
    }

    /// Past the bound, the quiet entries heard of longest ago go first; entries with a read to
    /// do stay.
    #[tokio::test]
    async fn the_feed_keeps_at_most_its_bound_of_quiet_tasks() {
        let (store, _feed) = FedStore::new();
        let (d, first) = remote_task(&store).await;
        let mut tasks = vec![first];
        for _ in 0..3 {
            tasks.push(new_running_task(&store).await);
        }
        let _live: Vec<Subscription> = tasks.iter().map(|t| follow(&d, t)).collect();
        let mut forwarder = Forwarder::default();
        let start = Instant::now();
        for (i, t) in tasks.iter().enumerate() {
            let change = LogChange {
                task_id: t.id,
                first: 1,
                last: 1,
            };
            forwarder.changed(&d.inner, change, start + Duration::from_millis(i as u64));
        }
        // The last one has a read to do; the first three were read up to their last seq.
        for t in &tasks[..3] {
            let r = forwarder.remotes.get_mut(&t.id).unwrap();
            (r.last, r.queued) = (1, false);
        }
        forwarder.sweep(&d.inner, 2);
        let mut left: Vec<TaskId> = forwarder.remotes.keys().copied().collect();
        left.sort();
        let mut want = vec![tasks[2].id, tasks[3].id];
        want.sort();
        assert_eq!(left, want, "the two quiet ones heard of first went");
        assert_eq!(d.metrics().feed_tasks_now(), 2);
    }
}
