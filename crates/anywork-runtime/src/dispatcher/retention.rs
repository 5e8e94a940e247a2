//! Retention and the store's size: finished tasks' logs older than [`Retention::max_age`] are
//! deleted, and while the store is over [`Retention::max_bytes`] the logs of the tasks that
//! finished longest ago go first; space freed is given back ([`TaskStore::compact`]). The size
//! is measured on every round, for the `anywork_store_bytes` metric. Settled deliveries of the
//! outbox (`sent`, `dead`) older than [`Retention::settled_deliveries_max_age`] are deleted too.
//!
//! [`TaskStore::compact`]: anywork_core::TaskStore::compact

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anywork_core::{Result, Timestamp};

use super::{Dispatcher, Inner};

/// Tasks whose logs one delete takes at most (one bounded transaction each).
const BATCH: u32 = 200;

/// How long finished tasks' logs are kept. Start from [`Default`] (keep everything, measure
/// the size every minute) and set the fields you need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Logs of tasks finished longer ago than this are deleted (the task rows stay); `None`
    /// keeps them.
    pub max_age: Option<Duration>,
    /// While the store takes more bytes than this, the logs of the tasks finished longest ago
    /// are deleted; `None` for no budget.
    pub max_bytes: Option<u64>,
    /// How often retention runs and the store's size is measured.
    pub every: Duration,
    /// Outbox deliveries settled (`sent`, or `dead`: no longer retried unless asked) longer
    /// ago than this are deleted; `None` keeps them. Open ones are never deleted.
    pub settled_deliveries_max_age: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: None,
            max_bytes: None,
            every: Duration::from_secs(60),
            settled_deliveries_max_age: Some(Duration::from_secs(7 * 86_400)),
        }
    }
}

/// What one round of retention did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionRound {
    /// Tasks whose logs were deleted.
    pub tasks: u64,
    /// Log events deleted.
    pub events: u64,
    /// Bytes given back to the file system by compaction.
    pub compacted_bytes: u64,
    /// The store's size afterwards, when it can tell.
    pub store_bytes: Option<u64>,
    /// Settled outbox deliveries deleted.
    pub deliveries: u64,
}

impl Dispatcher {
    /// Runs one round of retention now (as the background loop does every
    /// [`Retention::every`]): deletes the logs [`DispatcherConfig::retention`] says are past
    /// keeping, compacts when it deleted something, and measures the store for the
    /// `anywork_store_bytes` metric.
    ///
    /// [`DispatcherConfig::retention`]: crate::DispatcherConfig::retention
    pub async fn run_retention(&self) -> Result<RetentionRound> {
        let inner = &self.inner;
        let policy = inner.config.retention;
        let store = &inner.store;
        let mut round = RetentionRound::default();
        if let Some(age) = policy.max_age {
            let now = Timestamp::now();
            let before = now.plus_millis(-(age.as_millis().min(i64::MAX as u128) as i64));
            loop {
                let deleted = store.delete_finished_logs(before, BATCH, now).await?;
                round.tasks += deleted.tasks;
                round.events += deleted.events;
                if deleted.tasks < u64::from(BATCH) {
                    break;
                }
            }
        }
        if let Some(age) = policy.settled_deliveries_max_age {
            let before =
                Timestamp::now().plus_millis(-(age.as_millis().min(i64::MAX as u128) as i64));
            loop {
                let deleted = store.delete_settled_deliveries(before, BATCH).await?;
                round.deliveries += deleted;
                if deleted < u64::from(BATCH) {
                    break;
                }
            }
            if round.deliveries > 0 {
                inner.metrics.deliveries_deleted(round.deliveries);
                tracing::info!(
                    deliveries = round.deliveries,
                    "retention deleted settled deliveries"
                );
            }
        }
        if round.tasks > 0 {
            round.compacted_bytes += store.compact().await?;
        }
        let mut size = store.store_size().await?;
        if let Some(budget) = policy.max_bytes {
            // Oldest first, a batch at a time, until under budget or nothing is left to take.
            while let Some(s) = size
                && s.bytes > budget
            {
                let now = Timestamp::now();
                let deleted = store.delete_finished_logs(now, BATCH / 4, now).await?;
                round.tasks += deleted.tasks;
                round.events += deleted.events;
                round.compacted_bytes += store.compact().await?;
                size = store.store_size().await?;
                if deleted.tasks == 0 {
                    tracing::warn!(
                        bytes = s.bytes,
                        budget,
                        "the store is over its size budget with no finished task's log left to delete"
                    );
                    break;
                }
            }
        }
        if let Some(s) = size {
            inner.metrics.store_size(s.bytes, s.reclaimable_bytes);
            round.store_bytes = Some(s.bytes);
        }
        if round.tasks > 0 {
            inner.metrics.logs_deleted(round.tasks, round.events);
            tracing::info!(
                tasks = round.tasks,
                events = round.events,
                compacted_bytes = round.compacted_bytes,
                store_bytes = ?round.store_bytes,
                "retention deleted finished tasks' logs"
            );
        }
        Ok(round)
    }
}

pub(super) async fn retention_loop(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => i.config.retention.every.max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            if inner.stopped.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = (Dispatcher { inner }).run_retention().await {
                tracing::warn!(error = %e, "retention failed; trying again next round");
            }
        }
        tokio::time::sleep(every).await;
    }
}
