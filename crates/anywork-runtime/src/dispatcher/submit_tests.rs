//! What a submit writes: a new session and its first task are one store write; the races
//! around it (a session or an event stored by another request meanwhile) end as before.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anywork_core::{
    Channel, ContainerDriver, ErrorKind, Inbound, InboundRequest, InputKind, InputRequest,
    NewSession, NewTask, NewTaskLog, Page, Result, Session, SessionId, SessionMode, SessionSummary,
    Task, TaskChange, TaskEvent, TaskId, TaskLog, TaskOutcome, TaskRequest, TaskStatus, TaskStore,
    Timestamp, WorkerEndpoint, WorkerInfo,
};
use anywork_store::MemoryStore;

use crate::{Dispatcher, DispatcherConfig, InboundOutcome};

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
    /// The intake writes and the idempotency-key lookups, in order.
    calls: Mutex<Vec<&'static str>>,
    /// `get_session` calls.
    session_reads: AtomicU32,
    /// `get_setting` calls.
    setting_reads: AtomicU32,
    /// `get_setting` fails while set.
    settings_down: std::sync::atomic::AtomicBool,
}

impl Counted {
    fn wrote(&self, what: &'static str) {
        self.writes.lock().unwrap().push(what);
        self.calls.lock().unwrap().push(what);
    }

    /// The intake writes and idempotency-key lookups since the last call, in order.
    fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().unwrap())
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
        self.calls
            .lock()
            .unwrap()
            .push("find_task_by_idempotency_key");
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
    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        self.setting_reads.fetch_add(1, Ordering::SeqCst);
        // A read that takes a while, as a pooled connection's does: other tasks run meanwhile.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        if self.settings_down.load(Ordering::SeqCst) {
            return Err(anywork_core::Error::unavailable(
                "the settings cannot be read",
            ));
        }
        self.inner.get_setting(key).await
    }
    async fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        self.inner.put_setting(key, value).await
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
    dispatcher_with(store, None).await
}

async fn dispatcher_with(store: Arc<Counted>, channel: Option<Arc<Scripted>>) -> Dispatcher {
    let config = DispatcherConfig {
        retry: crate::Backoff::none(),
        reap_every: None,
        ..Default::default()
    };
    let mut builder = Dispatcher::builder(store, Arc::new(NoWorker)).config(config);
    if let Some(channel) = channel {
        builder = builder.channel(channel);
    }
    builder.start().await.unwrap()
}

/// A channel (`hook`) whose requests are scripted: each `parse` gives the next one, as a
/// `Task`; the ids it draws for taken fresh sessions are scripted too.
#[derive(Default)]
struct Scripted {
    requests: Mutex<std::collections::VecDeque<TaskRequest>>,
    fresh: Mutex<std::collections::VecDeque<SessionId>>,
}

impl Scripted {
    fn new(fresh: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            requests: Mutex::default(),
            fresh: Mutex::new(fresh.iter().map(|id| sid(id)).collect()),
        })
    }

    /// `session` named fresh by the channel (`CreateNew`), or `channel_key`'s; with
    /// idempotency key `event`.
    async fn send(
        self: &Arc<Self>,
        d: &Dispatcher,
        session: Option<&str>,
        channel_key: Option<&str>,
        event: Option<&str>,
    ) -> Result<InboundOutcome> {
        let mut r = TaskRequest::new("hook", "hello");
        if let Some(id) = session {
            r.session_id = Some(sid(id));
            r.session_mode = SessionMode::CreateNew;
        }
        r.channel_key = channel_key.map(str::to_owned);
        r.idempotency_key = event.map(str::to_owned);
        self.requests.lock().unwrap().push_back(r);
        d.inbound("hook", InboundRequest::new(Vec::new(), Vec::new()))
            .await
    }

    /// [`send`](Self::send), whose request must be submitted: its task.
    async fn submitted(
        self: &Arc<Self>,
        d: &Dispatcher,
        session: Option<&str>,
        channel_key: Option<&str>,
        event: Option<&str>,
    ) -> Box<crate::Submitted> {
        match self.send(d, session, channel_key, event).await.unwrap() {
            InboundOutcome::Submitted(s) => s,
            other => panic!("not submitted: {other:?}"),
        }
    }
}

#[async_trait::async_trait]
impl Channel for Scripted {
    fn channel_type(&self) -> &str {
        "hook"
    }
    async fn parse(&self, _: InboundRequest) -> Result<Inbound> {
        let next = self.requests.lock().unwrap().pop_front();
        Ok(Inbound::Task(Box::new(next.expect("a scripted request"))))
    }
    fn fresh_session_id(&self) -> Option<SessionId> {
        self.fresh.lock().unwrap().pop_front()
    }
    async fn deliver(&self, _: &Task, _: &TaskOutcome) -> Result<()> {
        Ok(())
    }
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

/// The same event again: nothing is looked up before the write, so its new session and task
/// are refused together and it answers as a duplicate (one lookup after the refusal), with
/// the first task and no session left behind.
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
        let mut again = request(None, SessionMode::Existing, key);
        again.idempotency_key = Some("delivery-1".into());
        let again = d.submit(again).await.unwrap();
        assert!(again.duplicate);
        assert!(!again.session_created);
        assert_eq!(again.task.id, first.task.id);
        assert_eq!(store.take_writes(), vec!["create_session_with_task"]);
    }
    // A lookup that misses the first task (gone meanwhile): the store's refusal is the answer.
    store.hide_events.store(1, Ordering::SeqCst);
    let mut again = request(None, SessionMode::Existing, None);
    again.idempotency_key = Some("delivery-1".into());
    let e = d.submit(again).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
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

/// A session id the channel drew for a request of its own (`CreateNew`) that an existing
/// session has already (8 random hex digits repeat by chance among a few ten thousand
/// sessions: a 409 to a valid request in the intake bench) is drawn again from the channel,
/// and the request stored in a new session of its own; the existing one is not touched. A
/// channel that draws only taken ids is refused (`Conflict`) after a few.
#[tokio::test]
async fn a_fresh_session_id_that_is_taken_is_drawn_again() {
    let store = Arc::new(Counted::default());
    let channel = Scripted::new(&["wh-taken002", "wh-fresh001"]);
    let d = dispatcher_with(store.clone(), Some(channel.clone())).await;
    for id in ["wh-taken001", "wh-taken002"] {
        let taken = NewSession::new("hook").with_id(sid(id));
        store.inner.create_session(taken).await.unwrap();
    }
    let _ = store.take_writes();

    let s = channel.submitted(&d, Some("wh-taken001"), None, None).await;
    assert!(s.session_created && !s.duplicate);
    assert_eq!(s.task.session_id, sid("wh-fresh001"));
    assert_eq!(store.take_writes(), vec!["create_session_with_task"; 3]);
    for id in ["wh-taken001", "wh-taken002"] {
        let tasks = store.tasks_by_session(&sid(id), Page::first(10)).await;
        assert!(tasks.unwrap().is_empty(), "{id} got no task");
    }

    // Every id the channel draws is taken: refused after 3 draws.
    let channel = Scripted::new(&["wh-taken002", "wh-taken001", "wh-taken002", "wh-fresh002"]);
    let d = dispatcher_with(store.clone(), Some(channel.clone())).await;
    let e = channel
        .send(&d, Some("wh-taken001"), None, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(store.take_writes(), vec!["create_session_with_task"; 4]);
    assert_eq!(channel.fresh.lock().unwrap().len(), 1, "3 draws");
    assert_eq!(store.list_sessions(Page::first(10)).await.unwrap().len(), 3);
}

/// An event with a delivery id (`Idempotency-Key`) reads nothing before its write: a new one
/// is stored at once, and a repeated one is refused by the store and answered with the
/// first copy's task (one lookup after the refused write), leaving nothing behind — in a new
/// session of its own and in a session found by its channel key.
#[tokio::test]
async fn a_delivery_id_is_looked_up_only_after_the_store_refused_it() {
    let store = Arc::new(Counted::default());
    let channel = Scripted::new(&[]);
    let d = dispatcher_with(store.clone(), Some(channel.clone())).await;

    let first = channel
        .submitted(&d, Some("wh-a0000001"), None, Some("d-1"))
        .await;
    assert!(!first.duplicate && first.session_created);
    assert_eq!(store.take_calls(), vec!["create_session_with_task"]);
    let again = channel
        .submitted(&d, Some("wh-a0000002"), None, Some("d-1"))
        .await;
    assert!(again.duplicate && !again.session_created);
    assert_eq!(again.task.id, first.task.id);
    assert_eq!(
        store.take_calls(),
        vec!["create_session_with_task", "find_task_by_idempotency_key"]
    );

    // A session found by channel key: the task alone is written, then refused.
    let first = channel
        .submitted(&d, None, Some("o/r#1"), Some("d-2"))
        .await;
    assert_eq!(store.take_calls(), vec!["create_session_with_task"]);
    let next = channel
        .submitted(&d, None, Some("o/r#1"), Some("d-3"))
        .await;
    assert!(!next.duplicate);
    assert_eq!(next.task.session_id, first.task.session_id);
    assert_eq!(store.take_calls(), vec!["create_task"]);
    let again = channel
        .submitted(&d, None, Some("o/r#1"), Some("d-2"))
        .await;
    assert!(again.duplicate);
    assert_eq!(again.task.id, first.task.id);
    assert_eq!(
        store.take_calls(),
        vec!["create_task", "find_task_by_idempotency_key"]
    );
    assert_eq!(store.list_sessions(Page::first(10)).await.unwrap().len(), 2);
    let tasks = store.tasks_by_status(TaskStatus::Pending, Page::first(10));
    assert_eq!(tasks.await.unwrap().len(), 3);
}

/// A repeated event whose session has a task waiting for input (the first copy's own task
/// asked something) gets the first copy's task: it does not answer the question, and
/// nothing is written.
#[tokio::test]
async fn a_repeated_event_does_not_answer_a_waiting_question() {
    let store = Arc::new(Counted::default());
    let channel = Scripted::new(&[]);
    let d = dispatcher_with(store.clone(), Some(channel.clone())).await;
    let first = channel
        .submitted(&d, None, Some("o/r#9"), Some("d-9"))
        .await;
    let id = first.task.id;
    store
        .inner
        .update_task(id, TaskStatus::Pending, TaskChange::to(TaskStatus::Running))
        .await
        .unwrap();
    let question = InputRequest {
        request_id: "q-1".into(),
        kind: InputKind::Question,
        prompt: "Which environment?".into(),
        tool_name: None,
        input: None,
        options: Vec::new(),
    };
    store
        .inner
        .update_task_and_append(
            id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
            vec![NewTaskLog::now(TaskEvent::InputRequired(question))],
        )
        .await
        .unwrap();
    let _ = store.take_calls();

    let again = channel
        .submitted(&d, None, Some("o/r#9"), Some("d-9"))
        .await;
    assert!(again.duplicate);
    assert_eq!(again.task.id, id);
    assert_eq!(store.take_calls(), vec!["find_task_by_idempotency_key"]);
    let task = store.inner.get_task(id).await.unwrap();
    assert_eq!(task.status, TaskStatus::InputRequired, "still waiting");
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

#[tokio::test]
async fn tasks_that_find_the_saved_defaults_stale_together_share_one_read() {
    let store = Arc::new(Counted::default());
    store
        .inner
        .put_setting(crate::WorkspaceDoc::Soul.setting_key(), "be brief")
        .await
        .unwrap();
    let d = dispatcher(store.clone()).await;
    let inner = &d.inner;
    let soul = Some("be brief".to_owned());

    // Eight `/prepare`s at once with nothing read yet: one read of each default, shared.
    let read = futures_util::future::join_all((0..8).map(|_| inner.saved_defaults())).await;
    assert!(
        read.iter().all(|(s, a)| *s == soul && a.is_none()),
        "{read:?}"
    );
    assert_eq!(
        store.setting_reads.load(Ordering::SeqCst),
        2,
        "SOUL.md and AGENTS.md once"
    );

    // Fresh: no read.
    assert_eq!(inner.saved_defaults().await.0, soul);
    assert_eq!(store.setting_reads.load(Ordering::SeqCst), 2);

    // Stale again (a save here): the next eight share one read again, and see the new text.
    d.put_workspace_doc(crate::WorkspaceDoc::Soul, "be thorough")
        .await
        .unwrap();
    let read = futures_util::future::join_all((0..8).map(|_| inner.saved_defaults())).await;
    assert!(
        read.iter()
            .all(|(s, _)| s.as_deref() == Some("be thorough")),
        "{read:?}"
    );
    assert_eq!(store.setting_reads.load(Ordering::SeqCst), 4);

    // A store that cannot be read: the eight share one failed read (the worker's own
    // defaults apply), and the next task tries again.
    store.settings_down.store(true, Ordering::SeqCst);
    d.put_workspace_doc(crate::WorkspaceDoc::Soul, "be kind")
        .await
        .unwrap();
    let read = futures_util::future::join_all((0..8).map(|_| inner.saved_defaults())).await;
    assert!(read.iter().all(|r| *r == (None, None)), "{read:?}");
    assert_eq!(store.setting_reads.load(Ordering::SeqCst), 6);
    store.settings_down.store(false, Ordering::SeqCst);
    assert_eq!(inner.saved_defaults().await.0.as_deref(), Some("be kind"));
    assert_eq!(store.setting_reads.load(Ordering::SeqCst), 8);
}
