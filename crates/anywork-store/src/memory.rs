//! [`MemoryStore`]: everything in one process's memory. For tests, demos and embedders that
//! need no durability; it is also the model the conformance suite checks other stores against.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use anywork_core::session::{title_matches, validate_title};
use anywork_core::{
    Claim, DeletedLogs, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, Error, Lease,
    NewDelivery, NewSession, NewTask, NewTaskLog, Page, Result, Session, SessionId, SessionSummary,
    Task, TaskChange, TaskId, TaskLog, TaskStatus, TaskStore, Timestamp, UsageTotals,
};
use async_trait::async_trait;

/// A [`TaskStore`] kept in memory behind one lock.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionId, Session>,
    tasks: HashMap<TaskId, Task>,
    logs: HashMap<TaskId, Log>,
    /// The outbox, by enqueue order (the SQL stores' `seq`).
    deliveries: BTreeMap<u64, Delivery>,
    delivery_seq: HashMap<DeliveryId, u64>,
    next_delivery_seq: u64,
    settings: HashMap<String, String>,
    /// The idle reaper's holds on sessions: owner and end.
    idle_holds: HashMap<SessionId, (String, Timestamp)>,
}

/// A task's log: its events in seq order, and the last seq ever given (which survives the
/// deletion of the events by retention, so that seqs never repeat).
#[derive(Debug, Default)]
struct Log {
    last_seq: u64,
    events: Vec<TaskLog>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated: every method
        // checks before it mutates, so the data is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// `Conflict` if `new`'s id, or its `(channel_type, channel_key)`, is taken.
    fn check_new_session(&self, new: &NewSession) -> Result<()> {
        if self.sessions.contains_key(&new.id) {
            return Err(Error::conflict(format!(
                "session {} already exists",
                new.id
            )));
        }
        if let Some(key) = &new.channel_key
            && self
                .sessions
                .values()
                .any(|s| s.channel_type == new.channel_type && s.channel_key.as_ref() == Some(key))
        {
            return Err(Error::conflict(format!(
                "a {} session with key {key:?} already exists",
                new.channel_type
            )));
        }
        Ok(())
    }

    /// Stores `new` as `create_task` does (its session touched), after its checks.
    fn insert_new_task(&mut self, new: NewTask) -> Result<Task> {
        self.check_new_task(&new)?;
        let session = self
            .sessions
            .get_mut(&new.session_id)
            .ok_or_else(|| session_not_found(&new.session_id))?;
        session.last_active = session.last_active.max(new.created_at);
        let task = new.into_task();
        self.tasks.insert(task.id, task.clone());
        Ok(task)
    }

    /// `Conflict` if `new`'s id, or its idempotency key in its channel, is taken.
    fn check_new_task(&self, new: &NewTask) -> Result<()> {
        if self.tasks.contains_key(&new.id) {
            return Err(Error::conflict(format!("task {} already exists", new.id)));
        }
        if let Some(key) = &new.idempotency_key
            && self.tasks.values().any(|t| {
                t.channel_type == new.channel_type && t.idempotency_key.as_ref() == Some(key)
            })
        {
            return Err(Error::conflict(format!(
                "a {} task with idempotency key {key:?} already exists",
                new.channel_type
            )));
        }
        Ok(())
    }
}

fn session_not_found(id: &SessionId) -> Error {
    Error::not_found(format!("session {id} not found"))
}

fn task_not_found(id: TaskId) -> Error {
    Error::not_found(format!("task {id} not found"))
}

fn window<T>(mut rows: Vec<T>, page: Page) -> Vec<T> {
    let start = (page.offset as usize).min(rows.len());
    let end = start.saturating_add(page.limit as usize).min(rows.len());
    rows.truncate(end);
    rows.drain(..start);
    rows
}

impl Inner {
    /// The sessions `keep` accepts with their task counts, in list order, windowed.
    fn summaries(&self, keep: impl Fn(&Session) -> bool, page: Page) -> Vec<SessionSummary> {
        let mut rows: Vec<SessionSummary> = self
            .sessions
            .values()
            .filter(|s| keep(s))
            .map(|s| {
                let tasks = self.tasks.values().filter(|t| t.session_id == s.id);
                let (mut total, mut active) = (0, 0);
                for t in tasks {
                    total += 1;
                    active += u64::from(t.status.is_active());
                }
                SessionSummary {
                    session: s.clone(),
                    task_count: total,
                    active_task_count: active,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.session.last_active, &b.session.id).cmp(&(a.session.last_active, &a.session.id))
        });
        window(rows, page)
    }

    fn task(&self, id: TaskId) -> Result<&Task> {
        self.tasks.get(&id).ok_or_else(|| task_not_found(id))
    }

    fn task_mut(&mut self, id: TaskId) -> Result<&mut Task> {
        self.tasks.get_mut(&id).ok_or_else(|| task_not_found(id))
    }

    fn update(&mut self, id: TaskId, expected: TaskStatus, change: TaskChange) -> Result<&Task> {
        let task = self.task_mut(id)?;
        if task.status != expected {
            return Err(Error::conflict(format!(
                "task {id} is {} now, not {expected}",
                task.status
            )));
        }
        let mut updated = task.clone();
        change.apply(&mut updated)?;
        *task = updated;
        Ok(task)
    }

    fn update_and_enqueue(
        &mut self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, u64)> {
        let last = self.update_lean(id, expected, change, logs, deliveries)?;
        Ok((self.task(id)?.clone(), last))
    }

    /// [`update_and_enqueue`](Self::update_and_enqueue) without a copy of the task.
    fn update_lean(
        &mut self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<u64> {
        // Every check before the first change: a failure changes nothing.
        self.task(id)?;
        for (i, d) in deliveries.iter().enumerate() {
            if self.delivery_seq.contains_key(&d.id) || deliveries[..i].iter().any(|o| o.id == d.id)
            {
                return Err(Error::conflict(format!("delivery {} already exists", d.id)));
            }
        }
        self.update(id, expected, change)?;
        let last = self.append(id, logs)?;
        for d in deliveries {
            self.next_delivery_seq += 1;
            let seq = self.next_delivery_seq;
            self.delivery_seq.insert(d.id, seq);
            self.deliveries.insert(seq, d.into_delivery(id));
        }
        Ok(last)
    }

    /// Why task `id` may not be claimed now (not pending, its session busy, an older
    /// pending task of its session), or `None` when it may.
    fn not_its_turn<T>(&self, id: TaskId) -> Result<Option<Claim<T>>> {
        let task = self.task(id)?;
        if task.status != TaskStatus::Pending {
            return Ok(Some(Claim::NotPending(task.clone())));
        }
        let key = (task.created_at, task.id);
        let mut first: Option<&Task> = None;
        for other in self
            .tasks
            .values()
            .filter(|t| t.session_id == task.session_id)
        {
            match other.status {
                TaskStatus::Running | TaskStatus::InputRequired => {
                    return Ok(Some(Claim::Busy(other.clone())));
                }
                TaskStatus::Pending
                    if (other.created_at, other.id) < key
                        && first.is_none_or(|f| {
                            (other.created_at, other.id) < (f.created_at, f.id)
                        }) =>
                {
                    first = Some(other);
                }
                _ => {}
            }
        }
        Ok(first.map(|first| Claim::NotFirst(first.clone())))
    }

    fn append(&mut self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.task(task_id)?;
        let log = self.logs.entry(task_id).or_default();
        for new in logs {
            log.last_seq += 1;
            log.events.push(TaskLog {
                task_id,
                seq: log.last_seq,
                event: new.event,
                timestamp: new.timestamp,
            });
        }
        Ok(log.last_seq)
    }

    fn remove_tasks(&mut self, doomed: &[TaskId]) {
        for t in doomed {
            self.tasks.remove(t);
            self.logs.remove(t);
        }
        let gone: Vec<(u64, DeliveryId)> = self
            .deliveries
            .iter()
            .filter(|(_, d)| doomed.contains(&d.task_id))
            .map(|(seq, d)| (*seq, d.id))
            .collect();
        for (seq, id) in gone {
            self.deliveries.remove(&seq);
            self.delivery_seq.remove(&id);
        }
    }

    fn delivery_mut(&mut self, id: DeliveryId) -> Result<&mut Delivery> {
        self.delivery_seq
            .get(&id)
            .and_then(|seq| self.deliveries.get_mut(seq))
            .ok_or_else(|| delivery_not_found(id))
    }

    /// Whether `d` may be claimed at `now`: open, due, unclaimed (or its claim ran out), and
    /// no older open delivery of its task to its target.
    fn claimable(&self, seq: u64, d: &Delivery, now: Timestamp) -> bool {
        d.status.is_open()
            && d.next_attempt_at <= now
            && d.claim.as_ref().is_none_or(|c| c.expires_at <= now)
            && !self.deliveries.range(..seq).any(|(_, o)| {
                o.task_id == d.task_id
                    && o.status.is_open()
                    && o.target.kind() == d.target.kind()
                    && o.target.address() == d.target.address()
            })
    }
}

fn delivery_not_found(id: DeliveryId) -> Error {
    Error::not_found(format!("delivery {id} not found"))
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        anywork_core::store::validate_setting_key(key)?;
        Ok(self.lock().settings.get(key).cloned())
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        anywork_core::store::validate_setting_key(key)?;
        self.lock()
            .settings
            .insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<Session> {
        validate_title(&new.title)?;
        let mut inner = self.lock();
        inner.check_new_session(&new)?;
        let session = new.into_session();
        inner.sessions.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    async fn create_session_with_task(
        &self,
        session: NewSession,
        task: NewTask,
    ) -> Result<(Session, Task)> {
        anywork_core::store::check_first_task(&session, &task)?;
        validate_title(&session.title)?;
        let mut inner = self.lock();
        // Every check before the first change: a conflict stores nothing.
        inner.check_new_session(&session)?;
        inner.check_new_task(&task)?;
        let mut session = session.into_session();
        session.last_active = session.last_active.max(task.created_at);
        let task = task.into_task();
        inner.sessions.insert(session.id.clone(), session.clone());
        inner.tasks.insert(task.id, task.clone());
        Ok((session, task))
    }

    async fn create_session_with_task_claimed(
        &self,
        session: NewSession,
        task: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Session, Task, Option<u64>)> {
        anywork_core::store::check_first_task(&session, &task)?;
        anywork_core::store::check_claim(&change)?;
        validate_title(&session.title)?;
        let mut inner = self.lock();
        inner.check_new_session(&session)?;
        inner.check_new_task(&task)?;
        let mut session = session.into_session();
        session.last_active = session.last_active.max(task.created_at);
        let task = task.into_task();
        let id = task.id;
        inner.sessions.insert(session.id.clone(), session.clone());
        inner.tasks.insert(id, task.clone());
        // A new session: nothing of it is active or held, the claim is the task's unless it
        // is refused (a taken delivery id), which leaves it pending.
        match inner.update_lean(id, TaskStatus::Pending, change, logs, deliveries) {
            Ok(last) => Ok((session, inner.task(id)?.clone(), Some(last))),
            Err(_) => Ok((session, task, None)),
        }
    }

    async fn get_session(&self, id: &SessionId) -> Result<Session> {
        self.lock()
            .sessions
            .get(id)
            .cloned()
            .ok_or_else(|| session_not_found(id))
    }

    async fn find_session(&self, channel_type: &str, channel_key: &str) -> Result<Option<Session>> {
        Ok(self
            .lock()
            .sessions
            .values()
            .find(|s| {
                s.channel_type == channel_type && s.channel_key.as_deref() == Some(channel_key)
            })
            .cloned())
    }

    async fn list_sessions(&self, page: Page) -> Result<Vec<SessionSummary>> {
        Ok(self.lock().summaries(|_| true, page))
    }

    async fn search_sessions(&self, query: &str, page: Page) -> Result<Vec<SessionSummary>> {
        Ok(self
            .lock()
            .summaries(|s| title_matches(&s.title, query), page))
    }

    async fn usage_totals(&self) -> Result<UsageTotals> {
        let inner = self.lock();
        let mut totals = UsageTotals {
            sessions: inner.sessions.len() as u64,
            ..UsageTotals::default()
        };
        for t in inner.tasks.values() {
            totals.add_task(t);
        }
        Ok(totals)
    }

    async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()> {
        validate_title(title)?;
        let mut inner = self.lock();
        let s = inner
            .sessions
            .get_mut(id)
            .ok_or_else(|| session_not_found(id))?;
        s.title = title.to_owned();
        Ok(())
    }

    async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()> {
        let mut inner = self.lock();
        let s = inner
            .sessions
            .get_mut(id)
            .ok_or_else(|| session_not_found(id))?;
        s.last_active = s.last_active.max(at);
        Ok(())
    }

    async fn delete_session(&self, id: &SessionId) -> Result<()> {
        let mut inner = self.lock();
        inner
            .sessions
            .remove(id)
            .ok_or_else(|| session_not_found(id))?;
        inner.idle_holds.remove(id);
        let doomed: Vec<TaskId> = inner
            .tasks
            .values()
            .filter(|t| &t.session_id == id)
            .map(|t| t.id)
            .collect();
        inner.remove_tasks(&doomed);
        Ok(())
    }

    async fn create_task(&self, new: NewTask) -> Result<Task> {
        self.lock().insert_new_task(new)
    }

    async fn create_task_claimed(
        &self,
        new: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, Option<u64>)> {
        anywork_core::store::check_claim(&change)?;
        let now = Timestamp::now();
        let mut inner = self.lock();
        let task = inner.insert_new_task(new)?;
        let id = task.id;
        let held = inner
            .idle_holds
            .get(&task.session_id)
            .is_some_and(|(_, until)| *until > now);
        if held || !matches!(inner.not_its_turn::<()>(id), Ok(None)) {
            return Ok((task, None));
        }
        match inner.update_lean(id, TaskStatus::Pending, change, logs, deliveries) {
            Ok(last) => Ok((inner.task(id)?.clone(), Some(last))),
            Err(_) => Ok((task, None)),
        }
    }

    async fn get_task(&self, id: TaskId) -> Result<Task> {
        self.lock().task(id).cloned()
    }

    async fn task_status(&self, id: TaskId) -> Result<TaskStatus> {
        Ok(self.lock().task(id)?.status)
    }

    async fn hold_idle_session(
        &self,
        session_id: &SessionId,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool> {
        let mut inner = self.lock();
        if !inner.sessions.contains_key(session_id) {
            return Err(session_not_found(session_id));
        }
        let held_by_other = inner
            .idle_holds
            .get(session_id)
            .is_some_and(|(o, end)| o != owner && *end > now);
        let active = inner
            .tasks
            .values()
            .any(|t| &t.session_id == session_id && t.status.is_active());
        if held_by_other || active {
            return Ok(false);
        }
        inner
            .idle_holds
            .insert(session_id.clone(), (owner.to_owned(), until));
        Ok(true)
    }

    async fn release_idle_hold(&self, session_id: &SessionId, owner: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner
            .idle_holds
            .get(session_id)
            .is_some_and(|(o, _)| o == owner)
        {
            inner.idle_holds.remove(session_id);
        }
        Ok(())
    }

    async fn task_status_for_start(&self, id: TaskId) -> Result<(TaskStatus, Option<Timestamp>)> {
        let inner = self.lock();
        let task = inner.task(id)?;
        let hold = inner.idle_holds.get(&task.session_id).map(|(_, end)| *end);
        Ok((task.status, hold))
    }

    async fn find_task_by_idempotency_key(
        &self,
        channel_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Task>> {
        Ok(self
            .lock()
            .tasks
            .values()
            .find(|t| {
                t.channel_type == channel_type
                    && t.idempotency_key.as_deref() == Some(idempotency_key)
            })
            .cloned())
    }

    async fn update_task(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
    ) -> Result<Task> {
        self.lock().update(id, expected, change).cloned()
    }

    async fn update_task_and_append(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
    ) -> Result<(Task, u64)> {
        self.update_task_and_enqueue(id, expected, change, logs, Vec::new())
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
        self.lock()
            .update_and_enqueue(id, expected, change, logs, deliveries)
    }

    async fn update_task_lean(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<u64> {
        self.lock()
            .update_lean(id, expected, change, logs, deliveries)
    }

    async fn tasks_by_session(&self, session_id: &SessionId, page: Page) -> Result<Vec<Task>> {
        let inner = self.lock();
        let mut rows: Vec<Task> = inner
            .tasks
            .values()
            .filter(|t| &t.session_id == session_id)
            .cloned()
            .collect();
        rows.sort_by_key(|t| (t.created_at, t.id));
        Ok(window(rows, page))
    }

    async fn tasks_by_session_in_status(
        &self,
        session_id: &SessionId,
        status: TaskStatus,
        page: Page,
    ) -> Result<Vec<Task>> {
        let inner = self.lock();
        let mut rows: Vec<Task> = inner
            .tasks
            .values()
            .filter(|t| &t.session_id == session_id && t.status == status)
            .cloned()
            .collect();
        rows.sort_by_key(|t| (t.created_at, t.id));
        Ok(window(rows, page))
    }

    async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>> {
        let inner = self.lock();
        let mut rows: Vec<Task> = inner
            .tasks
            .values()
            .filter(|t| t.status == status)
            .cloned()
            .collect();
        rows.sort_by_key(|t| (t.created_at, t.id));
        Ok(window(rows, page))
    }

    async fn renew_lease(&self, id: TaskId, owner: &str, expires_at: Timestamp) -> Result<()> {
        let mut inner = self.lock();
        let task = inner.task_mut(id)?;
        match &mut task.lease {
            Some(lease) if lease.owner == owner && task.status.is_active() => {
                lease.expires_at = expires_at;
                Ok(())
            }
            _ => Err(Error::conflict(format!(
                "task {id} is not leased by {owner:?}"
            ))),
        }
    }

    async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
        let inner = self.lock();
        let mut rows: Vec<Task> = inner
            .tasks
            .values()
            .filter(|t| {
                t.status.is_active() && t.lease.as_ref().is_some_and(|l| l.expires_at <= now)
            })
            .cloned()
            .collect();
        rows.sort_by_key(|t| (t.created_at, t.id));
        rows.truncate(limit as usize);
        Ok(rows)
    }

    async fn claim_task(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Claim> {
        anywork_core::store::check_claim(&change)?;
        let mut inner = self.lock();
        if let Some(not_now) = inner.not_its_turn(id)? {
            return Ok(not_now);
        }
        let last = inner.update_lean(id, TaskStatus::Pending, change, logs, deliveries)?;
        Ok(Claim::Claimed(inner.task(id)?.clone(), last))
    }

    async fn claim_task_lean(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Claim<()>> {
        anywork_core::store::check_claim(&change)?;
        let mut inner = self.lock();
        if let Some(not_now) = inner.not_its_turn(id)? {
            return Ok(not_now);
        }
        let last = inner.update_lean(id, TaskStatus::Pending, change, logs, deliveries)?;
        Ok(Claim::Claimed((), last))
    }

    async fn claimable(&self, limit: u32) -> Result<Vec<Task>> {
        let inner = self.lock();
        let busy: std::collections::HashSet<&SessionId> = inner
            .tasks
            .values()
            .filter(|t| matches!(t.status, TaskStatus::Running | TaskStatus::InputRequired))
            .map(|t| &t.session_id)
            .collect();
        let mut oldest: HashMap<&SessionId, &Task> = HashMap::new();
        for task in inner.tasks.values() {
            if task.status != TaskStatus::Pending || busy.contains(&task.session_id) {
                continue;
            }
            let slot = oldest.entry(&task.session_id).or_insert(task);
            if (task.created_at, task.id) < (slot.created_at, slot.id) {
                *slot = task;
            }
        }
        let mut rows: Vec<Task> = oldest.into_values().cloned().collect();
        rows.sort_by_key(|t| (t.created_at, t.id));
        rows.truncate(limit as usize);
        Ok(rows)
    }

    async fn append_logs(&self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.lock().append(task_id, logs)
    }

    async fn append_logs_while_active(
        &self,
        task_id: TaskId,
        logs: Vec<NewTaskLog>,
    ) -> Result<u64> {
        let mut inner = self.lock();
        anywork_core::store::check_log_open(inner.task(task_id)?)?;
        inner.append(task_id, logs)
    }

    async fn read_logs(&self, task_id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
        let inner = self.lock();
        let Some(log) = inner.logs.get(&task_id) else {
            return Ok(Vec::new());
        };
        let start = log.events.partition_point(|l| l.seq <= after);
        let end = start.saturating_add(limit as usize).min(log.events.len());
        Ok(log.events[start..end].to_vec())
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        let mut inner = self.lock();
        let mut due: Vec<(Timestamp, u64)> = inner
            .deliveries
            .iter()
            .filter(|(seq, d)| inner.claimable(**seq, d, now))
            .map(|(seq, d)| (d.next_attempt_at, *seq))
            .collect();
        due.sort();
        due.truncate(limit as usize);
        let mut claimed = Vec::with_capacity(due.len());
        for (_, seq) in due {
            if let Some(d) = inner.deliveries.get_mut(&seq) {
                d.claim = Some(Lease {
                    owner: owner.to_owned(),
                    expires_at: until,
                });
                claimed.push(d.clone());
            }
        }
        Ok(claimed)
    }

    async fn record_delivery_attempt(
        &self,
        id: DeliveryId,
        owner: &str,
        attempt: DeliveryAttempt,
        at: Timestamp,
    ) -> Result<Delivery> {
        let mut inner = self.lock();
        let d = inner.delivery_mut(id)?;
        let mut updated = d.clone();
        attempt.apply(&mut updated, owner, at)?;
        *d = updated.clone();
        Ok(updated)
    }

    async fn get_delivery(&self, id: DeliveryId) -> Result<Delivery> {
        self.lock().delivery_mut(id).map(|d| d.clone())
    }

    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        page: Page,
    ) -> Result<Vec<Delivery>> {
        let inner = self.lock();
        let rows = inner
            .deliveries
            .values()
            .filter(|d| status.is_none_or(|s| d.status == s))
            .cloned()
            .collect();
        Ok(window(rows, page))
    }

    async fn retry_delivery(&self, id: DeliveryId, now: Timestamp) -> Result<Delivery> {
        let mut inner = self.lock();
        let d = inner.delivery_mut(id)?;
        d.retry(now)?;
        Ok(d.clone())
    }

    async fn delete_settled_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64> {
        let mut inner = self.lock();
        let mut doomed: Vec<(Timestamp, u64)> = inner
            .deliveries
            .iter()
            .filter(|(_, d)| !d.status.is_open() && d.updated_at < before)
            .map(|(seq, d)| (d.updated_at, *seq))
            .collect();
        doomed.sort();
        doomed.truncate(limit as usize);
        for (_, seq) in &doomed {
            if let Some(d) = inner.deliveries.remove(seq) {
                inner.delivery_seq.remove(&d.id);
            }
        }
        Ok(doomed.len() as u64)
    }

    async fn delete_finished_logs(
        &self,
        finished_before: Timestamp,
        max_tasks: u32,
        now: Timestamp,
    ) -> Result<DeletedLogs> {
        let mut inner = self.lock();
        let mut doomed: Vec<(Timestamp, TaskId)> = inner
            .tasks
            .values()
            .filter(|t| t.status.is_terminal() && t.logs_deleted_at.is_none())
            .filter_map(|t| {
                t.finished_at
                    .filter(|f| *f < finished_before)
                    .map(|f| (f, t.id))
            })
            .collect();
        doomed.sort();
        doomed.truncate(max_tasks as usize);
        let mut deleted = DeletedLogs::default();
        for (_, id) in doomed {
            if let Some(log) = inner.logs.get_mut(&id) {
                deleted.events += log.events.len() as u64;
                log.events.clear();
            }
            if let Some(t) = inner.tasks.get_mut(&id) {
                t.logs_deleted_at = Some(now);
            }
            deleted.tasks += 1;
        }
        Ok(deleted)
    }
}
