//! The run of one task: a session's runner takes its queue in order; `Run` gets the worker,
//! moves the task to `running` with a lease, calls `/prepare` and `/chat`, and reads the event
//! stream to its end in one `select!` loop with the control messages (cancel, input answers,
//! the end of the task by another server), lease renewal and the timeout. It is the only
//! writer of its task's status while the task runs here; a task ended by another server
//! sharing the store (a cancel there, lease recovery) stops its run here at once, and the
//! run writes nothing after that end (its appends are refused once the task is over).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anywork_core::worker_api::{CancelRequest, ChatRequest, InputAnswer, PrepareRequest};
use anywork_core::{
    Claim, Error, ErrorKind, InputResponse, McpServerConfig, Progress, Result, SessionId,
    SkillSpec, Task, TaskChange, TaskEvent, TaskId, TaskOutcome, TaskStatus, Timestamp,
    WorkerEndpoint,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::retry::{retry, retry_if};
use super::{Control, Inner, lock};
use crate::shrink::Shrink;
use crate::worker_client::{ChatStart, ChatStream, PreparedBody};

/// Runs the queued tasks of `session`, one after the other, each once it has a permit. The
/// queue is a hint: a task starts only through the store's claim ([`TaskStore::claim_task`]),
/// which refuses it while another task of the session is active (on any server) or an older
/// one is pending; a hint that is no longer pending is dropped.
///
/// The next task stays at the head of its queue until it has its permit: while it waits it
/// counts in [`queue_depth`](super::Dispatcher::queue_depth), and its followers know that its
/// events will be published here ([`Dispatcher::runs_or_queues`](super::Dispatcher::runs_or_queues)),
/// so they do not read the log while it waits (thousands of queued chats did, twice a second
/// each: store reads per task grew with the length of the queue).
///
/// [`TaskStore::claim_task`]: anywork_core::TaskStore::claim_task
pub(super) async fn session_runner(inner: Arc<Inner>, session: SessionId) {
    loop {
        let head = {
            let mut queues = lock(&inner.queues);
            match queues.get(&session).and_then(VecDeque::front) {
                Some(t) => t.id,
                None => {
                    queues.remove(&session);
                    queues.shrink_when_sparse();
                    return;
                }
            }
        };
        // Started or ended meanwhile (by another server, or canceled): nothing to do.
        match inner.store.task_status_for_start(head).await {
            Ok((status, _)) if status != TaskStatus::Pending => {
                forget(&inner, &session, head);
                continue;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                forget(&inner, &session, head);
                continue;
            }
            Ok((_, Some(until))) if until > Timestamp::now() => {
                // A reaper (here or on another server) is stopping the session's worker: the
                // driver is asked for one once that is over. The hold was taken before this
                // task was stored (no hold is given while a task of the session is pending),
                // so the worker the driver hands out next is a new one.
                if inner.closing.load(std::sync::atomic::Ordering::Relaxed) {
                    lock(&inner.queues).remove(&session);
                    return;
                }
                tokio::time::sleep(BUSY_POLL).await;
                continue;
            }
            _ => {}
        }
        // A task another server still holds in this session ends first.
        super::restart::wait_until_session_is_free(&inner, &session).await;
        let Ok(_permit) = inner.permits.clone().acquire_owned().await else {
            return;
        };
        if inner.closing.load(std::sync::atomic::Ordering::Relaxed) {
            // Shutting down: queued tasks stay pending for the next start.
            lock(&inner.queues).remove(&session);
            return;
        }
        // The head, unless it was canceled meanwhile: then the one after it (the claim
        // checks it as it would have checked the first).
        let next = lock(&inner.queues)
            .get_mut(&session)
            .and_then(VecDeque::pop_front);
        let Some(next) = next else { continue };
        if next.id != head {
            // The head was canceled meanwhile: the next one is looked at as the head was
            // (it may have been stored while the session's worker was being reaped).
            lock(&inner.queues)
                .entry(session.clone())
                .or_default()
                .push_front(next);
            continue;
        }
        let id = next.id;
        let retry_after = inner.config.store_retry.max;
        // Boxed: a run's future is large, and a runner waiting for its permit would otherwise
        // hold room for the whole run (kilobytes per queued session), copied whole by each
        // move Tokio makes of it.
        match Box::pin(run_task(&inner, next)).await {
            Ok(()) => {}
            Err(RunError::NotStarted(e, task)) => {
                // The store could not take `pending → running`: the task is still pending.
                // It goes back to the head of its session's queue, after a pause.
                tracing::warn!(task = %task.id, error = %e, "cannot start the task; it is queued again");
                drop(_permit);
                tokio::time::sleep(retry_after).await;
                lock(&inner.queues)
                    .entry(session.clone())
                    .or_default()
                    .push_front(task);
            }
            Err(RunError::Busy(task, holder)) => {
                // Another server runs a task of this session: this one waits, without a
                // permit, until that one is over.
                drop(_permit);
                lock(&inner.queues)
                    .entry(session.clone())
                    .or_default()
                    .push_front(task);
                wait_until_over(&inner, holder).await;
            }
            Err(RunError::Store(e)) if ended_elsewhere(&e) => {
                // A write of the run lost to the end of its task (a cancel while it waited
                // for input, another server's cancel, lease recovery): expected.
                tracing::info!(task = %id, error = %e, "the task ended before its run's last write");
            }
            Err(RunError::Store(e)) => {
                tracing::error!(task = %id, error = %e, "task run failed in the dispatcher");
            }
        }
    }
}

/// A new task stored already claimed by this server
/// ([`TaskStore::create_task_claimed`](anywork_core::TaskStore::create_task_claimed)): its run
/// starts at once with the worker it was claimed for, holding its permit, with its control
/// channel registered before the write (a cancel meanwhile waits in it); then the session's
/// runner goes on with what was queued behind it (the session's queue was reserved for it,
/// so that no other runner starts beside it).
pub(super) struct Started {
    pub(super) task: Task,
    pub(super) endpoint: Arc<WorkerEndpoint>,
    pub(super) permit: tokio::sync::OwnedSemaphorePermit,
    pub(super) control: (mpsc::Sender<Control>, mpsc::Receiver<Control>),
    /// The session's `/prepare`, sent beside the write ([`EarlyPrepare`]).
    pub(super) prepare: Option<EarlyPrepare>,
}

/// Runs a task stored claimed ([`Started`]), then the rest of its session's queue.
pub(super) async fn run_started(inner: Arc<Inner>, started: Started) {
    let Started {
        task,
        endpoint,
        permit,
        control,
        prepare,
    } = started;
    let (id, session) = (task.id, task.session_id.clone());
    tracing::info!(task = %id, session = %session, worker = %endpoint.worker_id, "task started with its creation");
    let started = Some((endpoint, prepare));
    match Box::pin(run_registered(&inner, task, control, started)).await {
        Ok(()) => {}
        Err(RunError::Store(e)) if ended_elsewhere(&e) => {
            tracing::info!(task = %id, error = %e, "the task ended before its run's last write");
        }
        Err(RunError::Store(e)) => {
            tracing::error!(task = %id, error = %e, "task run failed in the dispatcher");
        }
        // Only a claim answers these, and this run made none.
        Err(RunError::NotStarted(e, _)) => {
            tracing::error!(task = %id, error = %e, "task run failed in the dispatcher");
        }
        Err(RunError::Busy(..)) => {}
    }
    drop(permit);
    Box::pin(session_runner(inner, session)).await;
}

/// Whether a run's write failed because its task had ended already (a compare-and-set lost
/// to a cancel, another server or lease recovery): expected, never an error of the run.
fn ended_elsewhere(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition)
}

/// Drops task `id` from the queue of `session` (it will not run here).
fn forget(inner: &Inner, session: &SessionId, id: TaskId) {
    if let Some(queue) = lock(&inner.queues).get_mut(session) {
        queue.retain(|t| t.id != id);
    }
}

/// How often a session whose task another server runs looks whether it is over.
const BUSY_POLL: Duration = Duration::from_millis(100);

/// Waits until task `id` is no longer active (or gone, or the server is closing).
async fn wait_until_over(inner: &Inner, id: TaskId) {
    loop {
        if inner.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match inner.store.task_status(id).await {
            Ok(status) if status.is_active() => {}
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(_) => {}
        }
        tokio::time::sleep(BUSY_POLL).await;
    }
}

/// Why a run ended without recording its task's outcome.
enum RunError {
    /// The store refused `pending → running` after retries: the task is still pending.
    NotStarted(Error, Task),
    /// Another task of the session (the id) is active, run by another server: the task is
    /// still pending.
    Busy(Task, TaskId),
    /// Another store error after retries; the task's lease runs out and recovery ends it with
    /// the reason kept in `Inner::last_words`.
    Store(Error),
}

impl From<Error> for RunError {
    fn from(e: Error) -> Self {
        RunError::Store(e)
    }
}

/// Runs `task` as queued (`pending`). One canceled meanwhile, or taken by another server,
/// fails the `pending → running` compare-and-set and is left alone.
async fn run_task(inner: &Arc<Inner>, task: Task) -> std::result::Result<(), RunError> {
    let (tx, rx) = mpsc::channel(8);
    lock(&inner.runs).insert(task.id, super::RunHandle::new(tx.clone()));
    run_registered(inner, task, (tx, rx), None).await
}

/// The run of `task`, whose control channel is registered in `Inner::runs`: from its
/// worker and claim, or, when `started` gives the worker (and the session's `/prepare` if it
/// was sent beside the write), from the claim the task was stored with
/// ([`TaskStore::create_task_claimed`](anywork_core::TaskStore::create_task_claimed)).
async fn run_registered(
    inner: &Arc<Inner>,
    task: Task,
    (tx, rx): (mpsc::Sender<Control>, mpsc::Receiver<Control>),
    started: Option<(Arc<WorkerEndpoint>, Option<EarlyPrepare>)>,
) -> std::result::Result<(), RunError> {
    inner.metrics.started();
    let mut run = Run {
        inner: inner.clone(),
        task: Arc::new(task),
        status: TaskStatus::Pending,
        control: rx,
        control_tx: tx,
        cancel_acks: Vec::new(),
        started: Instant::now(),
        answer: String::new(),
        model: String::new(),
        owned: false,
    };
    let result = match started {
        None => run.execute().await,
        Some((endpoint, prepare)) => {
            run.claimed();
            run.run_claimed(endpoint, prepare).await
        }
    };
    let task_id = run.task.id;
    {
        let mut runs = lock(&inner.runs);
        runs.remove(&task_id);
        runs.shrink_when_sparse();
    }
    inner.metrics.stopped();
    // Anyone who asked to cancel learns it is over.
    for ack in run.cancel_acks.drain(..) {
        let _ = ack.send(());
    }
    // The end of the live stream here, if this run ran the task or ended it. A run that
    // never held its task (another server claimed it while this one got the worker, or it
    // waits behind another server's task) leaves its followers alone: the task goes on
    // elsewhere, and they get its events through the store's change feed.
    if run.owned {
        inner.hub.close(task_id);
    }
    result
}

/// One run of one task.
struct Run {
    inner: Arc<Inner>,
    /// Shared (not copied) with the futures of the run's steps that need it beside the run
    /// (getting the worker, starting the chat); changed in place once they are done.
    task: Arc<Task>,
    /// The status as stored (this run is its only writer while the task is active).
    status: TaskStatus,
    control: mpsc::Receiver<Control>,
    /// The sender of `control`, for re-registering the run under another task of the session.
    control_tx: mpsc::Sender<Control>,
    cancel_acks: Vec<oneshot::Sender<()>>,
    started: Instant,
    /// The assistant's text since the run started (what `on_progress` shows), kept only
    /// when the task's channel is registered.
    answer: String,
    /// The model the agent said it uses (its `init` event), for the metrics.
    model: String,
    /// Whether this run claimed its task or ended it before it ran: the task's live
    /// stream here ends with this run.
    owned: bool,
}

/// Why the run stops before the worker's `done`.
enum Stop {
    Canceled,
    Failed(Failure),
    /// Another server ended the task: its outcome and `done` are stored; nothing to write.
    Ended,
}

/// A failure of the dispatcher's own, outside the executor (no worker, the worker lost, a
/// protocol error, the timeout): what the client is told — in the task's `error` and in an
/// `error` event before `done` — says what failed and what to do, with the task id and
/// never an internal address; the details go to the server log.
struct Failure {
    /// A stable code for the `error` event (`worker_unavailable`, `worker_lost`, …).
    code: &'static str,
    /// The message for the client.
    message: String,
}

impl Failure {
    fn new(code: &'static str, task: &Task, what: impl std::fmt::Display) -> Self {
        Self {
            code,
            message: format!("{what} (task {}; the server log has the details)", task.id),
        }
    }

    /// No worker for the task: the driver's message says what to fix.
    fn no_worker(task: &Task, e: &Error) -> Self {
        tracing::warn!(task = %task.id, session = %task.session_id, error = %e, "no worker for the task");
        Self::new(
            "worker_unavailable",
            task,
            format_args!(
                "No worker could be had for this session: {}. Send the message again once it is fixed",
                e.message().trim_end_matches('.')
            ),
        )
    }

    /// `/prepare` or `/chat` refused or unanswered.
    fn not_started(task: &Task, e: &Error) -> Self {
        tracing::warn!(task = %task.id, session = %task.session_id, error = %e, "the worker did not start the task");
        let code = match e.kind() {
            ErrorKind::Protocol => "worker_protocol",
            ErrorKind::InvalidInput => "worker_refused",
            _ => "worker_unavailable",
        };
        Self::new(
            code,
            task,
            format_args!(
                "The worker could not set up or start this task: {}. Check the task's skills, MCP \
                 servers and repository, or send the message again",
                e.message().trim_end_matches('.')
            ),
        )
    }

    /// The event stream broke or carried something that is not an event.
    fn lost(task: &Task, e: &Error) -> Self {
        tracing::warn!(task = %task.id, session = %task.session_id, error = %e, "lost the worker mid-task");
        if e.kind() == ErrorKind::Timeout {
            // The stream went silent (no keep-alive): the worker is hung or cut off.
            return Self::new(
                "worker_silent",
                task,
                format_args!(
                    "{}; what it did so far is in the log. Send the message again to go on",
                    e.message().trim_end_matches('.')
                ),
            );
        }
        if e.kind() == ErrorKind::Protocol {
            return Self::new(
                "worker_protocol",
                task,
                format_args!(
                    "The worker sent something this server does not understand ({}); use a \
                     worker of the server's version",
                    e.message().trim_end_matches('.')
                ),
            );
        }
        Self::new(
            "worker_lost",
            task,
            "The connection to the worker broke while the task ran; what it did so far is in \
             the log. Send the message again to go on",
        )
    }

    /// The run was stopped from outside (the server shutting down): `message` says why.
    fn interrupted(task: &Task, message: &str) -> Self {
        Self::new("interrupted", task, message)
    }

    /// The store refused the task's events through every retry.
    fn store(task: &Task, e: &Error) -> Self {
        tracing::warn!(task = %task.id, error = %e, "the task's events could not be stored");
        Self::new(
            "store_unavailable",
            task,
            format_args!(
                "The task's events could not be stored ({}); the run was stopped. Send the \
                 message again once the store is back",
                e.message().trim_end_matches('.')
            ),
        )
    }

    /// A re-attach after a restart failed: the worker no longer runs the task.
    fn not_resumed(task: &Task, e: &Error) -> Self {
        tracing::warn!(task = %task.id, error = %e, "cannot re-attach to the task's run");
        Self::new(
            "interrupted",
            task,
            format_args!(
                "interrupted: the server running this task stopped before it finished, and its \
                 worker no longer runs it ({}); send the message again to retry",
                e.message().trim_end_matches('.')
            ),
        )
    }

    /// The stream ended without `done`.
    fn no_result(task: &Task) -> Self {
        tracing::warn!(task = %task.id, session = %task.session_id, "the worker ended the stream without a result");
        Self::new(
            "worker_lost",
            task,
            "The worker ended the task without a result (it may have restarted). Send the \
             message again to go on",
        )
    }
}

impl Run {
    /// The task's channel, when one of its type is registered.
    fn channel(&self) -> Option<Arc<dyn anywork_core::Channel>> {
        self.inner.channels.get(&self.task.channel_type).cloned()
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + self.inner.config.task_timeout)
    }

    fn lease_expiry(&self) -> Timestamp {
        Timestamp::now().plus_millis(self.inner.config.lease_ttl.as_millis() as i64)
    }

    async fn execute(&mut self) -> std::result::Result<(), RunError> {
        let (inner, task) = (self.inner.clone(), self.task.clone());
        let get_worker = async move { worker_with_progress(&inner, &task).await };
        let endpoint = match self.until_stopped(get_worker, Failure::no_worker).await {
            Ok(w) => Arc::new(w),
            Err(stop) => return Ok(self.stop_before_running(stop).await?),
        };
        // pending → running, with the worker and a lease, if it is the session's turn.
        loop {
            let change = TaskChange::to(TaskStatus::Running)
                .worker(endpoint.worker_id.clone())
                .lease(self.inner.config.owner.clone(), self.lease_expiry());
            let running = vec![TaskEvent::Status {
                status: TaskStatus::Running,
            }];
            let (inner, task) = (&self.inner, &self.task);
            let claimed = retry_if(
                &inner.config.store_retry,
                || inner.claim(task, change.clone(), running.clone()),
                Error::is_retryable,
            )
            .await;
            match claimed {
                Ok(Claim::Claimed(t, _)) => {
                    self.task = Arc::new(t);
                    self.claimed();
                    break;
                }
                Ok(Claim::NotFirst(first)) => {
                    // An older task of the session (accepted by another server) starts
                    // first: this run takes it over, and this one waits at the head of the
                    // queue.
                    let session = self.task.session_id.clone();
                    let waiting = std::mem::replace(&mut self.task, Arc::new(first));
                    {
                        let mut runs = lock(&self.inner.runs);
                        runs.remove(&waiting.id);
                        runs.insert(self.task.id, super::RunHandle::new(self.control_tx.clone()));
                    }
                    lock(&self.inner.queues)
                        .entry(session)
                        .or_default()
                        .push_front(Arc::unwrap_or_clone(waiting));
                }
                Ok(Claim::Busy(holder)) => {
                    return Err(RunError::Busy(Task::clone(&self.task), holder.id));
                }
                // Canceled meanwhile, started by another server, or deleted.
                Ok(Claim::NotPending(_)) => return Ok(()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if e.is_retryable() => {
                    return Err(RunError::NotStarted(e, Task::clone(&self.task)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.run_claimed(endpoint, None).await
    }

    /// The run holds its task now (claimed, `running`): its live stream here ends with it,
    /// and its channel's hooks hear that it started.
    fn claimed(&mut self) {
        self.owned = true;
        if let Some(run) = lock(&self.inner.runs).get_mut(&self.task.id) {
            run.claimed = true;
        }
        if let Some(channel) = self.channel() {
            self.inner.hooks.started(&channel, &self.task);
        }
    }

    /// The run of a claimed task on `endpoint`: `/prepare` (unless `prepare` is on its way
    /// already) and `/chat` (or the re-attach to the worker's run), then the event stream to
    /// the end.
    async fn run_claimed(
        &mut self,
        endpoint: Arc<WorkerEndpoint>,
        prepare: Option<EarlyPrepare>,
    ) -> std::result::Result<(), RunError> {
        // Taken back from this server's previous run: re-attach rather than start over.
        let resume = lock(&self.inner.resume).remove(&self.task.id);
        self.status = TaskStatus::Running;
        tracing::info!(
            task = %self.task.id,
            session = %self.task.session_id,
            worker = %endpoint.worker_id,
            waited_ms = self.started.elapsed().as_millis() as u64,
            "task started"
        );

        let (inner, task, worker) = (self.inner.clone(), self.task.clone(), endpoint.clone());
        let start = async move {
            if resume {
                attach_chat(&inner, &task, &worker).await
            } else {
                start_chat(&inner, &task, &worker, prepare).await
            }
        };
        let failure = if resume {
            Failure::not_resumed
        } else {
            Failure::not_started
        };
        let stream = match self.until_stopped(start, failure).await {
            Ok(s) => s,
            Err(Stop::Ended) => {
                // The chat may have reached the worker.
                self.left_to_another_server(&endpoint);
                return Ok(());
            }
            Err(stop) => {
                if matches!(stop, Stop::Canceled) {
                    // The chat may have reached the worker before the cancel reached the
                    // run (its answer not read yet): it must not go on there.
                    self.ask_worker_to_cancel(&endpoint);
                }
                return Ok(self.stop(stop).await?);
            }
        };
        Ok(self.follow(stream, endpoint).await?)
    }

    /// Runs a step before the chat stream exists, while watching for cancel and the timeout.
    async fn until_stopped<T>(
        &mut self,
        work: impl std::future::Future<Output = Result<T>>,
        failure: impl FnOnce(&Task, &Error) -> Failure,
    ) -> std::result::Result<T, Stop> {
        tokio::pin!(work);
        let deadline = self.deadline();
        loop {
            tokio::select! {
                out = &mut work => return out.map_err(|e| Stop::Failed(failure(&self.task, &e))),
                ctl = self.control.recv() => match ctl {
                    Some(Control::Cancel(ack)) => {
                        self.cancel_acks.push(ack);
                        return Err(Stop::Canceled);
                    }
                    Some(Control::Interrupt(reason)) => {
                        return Err(Stop::Failed(Failure::interrupted(&self.task, &reason)));
                    }
                    Some(Control::Input(_, ack)) => {
                        let _ = ack.send(Err(Error::conflict("the task is not waiting for input")));
                    }
                    Some(Control::Ended) => return Err(Stop::Ended),
                    None => return Err(Stop::Canceled),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Stop::Failed(self.timeout_failure()));
                }
            }
        }
    }

    fn timeout_failure(&self) -> Failure {
        tracing::warn!(task = %self.task.id, "the task timed out");
        Failure::new(
            "timeout",
            &self.task,
            format_args!(
                "The task ran longer than the per-task timeout of {} s and was stopped \
                 (TASK_TIMEOUT_SECONDS sets it)",
                self.inner.config.task_timeout.as_secs_f64()
            ),
        )
    }

    /// Ends a task that never got to run: pending → canceled/failed.
    async fn stop_before_running(&mut self, stop: Stop) -> Result<()> {
        let Some((outcome, before)) = stop_outcome(stop) else {
            return Ok(());
        };
        match self
            .inner
            .finish_unrun_with(&self.task, outcome, before)
            .await
        {
            Ok(_) => {
                self.owned = true;
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the chat stream to its end, handling control messages, the lease and the timeout.
    async fn follow(&mut self, stream: ChatStream, worker: Arc<WorkerEndpoint>) -> Result<()> {
        // While one batch is being stored the stream is read on, so that the next events
        // queue up and are stored together (by this task: no task of its own per chat).
        let mut stream = ReadAhead::new(stream, self.inner.config.max_batch.max(1) * 4);
        let lease_every = (self.inner.config.lease_ttl / 3).max(Duration::from_millis(100));
        let mut lease =
            tokio::time::interval_at(tokio::time::Instant::now() + lease_every, lease_every);
        let deadline = self.deadline();
        let mut stopping: Option<(Stop, tokio::time::Instant)> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let stop_at = stopping.as_ref().map_or(far, |(_, at)| *at);
            tokio::select! {
                biased;
                ctl = self.control.recv() => match ctl {
                    Some(Control::Cancel(ack)) => {
                        self.cancel_acks.push(ack);
                        if stopping.is_none() {
                            self.ask_worker_to_cancel(&worker);
                            stopping = Some((Stop::Canceled, tokio::time::Instant::now() + self.inner.config.cancel_grace));
                        }
                    }
                    Some(Control::Interrupt(reason)) if stopping.is_none() => {
                        self.ask_worker_to_cancel(&worker);
                        stopping = Some((Stop::Failed(Failure::interrupted(&self.task, &reason)), tokio::time::Instant::now() + self.inner.config.cancel_grace));
                    }
                    Some(Control::Interrupt(_)) => {}
                    Some(Control::Input(_, ack)) if stopping.is_some() => {
                        let _ = ack.send(Err(Error::conflict("the task is being stopped")));
                    }
                    Some(Control::Input(response, ack)) => {
                        let r = self.answer(&worker, response).await;
                        let _ = ack.send(r);
                    }
                    Some(Control::Ended) => {
                        self.left_to_another_server(&worker);
                        return Ok(());
                    }
                    None => {}
                },
                _ = lease.tick() => {
                    let until = self.lease_expiry();
                    if let Err(e) = self.inner.store.renew_lease(self.task.id, &self.inner.config.owner, until).await {
                        if e.kind() == ErrorKind::Conflict {
                            // Someone else ended or took the task: stop quietly.
                            tracing::warn!(task = %self.task.id, error = %e, "lost the lease; leaving the task");
                            self.ask_worker_to_cancel(&worker);
                            return Ok(());
                        }
                        tracing::warn!(task = %self.task.id, error = %e, "cannot renew the lease");
                    }
                }
                _ = tokio::time::sleep_until(deadline), if stopping.is_none() => {
                    self.ask_worker_to_cancel(&worker);
                    stopping = Some((Stop::Failed(self.timeout_failure()), tokio::time::Instant::now() + self.inner.config.cancel_grace));
                }
                _ = tokio::time::sleep_until(stop_at), if stopping.is_some() => {
                    let (stop, _) = stopping.take().unwrap_or((Stop::Canceled, far));
                    return self.stop(stop).await;
                }
                item = stream.next() => {
                    let first = match item {
                        Some(Ok(event)) => event,
                        Some(Err(e)) => {
                            let stop = self.stop_after_broken_stream(stopping.take(), &worker, &e);
                            return self.stop(stop).await;
                        }
                        None => {
                            let stop = match stopping.take() {
                                Some((stop, _)) => stop,
                                None => Stop::Failed(Failure::no_result(&self.task)),
                            };
                            return self.stop(stop).await;
                        }
                    };
                    // Take whatever else is ready, so that bursts are stored in one batch.
                    let mut batch = vec![first];
                    let mut broken = None;
                    while batch.len() < self.inner.config.max_batch && !batch.last().is_some_and(TaskEvent::is_terminal) {
                        match stream.ready() {
                            Some(Ok(e)) => batch.push(e),
                            Some(Err(e)) => { broken = Some(e); break; }
                            None => break,
                        }
                    }
                    let mut done = match batch.last() {
                        Some(TaskEvent::Done(_)) => match batch.pop() { Some(TaskEvent::Done(o)) => Some(o), _ => None },
                        _ => None,
                    };
                    self.count(&batch);
                    let asks: Vec<_> = batch
                        .iter()
                        .filter_map(|e| match e {
                            TaskEvent::InputRequired(r) => Some(r.clone()),
                            _ => None,
                        })
                        .collect();
                    let before = self.answer.len();
                    // Only a channel's hooks are shown the text so far: without one, none
                    // is kept.
                    if self.inner.channels.contains_key(&self.task.channel_type) {
                        for e in &batch {
                            if let TaskEvent::Text { text } = e {
                                self.answer.push_str(text);
                            }
                        }
                    }
                    // A batch that ends the task as the worker says is stored with its
                    // `done`, in the one write of the outcome (a store call, and its log
                    // rows in one insert, fewer per task).
                    if let Some(outcome) =
                        done.take_if(|o| asks.is_empty() && ends_as_told(stopping.as_ref(), o))
                    {
                        if let Some(channel) = self.channel()
                            && self.answer.len() > before
                        {
                            self.inner.hooks.progress(&channel, &self.task, &self.answer);
                        }
                        return self.finish_with(outcome, batch).await;
                    }
                    let stored = if !asks.is_empty() && self.status == TaskStatus::Running {
                        stream.reading_while(self.set_status(TaskStatus::InputRequired, batch)).await
                    } else {
                        stream.reading_while(self.record(batch)).await
                    };
                    if let Err(e) = stored {
                        if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition) {
                            // Over: another server ended the task before this batch (its
                            // change feed has not told us yet). The batch is not stored.
                            self.left_to_another_server(&worker);
                            return Ok(());
                        }
                        // The store stayed down through every retry: stop the run and say why.
                        self.ask_worker_to_cancel(&worker);
                        return self.stop(Stop::Failed(Failure::store(&self.task, &e))).await;
                    }
                    if let Some(channel) = self.channel() {
                        if self.answer.len() > before {
                            self.inner.hooks.progress(&channel, &self.task, &self.answer);
                        }
                        for request in &asks {
                            self.inner.hooks.input_required(&channel, &self.task, request);
                        }
                    }
                    if let Some(outcome) = done {
                        match stopping.take() {
                            // Timed out: the worker's "canceled" (or "failed", for the
                            // original's interrupted run) is our "failed", for our reason.
                            Some((Stop::Failed(failure), _)) if outcome.status != TaskStatus::Completed => {
                                return self.stop(Stop::Failed(failure)).await;
                            }
                            // Canceled: a worker that reports its interrupted run as failed
                            // (the original's) ran no further than asked.
                            Some((Stop::Canceled, _)) if outcome.status == TaskStatus::Failed => {
                                return self.stop(Stop::Canceled).await;
                            }
                            _ => {}
                        }
                        return self.finish(outcome).await;
                    }
                    if let Some(e) = broken {
                        let stop = self.stop_after_broken_stream(stopping.take(), &worker, &e);
                        return self.stop(stop).await;
                    }
                }
            }
        }
    }

    /// Counts what the events tell about the model: its name, retries, API errors.
    fn count(&mut self, batch: &[TaskEvent]) {
        for event in batch {
            match event {
                TaskEvent::Init(init) if !init.model.is_empty() => {
                    self.model = init.model.clone();
                }
                TaskEvent::Progress(p) if p.stage == Progress::MODEL_RETRY => {
                    self.inner.metrics.model_retry(self.model_label());
                }
                TaskEvent::Error {
                    code: Some(code), ..
                } => {
                    self.inner.metrics.model_error(self.model_label(), code);
                }
                _ => {}
            }
        }
    }

    fn model_label(&self) -> &str {
        if self.model.is_empty() {
            "unknown"
        } else {
            &self.model
        }
    }

    /// How a run whose event stream broke ends: as already asked (`stopping`), else failed as
    /// lost — and the worker is asked to cancel, as the task may still run there (hung, or
    /// cut off from us).
    fn stop_after_broken_stream(
        &self,
        stopping: Option<(Stop, tokio::time::Instant)>,
        worker: &WorkerEndpoint,
        e: &Error,
    ) -> Stop {
        match stopping {
            Some((stop, _)) => stop,
            None => {
                self.ask_worker_to_cancel(worker);
                Stop::Failed(Failure::lost(&self.task, e))
            }
        }
    }

    /// Leaves a task another server ended (a cancel there, lease recovery): the worker is
    /// asked to stop it, and the caller returns without writing anything (its outcome and
    /// `done` are stored already), which drops the chat stream.
    fn left_to_another_server(&self, worker: &WorkerEndpoint) {
        tracing::info!(
            task = %self.task.id,
            session = %self.task.session_id,
            "the task was ended by another server; its run here stops"
        );
        self.ask_worker_to_cancel(worker);
    }

    /// Asks the worker to stop the task, off the run loop: a hung worker must not hold up
    /// the loop (its grace, the idle timeout and the lease go on).
    fn ask_worker_to_cancel(&self, worker: &WorkerEndpoint) {
        let (client, worker) = (self.inner.client.clone(), worker.clone());
        let request = CancelRequest {
            task_id: self.task.id,
            session_id: Some(self.task.session_id.clone()),
        };
        tokio::spawn(async move {
            match client.cancel(&worker, &request).await {
                Ok(()) => {}
                // Never started there (stopped before its chat), or over already.
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::debug!(task = %request.task_id, error = %e, "the worker does not run the task");
                }
                Err(e) => {
                    tracing::warn!(task = %request.task_id, error = %e, "the worker did not take the cancel");
                }
            }
        });
    }

    async fn answer(&mut self, worker: &WorkerEndpoint, response: InputResponse) -> Result<()> {
        if self.status != TaskStatus::InputRequired {
            return Err(Error::conflict(format!(
                "task {} is {} and not waiting for input",
                self.task.id, self.status
            )));
        }
        let answer = InputAnswer {
            task_id: self.task.id,
            request_id: response.request_id,
            answer: (!response.answer.is_empty()).then_some(response.answer),
            allow: response.allow,
        };
        self.inner.client.input(worker, &answer).await?;
        self.set_status(
            TaskStatus::Running,
            vec![TaskEvent::Status {
                status: TaskStatus::Running,
            }],
        )
        .await
    }

    /// Moves the task to `status`, renewing the lease, with `events` in the same write.
    async fn set_status(&mut self, status: TaskStatus, events: Vec<TaskEvent>) -> Result<()> {
        let change =
            TaskChange::to(status).lease(self.inner.config.owner.clone(), self.lease_expiry());
        let (inner, task, from) = (&self.inner, &self.task, self.status);
        retry_if(
            &inner.config.store_retry,
            || inner.transition_and_enqueue(task, from, change.clone(), events.clone()),
            Error::is_retryable,
        )
        .await?;
        inner
            .stored_change(Arc::make_mut(&mut self.task), from, &change)
            .await?;
        self.status = status;
        Ok(())
    }

    /// Appends events to the log and publishes them with their seqs, retrying store errors
    /// that may pass.
    async fn record(&self, events: Vec<TaskEvent>) -> Result<()> {
        let (inner, task) = (&self.inner, &self.task);
        retry_if(
            &inner.config.store_retry,
            || inner.record(task, events.clone()),
            Error::is_retryable,
        )
        .await
    }

    /// Ends the run for `stop`: canceled, or failed with an `error` event before `done`;
    /// nothing for a task another server ended.
    async fn stop(&mut self, stop: Stop) -> Result<()> {
        match stop_outcome(stop) {
            Some((outcome, before)) => self.finish_with(outcome, before).await,
            None => Ok(()),
        }
    }

    /// Records the outcome (the final status and the `done` event in one write), then
    /// delivers it.
    async fn finish(&mut self, outcome: TaskOutcome) -> Result<()> {
        self.finish_with(outcome, Vec::new()).await
    }

    /// [`finish`](Self::finish) with `before` written just ahead of the `done`.
    async fn finish_with(
        &mut self,
        mut outcome: TaskOutcome,
        mut before: Vec<TaskEvent>,
    ) -> Result<()> {
        if outcome.duration_ms == 0 {
            outcome.duration_ms = self.started.elapsed().as_millis() as u64;
        }
        if outcome.status == TaskStatus::Completed && self.status == TaskStatus::InputRequired {
            // The worker finished without the answer it asked for; pass through running.
            match self.set_status(TaskStatus::Running, Vec::new()).await {
                Ok(()) => {}
                Err(e) if ended_elsewhere(&e) => {
                    // Ended while it waited for input (a cancel on another server, lease
                    // recovery): its outcome and `done` are stored; expected, not an error.
                    tracing::info!(task = %self.task.id, error = %e, "the task was ended while it waited for input");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if !outcome.status.is_terminal() {
            outcome = TaskOutcome::failed(format!(
                "the worker ended the task as {}, which is not a final status",
                outcome.status
            ));
        }
        before.push(TaskEvent::Done(outcome.clone()));
        let change = TaskChange::finish(outcome.clone());
        let (inner, task, from) = (&self.inner, &self.task, self.status);
        let finished = retry_if(
            &inner.config.store_retry,
            || inner.transition_and_enqueue(task, from, change.clone(), before.clone()),
            Error::is_retryable,
        )
        .await;
        let finished = match finished {
            Ok(()) => {
                inner
                    .stored_change(Arc::make_mut(&mut self.task), from, &change)
                    .await
            }
            Err(e) => Err(e),
        };
        match finished {
            Ok(()) => {}
            Err(e) if ended_elsewhere(&e) => {
                tracing::warn!(task = %self.task.id, error = %e, "the task was ended elsewhere");
                return Ok(());
            }
            Err(e) => {
                // The lease runs out and recovery records the outcome; it gives this reason.
                let reason = match &outcome.error {
                    Some(error) => format!(
                        "{error} (and the outcome could not be stored: {})",
                        e.message()
                    ),
                    None => format!(
                        "the task ended as {} but the store refused its outcome: {}",
                        outcome.status,
                        e.message()
                    ),
                };
                lock(&self.inner.last_words).insert(self.task.id, reason);
                return Err(e);
            }
        }
        self.inner
            .metrics
            .model_usage(self.model_label(), &outcome.usage, outcome.cost_usd);
        tracing::info!(
            task = %self.task.id,
            session = %self.task.session_id,
            status = %self.task.status,
            duration_ms = outcome.duration_ms,
            cost_usd = outcome.cost_usd.unwrap_or(0.0),
            error = outcome.error.as_deref().unwrap_or(""),
            "task finished"
        );
        self.inner.after_finish(&self.task);
        Ok(())
    }
}

/// Whether the worker's `outcome` is the task's, given the stop asked for meanwhile: a timed
/// out run whose worker says "canceled" (or "failed", as the original's interrupted run does)
/// failed for our reason, and a canceled run whose worker says "failed" (the original's) ran
/// no further than asked — those end as [`stop`](Run::stop) says instead.
fn ends_as_told(stopping: Option<&(Stop, tokio::time::Instant)>, outcome: &TaskOutcome) -> bool {
    match stopping {
        Some((Stop::Failed(_), _)) => outcome.status == TaskStatus::Completed,
        Some((Stop::Canceled, _)) => outcome.status != TaskStatus::Failed,
        _ => true,
    }
}

/// The outcome of `stop`, and the events that go just before its `done`: an `error` for a
/// failure, so that a client that shows errors (the original's web client) shows it. `None`
/// when another server ended the task (its outcome is stored).
fn stop_outcome(stop: Stop) -> Option<(TaskOutcome, Vec<TaskEvent>)> {
    match stop {
        Stop::Canceled => Some((TaskOutcome::canceled(), Vec::new())),
        Stop::Failed(Failure { code, message }) => Some((
            TaskOutcome::failed(message.clone()),
            vec![TaskEvent::Error {
                message,
                code: Some(code.to_owned()),
            }],
        )),
        Stop::Ended => None,
    }
}

/// A chat stream read by the run's own task, with a queue of the events read ahead of it
/// while the run stores a batch ([`reading_while`](Self::reading_while)): the next batch is
/// what came meanwhile, as when a task of its own read the stream into a channel (a task
/// spawned per chat, and a wake-up of it and a channel hop per read; not any more).
struct ReadAhead {
    stream: futures_util::stream::Fuse<ChatStream>,
    ahead: VecDeque<Result<TaskEvent>>,
    /// Most events read ahead; past it the stream waits (the channel's capacity before).
    capacity: usize,
}

impl ReadAhead {
    fn new(stream: ChatStream, capacity: usize) -> Self {
        Self {
            stream: stream.fuse(),
            ahead: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The next event: the first read ahead, else the stream's next. `None` at its end.
    async fn next(&mut self) -> Option<Result<TaskEvent>> {
        match self.ahead.pop_front() {
            Some(item) => Some(item),
            None => self.stream.next().await,
        }
    }

    /// The next event if one is ready now: read ahead, or the stream's without waiting.
    /// `None` also at the stream's end (the next [`next`](Self::next) says so). A stream
    /// polled here with a waker that does nothing is polled again by the caller's next
    /// [`next`](Self::next) before it waits, which wakes the caller.
    fn ready(&mut self) -> Option<Result<TaskEvent>> {
        if let Some(item) = self.ahead.pop_front() {
            return Some(item);
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_next_unpin(&mut cx) {
            std::task::Poll::Ready(item) => item,
            std::task::Poll::Pending => None,
        }
    }

    /// `work`'s output, the stream read into the queue (up to its capacity) meanwhile.
    async fn reading_while<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
                return std::task::Poll::Ready(out);
            }
            while self.ahead.len() < self.capacity && !self.stream.is_done() {
                match self.stream.poll_next_unpin(cx) {
                    std::task::Poll::Ready(Some(item)) => self.ahead.push_back(item),
                    std::task::Poll::Ready(None) | std::task::Poll::Pending => break,
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Re-attaches to a task the worker may still be running (`/chat/attach`), from the first of
/// its events the log does not have: the log holds the worker's events in order, each once,
/// plus the server's own `status` events, so the worker's seq to resume after is the count of
/// the others.
async fn attach_chat(inner: &Inner, task: &Task, worker: &WorkerEndpoint) -> Result<ChatStream> {
    const PAGE: u32 = 500;
    let (mut seq, mut after) = (0, 0u64);
    loop {
        let logs = inner.store.read_logs(task.id, seq, PAGE).await?;
        after += logs
            .iter()
            .filter(|l| !matches!(l.event, TaskEvent::Status { .. }))
            .count() as u64;
        seq = logs.last().map_or(seq, |l| l.seq);
        if logs.len() < PAGE as usize {
            break;
        }
    }
    tracing::info!(task = %task.id, after, "re-attaching to the worker's run");
    retry(&inner.config.retry, || {
        inner.client.attach(worker, task.id, after)
    })
    .await
}

/// The session's worker from the driver, retried as `config.retry` says; what the task waits
/// for is told as `progress` events: that a worker is being made ready (once the driver has
/// taken `config.progress_after`), and each failed attempt with its reason, the attempt to
/// come and when.
async fn worker_with_progress(inner: &Inner, task: &Task) -> Result<WorkerEndpoint> {
    let policy = inner.config.retry;
    let max = policy.attempts.max(1);
    let driver = inner.driver.name().to_owned();
    let started = Instant::now();
    let tell = |progress: Progress| async move {
        if let Err(e) = inner
            .record(task, vec![TaskEvent::Progress(progress)])
            .await
        {
            tracing::warn!(task = %task.id, error = %e, "cannot record a progress event");
        }
    };
    let mut attempt = 1;
    loop {
        let call = inner.driver.get_worker(&task.session_id);
        tokio::pin!(call);
        let announce = || {
            tell(
                Progress::new(
                    Progress::WORKER,
                    format!("Getting a worker ready ({driver})…"),
                )
                .attempt(1, max),
            )
        };
        let result = if attempt > 1 {
            call.await
        } else if inner.config.progress_after.is_zero() {
            announce().await;
            call.await
        } else {
            match tokio::time::timeout(inner.config.progress_after, &mut call).await {
                Ok(r) => r,
                Err(_) => {
                    announce().await;
                    call.await
                }
            }
        };
        match result {
            Ok(endpoint) => {
                inner.metrics.worker_ready(&driver, started.elapsed());
                tracing::info!(
                    task = %task.id,
                    session = %task.session_id,
                    driver = %driver,
                    worker = %endpoint.worker_id,
                    attempts = attempt,
                    ms = started.elapsed().as_millis() as u64,
                    "worker ready"
                );
                return Ok(endpoint);
            }
            Err(e) if attempt < max && (e.is_retryable() || e.kind() == ErrorKind::Conflict) => {
                inner.metrics.worker_failed(&driver);
                let wait = policy.delay(attempt);
                let next = attempt + 1;
                tracing::warn!(
                    task = %task.id,
                    session = %task.session_id,
                    driver = %driver,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    error = %e,
                    "no worker yet; retrying"
                );
                tell(
                    Progress::new(
                        Progress::WORKER,
                        format!(
                            "The worker is not ready ({driver}): {}. Trying again in {:.1} s \
                             (attempt {next} of {max}).",
                            e.message().trim_end_matches('.'),
                            wait.as_secs_f64()
                        ),
                    )
                    .attempt(next, max)
                    .retry(
                        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        e.message(),
                    ),
                )
                .await;
                tokio::time::sleep(wait).await;
                attempt = next;
            }
            Err(e) => {
                // Logged with the task's failure (`Failure::no_worker`).
                inner.metrics.worker_failed(&driver);
                return Err(e);
            }
        }
    }
}

/// The skill with its `SKILL.md` among its files (`content` empty): the form both the
/// original AnyWork's worker (which requires `files`) and this one take.
fn files_form(mut skill: SkillSpec) -> SkillSpec {
    if !skill.content.is_empty() {
        let content = std::mem::take(&mut skill.content);
        skill.files.insert("SKILL.md".to_owned(), content);
    }
    skill
}

/// A task's `/prepare` (with the channel's defaults merged in, catalog secrets and skills
/// given by name read now) and its `/chat`, encoded.
struct ChatRequests {
    prepare: PreparedBody,
    chat: ChatRequest,
}

/// `task`'s [`ChatRequests`].
async fn chat_requests(inner: &Inner, task: &Task) -> Result<ChatRequests> {
    let mut skills = task.skills.clone();
    let mut mcp_servers = task.mcp_servers.clone();
    let mut repository = None;
    if let Some(channel) = inner.channels.get(&task.channel_type) {
        repository = channel.workspace_repository(task).await?;
        if let Some(r) = &repository {
            r.validate()?;
        }
        let defaults = channel.defaults();
        for skill in defaults.skills {
            if !skills.iter().any(|s| s.name == skill.name) {
                skills.push(skill);
            }
        }
        for (name, server) in defaults.mcp_servers {
            mcp_servers.entry(name).or_insert(server);
        }
    }
    // Catalog entries get their secrets now (never stored); the request's own HTTP servers
    // are checked again, as names may resolve differently by now.
    let config = &inner.config;
    for (name, server) in &mcp_servers {
        if let McpServerConfig::Http { url, .. } | McpServerConfig::Sse { url, .. } = server
            && !config.mcp.catalog.contains(name)
        {
            crate::outbound::check_remote_url(
                &config.outbound,
                &format!("MCP server {name:?}"),
                url,
            )
            .await?;
        }
    }
    let mcp_servers = config
        .mcp
        .resolve(&mcp_servers, &crate::outbound::read_secret)?;
    // Default skills given by name are read now, so that a skill edited on disk is current.
    let names: Vec<String> = skills
        .iter()
        .filter(|s| s.is_name_only())
        .map(|s| s.name.clone())
        .collect();
    if !names.is_empty() {
        let resolved = inner.resolve_skill_names(names).await?;
        for skill in &mut skills {
            if let Some(r) = resolved.iter().find(|r| r.name == skill.name) {
                *skill = r.clone();
            }
        }
    }
    let mut message = task.message.clone();
    if let Some(r) = &repository {
        message.push_str(&format!(
            "\n\n(The repository is checked out in the folder `{}` of your working directory{}.)",
            r.dir,
            r.git_ref
                .as_deref()
                .map(|g| format!(", at `{g}`"))
                .unwrap_or_default()
        ));
    }
    let (default_soul, default_agents) = inner.saved_defaults().await;
    let prepare = PrepareRequest {
        session_id: task.session_id.clone(),
        skills: Some(skills.into_iter().map(files_form).collect()),
        mcp_servers: Some(mcp_servers),
        soul: None,
        repository,
        default_soul,
        default_agents,
    };
    let prepare = PreparedBody::new(&prepare)?;
    let chat = ChatRequest {
        task_id: task.id,
        session_id: task.session_id.clone(),
        message,
    };
    Ok(ChatRequests { prepare, chat })
}

/// A new task's `/prepare`, sent while the write that stores it claimed is under way, so
/// that the worker is prepared by the time the task is stored and its run sends `/chat`
/// (issue #16: the prepare's round trip was on every dispatch's path). Only where nothing
/// of the session can be active or queued but through this server (a store that serves one
/// server, [`TaskStore::shared`](anywork_core::TaskStore::shared), and the session's start
/// reserved here): the worker is then never prepared under another task's feet, whatever
/// the write decides. The prepare carries no task; when the write leaves the task
/// `pending`, its run prepares again when it starts. Dropped, it is aborted.
pub(super) struct EarlyPrepare(tokio::task::JoinHandle<Result<(ChatRequests, bool)>>);

impl EarlyPrepare {
    /// Builds `task`'s requests and sends its `/prepare` to `worker`, on a task of its own.
    pub(super) fn spawn(inner: Arc<Inner>, task: Task, worker: Arc<WorkerEndpoint>) -> Self {
        Self(tokio::spawn(async move {
            prepared(&inner, &task, &worker).await
        }))
    }

    /// The requests, and whether the prepare was left out (acknowledged unchanged); the
    /// prepare's failure, after its retries.
    async fn finish(mut self) -> Result<(ChatRequests, bool)> {
        match (&mut self.0).await {
            Ok(done) => done,
            Err(e) => Err(Error::internal(format!(
                "the /prepare sent beside the task's write did not finish: {e}"
            ))),
        }
    }
}

impl Drop for EarlyPrepare {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `task`'s requests, with its `/prepare` sent to `worker` (retried on errors that may pass)
/// unless what it carries is what this worker acknowledged last: then `true` (left out).
async fn prepared(
    inner: &Inner,
    task: &Task,
    worker: &WorkerEndpoint,
) -> Result<(ChatRequests, bool)> {
    let requests = chat_requests(inner, task).await?;
    let skipped = inner.client.is_prepared(worker, &requests.prepare);
    if !skipped {
        send_prepare(inner, worker, &requests.prepare).await?;
    }
    Ok((requests, skipped))
}

/// `prepare` sent to `worker`, retried on errors that may pass.
async fn send_prepare(
    inner: &Inner,
    worker: &WorkerEndpoint,
    prepare: &PreparedBody,
) -> Result<()> {
    retry(&inner.config.retry, || {
        inner.client.prepare_body(worker, prepare)
    })
    .await?;
    inner.metrics.prepare("sent");
    Ok(())
}

/// `/prepare` (unless `early` sent it already), then `/chat`; both retried on errors that
/// may pass.
async fn start_chat(
    inner: &Inner,
    task: &Task,
    worker: &WorkerEndpoint,
    early: Option<EarlyPrepare>,
) -> Result<ChatStream> {
    let client = &inner.client;
    // `/prepare` only when what it carries changed since this worker acknowledged it; the
    // worker refuses the chat if its state is not that one (restarted, replaced), and then
    // gets `/prepare` and the chat once more.
    let (ChatRequests { prepare, chat }, mut skipped) = match early {
        Some(early) => early.finish().await?,
        None => prepared(inner, task, worker).await?,
    };
    loop {
        let key = client
            .is_prepared(worker, &prepare)
            .then(|| prepare.key())
            .flatten();
        let started = retry(&inner.config.retry, || {
            client.chat_prepared(worker, &chat, key)
        })
        .await?;
        match started {
            ChatStart::Started(stream) => {
                if skipped {
                    inner.metrics.prepare("skipped");
                }
                return Ok(stream);
            }
            ChatStart::NotPrepared if skipped => {
                skipped = false;
                send_prepare(inner, worker, &prepare).await?;
            }
            ChatStart::NotPrepared => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "the worker refused the chat as unprepared right after its /prepare",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::sync::Mutex;

    use anywork_core::{ContainerDriver, NewTaskLog, TaskRequest, TaskStore, WorkerInfo};
    use anywork_store::MemoryStore;
    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::hub::LiveEvent;
    use crate::{Dispatcher, DispatcherConfig};

    /// A driver whose `get_worker` says it was asked, then waits for a permit and answers with
    /// an address where nothing listens.
    struct GatedDriver {
        asked: Notify,
        gate: Semaphore,
    }

    impl Default for GatedDriver {
        fn default() -> Self {
            Self {
                asked: Notify::new(),
                gate: Semaphore::new(0),
            }
        }
    }

    #[async_trait::async_trait]
    impl ContainerDriver for GatedDriver {
        fn name(&self) -> &str {
            "gated"
        }
        async fn get_worker(&self, _: &SessionId) -> Result<WorkerEndpoint> {
            self.asked.notify_one();
            self.gate
                .acquire()
                .await
                .map_err(|_| Error::unavailable("closed"))?
                .forget();
            Ok(WorkerEndpoint::new("w", "http://127.0.0.1:9"))
        }
        async fn release(&self, _: &SessionId) -> Result<()> {
            Ok(())
        }
        async fn is_healthy(&self, _: &WorkerEndpoint) -> bool {
            false
        }
        async fn list(&self) -> Result<Vec<WorkerInfo>> {
            Ok(Vec::new())
        }
    }

    /// Another server claims a task while the run here still waits for the worker: the run
    /// here loses the claim and ends, and the task's followers here go on following it (they
    /// get its events through the change feed). The run did not hold the task meanwhile, so
    /// it did not stand for it either: the feed forwards the task's events.
    #[tokio::test]
    async fn a_run_that_loses_the_claim_leaves_the_followers_here_following() {
        let store = Arc::new(MemoryStore::new());
        let driver = Arc::new(GatedDriver::default());
        let config = DispatcherConfig {
            retry: crate::Backoff::none(),
            reap_every: None,
            ..Default::default()
        };
        let d = Dispatcher::builder(store.clone(), driver.clone())
            .config(config)
            .start()
            .await
            .unwrap();
        let task = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        driver.asked.notified().await;
        assert_eq!(d.running(), 1, "the run here waits for the worker");
        assert!(!d.runs_here(task.id), "a run that has not claimed its task");
        let mut live = d.hub().subscribe(task.id, &task.session_id);

        // The other server claims it and runs it.
        let change = TaskChange::to(TaskStatus::Running)
            .lease("other-server", Timestamp::now().plus_millis(60_000));
        let running = NewTaskLog::now(TaskEvent::Status {
            status: TaskStatus::Running,
        });
        let claim = store
            .claim_task(task.id, change, vec![running], Vec::new())
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Claimed(..)), "{claim:?}");
        driver.gate.add_permits(1);
        while d.running() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            d.hub().is_followed(task.id),
            "the task's live channel here stays open"
        );
        // What the change feed publishes reaches the follower.
        d.hub().publish([LiveEvent::new(
            task.id,
            task.session_id.clone(),
            2,
            TaskEvent::text("from the other server"),
        )]);
        let got = live.recv().await.unwrap();
        assert_eq!(got.event, TaskEvent::text("from the other server"));
        assert_eq!(
            store.get_task(task.id).await.unwrap().status,
            TaskStatus::Running,
            "the task is the other server's"
        );
    }

    /// A worker on loopback that speaks just enough HTTP for a run: `/prepare` answers `{}`,
    /// or never (`prepare_hangs`); `/chat` streams `first`, then waits for `go` and streams
    /// `then` and ends; `/cancel` answers `{}`. It records the paths it was asked for.
    struct FakeWorker {
        url: String,
        paths: Arc<Mutex<Vec<String>>>,
        /// Told when a request came in.
        asked: Arc<Notify>,
        go: Arc<Notify>,
    }

    impl FakeWorker {
        async fn start(prepare_hangs: bool, first: Vec<TaskEvent>, then: Vec<TaskEvent>) -> Self {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (paths, asked, go) = (
                Arc::default(),
                Arc::new(Notify::new()),
                Arc::new(Notify::new()),
            );
            let worker = Self {
                url,
                paths: Arc::clone(&paths),
                asked: Arc::clone(&asked),
                go: Arc::clone(&go),
            };
            let sse = |events: &[TaskEvent]| {
                events
                    .iter()
                    .map(|e| format!("data: {}\n\n", serde_json::to_string(e).unwrap()))
                    .collect::<String>()
            };
            let (first, then) = (sse(&first), sse(&then));
            tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let (paths, asked, go) = (paths.clone(), asked.clone(), go.clone());
                    let (first, then) = (first.clone(), then.clone());
                    tokio::spawn(async move {
                        // The request head, then its body (by its length), read and dropped.
                        let mut request = Vec::new();
                        let mut buf = [0u8; 4096];
                        let head_end = loop {
                            let Ok(n) = conn.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            request.extend_from_slice(&buf[..n]);
                            if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                        };
                        let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while request.len() < head_end + length {
                            let Ok(n) = conn.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            request.extend_from_slice(&buf[..n]);
                        }
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                        lock(&paths).push(path.clone());
                        asked.notify_waiters();
                        let json = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                    content-length: 2\r\nconnection: close\r\n\r\n{}";
                        match path.as_str() {
                            "/prepare" if prepare_hangs => std::future::pending::<()>().await,
                            "/chat" => {
                                let start = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                             connection: close\r\n\r\n";
                                let _ = conn.write_all(format!("{start}{first}").as_bytes()).await;
                                go.notified().await;
                                let _ = conn.write_all(then.as_bytes()).await;
                            }
                            _ => {
                                let _ = conn.write_all(json.as_bytes()).await;
                            }
                        }
                        let _ = conn.shutdown().await;
                    });
                }
            });
            worker
        }

        fn paths(&self) -> Vec<String> {
            lock(&self.paths).clone()
        }

        /// Waits until `path` was asked for.
        async fn until_asked(&self, path: &str) {
            loop {
                let asked = self.asked.notified();
                if self.paths().iter().any(|p| p == path) {
                    return;
                }
                asked.await;
            }
        }
    }

    fn quick_dispatcher(store: Arc<MemoryStore>, worker: &FakeWorker) -> crate::DispatcherBuilder {
        let driver = Arc::new(anywork_drivers::StaticDriver::new(&worker.url).unwrap());
        let config = DispatcherConfig {
            retry: crate::Backoff::none(),
            reap_every: None,
            ..Default::default()
        };
        Dispatcher::builder(store, driver).config(config)
    }

    /// `f`, or a panic after 30 s: a guard against a hang, not a timing.
    async fn guard<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("hung for 30 s")
    }

    /// A cancel while the run waits for the worker's `/prepare` (its chat not sent yet) stops
    /// the run at once: the cancel answers with the task canceled (not after the prepare's
    /// 30 s timeout), the log ends with its `done`, no chat is ever sent, and the worker is
    /// asked to cancel (a chat in flight would have reached it).
    #[tokio::test]
    async fn a_cancel_during_prepare_cancels_at_once() {
        let worker = FakeWorker::start(true, Vec::new(), Vec::new()).await;
        let store = Arc::new(MemoryStore::new());
        let d = quick_dispatcher(store.clone(), &worker)
            .start()
            .await
            .unwrap();
        let task = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        guard(worker.until_asked("/prepare")).await;
        assert_eq!(
            store.get_task(task.id).await.unwrap().status,
            TaskStatus::Running
        );

        let canceled = guard(d.cancel(task.id)).await.unwrap();
        assert_eq!(canceled.status, TaskStatus::Canceled, "{canceled:?}");
        assert_eq!(d.running(), 0, "the run is over");
        let logs = store.read_logs(task.id, 0, 100).await.unwrap();
        assert!(
            matches!(&logs.last().unwrap().event, TaskEvent::Done(o) if o.status == TaskStatus::Canceled),
            "{logs:?}"
        );
        assert_eq!(
            logs.iter()
                .filter(|l| matches!(l.event, TaskEvent::Done(_)))
                .count(),
            1
        );
        guard(worker.until_asked("/cancel")).await;
        assert!(
            !worker.paths().iter().any(|p| p == "/chat"),
            "{:?}",
            worker.paths()
        );
    }

    /// Counts the events logged at error level.
    #[derive(Clone, Default)]
    struct Errors(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Errors {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::ERROR {
                lock(&self.0).push(format!("{event:?}"));
            }
        }
    }

    /// A task that ends while it waits for input (another server cancels it) and whose worker
    /// then finishes anyway: the run's last write loses to that end, which is expected, so
    /// nothing is logged at error level, and the task stays canceled with one `done`.
    #[tokio::test]
    async fn a_task_ended_while_waiting_for_input_logs_no_error() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let errors = Errors::default();
        let _logging =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
        let ask = TaskEvent::InputRequired(anywork_core::InputRequest {
            request_id: "q1".into(),
            kind: anywork_core::InputKind::Question,
            prompt: "Which one?".into(),
            tool_name: None,
            input: None,
            options: Vec::new(),
        });
        let done = TaskEvent::Done(TaskOutcome::completed("did it anyway"));
        let worker = FakeWorker::start(false, vec![ask], vec![done]).await;
        let store = Arc::new(MemoryStore::new());
        let d = quick_dispatcher(store.clone(), &worker)
            .start()
            .await
            .unwrap();
        let task = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        guard(async {
            while store.task_status(task.id).await.unwrap() != TaskStatus::InputRequired {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // Another server cancels it (this store has no change feed to tell the run).
        store
            .update_task_and_append(
                task.id,
                TaskStatus::InputRequired,
                TaskChange::finish(TaskOutcome::canceled()),
                vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::canceled()))],
            )
            .await
            .unwrap();
        worker.go.notify_one();
        guard(async {
            while d.running() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(
            store.task_status(task.id).await.unwrap(),
            TaskStatus::Canceled
        );
        let logs = store.read_logs(task.id, 0, 100).await.unwrap();
        assert_eq!(
            logs.iter()
                .filter(|l| matches!(l.event, TaskEvent::Done(_)))
                .count(),
            1
        );
        assert!(lock(&errors.0).is_empty(), "{:?}", lock(&errors.0));
    }

    /// The paths a fake worker was asked for, in order.
    type Paths = Arc<Mutex<Vec<String>>>;

    /// A store that writes through to memory and records, per write, the types of the
    /// events it appended (how many writes the events of a task took) and the method.
    #[derive(Default)]
    struct Writes {
        inner: MemoryStore,
        appends: std::sync::Mutex<Vec<Vec<String>>>,
        methods: std::sync::Mutex<Vec<&'static str>>,
        /// Calls of `task_status_for_start` (a runner's read before it asks for a worker).
        status_reads: std::sync::atomic::AtomicUsize,
        /// Says that it serves one server ([`TaskStore::shared`] `false`).
        one_server: bool,
        /// The paths a worker was asked for, and its notice of each request: when set,
        /// `create_task_claimed` first waits (on a one-server store; up to 10 s) or looks
        /// (otherwise: for 200 ms) for a `/prepare`, and records in `prepared_first` whether
        /// it came before the write.
        prepare_gate: Option<(Paths, Arc<Notify>)>,
        prepared_first: Mutex<Vec<bool>>,
    }

    impl Writes {
        fn record(&self, method: &'static str, logs: &[NewTaskLog]) {
            let kinds = logs
                .iter()
                .map(|l| anywork_core::WireEvent::from(l.event.clone()).kind)
                .collect();
            self.appends.lock().unwrap().push(kinds);
            self.methods.lock().unwrap().push(method);
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for Writes {
        fn shared(&self) -> bool {
            !self.one_server
        }
        async fn create_session(
            &self,
            new: anywork_core::NewSession,
        ) -> Result<anywork_core::Session> {
            self.inner.create_session(new).await
        }
        async fn get_session(&self, id: &SessionId) -> Result<anywork_core::Session> {
            self.inner.get_session(id).await
        }
        async fn find_session(
            &self,
            channel_type: &str,
            key: &str,
        ) -> Result<Option<anywork_core::Session>> {
            self.inner.find_session(channel_type, key).await
        }
        async fn list_sessions(
            &self,
            page: anywork_core::Page,
        ) -> Result<Vec<anywork_core::SessionSummary>> {
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
        async fn create_task(&self, new: anywork_core::NewTask) -> Result<Task> {
            self.inner.create_task(new).await
        }
        async fn create_session_with_task(
            &self,
            session: anywork_core::NewSession,
            task: anywork_core::NewTask,
        ) -> Result<(anywork_core::Session, Task)> {
            self.inner.create_session_with_task(session, task).await
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
            self.record("update_task_and_append", &logs);
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
            self.record("update_task_lean", &logs);
            self.inner
                .update_task_lean(id, expected, change, logs, deliveries)
                .await
        }
        async fn create_task_claimed(
            &self,
            new: anywork_core::NewTask,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
        ) -> Result<(Task, Option<u64>)> {
            if let Some((paths, asked)) = &self.prepare_gate {
                let prepared = || lock(paths).iter().any(|p| p == "/prepare");
                let wait = if self.one_server {
                    Duration::from_secs(10)
                } else {
                    Duration::from_millis(200)
                };
                let _ = tokio::time::timeout(wait, async {
                    loop {
                        let next = asked.notified();
                        if prepared() {
                            return;
                        }
                        next.await;
                    }
                })
                .await;
                lock(&self.prepared_first).push(prepared());
            }
            self.record("create_task_claimed", &logs);
            self.inner
                .create_task_claimed(new, change, logs, deliveries)
                .await
        }
        async fn create_session_with_task_claimed(
            &self,
            session: anywork_core::NewSession,
            new: anywork_core::NewTask,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
        ) -> Result<(anywork_core::Session, Task, Option<u64>)> {
            self.record("create_session_with_task_claimed", &logs);
            self.inner
                .create_session_with_task_claimed(session, new, change, logs, deliveries)
                .await
        }
        async fn task_status_for_start(
            &self,
            id: TaskId,
        ) -> Result<(TaskStatus, Option<Timestamp>)> {
            self.status_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.task_status_for_start(id).await
        }
        async fn claim_task_lean(
            &self,
            id: TaskId,
            change: TaskChange,
            logs: Vec<NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
        ) -> Result<anywork_core::Claim<()>> {
            self.record("claim_task_lean", &logs);
            self.inner
                .claim_task_lean(id, change, logs, deliveries)
                .await
        }
        async fn tasks_by_session(
            &self,
            id: &SessionId,
            page: anywork_core::Page,
        ) -> Result<Vec<Task>> {
            self.inner.tasks_by_session(id, page).await
        }
        async fn tasks_by_status(
            &self,
            status: TaskStatus,
            page: anywork_core::Page,
        ) -> Result<Vec<Task>> {
            self.inner.tasks_by_status(status, page).await
        }
        async fn renew_lease(&self, id: TaskId, owner: &str, until: Timestamp) -> Result<()> {
            self.inner.renew_lease(id, owner, until).await
        }
        async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
            self.inner.expired_leases(now, limit).await
        }
        async fn append_logs(&self, id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
            self.record("append_logs", &logs);
            self.inner.append_logs(id, logs).await
        }
        async fn read_logs(
            &self,
            id: TaskId,
            after: u64,
            limit: u32,
        ) -> Result<Vec<anywork_core::TaskLog>> {
            self.inner.read_logs(id, after, limit).await
        }
    }

    /// A worker of the original's protocol that sends each `/chat` its whole stream in one
    /// write (a `text`, then a completed `done`), as a fast worker's stream arrives.
    async fn one_write_worker() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let (head, body_len) = loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (head, end + 4 + len);
                        }
                    };
                    while request.len() < body_len {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    let (kind, body) = if head.starts_with("post /chat") {
                        (
                            "text/event-stream",
                            "event: text\ndata: {\"content\":\"hello\",\"metadata\":{}}\n\n\
                             event: done\ndata: {\"content\":\"\",\"metadata\":{\"result\":\"hello\",\
                             \"cost_usd\":0.0,\"num_turns\":1,\"duration_ms\":1}}\n\n",
                        )
                    } else {
                        ("application/json", "{\"status\":\"ready\"}")
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    /// A dispatcher on `store` with the one-write worker behind the static driver.
    async fn one_write_dispatcher(store: &Arc<Writes>) -> Dispatcher {
        let driver =
            Arc::new(anywork_drivers::StaticDriver::new(&one_write_worker().await).unwrap());
        Dispatcher::builder(store.clone(), driver)
            .config(DispatcherConfig {
                reap_every: None,
                ..Default::default()
            })
            .start()
            .await
            .unwrap()
    }

    /// Waits until task `id` ended completed; the task as stored.
    async fn until_completed(store: &Arc<Writes>, id: TaskId) -> Task {
        let mut tries = 0;
        let done = loop {
            let t = store.get_task(id).await.unwrap();
            if t.status.is_terminal() {
                break t;
            }
            tries += 1;
            assert!(tries < 1_000, "the task never ended: {t:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        done
    }

    /// Waits until task `id` completed, and checks that it was stored already started: the
    /// store's writes since the caller cleared them are `write` then the finish, no status
    /// was read since `reads` of them, the task has its worker and start, and its log is a
    /// claimed task's (`running` first, then the worker's events). The task as stored.
    async fn stored_started(store: &Arc<Writes>, id: TaskId, write: &str, reads: usize) -> Task {
        let done = until_completed(store, id).await;
        assert_eq!(
            *store.methods.lock().unwrap(),
            vec![write, "update_task_lean"]
        );
        assert_eq!(
            store.status_reads.load(std::sync::atomic::Ordering::SeqCst),
            reads,
            "no status read before the start"
        );
        assert!(
            done.worker_id.is_some() && done.started_at.is_some(),
            "{done:?}"
        );
        let logs = store.read_logs(done.id, 0, 10).await.unwrap();
        assert_eq!(
            logs.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            logs[0].event,
            TaskEvent::Status {
                status: TaskStatus::Running
            }
        );
        done
    }

    /// Runs one task of the one-write worker on `store` to its end; the task as stored.
    async fn run_one(store: &Arc<Writes>) -> Task {
        let d = one_write_dispatcher(store).await;
        let task = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        until_completed(store, task.id).await
    }

    /// A chat in a session with nothing queued or running here, while the driver knows its
    /// worker is up, is stored already started: one write (`create_task_claimed`: the task,
    /// `running` with the worker and the lease, its `running` event) instead of the create,
    /// the runner's status read and the claim. The submitter is answered with the task as
    /// accepted, and the log is a claimed task's: `running` first, then the worker's events.
    #[tokio::test]
    async fn a_chat_in_an_idle_session_is_stored_started() {
        let store = Arc::new(Writes::default());
        let d = one_write_dispatcher(&store).await;
        let (again, reads) = again_after_a_first_chat(&store, &d).await;
        let submitted = d.submit(again).await.unwrap();
        assert_eq!(submitted.task.status, TaskStatus::Pending, "as accepted");
        let done = stored_started(&store, submitted.task.id, "create_task_claimed", reads).await;
        assert_eq!(done.result.as_deref(), Some("hello"), "{done:?}");
    }

    /// After a first chat has made a session (and the driver's health check) and completed:
    /// the next chat's request in that session, and the status reads so far; the writes
    /// recorded until then are forgotten.
    async fn again_after_a_first_chat(store: &Arc<Writes>, d: &Dispatcher) -> (TaskRequest, usize) {
        let first = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        until_completed(store, first.id).await;
        store.methods.lock().unwrap().clear();
        store.appends.lock().unwrap().clear();
        let reads = store.status_reads.load(std::sync::atomic::Ordering::SeqCst);
        let mut again = TaskRequest::new("web", "again");
        again.session_id = Some(first.session_id.clone());
        (again, reads)
    }

    /// The runs started so far, as the metrics count them.
    fn runs_started(d: &Dispatcher) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        d.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find(|l| l.starts_with("anywork_task_runs_total{phase=\"started\"}"))
            .unwrap_or_default()
            .to_owned()
    }

    /// A chat stored started and followed (as a WebSocket's) has its run under way (up to
    /// its first worker call) before the submitter goes on: the submit lets the run go
    /// first instead of leaving it until the submitter stops (a WebSocket would answer its
    /// client, twice, before the run asked the worker anything). The task is stored before
    /// its run starts, as before.
    #[tokio::test]
    async fn a_run_stored_started_goes_before_its_submitter() {
        let store = Arc::new(Writes::default());
        let d = one_write_dispatcher(&store).await;
        let (again, reads) = again_after_a_first_chat(&store, &d).await;
        assert!(runs_started(&d).ends_with(" 1"), "{}", runs_started(&d));
        let (submitted, _events) = d.submit_and_follow(again).await.unwrap();
        // Nothing awaited since the submit: on this one-thread runtime the run ran only if
        // the submit let it.
        assert!(runs_started(&d).ends_with(" 2"), "{}", runs_started(&d));
        assert_eq!(
            store.get_task(submitted.task.id).await.unwrap().status,
            TaskStatus::Running,
            "stored (claimed) before its run started"
        );
        stored_started(&store, submitted.task.id, "create_task_claimed", reads).await;
    }

    /// The next chat of a session on `store` (a fake worker whose chat completes at once,
    /// watched by the store's gate): the paths the worker was asked for from that chat's
    /// submit to its end.
    async fn paths_of_a_second_chat(one_server: bool) -> (Arc<Writes>, Vec<String>) {
        let done = TaskEvent::Done(TaskOutcome::completed("done"));
        let worker = FakeWorker::start(false, vec![done], Vec::new()).await;
        let store = Arc::new(Writes {
            one_server,
            prepare_gate: Some((worker.paths.clone(), worker.asked.clone())),
            ..Writes::default()
        });
        let driver = Arc::new(anywork_drivers::StaticDriver::new(&worker.url).unwrap());
        let config = DispatcherConfig {
            retry: crate::Backoff::none(),
            reap_every: None,
            ..Default::default()
        };
        let d = Dispatcher::builder(store.clone(), driver)
            .config(config)
            .start()
            .await
            .unwrap();
        let (again, _) = again_after_a_first_chat(&store, &d).await;
        lock(&worker.paths).clear();
        let task = guard(d.submit(again)).await.unwrap().task;
        let done = guard(until_completed(&store, task.id)).await;
        assert!(done.worker_id.is_some(), "{done:?}");
        (store, worker.paths())
    }

    /// On a store that serves this server only, a chat stored started has the session's
    /// `/prepare` sent while the task is written, not after: the worker is asked for it
    /// before the create-and-claim writes (which here waits for it), once, and the chat
    /// follows.
    #[tokio::test]
    async fn a_sole_servers_chat_prepares_its_worker_while_it_is_written() {
        let (store, paths) = paths_of_a_second_chat(true).await;
        assert_eq!(*lock(&store.prepared_first), vec![true]);
        assert_eq!(
            *store.methods.lock().unwrap(),
            vec!["create_task_claimed", "update_task_lean"]
        );
        assert_eq!(paths, vec!["/prepare", "/chat"]);
    }

    /// On a store that other servers may share, the session's `/prepare` waits for the
    /// write that claims the task (another server may run a task of the session on that
    /// worker): no `/prepare` before the create-and-claim, then one, then the chat.
    #[tokio::test]
    async fn a_shared_stores_chat_prepares_its_worker_after_it_is_written() {
        let (store, paths) = paths_of_a_second_chat(false).await;
        assert_eq!(*lock(&store.prepared_first), vec![false]);
        assert_eq!(paths, vec!["/prepare", "/chat"]);
    }

    /// A new session's first chat that can start at once (the driver's health check fresh,
    /// a permit free) is stored with its session already started, in one write: no status
    /// read, no claim after it. The first chat of all waits for the driver's first health
    /// check, so it goes the old way.
    #[tokio::test]
    async fn a_new_sessions_first_chat_is_stored_started_with_its_session() {
        let store = Arc::new(Writes::default());
        let d = one_write_dispatcher(&store).await;
        let first = d.submit(TaskRequest::new("web", "hi")).await.unwrap().task;
        until_completed(&store, first.id).await;
        store.methods.lock().unwrap().clear();
        let reads = store.status_reads.load(std::sync::atomic::Ordering::SeqCst);

        let submitted = d.submit(TaskRequest::new("web", "another")).await.unwrap();
        assert!(submitted.session_created);
        assert_ne!(submitted.task.session_id, first.session_id);
        assert_eq!(submitted.task.status, TaskStatus::Pending, "as accepted");
        let done = stored_started(
            &store,
            submitted.task.id,
            "create_session_with_task_claimed",
            reads,
        )
        .await;
        let session = store.get_session(&done.session_id).await.unwrap();
        assert_eq!(session.last_active, done.created_at);
    }

    /// The claim and the outcome go through the lean writes, which do not read the task
    /// back (a SQL store reads and decodes no task row for them); the run applies each
    /// change to its own copy, which ends as the task stored.
    #[tokio::test]
    async fn a_run_claims_and_finishes_without_reading_its_task_back() {
        let store = Arc::new(Writes::default());
        let done = run_one(&store).await;
        assert_eq!(
            *store.methods.lock().unwrap(),
            vec!["claim_task_lean", "update_task_lean"]
        );
        assert!(done.started_at.is_some() && done.finished_at.is_some());
        assert!(done.worker_id.is_some(), "{done:?}");
        assert_eq!(done.result.as_deref(), Some("hello"), "{done:?}");
    }

    /// The events that end a task, arriving together, are stored with its outcome in one
    /// write (its `done` last), not in a write of their own before it; the log stays
    /// gap-free and complete.
    #[tokio::test]
    async fn a_batch_that_ends_the_task_is_stored_with_its_outcome_in_one_write() {
        let store = Arc::new(Writes::default());
        let task = run_one(&store).await;
        let writes = store.appends.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![
                vec!["status".to_owned()],
                vec!["text".to_owned(), "done".to_owned()]
            ],
            "the `running` with the claim, then the text with the outcome"
        );
        let logs = store.read_logs(task.id, 0, 10).await.unwrap();
        let seqs: Vec<u64> = logs.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(logs[1].event, TaskEvent::text("hello"));
        assert!(matches!(logs[2].event, TaskEvent::Done(_)), "{logs:?}");
    }

    /// A chat stream fed by hand, and its sender.
    fn fed_stream() -> (mpsc::UnboundedSender<Result<TaskEvent>>, ChatStream) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (tx, Box::pin(stream))
    }

    /// While the run stores a batch, the stream is read on into the queue, up to its
    /// capacity: what came meanwhile is ready at once afterwards, in order, as one batch (a
    /// task of its own read the stream into a channel for this before); the rest stays in
    /// the stream and comes after it, and the end comes once, after everything.
    #[tokio::test]
    async fn the_stream_is_read_ahead_while_a_batch_is_stored() {
        let (tx, stream) = fed_stream();
        let mut ahead = ReadAhead::new(stream, 2);
        tx.send(Ok(TaskEvent::text("a"))).unwrap();
        assert_eq!(ahead.next().await.unwrap().unwrap(), TaskEvent::text("a"));
        assert!(ahead.ready().is_none(), "nothing more came");

        let (stored, store_done) = oneshot::channel::<&str>();
        let feeder = async {
            for text in ["b", "c", "d"] {
                tx.send(Ok(TaskEvent::text(text))).unwrap();
                tokio::task::yield_now().await;
            }
            stored.send("stored").unwrap();
        };
        let (out, ()) = tokio::join!(ahead.reading_while(store_done), feeder);
        assert_eq!(out.unwrap(), "stored");
        assert_eq!(ahead.ahead.len(), 2, "read ahead up to the capacity");
        drop(tx);
        let mut rest = Vec::new();
        while let Some(item) = ahead.ready() {
            rest.push(item.unwrap());
        }
        assert_eq!(
            rest,
            vec![
                TaskEvent::text("b"),
                TaskEvent::text("c"),
                TaskEvent::text("d")
            ]
        );
        assert!(ahead.next().await.is_none(), "the stream's end");
        assert!(ahead.next().await.is_none(), "and again, not a panic");
        assert!(ahead.ready().is_none());
    }

    /// An item ready at once is handed on without waiting; a stream with nothing ready
    /// wakes its reader when something comes (the queue's noop poll does not lose it).
    #[tokio::test]
    async fn a_stream_polled_for_ready_events_still_wakes_its_reader() {
        let (tx, stream) = fed_stream();
        let mut ahead = ReadAhead::new(stream, 4);
        assert!(ahead.ready().is_none());
        // From another task, later: only the stream's waker can wake this one.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(Err(Error::unavailable("broke"))).unwrap();
        });
        let item = tokio::time::timeout(Duration::from_secs(10), ahead.next())
            .await
            .expect("woken by the stream");
        assert_eq!(item.unwrap().unwrap_err().kind(), ErrorKind::Unavailable);
    }
}
