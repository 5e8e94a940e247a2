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
    /// [`TaskStore::hold_idle_session`]: anywork_core::TaskStore::hold_idle_session
    pub async fn reap_idle(&self) -> Result<Vec<SessionId>> {
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
    use std::sync::{Arc, Mutex};

    use anywork_core::{ContainerDriver, Error, TaskRequest, TaskStore, WorkerEndpoint};

    use super::*;
    use crate::{Backoff, DispatcherConfig};

    /// A driver whose workers never come up, and which records what the reaper is told.
    #[derive(Default)]
    struct RecordingDriver {
        told_busy: Mutex<Vec<Vec<SessionId>>>,
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
            lock(&self.told_busy).push(busy.to_vec());
            Ok(Vec::new())
        }
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
}
