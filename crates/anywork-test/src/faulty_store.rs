//! [`FaultyStore`]: a [`TaskStore`] wrapper that injects store outages — every write failing
//! with `Unavailable` (as a locked or full SQLite file, or a stopped PostgreSQL, does) for a
//! while, or the next N writes — so the runtime's retries and recovery can be tested against
//! a real store underneath. It also counts some reads, so that tests can pin how many a
//! request costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::delivery::{
    DeletedLogs, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, NewDelivery, StoreSize,
};
use anywork_core::{
    Error, NewSession, NewTask, NewTaskLog, Page, Result, Session, SessionId, SessionSummary, Task,
    TaskChange, TaskId, TaskLog, TaskStatus, TaskStore, Timestamp,
};

/// Wraps a store; writes fail while an outage is injected. Reads pass through, but for the
/// log reads made to fail by [`fail_next_log_reads`](Self::fail_next_log_reads); log reads are
/// counted ([`log_reads`](Self::log_reads)), and so are session reads and task listings
/// ([`reads`](Self::reads)).
pub struct FaultyStore {
    inner: Arc<dyn TaskStore>,
    fail_reads: AtomicU64,
    down_until: Mutex<Option<Instant>>,
    /// The operations an outage hits (by method name); `None` for every write.
    only: Mutex<Option<Vec<&'static str>>>,
    fail_next: AtomicU64,
    injected: AtomicU64,
    log_reads: AtomicU64,
    reads: Mutex<std::collections::HashMap<&'static str, u64>>,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore")
            .field("injected", &self.injected())
            .finish_non_exhaustive()
    }
}

impl FaultyStore {
    /// Wraps `inner`, healthy.
    pub fn new(inner: Arc<dyn TaskStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_reads: AtomicU64::new(0),
            down_until: Mutex::new(None),
            only: Mutex::new(None),
            fail_next: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            log_reads: AtomicU64::new(0),
            reads: Mutex::default(),
        })
    }

    /// How many times `method` was called so far, for the reads that are counted:
    /// `get_session`, `find_session`, `tasks_by_session`, `tasks_by_status` and
    /// `tasks_by_session_in_status` (0 for any other name).
    pub fn reads(&self, method: &str) -> u64 {
        let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        reads.get(method).copied().unwrap_or(0)
    }

    fn count_read(&self, method: &'static str) {
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        *reads.entry(method).or_default() += 1;
    }

    /// Every write fails for `d` from now on (`Duration::ZERO` ends an outage).
    pub fn down_for(&self, d: Duration) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + d);
    }

    /// Only the writes of these methods (`"append_logs"`, `"update_task_and_append"`, …)
    /// fail for `d` from now on; the others pass. `append_logs_while_active` (how a run
    /// writes its events) counts as `"append_logs"`, `claim_task_lean` (how a run starts) as
    /// `"claim_task"`, `create_task_claimed` as `"create_task"` then `"claim_task"` and `update_task_lean` (how a run changes its status) as
    /// `"update_task_and_enqueue"`.
    pub fn down_for_ops(&self, ops: &[&'static str], d: Duration) {
        *self.only.lock().unwrap_or_else(|e| e.into_inner()) = Some(ops.to_vec());
        self.down_for(d);
    }

    /// Every write fails until [`up`](Self::up).
    pub fn down(&self) {
        self.down_for(Duration::from_secs(86_400 * 365));
    }

    /// Ends the outage.
    pub fn up(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.only.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.fail_next.store(0, Ordering::SeqCst);
    }

    /// The next `n` writes fail, then writes pass again.
    pub fn fail_next_writes(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` log reads (`read_logs`) fail with `Unavailable`, as a pool that timed out
    /// waiting for a connection does; then they pass.
    pub fn fail_next_log_reads(&self, n: u64) {
        self.fail_reads.store(n, Ordering::SeqCst);
    }

    fn read(&self) -> Result<()> {
        if self
            .fail_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(Error::unavailable(
                "injected outage: database unreachable (pool timed out while waiting for an \
                 open connection)",
            ));
        }
        Ok(())
    }

    /// Log reads (`read_logs` calls) so far, failed ones included: what followers cost the
    /// store.
    pub fn log_reads(&self) -> u64 {
        self.log_reads.load(Ordering::SeqCst)
    }

    /// Writes failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn write(&self, op: &str) -> Result<()> {
        let hit = self
            .only
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|ops| ops.contains(&op));
        let down = hit
            && self
                .down_until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|until| Instant::now() < until);
        let counted = !down
            && self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if down || counted {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(Error::unavailable(
                "injected outage: the database is locked (another process holds the write \
                 lock); try again",
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl TaskStore for FaultyStore {
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        self.write("create_session")?;
        self.inner.create_session(new).await
    }
    async fn get_session(&self, id: &SessionId) -> Result<Session> {
        self.count_read("get_session");
        self.inner.get_session(id).await
    }
    async fn find_session(&self, channel_type: &str, channel_key: &str) -> Result<Option<Session>> {
        self.count_read("find_session");
        self.inner.find_session(channel_type, channel_key).await
    }
    async fn list_sessions(&self, page: Page) -> Result<Vec<SessionSummary>> {
        self.inner.list_sessions(page).await
    }
    async fn search_sessions(&self, query: &str, page: Page) -> Result<Vec<SessionSummary>> {
        self.inner.search_sessions(query, page).await
    }
    async fn usage_totals(&self) -> Result<anywork_core::UsageTotals> {
        self.inner.usage_totals().await
    }
    async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()> {
        self.write("set_session_title")?;
        self.inner.set_session_title(id, title).await
    }
    async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()> {
        self.write("touch_session")?;
        self.inner.touch_session(id, at).await
    }
    async fn delete_session(&self, id: &SessionId) -> Result<()> {
        self.write("delete_session")?;
        self.inner.delete_session(id).await
    }
    async fn create_task(&self, new: NewTask) -> Result<Task> {
        self.write("create_task")?;
        self.inner.create_task(new).await
    }
    /// The create as `"create_task"`, then the claim in it as `"claim_task"`: a claim that
    /// fails stores the task `pending` (what the store answers when it cannot start it).
    async fn create_task_claimed(
        &self,
        new: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, Option<u64>)> {
        self.write("create_task")?;
        if self.write("claim_task").is_err() {
            return Ok((self.inner.create_task(new).await?, None));
        }
        self.inner
            .create_task_claimed(new, change, logs, deliveries)
            .await
    }
    async fn create_session_with_task(
        &self,
        session: NewSession,
        task: NewTask,
    ) -> Result<(Session, Task)> {
        self.write("create_session_with_task")?;
        self.inner.create_session_with_task(session, task).await
    }
    /// The create as `"create_session_with_task"`, then the claim in it as `"claim_task"`,
    /// as `create_task_claimed`.
    async fn create_session_with_task_claimed(
        &self,
        session: NewSession,
        task: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Session, Task, Option<u64>)> {
        self.write("create_session_with_task")?;
        if self.write("claim_task").is_err() {
            let (session, task) = self.inner.create_session_with_task(session, task).await?;
            return Ok((session, task, None));
        }
        self.inner
            .create_session_with_task_claimed(session, task, change, logs, deliveries)
            .await
    }
    async fn find_task_by_idempotency_key(
        &self,
        channel_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Task>> {
        self.inner
            .find_task_by_idempotency_key(channel_type, idempotency_key)
            .await
    }
    async fn get_task(&self, id: TaskId) -> Result<Task> {
        self.inner.get_task(id).await
    }
    async fn task_status(&self, id: TaskId) -> Result<TaskStatus> {
        self.inner.task_status(id).await
    }
    async fn task_status_for_start(&self, id: TaskId) -> Result<(TaskStatus, Option<Timestamp>)> {
        self.inner.task_status_for_start(id).await
    }
    async fn hold_idle_session(
        &self,
        session_id: &SessionId,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool> {
        self.write("hold_idle_session")?;
        self.inner
            .hold_idle_session(session_id, owner, now, until)
            .await
    }
    async fn release_idle_hold(&self, session_id: &SessionId, owner: &str) -> Result<()> {
        self.write("release_idle_hold")?;
        self.inner.release_idle_hold(session_id, owner).await
    }
    async fn update_task(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
    ) -> Result<Task> {
        self.write("update_task")?;
        self.inner.update_task(id, expected, change).await
    }
    async fn update_task_and_append(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
    ) -> Result<(Task, u64)> {
        self.write("update_task_and_append")?;
        self.inner
            .update_task_and_append(id, expected, change, logs)
            .await
    }
    async fn update_task_and_enqueue(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, u64)> {
        self.write("update_task_and_enqueue")?;
        self.inner
            .update_task_and_enqueue(id, expected, change, logs, deliveries)
            .await
    }
    async fn update_task_lean(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<u64> {
        self.write("update_task_and_enqueue")?;
        self.inner
            .update_task_lean(id, expected, change, logs, deliveries)
            .await
    }
    async fn tasks_by_session(&self, session_id: &SessionId, page: Page) -> Result<Vec<Task>> {
        self.count_read("tasks_by_session");
        self.inner.tasks_by_session(session_id, page).await
    }
    async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>> {
        self.count_read("tasks_by_status");
        self.inner.tasks_by_status(status, page).await
    }
    async fn tasks_by_session_in_status(
        &self,
        session_id: &SessionId,
        status: TaskStatus,
        page: Page,
    ) -> Result<Vec<Task>> {
        self.count_read("tasks_by_session_in_status");
        self.inner
            .tasks_by_session_in_status(session_id, status, page)
            .await
    }
    async fn renew_lease(&self, id: TaskId, owner: &str, expires_at: Timestamp) -> Result<()> {
        self.write("renew_lease")?;
        self.inner.renew_lease(id, owner, expires_at).await
    }
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
        self.inner.expired_leases(now, limit).await
    }
    async fn claim_task(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<anywork_core::Claim> {
        self.write("claim_task")?;
        self.inner.claim_task(id, change, logs, deliveries).await
    }
    async fn claim_task_lean(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<anywork_core::NewTaskLog>,
        deliveries: Vec<anywork_core::NewDelivery>,
    ) -> anywork_core::Result<anywork_core::Claim<()>> {
        self.write("claim_task")?;
        self.inner
            .claim_task_lean(id, change, logs, deliveries)
            .await
    }
    async fn claimable(&self, limit: u32) -> Result<Vec<Task>> {
        self.inner.claimable(limit).await
    }
    fn change_feed(&self) -> Option<anywork_core::ChangeFeed> {
        self.inner.change_feed()
    }
    async fn append_logs(&self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.write("append_logs")?;
        self.inner.append_logs(task_id, logs).await
    }
    async fn append_logs_while_active(
        &self,
        task_id: TaskId,
        logs: Vec<NewTaskLog>,
    ) -> Result<u64> {
        self.write("append_logs")?;
        self.inner.append_logs_while_active(task_id, logs).await
    }
    async fn read_logs(&self, task_id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
        self.log_reads.fetch_add(1, Ordering::SeqCst);
        self.read()?;
        self.inner.read_logs(task_id, after, limit).await
    }
    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        self.write("claim_deliveries")?;
        self.inner.claim_deliveries(owner, now, until, limit).await
    }
    async fn record_delivery_attempt(
        &self,
        id: DeliveryId,
        owner: &str,
        attempt: DeliveryAttempt,
        at: Timestamp,
    ) -> Result<Delivery> {
        self.write("record_delivery_attempt")?;
        self.inner
            .record_delivery_attempt(id, owner, attempt, at)
            .await
    }
    async fn get_delivery(&self, id: DeliveryId) -> Result<Delivery> {
        self.inner.get_delivery(id).await
    }
    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        page: Page,
    ) -> Result<Vec<Delivery>> {
        self.inner.list_deliveries(status, page).await
    }
    async fn retry_delivery(&self, id: DeliveryId, now: Timestamp) -> Result<Delivery> {
        self.write("retry_delivery")?;
        self.inner.retry_delivery(id, now).await
    }
    async fn delete_settled_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64> {
        self.write("delete_settled_deliveries")?;
        self.inner.delete_settled_deliveries(before, limit).await
    }
    async fn delete_finished_logs(
        &self,
        finished_before: Timestamp,
        max_tasks: u32,
        now: Timestamp,
    ) -> Result<DeletedLogs> {
        self.write("delete_finished_logs")?;
        self.inner
            .delete_finished_logs(finished_before, max_tasks, now)
            .await
    }
    async fn compact(&self) -> Result<u64> {
        self.write("compact")?;
        self.inner.compact().await
    }
    async fn store_size(&self) -> Result<Option<StoreSize>> {
        self.inner.store_size().await
    }
    async fn check_ready(&self) -> Result<()> {
        self.write("check_ready")?;
        self.inner.check_ready().await
    }
    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        self.inner.get_setting(key).await
    }
    async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        self.write("put_setting")?;
        self.inner.put_setting(key, value).await
    }
}
