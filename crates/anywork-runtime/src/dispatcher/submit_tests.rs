//! What a submit writes: a new session and its first task are one store write; the races
//! around it (a session or an event stored by another request meanwhile) end as before.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anywork_core::{
    ContainerDriver, ErrorKind, NewSession, NewTask, NewTaskLog, Page, Result, Session, SessionId,
    SessionMode, SessionSummary, Task, TaskChange, TaskId, TaskLog, TaskRequest, TaskStatus,
    TaskStore, Timestamp, WorkerEndpoint, WorkerInfo,
};
use anywork_store::MemoryStore;

use crate::{Dispatcher, DispatcherConfig};

/// A memory store that records its intake writes (`create_session`, `create_task`,
/// `create_session_with_task`, refused ones too) and can hide what is stored from the next
/// lookups, as if another request stored it right after they read.
#[derive(Default)]
struct Counted {
    inner: MemoryStore,
    writes: Mutex<Vec<&'static str>>,
    /// Session lookups (`get_session`, `find_session`) still to answer "none".
    hide_sessions: AtomicU32,
    /// Idempotency-key lookups still to answer "none".
    hide_events: AtomicU32,
    /// `get_session` calls.
    session_reads: AtomicU32,
}

impl Counted {
    fn wrote(&self, what: &'static str) {
        self.writes.lock().unwrap().push(what);
    }

    /// The intake writes since the last call.
    fn take_writes(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }

    fn hides(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait::async_trait]
impl TaskStore for Counted {
    async fn create_session(&self, new: NewSession) -> Result<Session> {
        self.wrote("create_session");
        self.inner.create_session(new).await
    }
    async fn create_session_with_task(
        &self,
        session: NewSession,
        task: NewTask,
    ) -> Result<(Session, Task)> {
        self.wrote("create_session_with_task");
        self.inner.create_session_with_task(session, task).await
    }
    async fn create_task(&self, new: NewTask) -> Result<Task> {
        self.wrote("create_task");
        self.inner.create_task(new).await
    }
    async fn get_session(&self, id: &SessionId) -> Result<Session> {
        self.session_reads.fetch_add(1, Ordering::SeqCst);
        if Self::hides(&self.hide_sessions) {
            return Err(anywork_core::Error::not_found(format!(
                "session {id} not found"
            )));
        }
        self.inner.get_session(id).await
    }
    async fn find_session(&self, channel_type: &str, key: &str) -> Result<Option<Session>> {
        if Self::hides(&self.hide_sessions) {
            return Ok(None);
        }
        self.inner.find_session(channel_type, key).await
    }
    async fn find_task_by_idempotency_key(
        &self,
        channel_type: &str,
        key: &str,
    ) -> Result<Option<Task>> {
        if Self::hides(&self.hide_events) {
            return Ok(None);
        }
        self.inner
            .find_task_by_idempotency_key(channel_type, key)
            .await
    }
    async fn list_sessions(&self, page: Page) -> Result<Vec<SessionSummary>> {
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
        self.inner
            .update_task_and_append(id, expected, change, logs)
            .await
    }
    async fn tasks_by_session(&self, id: &SessionId, page: Page) -> Result<Vec<Task>> {
        self.inner.tasks_by_session(id, page).await
    }
    async fn tasks_by_status(&self, status: TaskStatus, page: Page) -> Result<Vec<Task>> {
        self.inner.tasks_by_status(status, page).await
    }
    async fn renew_lease(&self, id: TaskId, owner: &str, until: Timestamp) -> Result<()> {
        self.inner.renew_lease(id, owner, until).await
    }
    async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
        self.inner.expired_leases(now, limit).await
    }
    async fn append_logs(&self, id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
        self.inner.append_logs(id, logs).await
    }
    async fn read_logs(&self, id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
        self.inner.read_logs(id, after, limit).await
    }
}

/// A driver that never gives a worker: submitted tasks stay `pending`, and runs write
/// nothing.
struct NoWorker;

#[async_trait::async_trait]
impl ContainerDriver for NoWorker {
    fn name(&self) -> &str {
        "none"
    }
    async fn get_worker(&self, _: &SessionId) -> Result<WorkerEndpoint> {
        std::future::pending().await
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

async fn dispatcher(store: Arc<Counted>) -> Dispatcher {
    let config = DispatcherConfig {
        retry: crate::Backoff::none(),
        reap_every: None,
        ..Default::default()
    };
    Dispatcher::builder(store, Arc::new(NoWorker))
        .config(config)
        .start()
        .await
        .unwrap()
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn request(session: Option<&str>, mode: SessionMode, key: Option<&str>) -> TaskRequest {
    let mut r = TaskRequest::new("web", "hello");
    r.session_id = session.map(sid);
    r.session_mode = mode;
    r.channel_key = key.map(str::to_owned);
    r
}

/// Each way a request makes a new session — a fresh one, one for a channel key, one with the
/// sender's id (get-or-create, create-new) — stores the session and its task in ONE write;
/// a request that continues a session writes only its task.
#[tokio::test]
async fn a_new_session_and_its_first_task_are_one_store_write() {
    let store = Arc::new(Counted::default());
    let d = dispatcher(store.clone()).await;
    let _ = store.take_writes();
    for (session, mode, key) in [
        (None, SessionMode::Existing, None),
        (None, SessionMode::Existing, Some("o/r#1")),
        (Some("wh-given01"), SessionMode::GetOrCreate, None),
        (Some("wh-fresh001"), SessionMode::CreateNew, None),
    ] {
        let submitted = d.submit(request(session, mode, key)).await.unwrap();
        assert!(submitted.session_created, "{session:?} {key:?}");
        assert_eq!(
            store.take_writes(),
            vec!["create_session_with_task"],
            "one write for a new session and its task ({session:?} {key:?})"
        );
        let task = store.get_task(submitted.task.id).await.unwrap();
        assert_eq!(task.status, TaskStatus::Pending);
        let stored = store.inner.get_session(&task.session_id).await.unwrap();
        assert_eq!(stored.channel_key.as_deref(), key);
        if let Some(id) = session {
            assert_eq!(stored.id, sid(id));
        }
    }
    // Continuing a session: its task only.
    for (session, mode, key) in [
        (None, SessionMode::Existing, Some("o/r#1")),
        (Some("wh-given01"), SessionMode::GetOrCreate, None),
        (Some("wh-given01"), SessionMode::Existing, None),
    ] {
        let submitted = d.submit(request(session, mode, key)).await.unwrap();
        assert!(!submitted.session_created);
        assert_eq!(store.take_writes(), vec!["create_task"]);
    }
    assert_eq!(store.list_sessions(Page::first(10)).await.unwrap().len(), 4);
}

/// Another request creates the session between this request's lookup and its write: the
/// write is refused whole, and the request continues that session with its task alone
/// (by channel key, and by a get-or-create id); a create-new id answers `Conflict` and stores
/// nothing.
#[tokio::test]
async fn a_session_created_meanwhile_is_continued_or_refused() {
    let store = Arc::new(Counted::default());
    let d = dispatcher(store.clone()).await;
    let by_key = NewSession::new("web").with_key("o/r#2".to_owned());
    let by_key = store.inner.create_session(by_key).await.unwrap();
    let by_id = NewSession::new("web").with_id(sid("wh-raced001"));
    let by_id = store.inner.create_session(by_id).await.unwrap();
    let _ = store.take_writes();

    for (session, mode, key, existing) in [
        (None, SessionMode::Existing, Some("o/r#2"), &by_key),
        (Some("wh-raced001"), SessionMode::GetOrCreate, None, &by_id),
    ] {
        store.hide_sessions.store(1, Ordering::SeqCst);
        let submitted = d.submit(request(session, mode, key)).await.unwrap();
        assert!(!submitted.session_created);
        assert_eq!(submitted.task.session_id, existing.id);
        assert_eq!(
            store.take_writes(),
            vec!["create_session_with_task", "create_task"]
        );
        assert_eq!(
            store.get_task(submitted.task.id).await.unwrap().session_id,
            existing.id
        );
    }

    // Create-new: the store's refusal is the answer (the session is not read first).
    let e = d
        .submit(request(Some("wh-raced001"), SessionMode::CreateNew, None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("exists already"), "{e}");
    assert_eq!(store.take_writes(), vec!["create_session_with_task"]);
    let tasks = store
        .tasks_by_session(&by_id.id, Page::first(10))
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "only the get-or-create task: {tasks:?}");
    assert_eq!(store.list_sessions(Page::first(10)).await.unwrap().len(), 2);
}

/// The same event twice at once: the second copy's lookup missed the first's task, so its
/// new session and task are refused together and it answers as a duplicate, with the first
/// task and no session left behind.
#[tokio::test]
async fn an_event_stored_meanwhile_is_a_duplicate_and_leaves_no_session() {
    let store = Arc::new(Counted::default());
    let d = dispatcher(store.clone()).await;
    let mut first = request(None, SessionMode::Existing, None);
    first.idempotency_key = Some("delivery-1".into());
    let first = d.submit(first).await.unwrap();
    assert!(!first.duplicate);
    let _ = store.take_writes();

    for key in [None, Some("o/r#3")] {
        store.hide_events.store(1, Ordering::SeqCst);
        let mut again = request(None, SessionMode::Existing, key);
        again.idempotency_key = Some("delivery-1".into());
        let again = d.submit(again).await.unwrap();
        assert!(again.duplicate);
        assert!(!again.session_created);
        assert_eq!(again.task.id, first.task.id);
        assert_eq!(store.take_writes(), vec!["create_session_with_task"]);
    }
    assert_eq!(
        store.list_sessions(Page::first(10)).await.unwrap().len(),
        1,
        "the copies left no session"
    );
    assert_eq!(
        store
            .tasks_by_status(TaskStatus::Pending, Page::first(10))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A chat in a session its caller knows stored and titled (a WebSocket's session of its last
/// chat) writes its task without reading the session; one deleted since is refused as one
/// that never was (`NotFound`, the same message), with nothing stored and no session made
/// again. `session_titled` tells the caller when it may say it knows the session: not for an
/// untitled one (whose title the submit still makes), not for a duplicate.
#[tokio::test]
async fn a_known_session_is_not_read_and_a_deleted_one_is_refused_as_unknown() {
    let store = Arc::new(Counted::default());
    let d = dispatcher(store.clone()).await;
    let reads = || store.session_reads.load(Ordering::SeqCst);
    let (first, _) = d
        .submit_follow_and_watch_known(request(None, SessionMode::Existing, None), None, false)
        .await
        .unwrap();
    assert!(first.session_created && first.session_titled);
    let session = first.task.session_id.clone();
    let _ = store.take_writes();

    let before = reads();
    let known = request(Some(session.as_str()), SessionMode::Existing, None);
    let (again, _) = d
        .submit_follow_and_watch_known(known.clone(), None, true)
        .await
        .unwrap();
    assert!(!again.session_created && again.session_titled);
    assert_eq!(again.task.session_id, session);
    assert_eq!(store.take_writes(), vec!["create_task"]);
    assert_eq!(reads(), before, "the known session was not read");

    // Not known: read as before.
    let (_, _) = d
        .submit_follow_and_watch_known(known.clone(), None, false)
        .await
        .unwrap();
    assert_eq!(reads(), before + 1);
    // Known is only for a session that must exist: a get-or-create one is read.
    let mut get_or_create = known.clone();
    get_or_create.session_mode = SessionMode::GetOrCreate;
    let (_, _) = d
        .submit_follow_and_watch_known(get_or_create, None, true)
        .await
        .unwrap();
    assert_eq!(reads(), before + 2);
    let _ = store.take_writes();

    // Deleted meanwhile: the answer of an unknown session, and nothing stored.
    let unknown = d
        .submit(request(Some("never-was"), SessionMode::Existing, None))
        .await
        .unwrap_err();
    store.inner.delete_session(&session).await.unwrap();
    let tasks = |status| {
        let store = store.clone();
        async move {
            store
                .tasks_by_status(status, Page::first(100))
                .await
                .unwrap()
                .len()
        }
    };
    let pending = tasks(TaskStatus::Pending).await;
    let refused = d
        .submit_follow_and_watch_known(known.clone(), None, true)
        .await
        .err()
        .expect("a chat in a deleted session is refused");
    assert_eq!(refused.kind(), ErrorKind::NotFound);
    assert_eq!(
        refused.message(),
        unknown.message().replace("never-was", session.as_str())
    );
    assert_eq!(
        store.take_writes(),
        vec!["create_task"],
        "only the refused create"
    );
    assert_eq!(tasks(TaskStatus::Pending).await, pending);
    assert_eq!(
        store.inner.get_session(&session).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // An untitled session: the caller is told, so that it reads the session next time.
    let (untitled, _) = d
        .submit_follow_and_watch_known(request(None, SessionMode::Existing, None), None, false)
        .await
        .unwrap();
    store
        .inner
        .set_session_title(&untitled.task.session_id, NewSession::DEFAULT_TITLE)
        .await
        .unwrap();
    let (next, _) = d
        .submit_follow_and_watch_known(
            request(
                Some(untitled.task.session_id.as_str()),
                SessionMode::Existing,
                None,
            ),
            None,
            false,
        )
        .await
        .unwrap();
    assert!(!next.session_titled);
}
