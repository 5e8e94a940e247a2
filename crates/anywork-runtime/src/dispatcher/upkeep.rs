//! Upkeep: the tasks a previous run left pending are queued again at start; tasks whose lease
//! expired (their server is gone) are failed with the reason, at start and then periodically;
//! the driver is asked now and then to stop the idle workers of sessions with no work.

use std::collections::HashSet;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anywork_core::{
    ErrorKind, Page, ReapGuard, Result, SessionId, TaskOutcome, TaskStatus, Timestamp,
};

use super::{Dispatcher, Inner, lock};

impl Dispatcher {
    pub(super) async fn requeue_pending(&self) -> Result<()> {
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = self
                .inner
                .store
                .tasks_by_status(TaskStatus::Pending, page)
                .await?;
            let n = tasks.len() as u32;
            for t in tasks {
                self.enqueue(t);
            }
            if n < page.limit {
                return Ok(());
            }
            offset += n;
        }
    }

    /// Fails the active tasks whose lease expired (their server is gone). Returns how many.
    pub async fn recover_expired(&self) -> usize {
        let inner = &self.inner;
        let expired = match inner.store.expired_leases(Timestamp::now(), 100).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read expired leases");
                return 0;
            }
        };
        let mut n = 0;
        for task in expired {
            if lock(&inner.runs).contains_key(&task.id) {
                continue;
            }
            let owner = task
                .lease
                .as_ref()
                .map(|l| l.owner.clone())
                .unwrap_or_default();
            // The worker's id stays in the log: the reason reaches clients.
            let reason = lock(&inner.last_words)
                .get(&task.id)
                .cloned()
                .unwrap_or_else(|| {
                    format!(
                        "the server running this task ({owner}) stopped before it finished; it \
                         was {}. Send the message again to go on (task {})",
                        task.status, task.id
                    )
                });
            // Only if the lease is still the expired one: of several servers recovering it,
            // one wins, and an owner that renewed meanwhile keeps its task.
            match inner
                .finish_expired(&task, TaskOutcome::failed(reason.clone()))
                .await
            {
                Ok(_) => {
                    tracing::warn!(task = %task.id, worker = task.worker_id.as_deref().unwrap_or("(none)"), %reason, "recovered an orphaned task");
                    // The worker may still be running it: ask it to stop, best effort.
                    self.cancel_on_worker(&task);
                    lock(&inner.last_words).remove(&task.id);
                    n += 1;
                }
                Err(e) => {
                    tracing::debug!(task = %task.id, error = %e, "an expired lease was renewed or recovered elsewhere");
                }
            }
        }
        n
    }
    /// The sessions that need their worker: a task queued (`pending`), running or waiting
    /// for input, on this server or another one sharing the store.
    pub async fn busy_sessions(&self) -> Result<Vec<SessionId>> {
        let inner = &self.inner;
        let mut busy = HashSet::new();
        for status in [
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::InputRequired,
        ] {
            let mut offset = 0;
            loop {
                let page = Page {
                    offset,
                    limit: 1000,
                };
                let tasks = inner.store.tasks_by_status(status, page).await?;
                let n = tasks.len() as u32;
                busy.extend(tasks.into_iter().map(|t| t.session_id));
                if n < page.limit {
                    break;
                }
                offset += n;
            }
        }
        Ok(busy.into_iter().collect())
    }

    /// Asks the driver to stop the idle workers of sessions that are not busy. Returns the
    /// sessions whose workers were stopped. Each stop happens while this server holds the
    /// session in the store ([`TaskStore::hold_idle_session`]): a task that arrives
    /// meanwhile, on any server, waits until it is over and then gets a new worker, and a
    /// task that came first keeps the worker.
    ///
    /// A driver that [reaps no workers](anywork_core::ContainerDriver::reaps_workers) is not
    /// asked, and the store is not read.
    ///
    /// [`TaskStore::hold_idle_session`]: anywork_core::TaskStore::hold_idle_session
    pub async fn reap_idle(&self) -> Result<Vec<SessionId>> {
        if !self.inner.driver.reaps_workers() {
            return Ok(Vec::new());
        }
        let busy = self.busy_sessions().await?;
        let guard = StoreGuard { inner: &self.inner };
        let reaped = self.inner.driver.reap_idle_guarded(&busy, &guard).await?;
        if !reaped.is_empty() {
            tracing::info!(count = reaped.len(), "stopped idle workers");
        }
        Ok(reaped)
    }
}

/// The reaper's hold on a session, in the store.
struct StoreGuard<'a> {
    inner: &'a Inner,
}

#[async_trait::async_trait]
impl ReapGuard for StoreGuard<'_> {
    async fn hold(&self, session_id: &SessionId) -> bool {
        let inner = self.inner;
        let now = Timestamp::now();
        let until = now.plus_millis(inner.config.reap_hold.as_millis() as i64);
        match inner
            .store
            .hold_idle_session(session_id, &inner.config.owner, now, until)
            .await
        {
            Ok(held) => {
                if !held {
                    tracing::debug!(session = %session_id, "a task came for the idle session; its worker stays");
                }
                held
            }
            // A worker of a session the store does not know (deleted, or never stored):
            // no task of it can start, nothing to hold.
            Err(e) if e.kind() == ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(session = %session_id, error = %e, "cannot hold the idle session; its worker stays");
                false
            }
        }
    }

    async fn release(&self, session_id: &SessionId) {
        let inner = self.inner;
        if let Err(e) = inner
            .store
            .release_idle_hold(session_id, &inner.config.owner)
            .await
        {
            // It runs out by itself; the session's tasks wait until then.
            tracing::warn!(session = %session_id, error = %e, "cannot release the hold on a reaped session");
        }
    }
}

pub(super) async fn reap_loop(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = (Dispatcher { inner }).reap_idle().await {
            tracing::warn!(error = %e, "reaping idle workers failed");
        }
    }
}

/// Now and then, queues here the pending tasks of free sessions that no runner here has:
/// tasks accepted by another server (busy, or gone), or waiting behind a task another server
/// ran. Whichever server claims one first runs it.
pub(super) async fn claim_loop(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => i.config.claim_every.max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::Relaxed) {
            return;
        }
        if inner.closing.load(Ordering::Relaxed) {
            continue;
        }
        Dispatcher { inner }.queue_claimable().await;
    }
}

impl Dispatcher {
    /// Queues the claimable tasks of sessions that have no runner here. Returns how many.
    pub(super) async fn queue_claimable(&self) -> usize {
        let tasks = match self.inner.store.claimable(CLAIM_BATCH).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the tasks waiting to start");
                return 0;
            }
        };
        let mut n = 0;
        for task in tasks {
            if lock(&self.inner.queues).contains_key(&task.session_id) {
                continue;
            }
            self.enqueue(task);
            n += 1;
        }
        n
    }
}

/// How many claimable tasks one look takes.
const CLAIM_BATCH: u32 = 200;

pub(super) async fn recovery_loop(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => (i.config.lease_ttl / 2).max(Duration::from_millis(200)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.load(Ordering::Relaxed) {
            return;
        }
        Dispatcher { inner }.recover_expired().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Mutex};

    use anywork_core::{
        ContainerDriver, Delivery, DeliveryAttempt, DeliveryId, Error, NewSession, NewTask,
        NewTaskLog, Session, SessionSummary, Task, TaskChange, TaskId, TaskLog, TaskRequest,
        TaskStore, WorkerEndpoint,
    };

    use super::*;
    use crate::{Backoff, DispatcherConfig};

    /// A driver whose workers never come up, and which records what the reaper is told.
    /// With `shared_worker`, it has one worker for every session (as the static and local
    /// drivers): nothing to reap. With `idle`, it has a worker for each of those sessions and
    /// stops the ones not busy, under the reaper's hold (as Docker and Kubernetes).
    #[derive(Default)]
    struct RecordingDriver {
        told_busy: Mutex<Vec<Vec<SessionId>>>,
        shared_worker: bool,
        idle: Mutex<Vec<SessionId>>,
    }

    #[async_trait::async_trait]
    impl ContainerDriver for RecordingDriver {
        fn name(&self) -> &str {
            "recording"
        }
        async fn get_worker(&self, _: &SessionId) -> Result<WorkerEndpoint> {
            Err(Error::unavailable("no workers here"))
        }
        async fn release(&self, _: &SessionId) -> Result<()> {
            Ok(())
        }
        async fn is_healthy(&self, _: &WorkerEndpoint) -> bool {
            false
        }
        async fn list(&self) -> Result<Vec<anywork_core::WorkerInfo>> {
            Ok(Vec::new())
        }
        async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
            self.reap_idle_guarded(busy, &anywork_core::Unguarded).await
        }
        fn reaps_workers(&self) -> bool {
            !self.shared_worker
        }
        async fn reap_idle_guarded(
            &self,
            busy: &[SessionId],
            guard: &dyn ReapGuard,
        ) -> Result<Vec<SessionId>> {
            lock(&self.told_busy).push(busy.to_vec());
            let idle = lock(&self.idle).clone();
            let mut reaped = Vec::new();
            for s in idle.into_iter().filter(|s| !busy.contains(s)) {
                if guard.hold(&s).await {
                    guard.release(&s).await;
                    reaped.push(s);
                }
            }
            Ok(reaped)
        }
    }

    /// A memory store that counts the reads of tasks by status and the reaper's holds.
    struct CountingStore {
        inner: anywork_store::MemoryStore,
        by_status: AtomicU64,
        holds: AtomicU64,
    }

    impl CountingStore {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                inner: anywork_store::MemoryStore::new(),
                by_status: AtomicU64::new(0),
                holds: AtomicU64::new(0),
            })
        }

        /// (reads of tasks by status, holds) so far.
        fn counts(&self) -> (u64, u64) {
            (
                self.by_status.load(Ordering::Relaxed),
                self.holds.load(Ordering::Relaxed),
            )
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for CountingStore {
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
        async fn get_task(&self, id: TaskId) -> Result<Task> {
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
        async fn tasks_by_session(&self, id: &SessionId, page: Page) -> Result<Vec<Task>> {
            self.inner.tasks_by_session(id, page).await
        }
        async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>> {
            self.by_status.fetch_add(1, Ordering::Relaxed);
            self.inner.tasks_by_status(status, page).await
        }
        async fn renew_lease(&self, id: TaskId, owner: &str, until: Timestamp) -> Result<()> {
            self.inner.renew_lease(id, owner, until).await
        }
        async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
            self.inner.expired_leases(now, limit).await
        }
        async fn claimable(&self, limit: u32) -> Result<Vec<Task>> {
            self.inner.claimable(limit).await
        }
        async fn hold_idle_session(
            &self,
            session_id: &SessionId,
            owner: &str,
            now: Timestamp,
            until: Timestamp,
        ) -> Result<bool> {
            self.holds.fetch_add(1, Ordering::Relaxed);
            self.inner
                .hold_idle_session(session_id, owner, now, until)
                .await
        }
        async fn release_idle_hold(&self, session_id: &SessionId, owner: &str) -> Result<()> {
            self.inner.release_idle_hold(session_id, owner).await
        }
        async fn append_logs(&self, id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
            self.inner.append_logs(id, logs).await
        }
        async fn read_logs(&self, id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
            self.inner.read_logs(id, after, limit).await
        }
        async fn claim_deliveries(
            &self,
            owner: &str,
            now: Timestamp,
            until: Timestamp,
            limit: u32,
        ) -> Result<Vec<Delivery>> {
            self.inner.claim_deliveries(owner, now, until, limit).await
        }
        async fn record_delivery_attempt(
            &self,
            id: DeliveryId,
            owner: &str,
            attempt: DeliveryAttempt,
            at: Timestamp,
        ) -> Result<Delivery> {
            self.inner
                .record_delivery_attempt(id, owner, attempt, at)
                .await
        }
    }

    /// A dispatcher over `store` and `driver`, without a reaper loop of its own (the tests
    /// call `reap_idle`).
    async fn dispatcher(store: Arc<dyn TaskStore>, driver: Arc<RecordingDriver>) -> Dispatcher {
        let config = DispatcherConfig {
            retry: Backoff::new(1000, Duration::from_millis(100), Duration::from_millis(100)),
            reap_every: None,
            ..DispatcherConfig::default()
        };
        Dispatcher::builder(store, driver)
            .config(config)
            .start()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_driver_with_nothing_to_reap_is_not_asked_and_the_store_not_read() {
        let store = CountingStore::new();
        let driver = Arc::new(RecordingDriver {
            shared_worker: true,
            ..RecordingDriver::default()
        });
        let d = dispatcher(store.clone(), driver.clone()).await;
        let waiting = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        let before = store.counts();
        assert!(d.reap_idle().await.unwrap().is_empty());
        assert_eq!(
            store.counts(),
            before,
            "the reaper read the store or held a session"
        );
        assert!(lock(&driver.told_busy).is_empty());
        d.cancel(waiting.id).await.unwrap();
    }

    #[tokio::test]
    async fn a_driver_with_workers_is_told_the_busy_sessions_and_stops_under_a_hold() {
        let store = CountingStore::new();
        let driver = Arc::new(RecordingDriver::default());
        let d = dispatcher(store.clone(), driver.clone()).await;
        // Two sessions with a worker each: one busy (a task waits), one whose task is over.
        let busy = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        let over = d.submit(TaskRequest::new("web", "bye")).await.unwrap().task;
        d.cancel(over.id).await.unwrap();
        *lock(&driver.idle) = vec![busy.session_id.clone(), over.session_id.clone()];
        let (reads, holds) = store.counts();
        let reaped = d.reap_idle().await.unwrap();
        assert_eq!(reaped, vec![over.session_id.clone()]);
        let (reads_after, holds_after) = store.counts();
        // Pending, running and waiting for input: one page each.
        assert_eq!(reads_after - reads, 3);
        assert_eq!(
            holds_after - holds,
            1,
            "the stop happened without the store's hold"
        );
        let told = lock(&driver.told_busy).pop().unwrap();
        assert_eq!(told, vec![busy.session_id.clone()]);
        d.cancel(busy.id).await.unwrap();
    }

    #[tokio::test]
    async fn the_reaper_spares_sessions_with_work_and_only_those() {
        let driver = Arc::new(RecordingDriver::default());
        let store: Arc<dyn TaskStore> = Arc::new(anywork_store::MemoryStore::new());
        let config = DispatcherConfig {
            retry: Backoff::new(1000, Duration::from_millis(100), Duration::from_millis(100)),
            reap_every: None,
            ..DispatcherConfig::default()
        };
        let d = Dispatcher::builder(store.clone(), driver.clone())
            .config(config)
            .start()
            .await
            .unwrap();
        // A session whose task waits for a worker, and one whose only task is over.
        let waiting = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        let over = d.submit(TaskRequest::new("web", "bye")).await.unwrap().task;
        d.cancel(over.id).await.unwrap();
        d.reap_idle().await.unwrap();
        let told = lock(&driver.told_busy).pop().unwrap();
        assert!(told.contains(&waiting.session_id), "{told:?}");
        assert!(!told.contains(&over.session_id), "{told:?}");
        d.cancel(waiting.id).await.unwrap();
        d.reap_idle().await.unwrap();
        let told = lock(&driver.told_busy).pop().unwrap();
        assert!(told.is_empty(), "{told:?}");
    }

    /// What start-up reads (the previous run's tasks, the pending ones, the outbox's first
    /// claim, retention's first round, the store's size) a SQLite store serves on one read
    /// connection. Before, it opened three: a read right after another found the first
    /// connection not yet given back to the pool (a ping on it first) and opened one more,
    /// with its thread, whose heap the C library keeps.
    #[tokio::test]
    async fn start_up_reads_a_sqlite_store_on_one_connection() {
        let dir = std::env::temp_dir().join(format!("anywork-start-{}", TaskId::generate()));
        let sqlite = Arc::new(anywork_store::SqliteStore::open_in_dir(&dir).await.unwrap());
        let store: Arc<dyn TaskStore> = sqlite.clone();
        let d = dispatcher(store, Arc::new(RecordingDriver::default())).await;
        // The outbox's claim and retention's deletion of settled deliveries are the writer's
        // first two writes; their looks and the size's reads follow.
        for _ in 0..600 {
            if sqlite.writer_stats().unwrap().writes >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sqlite.writer_stats().unwrap().writes >= 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Connections stay open for `idle_close` (30 s): one opened, one open.
        assert_eq!(sqlite.open_read_connections(), 1);
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
