//! [`TaskStore`]: where sessions, tasks and task logs live.

use async_trait::async_trait;

use crate::delivery::{
    DeletedLogs, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, NewDelivery, StoreSize,
};
use crate::error::{Error, Result};
use crate::ids::{SessionId, TaskId, Timestamp};
use crate::log::{NewTaskLog, TaskLog};
use crate::session::{NewSession, Page, Session, SessionSummary, UsageTotals, title_matches};
use crate::status::TaskStatus;
use crate::task::{NewTask, Task, TaskChange};

/// What the default methods of the outbox answer on a store that does not implement it.
fn no_outbox(what: &str) -> Error {
    Error::internal(format!(
        "this TaskStore keeps no deliveries (outbox), so it cannot {what}: implement the \
         delivery methods of TaskStore, or use a store from anywork-store"
    ))
}

/// Durable state of AnyWork. Every implementation passes the conformance suite in
/// `anywork-test`, so callers can rely on the guarantees written here whatever the backend.
///
/// Errors: [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) for an unknown session or task,
/// [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) for a duplicate or a lost
/// compare-and-set, [`ErrorKind::InvalidTransition`](crate::ErrorKind::InvalidTransition) for a
/// status change the state machine forbids, and
/// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable) /
/// [`ErrorKind::Storage`](crate::ErrorKind::Storage) when the backend fails.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Creates a session. `Conflict` if the id, or the `(channel_type, channel_key)` pair, is
    /// already taken.
    async fn create_session(&self, new: NewSession) -> Result<Session>;

    /// The session with `id`, or `NotFound`.
    async fn get_session(&self, id: &SessionId) -> Result<Session>;

    /// The session a channel made for `channel_key`, if any.
    async fn find_session(&self, channel_type: &str, channel_key: &str) -> Result<Option<Session>>;

    /// Sessions with their task counts, most recently active first (ties: newest id first).
    async fn list_sessions(&self, page: Page) -> Result<Vec<SessionSummary>>;

    /// Sessions whose title contains `query` ignoring case, in the order of
    /// [`list_sessions`](Self::list_sessions) and paged the same way. `query` is literal text
    /// (`%`, `_` and `\` are no wildcards); case is ignored for ASCII letters on every store,
    /// and for other letters where the backend folds them (memory and PostgreSQL with a UTF-8
    /// locale do, SQLite does not). An empty `query` lists every session.
    ///
    /// The default pages through `list_sessions` and filters: right, but it reads every
    /// session; the shipped stores filter in the database.
    async fn search_sessions(&self, query: &str, page: Page) -> Result<Vec<SessionSummary>> {
        const CHUNK: u32 = 500;
        let (skip, want) = (page.offset as usize, page.limit as usize);
        let mut found = Vec::new();
        let mut offset = 0u32;
        loop {
            let rows = self
                .list_sessions(Page {
                    limit: CHUNK,
                    offset,
                })
                .await?;
            let last = rows.len() < CHUNK as usize;
            found.extend(
                rows.into_iter()
                    .filter(|s| title_matches(&s.session.title, query)),
            );
            if last || found.len() >= skip.saturating_add(want) {
                break;
            }
            offset = offset.saturating_add(CHUNK);
        }
        Ok(found.into_iter().skip(skip).take(want).collect())
    }

    /// Cost and tokens summed over every task of every session, with the session and task
    /// counts: the figures behind a "total" display. Deleting a session takes its tasks out of
    /// the totals; deleting a task's log (retention) does not.
    ///
    /// The default reads every session and task page by page, so it is right but slow on a
    /// large store; the shipped stores sum in the database.
    async fn usage_totals(&self) -> Result<UsageTotals> {
        const CHUNK: u32 = 1000;
        let mut totals = UsageTotals::default();
        let mut offset = 0u32;
        loop {
            let n = self
                .list_sessions(Page {
                    limit: CHUNK,
                    offset,
                })
                .await?
                .len();
            totals.sessions += n as u64;
            if n < CHUNK as usize {
                break;
            }
            offset = offset.saturating_add(CHUNK);
        }
        for status in TaskStatus::ALL {
            let mut offset = 0u32;
            loop {
                let tasks = self
                    .tasks_by_status(
                        status,
                        Page {
                            limit: CHUNK,
                            offset,
                        },
                    )
                    .await?;
                for t in &tasks {
                    totals.add_task(t);
                }
                if tasks.len() < CHUNK as usize {
                    break;
                }
                offset = offset.saturating_add(CHUNK);
            }
        }
        Ok(totals)
    }

    /// Renames a session; `NotFound` if unknown.
    async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()>;

    /// Moves `last_active` forward to `at` (never backwards); `NotFound` if unknown.
    async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()>;

    /// Deletes a session with all its tasks and their logs; `NotFound` if unknown.
    async fn delete_session(&self, id: &SessionId) -> Result<()>;

    /// Stores a `pending` task and touches its session. `NotFound` if the session is unknown,
    /// `Conflict` if the task id exists, or if a task of the same `channel_type` has the same
    /// `idempotency_key` (then nothing is stored: look the first one up with
    /// [`find_task_by_idempotency_key`](Self::find_task_by_idempotency_key)).
    async fn create_task(&self, new: NewTask) -> Result<Task>;

    /// [`create_session`](Self::create_session) and [`create_task`](Self::create_task) of
    /// its first task in one write: both are stored or neither. What a request that starts a
    /// new session uses (one store write instead of two). `task.session_id` must be
    /// `session.id` (`InvalidInput` otherwise). `Conflict` as the two calls give it — the
    /// session's id or its `(channel_type, channel_key)` is taken, or the task's id or its
    /// idempotency key is — and then NOTHING is stored: neither the session nor the task.
    /// Returns both as stored (the session's `last_active` moved to the task's `created_at`,
    /// as `create_task` touches it).
    ///
    /// The default makes the two calls, so it is not atomic: a task refused after its session
    /// was created leaves that session behind (what two separate calls leave). The shipped
    /// stores write both in one transaction.
    async fn create_session_with_task(
        &self,
        session: NewSession,
        task: NewTask,
    ) -> Result<(Session, Task)> {
        check_first_task(&session, &task)?;
        let mut session = self.create_session(session).await?;
        let task = self.create_task(task).await?;
        session.last_active = session.last_active.max(task.created_at);
        Ok((session, task))
    }

    /// The task a channel created with `idempotency_key`, if any: what a duplicate event is
    /// answered with. The key stays taken as long as the task exists (deleting its log keeps
    /// it; deleting its session frees it). The default finds nothing, which is right for a
    /// store that ignores the key in `create_task` (it dedupes nothing).
    async fn find_task_by_idempotency_key(
        &self,
        channel_type: &str,
        idempotency_key: &str,
    ) -> Result<Option<Task>> {
        let _ = (channel_type, idempotency_key);
        Ok(None)
    }

    /// The task with `id`, or `NotFound`.
    async fn get_task(&self, id: TaskId) -> Result<Task>;

    /// The status of the task with `id`, or `NotFound`: for a caller that needs nothing else
    /// (a SQL store reads one column instead of the whole row and decoding its JSON). The
    /// default reads the whole task.
    async fn task_status(&self, id: TaskId) -> Result<TaskStatus> {
        Ok(self.get_task(id).await?.status)
    }

    /// Atomically applies `change` if the task's status is still `expected`: a lost race gives
    /// `Conflict` and changes nothing; an illegal transition gives `InvalidTransition`.
    /// Returns the task as stored after the change.
    async fn update_task(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
    ) -> Result<Task>;

    /// [`update_task`](Self::update_task) and [`append_logs`](Self::append_logs) in one
    /// transaction: both happen or neither. What a status change and the event that tells of it
    /// (a run's `running`, its final `done`) use, so that a reader never sees one without the
    /// other. Returns the task after the change and the seq of the last event.
    async fn update_task_and_append(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
    ) -> Result<(Task, u64)>;

    /// [`update_task_and_append`](Self::update_task_and_append) that also enqueues
    /// `deliveries` for this task, all in one transaction: the change, its events and the
    /// outbox rows commit together or not at all (a lost compare-and-set, an illegal
    /// transition or an unknown task enqueues nothing). This is how an outcome reaches the
    /// outbox: the run that records a terminal status passes the channel delivery and the
    /// push notification here, so a stored outcome is always on its way out.
    /// `Conflict` if a delivery id exists already.
    ///
    /// The default enqueues nothing: with `deliveries` empty it is `update_task_and_append`;
    /// otherwise it refuses, so a store without an outbox never drops one silently.
    async fn update_task_and_enqueue(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, u64)> {
        if deliveries.is_empty() {
            self.update_task_and_append(id, expected, change, logs)
                .await
        } else {
            Err(no_outbox("enqueue deliveries"))
        }
    }

    /// A session's tasks, oldest first.
    async fn tasks_by_session(&self, session_id: &SessionId, page: Page) -> Result<Vec<Task>>;

    /// Tasks in `status`, oldest first.
    async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>>;

    /// A session's tasks in `status`, oldest first: the question a session's next message
    /// may answer is its task in `input_required` (one at most, since one task of a session
    /// runs at a time). Empty for an unknown session.
    ///
    /// The default pages through [`tasks_by_session`](Self::tasks_by_session) and filters:
    /// right, but it reads every task of the session; the shipped stores ask the database for
    /// the session's tasks in that status only.
    async fn tasks_by_session_in_status(
        &self,
        session_id: &SessionId,
        status: TaskStatus,
        page: Page,
    ) -> Result<Vec<Task>> {
        const CHUNK: u32 = 500;
        let (skip, want) = (page.offset as usize, page.limit as usize);
        let mut found = Vec::new();
        let mut offset = 0u32;
        loop {
            let tasks = self
                .tasks_by_session(
                    session_id,
                    Page {
                        limit: CHUNK,
                        offset,
                    },
                )
                .await?;
            let last = tasks.len() < CHUNK as usize;
            found.extend(tasks.into_iter().filter(|t| t.status == status));
            if last || found.len() >= skip.saturating_add(want) {
                break;
            }
            offset = offset.saturating_add(CHUNK);
        }
        Ok(found.into_iter().skip(skip).take(want).collect())
    }

    /// Extends the lease of an active task held by `owner`. `Conflict` if another owner holds
    /// it, it has no lease, or it is no longer active.
    async fn renew_lease(&self, id: TaskId, owner: &str, expires_at: Timestamp) -> Result<()>;

    /// Active tasks whose lease expired at or before `now`, oldest first: the ones a crashed
    /// server left behind.
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>>;

    /// Starts task `id` if it is its session's turn: atomically moves it from `pending` to
    /// `running` with `change` (a change to `running` with a lease: the claimer as owner),
    /// appends `logs` (the `running` status event) and enqueues `deliveries` in the same
    /// transaction — but only if it is the OLDEST pending task of its session and no task of
    /// the session is `running` or `input_required`. That is how one task at a time per
    /// session and FIFO order hold across servers sharing the store: every start of a task
    /// goes through here (PostgreSQL locks the session's row `FOR UPDATE` for the claim, so
    /// two claimers of one session take turns; SQLite and memory have one writer).
    ///
    /// Returns [`Claim::Claimed`] with the task as stored and the seq of the last appended
    /// event; otherwise nothing changed and the answer says why: [`Claim::Busy`] (the task
    /// that holds the session), [`Claim::NotFirst`] (an older pending task of the session,
    /// which must start first), [`Claim::NotPending`] (the task as stored: canceled, or
    /// started by another server). `NotFound` for an unknown task, `InvalidInput` for a
    /// change that is not to `running` with a lease, `Conflict` if a delivery id exists.
    ///
    /// The default is built on the other methods and is NOT atomic across servers (the
    /// compare-and-set on `pending → running` still keeps a task from running twice, but two
    /// servers may run two tasks of one session at once): right for one server only.
    async fn claim_task(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Claim> {
        check_claim(&change)?;
        let task = self.get_task(id).await?;
        if task.status != TaskStatus::Pending {
            return Ok(Claim::NotPending(task));
        }
        // An active task of the session refuses the claim first (`Busy`), else its oldest
        // pending task older than this one (`NotFirst`), as the shipped stores answer.
        let mut first: Option<Task> = None;
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = self.tasks_by_session(&task.session_id, page).await?;
            let n = tasks.len() as u32;
            for other in tasks {
                match other.status {
                    TaskStatus::Running | TaskStatus::InputRequired => {
                        return Ok(Claim::Busy(other));
                    }
                    TaskStatus::Pending
                        if (other.created_at, other.id) < (task.created_at, task.id)
                            && first.as_ref().is_none_or(|f| {
                                (other.created_at, other.id) < (f.created_at, f.id)
                            }) =>
                    {
                        first = Some(other);
                    }
                    _ => {}
                }
            }
            if n < page.limit {
                break;
            }
            offset += n;
        }
        if let Some(first) = first {
            return Ok(Claim::NotFirst(first));
        }
        match self
            .update_task_and_enqueue(id, TaskStatus::Pending, change, logs, deliveries)
            .await
        {
            Ok((task, last)) => Ok(Claim::Claimed(task, last)),
            Err(e) if e.kind() == crate::ErrorKind::Conflict => {
                Ok(Claim::NotPending(self.get_task(id).await?))
            }
            Err(e) => Err(e),
        }
    }

    /// [`create_task`](Self::create_task) and, in the same write, the task's claim
    /// ([`claim_task_lean`](Self::claim_task_lean) with `change`, `logs` and `deliveries`) when
    /// it can start at once: no other task of its session is `running`, `input_required` or
    /// an older `pending` one, and the idle reaper does not hold its session
    /// ([`hold_idle_session`](Self::hold_idle_session)) past now. What a dispatcher uses for a
    /// new task it can run right away (it has a permit and the session's worker): one store
    /// write instead of the create, the runner's status read and the claim.
    ///
    /// Returns the task as stored and, when it was claimed, the seq of the last appended
    /// event (the task is then `running` with `change` applied); `None` when it could not
    /// start: it is stored `pending` exactly as `create_task` stores it, with no event and no
    /// delivery, and starts later through `claim_task`. The errors are `create_task`'s
    /// (nothing stored), and `InvalidInput` for a change that is not a claim's (to `running`
    /// with a lease).
    ///
    /// The default makes the calls one after the other (`create_task`,
    /// `task_status_for_start`, `claim_task_lean`): a claim that fails after the create
    /// leaves the task `pending` (answered `None`). The shipped stores do all of it in one
    /// transaction.
    async fn create_task_claimed(
        &self,
        new: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Task, Option<u64>)> {
        check_claim(&change)?;
        let mut task = self.create_task(new).await?;
        match self.task_status_for_start(task.id).await {
            Ok((TaskStatus::Pending, None)) => {}
            Ok((TaskStatus::Pending, Some(until))) if until <= Timestamp::now() => {}
            _ => return Ok((task, None)),
        }
        match self
            .claim_task_lean(task.id, change.clone(), logs, deliveries)
            .await
        {
            Ok(crate::Claim::Claimed((), last)) => {
                if change.apply(&mut task).is_err() {
                    task = self.get_task(task.id).await?;
                }
                Ok((task, Some(last)))
            }
            _ => Ok((task, None)),
        }
    }

    /// [`create_session_with_task`](Self::create_session_with_task) with the task stored
    /// already claimed, as [`create_task_claimed`](Self::create_task_claimed) stores a new
    /// task of a stored session: the session, its first task `running` with `change` applied,
    /// `logs` (the `running` event) and `deliveries`, in one write. What a dispatcher uses for
    /// the first task of a new session when it can run it at once.
    ///
    /// Returns both as stored and, when the task was claimed, the seq of the last appended
    /// event; `None` when it was not (then it is stored `pending` exactly as
    /// `create_session_with_task` stores it, with no event and no delivery). The errors are
    /// `create_session_with_task`'s (`Conflict`, and then nothing is stored), and
    /// `InvalidInput` for a change that is not a claim's (to `running` with a lease).
    ///
    /// The default makes the calls one after the other (`create_session_with_task`, then
    /// `claim_task_lean`): a claim that fails after the create leaves the task `pending`
    /// (answered `None`). The shipped SQL stores do all of it in one transaction.
    async fn create_session_with_task_claimed(
        &self,
        session: NewSession,
        task: NewTask,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<(Session, Task, Option<u64>)> {
        check_claim(&change)?;
        let (session, mut task) = self.create_session_with_task(session, task).await?;
        match self
            .claim_task_lean(task.id, change.clone(), logs, deliveries)
            .await
        {
            Ok(crate::Claim::Claimed((), last)) => {
                if change.apply(&mut task).is_err() {
                    task = self.get_task(task.id).await?;
                }
                Ok((session, task, Some(last)))
            }
            _ => Ok((session, task, None)),
        }
    }

    /// [`claim_task`](Self::claim_task) for a caller that needs only the seq of the last
    /// event appended, not the task as stored (a runner has its task, and applies `change`
    /// to its copy): the same checks, guarantees and answers, except that
    /// [`Claim::Claimed`] carries `()` instead of the task. A SQL store then neither reads
    /// nor decodes the task's row on the way (one conditional `UPDATE … RETURNING last_seq`
    /// claims it when it is the session's turn).
    ///
    /// The default calls `claim_task` and drops the task.
    async fn claim_task_lean(
        &self,
        id: TaskId,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<Claim<()>> {
        Ok(self
            .claim_task(id, change, logs, deliveries)
            .await?
            .map(drop))
    }

    /// [`update_task_and_enqueue`](Self::update_task_and_enqueue) for a caller that needs
    /// only the seq of the last event of the task's log after the write (the current last
    /// seq when `logs` is empty), not the task as stored: the same compare-and-set, errors
    /// and transaction (the change, its events and its deliveries commit together or not at
    /// all). A SQL store then neither reads nor decodes the task's row: one
    /// `UPDATE … WHERE id = … AND status = … RETURNING last_seq` writes what `change` sets.
    ///
    /// The default calls `update_task_and_enqueue` and drops the task.
    async fn update_task_lean(
        &self,
        id: TaskId,
        expected: TaskStatus,
        change: TaskChange,
        logs: Vec<NewTaskLog>,
        deliveries: Vec<NewDelivery>,
    ) -> Result<u64> {
        self.update_task_and_enqueue(id, expected, change, logs, deliveries)
            .await
            .map(|(_, last)| last)
    }

    /// The idle reaper's hold on a session: takes it for `owner` until `until` if
    /// `session_id` has no task `pending`, `running` or `input_required` and no other owner
    /// holds it past `now` (the same owner extends its hold), and answers whether it did. It
    /// is one conditional write, ordered with [`create_task`](Self::create_task) (on
    /// PostgreSQL both take the session's row lock), so of a hold and a task created at the
    /// same moment either the hold sees the task and is refused, or the task's runner sees
    /// the hold ([`task_status_for_start`](Self::task_status_for_start)) and waits for it to
    /// end before it asks the driver for the session's worker. A reaper stops a worker only
    /// while it holds its session, then lets go ([`release_idle_hold`](Self::release_idle_hold));
    /// one that dies meanwhile leaves the hold to run out at `until`. `NotFound` for an
    /// unknown session.
    ///
    /// The default holds nothing: it answers whether the session has no active task (read
    /// with `tasks_by_session`), which is right for one server only.
    async fn hold_idle_session(
        &self,
        session_id: &SessionId,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool> {
        let _ = (owner, now, until);
        self.get_session(session_id).await?;
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = self.tasks_by_session(session_id, page).await?;
            let n = tasks.len() as u32;
            if tasks.iter().any(|t| t.status.is_active()) {
                return Ok(false);
            }
            if n < page.limit {
                return Ok(true);
            }
            offset += n;
        }
    }

    /// Ends `owner`'s hold on `session_id` ([`hold_idle_session`](Self::hold_idle_session)):
    /// the session's tasks may get its worker again. Nothing happens if `owner` holds none
    /// (another owner's hold stays). The default does nothing.
    async fn release_idle_hold(&self, session_id: &SessionId, owner: &str) -> Result<()> {
        let _ = (session_id, owner);
        Ok(())
    }

    /// The status of task `id` and, when the reaper holds its session
    /// ([`hold_idle_session`](Self::hold_idle_session)), when that hold runs out (it may be
    /// past: compare with the clock): what a runner reads before it asks the driver for the
    /// task's worker, in one read. `NotFound` for an unknown task. The default reads the
    /// status and tells no hold.
    async fn task_status_for_start(&self, id: TaskId) -> Result<(TaskStatus, Option<Timestamp>)> {
        Ok((self.task_status(id).await?, None))
    }

    /// Work any server may start: the oldest `pending` task of each session that has no task
    /// `running` or `input_required`, oldest first, at most `limit`. A server calls it now and
    /// then (and when told that a task ended) and claims each with
    /// [`claim_task`](Self::claim_task), so that a task accepted by one server runs even when
    /// that server is busy or gone. The default is built on `tasks_by_status`.
    async fn claimable(&self, limit: u32) -> Result<Vec<Task>> {
        let mut busy = std::collections::HashSet::new();
        for status in [TaskStatus::Running, TaskStatus::InputRequired] {
            let mut offset = 0;
            loop {
                let page = Page { limit: 500, offset };
                let tasks = self.tasks_by_status(status, page).await?;
                let n = tasks.len() as u32;
                busy.extend(tasks.into_iter().map(|t| t.session_id));
                if n < page.limit {
                    break;
                }
                offset += n;
            }
        }
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let page = Page { limit: 500, offset };
            let tasks = self.tasks_by_status(TaskStatus::Pending, page).await?;
            let n = tasks.len() as u32;
            for task in tasks {
                if out.len() >= limit as usize {
                    return Ok(out);
                }
                if busy.insert(task.session_id.clone()) {
                    out.push(task);
                }
            }
            if n < page.limit {
                return Ok(out);
            }
            offset += n;
        }
    }

    /// Whether other dispatchers (servers) may use the store at the same time. `true`, the
    /// default, unless the store serves one server only, as SQLite does (docs/scaling.md):
    /// then whether a session has a task active or queued is known to that server alone, and
    /// its dispatcher may send a session's `/prepare` before the write that claims its new
    /// task. (The memory store says `true`: tests share one between dispatchers.)
    fn shared(&self) -> bool {
        true
    }

    /// A feed of the events appended to task logs by any server sharing the store, for
    /// followers on this server of tasks run elsewhere (PostgreSQL: `LISTEN/NOTIFY`). `None`
    /// (the default) when the store has none: followers then read the log by polling.
    fn change_feed(&self) -> Option<ChangeFeed> {
        None
    }

    /// Appends events to a task's log in order and returns the seq of the last one (the
    /// current last seq when `logs` is empty). The store numbers them: the first event of a
    /// task is 1 and seqs have no gaps or duplicates, even with concurrent appenders.
    /// `NotFound` if the task is unknown.
    async fn append_logs(&self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64>;

    /// [`append_logs`](Self::append_logs) only while the task is active (`pending`,
    /// `running`, `input_required`): once it is over — its `done` is in the log, whichever
    /// server wrote it — `Conflict`, and nothing is appended (also with `logs` empty). What
    /// a run writes goes through here, so a task another server ended (a cancel, lease
    /// recovery) keeps its `done` last. The shipped stores check and append in one step (the
    /// SQL stores under the task's row lock, which the end of a task takes too).
    ///
    /// The default reads the task, then appends: right for one server only (an end written
    /// by another server in between is not seen).
    async fn append_logs_while_active(
        &self,
        task_id: TaskId,
        logs: Vec<NewTaskLog>,
    ) -> Result<u64> {
        let task = self.get_task(task_id).await?;
        check_log_open(&task)?;
        self.append_logs(task_id, logs).await
    }

    /// Up to `limit` events with seq greater than `after`, in seq order; empty for an unknown
    /// task (callers that must tell the two apart check the task first).
    async fn read_logs(&self, task_id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>>;

    /// Takes up to `limit` deliveries that are due, for `owner` until `until`, and returns
    /// them (oldest due first). Due means: `pending` or `failed`, `next_attempt_at <= now`,
    /// nobody's claim running past `now`, and no older open delivery of the same task to the
    /// same target (one task's deliveries to one target go out one at a time, in the order
    /// they were enqueued).
    ///
    /// At most one sender holds a delivery at a time, also across servers sharing the store
    /// (PostgreSQL: `FOR UPDATE SKIP LOCKED` plus a compare-and-set on the claim). A claim
    /// that runs out lets another sender take it: `until - now` must exceed the longest
    /// attempt (the send timeout), or one delivery may be sent twice — receivers drop the
    /// second copy by its [`idempotency key`](Delivery::idempotency_key). `owner` names the
    /// sender (a server instance id, unique per process).
    ///
    /// The sender then tries each one and reports with
    /// [`record_delivery_attempt`](Self::record_delivery_attempt).
    async fn claim_deliveries(
        &self,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        let _ = (owner, now, until, limit);
        Err(no_outbox("claim deliveries"))
    }

    /// Records the result of an attempt on a delivery `owner` claimed, at `at`, and drops the
    /// claim: `Sent` → `sent`; `Retry` → `failed`, due again at `retry_at`; `Dead` → `dead`.
    /// Each counts one attempt. The store does not count attempts against a budget: the
    /// sender decides when a failure is final (e.g. `attempts + 1 >= max`, or a 4xx) and
    /// records `Dead`. `NotFound` for an unknown delivery; `Conflict` (nothing changes) if
    /// `owner` no longer holds it — its claim expired and another sender took it over, or it
    /// was already settled. Returns the delivery as stored.
    async fn record_delivery_attempt(
        &self,
        id: DeliveryId,
        owner: &str,
        attempt: DeliveryAttempt,
        at: Timestamp,
    ) -> Result<Delivery> {
        let _ = (id, owner, attempt, at);
        Err(no_outbox("record a delivery attempt"))
    }

    /// The delivery with `id`, or `NotFound`.
    async fn get_delivery(&self, id: DeliveryId) -> Result<Delivery> {
        let _ = id;
        Err(no_outbox("read a delivery"))
    }

    /// Deliveries in `status` (all when `None`), oldest first, paged.
    async fn list_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        page: Page,
    ) -> Result<Vec<Delivery>> {
        let _ = (status, page);
        Err(no_outbox("list deliveries"))
    }

    /// Sends a `dead` delivery again: back to `pending`, due at `now`, attempts reset to 0
    /// (a fresh budget), its last error kept. `NotFound` if unknown, `Conflict` if it is not
    /// dead. Returns it as stored.
    async fn retry_delivery(&self, id: DeliveryId, now: Timestamp) -> Result<Delivery> {
        let _ = (id, now);
        Err(no_outbox("retry a delivery"))
    }

    /// Retention of deliveries: deletes up to `limit` `sent` or `dead` deliveries last
    /// changed before `before`, oldest first, and returns how many. Open ones (`pending`,
    /// `failed`) are never deleted. Call it repeatedly until it returns less than `limit`.
    async fn delete_settled_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64> {
        let _ = (before, limit);
        Ok(0)
    }

    /// Retention of logs: deletes the whole logs of up to `max_tasks` tasks that finished
    /// (`completed`, `failed`, `canceled`) before `finished_before`, those finished longest
    /// ago first, and stamps them with `logs_deleted_at = now`. The task rows stay (message,
    /// result, status, usage, idempotency key), so sessions keep their history and counts;
    /// only the events go. Each task's log goes entirely or not at all, and a task that is
    /// not finished is never touched. A task's seqs continue after deletion (an append gets
    /// the next seq as before). One call is one bounded transaction: call it repeatedly
    /// until `tasks` comes back below `max_tasks`; for a size budget, call it with
    /// `finished_before = now` while [`store_size`](Self::store_size) is over budget.
    /// The default deletes nothing.
    async fn delete_finished_logs(
        &self,
        finished_before: Timestamp,
        max_tasks: u32,
        now: Timestamp,
    ) -> Result<DeletedLogs> {
        let _ = (finished_before, max_tasks, now);
        Ok(DeletedLogs::default())
    }

    /// Gives free space back to the file system after deletions, in bounded steps that let
    /// other writes through in between, and returns the bytes freed. SQLite: incremental
    /// vacuum (databases created before this version need one full `VACUUM` first, see
    /// `SqliteStore::vacuum`); PostgreSQL: nothing, autovacuum reuses the space. The default
    /// does nothing.
    async fn compact(&self) -> Result<u64> {
        Ok(0)
    }

    /// How much room the store takes, for a metric and size-based retention; `None` when
    /// the store cannot tell (memory). The default is `None`.
    async fn store_size(&self) -> Result<Option<StoreSize>> {
        Ok(None)
    }

    /// `Ok` when the store can take writes now, for a readiness check (HTTP 503 otherwise).
    /// SQL stores commit a real one-row write (a heartbeat) through their normal write path
    /// (on SQLite, the writer's queue, so a stuck writer shows), waiting at most 3 s:
    /// `Unavailable` when the database is unreachable, locked past the bound, out of disk
    /// space or read-only. It is one small write: a disk with a few KiB left passes it while
    /// larger writes fail with "the disk is full". Cheap enough for a probe every few
    /// seconds. The default reads one session.
    async fn check_ready(&self) -> Result<()> {
        self.list_sessions(Page::first(1)).await.map(drop)
    }

    /// The server-wide setting `key` (e.g. `workspace.soul`, the default `SOUL.md` of new
    /// sessions), `None` when it was never set. The default answers `None` (nothing is kept).
    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        let _ = key;
        Ok(None)
    }

    /// Sets `key` to `value`, replacing what it was. Keys are 1 to 128 printable ASCII
    /// characters (`InvalidInput` otherwise, see [`validate_setting_key`]); values are any
    /// text. The default refuses, saying that this store keeps no settings.
    async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        let _ = value;
        validate_setting_key(key)?;
        Err(Error::internal(format!(
            "this TaskStore keeps no settings, so {key} cannot be saved: implement \
             get_setting and put_setting, or use a store from anywork-store"
        )))
    }
}

/// What [`TaskStore::claim_task`] did. `T` is what a claimed task comes back as: the task as
/// stored (`Claim`, the default), or nothing (`Claim<()>`, from
/// [`TaskStore::claim_task_lean`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Claim<T = Task> {
    /// The task is now `running` for the claimer; the seq of the last event appended.
    Claimed(T, u64),
    /// This task of the session is `running` or `input_required`: nothing changed. An active
    /// task is told before an older pending one.
    Busy(Task),
    /// This older pending task of the session (its oldest) starts first, and none is
    /// active: nothing changed.
    NotFirst(Task),
    /// The task is no longer pending (canceled, or started by another server), as stored.
    NotPending(Task),
}

impl<T> Claim<T> {
    /// The same answer with `f` applied to what a claimed task comes back as.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Claim<U> {
        match self {
            Claim::Claimed(t, last) => Claim::Claimed(f(t), last),
            Claim::Busy(t) => Claim::Busy(t),
            Claim::NotFirst(t) => Claim::NotFirst(t),
            Claim::NotPending(t) => Claim::NotPending(t),
        }
    }
}

/// `Conflict` when `task` is over: what [`TaskStore::append_logs_while_active`] answers then.
pub fn check_log_open(task: &Task) -> Result<()> {
    if task.status.is_active() {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "task {} is {}: its log ends at its done, nothing more is appended",
        task.id, task.status
    )))
}

/// Checks that `task` is the first task of `session` as
/// [`TaskStore::create_session_with_task`] takes them: it names that session.
pub fn check_first_task(session: &NewSession, task: &NewTask) -> Result<()> {
    if task.session_id != session.id {
        return Err(Error::invalid_input(format!(
            "the first task of session {} names session {}",
            session.id, task.session_id
        )));
    }
    Ok(())
}

/// Checks that `change` is what [`TaskStore::claim_task`] takes: to `running`, with a lease.
pub fn check_claim(change: &TaskChange) -> Result<()> {
    if change.status != TaskStatus::Running || change.lease.is_none() {
        return Err(Error::invalid_input(format!(
            "a claim moves a task to running with a lease, not to {}{}",
            change.status,
            if change.lease.is_none() {
                " without a lease"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// One append to a task's log, told by [`TaskStore::change_feed`]: events `first..=last`
/// are in the log of `task_id` (read them with [`TaskStore::read_logs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogChange {
    /// The task whose log grew.
    pub task_id: TaskId,
    /// The seq of the first event appended.
    pub first: u64,
    /// The seq of the last event appended (the log's last seq then).
    pub last: u64,
}

/// What a [`ChangeFeed`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedItem {
    /// A log grew.
    Changed(LogChange),
    /// Changes may have been missed (the store's listener reconnected, or this subscriber
    /// fell behind): a follower reads its log from the last seq it has.
    Gap,
    /// The task's log got its `done` (told right after the [`Changed`](Self::Changed) of
    /// that append): the task is over, whichever server ended it. A server that runs it
    /// stops its run at once.
    Ended(TaskId),
}

/// A subscription to the log changes of every server sharing the store; it ends when the
/// store is dropped.
pub type ChangeFeed = std::pin::Pin<Box<dyn futures_core::Stream<Item = FeedItem> + Send>>;

/// Checks a settings key: 1 to 128 printable ASCII characters, no spaces.
pub fn validate_setting_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid_input(format!(
            "a setting key is 1 to 128 printable ASCII characters without spaces, not {key:?}"
        )));
    }
    Ok(())
}
