//! [`MemoryStore`]: everything in one process's memory. For tests, demos and embedders that
//! need no durability; it is also the model the conformance suite checks other stores against.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use anywork_core::session::validate_title;
use anywork_core::{
    Error, NewSession, NewTask, NewTaskLog, Page, Result, Session, SessionId, SessionSummary, Task,
    TaskChange, TaskId, TaskLog, TaskStatus, TaskStore, Timestamp,
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
    logs: HashMap<TaskId, Vec<TaskLog>>,
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
    fn task(&self, id: TaskId) -> Result<&Task> {
        self.tasks.get(&id).ok_or_else(|| task_not_found(id))
    }

    fn task_mut(&mut self, id: TaskId) -> Result<&mut Task> {
        self.tasks.get_mut(&id).ok_or_else(|| task_not_found(id))
    }

    fn update(&mut self, id: TaskId, expected: TaskStatus, change: TaskChange) -> Result<Task> {
        let task = self.task_mut(id)?;
        if task.status != expected {
            return Err(Error::conflict(format!(
                "task {id} is {} now, not {expected}",
                task.status
            )));
        }
        let mut updated = task.clone();
        change.apply(&mut updated)?;
        *task = updated.clone();
        Ok(updated)
    }

    fn append(&mut self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.task(task_id)?;
        let entries = self.logs.entry(task_id).or_default();
        for log in logs {
            let seq = entries.len() as u64 + 1;
            entries.push(TaskLog {
                task_id,
                seq,
                event: log.event,
                timestamp: log.timestamp,
            });
        }
        Ok(entries.len() as u64)
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        validate_title(&new.title)?;
        let mut inner = self.lock();
        if inner.sessions.contains_key(&new.id) {
            return Err(Error::conflict(format!(
                "session {} already exists",
                new.id
            )));
        }
        if let Some(key) = &new.channel_key
            && inner
                .sessions
                .values()
                .any(|s| s.channel_type == new.channel_type && s.channel_key.as_ref() == Some(key))
        {
            return Err(Error::conflict(format!(
                "a {} session with key {key:?} already exists",
                new.channel_type
            )));
        }
        let session = new.into_session();
        inner.sessions.insert(session.id.clone(), session.clone());
        Ok(session)
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
        let inner = self.lock();
        let mut rows: Vec<SessionSummary> = inner
            .sessions
            .values()
            .map(|s| {
                let tasks = inner.tasks.values().filter(|t| t.session_id == s.id);
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
        Ok(window(rows, page))
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
        let doomed: Vec<TaskId> = inner
            .tasks
            .values()
            .filter(|t| &t.session_id == id)
            .map(|t| t.id)
            .collect();
        for t in doomed {
            inner.tasks.remove(&t);
            inner.logs.remove(&t);
        }
        Ok(())
    }

    async fn create_task(&self, new: NewTask) -> Result<Task> {
        let mut inner = self.lock();
        if inner.tasks.contains_key(&new.id) {
            return Err(Error::conflict(format!("task {} already exists", new.id)));
        }
        let session = inner
            .sessions
            .get_mut(&new.session_id)
            .ok_or_else(|| session_not_found(&new.session_id))?;
        session.last_active = session.last_active.max(new.created_at);
        let task = new.into_task();
        inner.tasks.insert(task.id, task.clone());
        Ok(task)
    }

    async fn get_task(&self, id: TaskId) -> Result<Task> {
        self.lock().task(id).cloned()
    }

    async fn update_task(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
    ) -> Result<Task> {
        self.lock().update(id, expected, change)
    }

    async fn update_task_and_append(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
    ) -> Result<(Task, u64)> {
        let mut inner = self.lock();
        let task = inner.update(id, expected, change)?;
        let last = inner.append(id, logs)?;
        Ok((task, last))
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

    async fn append_logs(&self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.lock().append(task_id, logs)
    }

    async fn read_logs(&self, task_id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
        let inner = self.lock();
        let Some(entries) = inner.logs.get(&task_id) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(entries.len());
        let end = start.saturating_add(limit as usize).min(entries.len());
        Ok(entries[start..end].to_vec())
    }
}
