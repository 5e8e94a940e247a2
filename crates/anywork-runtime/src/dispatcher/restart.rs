//! What a starting dispatcher does about the work a previous server left behind, before it
//! queues anything: tasks held by an owner known to be gone
//! ([`DispatcherConfig::dead_owners`](crate::DispatcherConfig::dead_owners), e.g. this
//! server's previous incarnation) are taken back at once — a running one goes back to
//! `pending` and its run re-attaches to the worker (`/chat/attach`), which may still be
//! running it; one waiting for input is ended as interrupted —, expired leases are
//! recovered, and the sessions of tasks still held by another live-looking owner keep their
//! pending tasks back until those tasks are over: one task at a time per session holds across
//! restarts.

use std::collections::HashMap;
use std::time::Duration;

use anywork_core::worker_api::CancelRequest;
use anywork_core::{
    ErrorKind, Page, Result, SessionId, Task, TaskChange, TaskId, TaskOutcome, TaskStatus,
};

use super::{Dispatcher, Inner, lock};

/// How often a held-back session looks whether the other server's task is over.
const HELD_POLL: Duration = Duration::from_millis(250);

impl Dispatcher {
    /// Ends the active tasks of dead owners as interrupted, recovers expired leases, and
    /// holds back the sessions whose task another server still holds. Returns how many tasks
    /// were ended.
    pub(super) async fn settle_at_start(&self) -> Result<usize> {
        let inner = &self.inner;
        let mut ended = 0;
        let mut held: HashMap<SessionId, Vec<TaskId>> = HashMap::new();
        for status in [TaskStatus::Running, TaskStatus::InputRequired] {
            for task in active(inner, status).await? {
                let Some(lease) = &task.lease else { continue };
                if lease.owner == inner.config.owner {
                    continue;
                }
                if !inner.config.dead_owners.contains(&lease.owner) {
                    held.entry(task.session_id.clone())
                        .or_default()
                        .push(task.id);
                    continue;
                }
                // A running task may still be running on its worker, which keeps its events:
                // back to `pending`, and its run re-attaches instead of starting over.
                if status == TaskStatus::Running
                    && task.worker_id.is_some()
                    && inner
                        .store
                        .update_task(
                            task.id,
                            TaskStatus::Running,
                            TaskChange::to(TaskStatus::Pending),
                        )
                        .await
                        .is_ok()
                {
                    tracing::info!(task = %task.id, "re-attaching to a task of this server's previous run");
                    lock(&inner.resume).insert(task.id);
                    continue;
                }
                let reason = format!(
                    "interrupted: the server running this task ({}) stopped before it finished \
                     (it was {} on worker {}); send the message again to retry",
                    lease.owner,
                    task.status,
                    task.worker_id.as_deref().unwrap_or("(none)")
                );
                tracing::warn!(task = %task.id, %reason, "ending a task of this server's previous run");
                self.cancel_on_worker(&task);
                match inner.finish_unrun(&task, TaskOutcome::failed(reason)).await {
                    Ok(_) => ended += 1,
                    // Ended meanwhile (by its run, if it was alive after all).
                    Err(e) if e.kind() == ErrorKind::Conflict => {}
                    Err(e) => return Err(e),
                }
            }
        }
        ended += self.recover_expired().await;
        // What recovery just ended is no longer held.
        let mut still = HashMap::new();
        for (session, ids) in held {
            let mut active = Vec::new();
            for id in ids {
                if inner
                    .store
                    .get_task(id)
                    .await
                    .map_or(true, |t| t.status.is_active())
                {
                    active.push(id);
                }
            }
            if !active.is_empty() {
                still.insert(session, active);
            }
        }
        if !still.is_empty() {
            tracing::info!(
                sessions = still.len(),
                "sessions wait for tasks another server holds before their next task runs"
            );
        }
        *lock(&inner.held) = still;
        Ok(ended)
    }

    /// Asks the worker of `task` to stop it, best effort and in the background (it may still
    /// be running there; a dead worker must not hold up the start).
    pub(super) fn cancel_on_worker(&self, task: &Task) {
        let Some(worker_id) = task.worker_id.clone() else {
            return;
        };
        let inner = self.inner.clone();
        let request = CancelRequest {
            task_id: task.id,
            session_id: Some(task.session_id.clone()),
        };
        tokio::spawn(async move {
            if let Ok(workers) = inner.driver.list().await
                && let Some(w) = workers.iter().find(|w| w.endpoint.worker_id == worker_id)
            {
                let _ = inner.client.cancel(&w.endpoint, &request).await;
            }
        });
    }
}

/// Every task in `status`, paged.
async fn active(inner: &Inner, status: TaskStatus) -> Result<Vec<Task>> {
    let mut all = Vec::new();
    let mut offset = 0;
    loop {
        let page = Page { limit: 500, offset };
        let tasks = inner.store.tasks_by_status(status, page).await?;
        let n = tasks.len() as u32;
        all.extend(tasks);
        if n < page.limit {
            return Ok(all);
        }
        offset += n;
    }
}

/// Waits until no task of `session` is held by another server (see
/// [`Dispatcher::settle_at_start`]); returns at once for the other sessions.
pub(super) async fn wait_until_session_is_free(inner: &Inner, session: &SessionId) {
    loop {
        let Some(ids) = lock(&inner.held).get(session).cloned() else {
            return;
        };
        let mut active = Vec::new();
        for id in ids {
            match inner.store.task_status(id).await {
                Ok(status) if status.is_active() => active.push(id),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(_) => active.push(id),
            }
        }
        if active.is_empty() {
            lock(&inner.held).remove(session);
            return;
        }
        lock(&inner.held).insert(session.clone(), active);
        tokio::time::sleep(HELD_POLL).await;
    }
}
