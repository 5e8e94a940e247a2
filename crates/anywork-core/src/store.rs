//! [`TaskStore`]: where sessions, tasks and task logs live.

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::{SessionId, TaskId, Timestamp};
use crate::log::{NewTaskLog, TaskLog};
use crate::session::{NewSession, Page, Session, SessionSummary};
use crate::status::TaskStatus;
use crate::task::{NewTask, Task, TaskChange};

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

    /// Renames a session; `NotFound` if unknown.
    async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()>;

    /// Moves `last_active` forward to `at` (never backwards); `NotFound` if unknown.
    async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()>;

    /// Deletes a session with all its tasks and their logs; `NotFound` if unknown.
    async fn delete_session(&self, id: &SessionId) -> Result<()>;

    /// Stores a `pending` task and touches its session. `NotFound` if the session is unknown,
    /// `Conflict` if the task id exists.
    async fn create_task(&self, new: NewTask) -> Result<Task>;

    /// The task with `id`, or `NotFound`.
    async fn get_task(&self, id: TaskId) -> Result<Task>;

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

    /// A session's tasks, oldest first.
    async fn tasks_by_session(&self, session_id: &SessionId, page: Page) -> Result<Vec<Task>>;

    /// Tasks in `status`, oldest first.
    async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>>;

    /// Extends the lease of an active task held by `owner`. `Conflict` if another owner holds
    /// it, it has no lease, or it is no longer active.
    async fn renew_lease(&self, id: TaskId, owner: &str, expires_at: Timestamp) -> Result<()>;

    /// Active tasks whose lease expired at or before `now`, oldest first: the ones a crashed
    /// server left behind.
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>>;

    /// Appends events to a task's log in order and returns the seq of the last one (the
    /// current last seq when `logs` is empty). The store numbers them: the first event of a
    /// task is 1 and seqs have no gaps or duplicates, even with concurrent appenders.
    /// `NotFound` if the task is unknown.
    async fn append_logs(&self, task_id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64>;

    /// Up to `limit` events with seq greater than `after`, in seq order; empty for an unknown
    /// task (callers that must tell the two apart check the task first).
    async fn read_logs(&self, task_id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>>;
}
