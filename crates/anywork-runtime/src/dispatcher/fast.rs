//! A new task that can start at once is stored already started: when its session has nothing
//! queued or running here, a permit is free and the driver names the session's worker
//! without waiting ([`ContainerDriver::ready_worker`](anywork_core::ContainerDriver::ready_worker)),
//! the submit stores it with [`TaskStore::create_task_claimed`] — `running`, with its worker,
//! this server's lease and its `running` event, in the create's own write — and its run
//! sends `/chat` at once. The old way took three store calls before the worker was asked
//! (the create, the runner's status-and-hold read, the claim), each a hop to the store's
//! thread and back. When the store cannot start it (another task of the session is active
//! or older, the reaper holds the session) it is stored `pending` and queued as any task.
//! A new session's first task is stored the same way with its session
//! ([`TaskStore::create_session_with_task_claimed`]). On a store that serves this server
//! only ([`TaskStore::shared`]), a task of a stored session has its `/prepare` sent while it
//! is written ([`run::EarlyPrepare`]), so that the run's `/chat` follows the write at once.
//!
//! [`TaskStore::shared`]: anywork_core::TaskStore::shared
//!
//! [`TaskStore::create_session_with_task_claimed`]: anywork_core::TaskStore::create_session_with_task_claimed
//!
//! [`TaskStore::create_task_claimed`]: anywork_core::TaskStore::create_task_claimed

use std::collections::VecDeque;
use std::sync::Arc;

use anywork_core::{
    NewSession, NewTask, Result, Session, SessionId, Task, TaskChange, TaskEvent, TaskId,
    TaskOutcome, TaskStatus, Timestamp, WorkerEndpoint,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{Control, Dispatcher, Inner, RunHandle, lock, outbox, run};

/// The reservation of a session's start for one new task, from before its create to its run:
/// the session's queue (empty: later submits queue behind it, and no runner starts beside
/// it), a permit, and the run's control channel, registered so that a cancel arriving once
/// the task is stored reaches its run. Dropped, it hands on what the create left: the claimed
/// task's run (its `running` event published first), or the pending task to the session's
/// runner, or, when nothing was stored, the session back to whatever queued behind it. It is
/// dropped after the submitter has subscribed to the task's events, and a submit whose future
/// is dropped midway still leaves no session reserved.
pub(super) struct FastStart {
    inner: Arc<Inner>,
    session: SessionId,
    task_id: TaskId,
    /// Shared with the early `/prepare` and the run: one copy of its strings per task.
    endpoint: Arc<WorkerEndpoint>,
    permit: Option<OwnedSemaphorePermit>,
    control: Option<(mpsc::Sender<Control>, mpsc::Receiver<Control>)>,
    /// The session's `/prepare`, on its way while the task is written (a store that serves
    /// this server only): handed to the run, or aborted.
    prepare: Option<run::EarlyPrepare>,
    outcome: Outcome,
}

/// The claim a new task is stored with ([`Dispatcher::claim_of`]).
struct NewClaim {
    change: TaskChange,
    logs: Vec<anywork_core::NewTaskLog>,
    events: Vec<super::Encoded>,
    deliveries: Vec<anywork_core::NewDelivery>,
    woken: bool,
    /// Events appended with the claim.
    n: u64,
}

/// What the create left for [`FastStart`] to hand on.
enum Outcome {
    /// Nothing stored (the create failed, or has not run), or nothing left to do.
    Nothing,
    /// Stored claimed: the task as stored, and its events numbered from `first`.
    Claimed {
        task: Task,
        first: u64,
        events: Vec<super::Encoded>,
        woken: bool,
    },
    /// Stored `pending`: it goes to the head of its session's queue.
    Pending(Task),
}

impl Dispatcher {
    /// Stores `new_task` (of a stored session) as `pending`, or already claimed by this
    /// server when it can start at once; `start` is then what starts it once dropped (see
    /// [`FastStart`]), else the caller queues it. Returns the task as accepted (`pending`).
    pub(super) async fn create_task_fast(
        &self,
        new_task: NewTask,
        start: &mut Option<FastStart>,
    ) -> Result<Task> {
        let inner = &self.inner;
        let Some(mut fast) = self.reserve_start(&new_task.session_id, new_task.id) else {
            return inner.store.create_task(new_task).await;
        };
        let (accepted, claim) = self.claim_of(&fast, &new_task);
        if !inner.store.shared() {
            // Nothing of the session is active or queued here, and no other server uses the
            // store: the worker may be prepared while the task is written.
            fast.prepare = Some(run::EarlyPrepare::spawn(
                inner.clone(),
                accepted.clone(),
                fast.endpoint.clone(),
            ));
        }
        // An error drops `fast`: the reservation is undone.
        let (stored, last) = inner
            .store
            .create_task_claimed(new_task, claim.change, claim.logs, claim.deliveries)
            .await?;
        self.settle(&mut fast, stored, last, claim.n, claim.events, claim.woken)
            .await;
        *start = Some(fast);
        Ok(accepted)
    }

    /// [`create_task_fast`](Self::create_task_fast) of a new session's first task: the
    /// session and its task in one write ([`TaskStore::create_session_with_task_claimed`]
    /// when the task can start at once, else `create_session_with_task`). Returns the
    /// session as stored and the task as accepted (`pending`).
    ///
    /// [`TaskStore::create_session_with_task_claimed`]: anywork_core::TaskStore::create_session_with_task_claimed
    pub(super) async fn create_session_fast(
        &self,
        session: NewSession,
        new_task: NewTask,
        start: &mut Option<FastStart>,
    ) -> Result<(Session, Task)> {
        let inner = &self.inner;
        let Some(mut fast) = self.reserve_start(&new_task.session_id, new_task.id) else {
            return inner
                .store
                .create_session_with_task(session, new_task)
                .await;
        };
        // No `/prepare` beside this write: a taken session id (the write's `Conflict`) would
        // be another session's, whose tasks this server knows nothing of.
        let (accepted, claim) = self.claim_of(&fast, &new_task);
        // An error (a taken session or task: nothing stored) drops `fast`: the reservation
        // is undone.
        let (made, stored, last) = inner
            .store
            .create_session_with_task_claimed(
                session,
                new_task,
                claim.change,
                claim.logs,
                claim.deliveries,
            )
            .await?;
        self.settle(&mut fast, stored, last, claim.n, claim.events, claim.woken)
            .await;
        *start = Some(fast);
        Ok((made, accepted))
    }

    /// The claim a new task is stored with by `fast`: to `running` on its worker with this
    /// server's lease, its `running` event and the deliveries that wants. Also the task as
    /// accepted (`pending`).
    fn claim_of(&self, fast: &FastStart, new_task: &NewTask) -> (Task, NewClaim) {
        let inner = &self.inner;
        let expiry = Timestamp::now().plus_millis(inner.config.lease_ttl.as_millis() as i64);
        let change = TaskChange::to(TaskStatus::Running)
            .worker(fast.endpoint.worker_id.clone())
            .lease(inner.config.owner.clone(), expiry);
        let events = vec![TaskEvent::Status {
            status: TaskStatus::Running,
        }];
        let accepted = new_task.clone().into_task();
        let deliveries =
            outbox::deliveries_after(inner, &accepted, TaskStatus::Pending, &change, None, None);
        let woken = !deliveries.is_empty();
        let n = events.len() as u64;
        let (logs, events) = super::encode(events);
        let claim = NewClaim {
            change,
            logs,
            events,
            deliveries,
            woken,
            n,
        };
        (accepted, claim)
    }

    /// What `fast` hands on once the task is stored: its run when the store claimed it (the
    /// last seq `last`), else the pending task to its session's runner (a cancel that
    /// reached the reserved run meanwhile is done here, as on a queued task).
    async fn settle(
        &self,
        fast: &mut FastStart,
        stored: Task,
        last: Option<u64>,
        n: u64,
        events: Vec<super::Encoded>,
        woken: bool,
    ) {
        let inner = &self.inner;
        match last {
            Some(last) => {
                if let Some(run) = lock(&inner.runs).get_mut(&stored.id) {
                    run.claimed = true;
                }
                let first = last + 1 - n;
                fast.outcome = Outcome::Claimed {
                    task: stored,
                    first,
                    events,
                    woken,
                };
            }
            None => {
                let acks = fast.close_control();
                if acks.is_empty() {
                    fast.outcome = Outcome::Pending(stored);
                } else {
                    // Boxed: a rare path, whose future would otherwise make every submit's
                    // future (moved whole into the WebSocket's box per chat) kilobytes larger.
                    let finish = Box::pin(inner.finish_unrun(&stored, TaskOutcome::canceled()));
                    if let Err(e) = finish.await {
                        tracing::warn!(task = %stored.id, error = %e, "cannot cancel the new task");
                        fast.outcome = Outcome::Pending(stored);
                    }
                    for ack in acks {
                        let _ = ack.send(());
                    }
                }
            }
        }
    }

    /// The reservation of `session`'s start for task `task_id`, when it can start at once:
    /// not shutting down, the driver's worker ready, a permit free, and nothing of the
    /// session queued, running or held back here.
    fn reserve_start(&self, session: &SessionId, task_id: TaskId) -> Option<FastStart> {
        let inner = &self.inner;
        if inner.closing.load(std::sync::atomic::Ordering::Relaxed)
            || lock(&inner.held).contains_key(session)
        {
            return None;
        }
        let endpoint = Arc::new(inner.driver.ready_worker(session)?);
        let permit = inner.permits.clone().try_acquire_owned().ok()?;
        {
            let mut queues = lock(&inner.queues);
            if queues.contains_key(session) {
                return None;
            }
            queues.insert(session.clone(), VecDeque::new());
        }
        let (tx, rx) = mpsc::channel(8);
        lock(&inner.runs).insert(task_id, RunHandle::new(tx.clone()));
        Some(FastStart {
            inner: inner.clone(),
            session: session.clone(),
            task_id,
            endpoint,
            permit: Some(permit),
            control: Some((tx, rx)),
            prepare: None,
            outcome: Outcome::Nothing,
        })
    }
}

impl FastStart {
    /// Unregisters the run that will not be, and answers the cancels sent to it meanwhile
    /// (their acknowledgements, for after the task is canceled).
    fn close_control(&mut self) -> Vec<tokio::sync::oneshot::Sender<()>> {
        lock(&self.inner.runs).remove(&self.task_id);
        let mut acks = Vec::new();
        if let Some((_, mut rx)) = self.control.take() {
            rx.close();
            while let Ok(control) = rx.try_recv() {
                if let Control::Cancel(ack) = control {
                    acks.push(ack);
                }
            }
        }
        acks
    }
}

impl Drop for FastStart {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        match std::mem::replace(&mut self.outcome, Outcome::Nothing) {
            Outcome::Claimed {
                task,
                first,
                events,
                woken,
            } => {
                inner.publish(&task, first, events);
                if woken {
                    inner.outbox_wake.notify_one();
                }
                let (Some(permit), Some(control)) = (self.permit.take(), self.control.take())
                else {
                    return;
                };
                let started = run::Started {
                    task,
                    endpoint: self.endpoint.clone(),
                    permit,
                    control,
                    prepare: self.prepare.take(),
                };
                runtime.spawn(run::run_started(inner, started));
            }
            Outcome::Pending(task) => {
                self.close_control();
                lock(&inner.queues)
                    .entry(self.session.clone())
                    .or_default()
                    .push_front(task);
                runtime.spawn(run::session_runner(inner, self.session.clone()));
            }
            Outcome::Nothing => {
                self.close_control();
                let mut queues = lock(&inner.queues);
                if queues.get(&self.session).is_some_and(VecDeque::is_empty) {
                    queues.remove(&self.session);
                } else {
                    // Queued behind the reservation meanwhile: its runner starts now.
                    drop(queues);
                    runtime.spawn(run::session_runner(inner, self.session.clone()));
                }
            }
        }
    }
}
