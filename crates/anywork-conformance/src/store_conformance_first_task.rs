//! The cases of `create_session_with_task`: a new session and its first task in one write,
//! both or neither.

use anywork_core::{
    ErrorKind, NewSession, NewTask, Page, PushNotification, Session, SessionSummary, Task, TaskId,
    TaskRequest, TaskStatus, Timestamp,
};
use serde_json::json;

use super::{Store, new_session, new_task, sid, uuid_from};

/// A session of channel `github` with key `key` (if any), titled, created at `at`.
fn keyed_session(id: &str, key: Option<&str>, at: i64) -> NewSession {
    NewSession {
        id: sid(id),
        channel_type: "github".into(),
        channel_key: key.map(str::to_owned),
        title: "Fix the build".into(),
        created_at: Timestamp(at),
    }
}

/// A task of channel `github` in `session` with most fields set, created at `at`.
fn rich_task(session: &str, n: u128, at: i64, key: Option<&str>) -> NewTask {
    let mut request = TaskRequest::new("github", "please fix the build — ünïcode ✓");
    request.channel_meta = json!({"repo": "o/r", "issue": 7, "nested": {"a": [1, 2]}});
    request.push_notification = Some(PushNotification::new("https://example.com/hook"));
    request.idempotency_key = key.map(str::to_owned);
    let mut task = NewTask::from_request(sid(session), request);
    task.id = TaskId(uuid_from(n));
    task.created_at = Timestamp(at);
    task
}

/// Everything a reader sees of `session`: the session, its listing row, its tasks.
async fn seen(store: &Store, session: &Session) -> (Session, SessionSummary, Vec<Task>) {
    let stored = store.get_session(&session.id).await.expect("read session");
    let listed = store
        .list_sessions(Page::first(100))
        .await
        .expect("list sessions")
        .into_iter()
        .find(|s| s.session.id == session.id)
        .expect("the session is listed");
    let tasks = store
        .tasks_by_session(&session.id, Page::first(100))
        .await
        .expect("tasks of the session");
    (stored, listed, tasks)
}

/// What [`seen`] read of a session, its ids and keys replaced by those of `to` and its
/// task's by those of `to_task`: to compare two sessions made the two ways.
fn renamed(
    (mut s, mut l, mut tasks): (Session, SessionSummary, Vec<Task>),
    to: &Session,
    to_task: &Task,
) -> (Session, SessionSummary, Vec<Task>) {
    s.id = to.id.clone();
    s.channel_key = to.channel_key.clone();
    l.session = s.clone();
    for t in &mut tasks {
        t.id = to_task.id;
        t.session_id = to.id.clone();
        t.idempotency_key = to_task.idempotency_key.clone();
    }
    (s, l, tasks)
}

/// A session and its first task in one write: both stored, returned as stored, the session
/// touched by the task (`last_active` = the later of the two times), and a reader sees
/// exactly what `create_session` then `create_task` of the same values leave.
pub async fn a_session_and_its_first_task_are_created_together(store: Store) {
    // The task after the session (the usual case), and before it (`last_active` keeps the
    // session's time, as `create_task` never moves it back).
    for (n, (session_at, task_at)) in [(10, 20), (30, 5)].into_iter().enumerate() {
        let n = n as u128 * 10;
        let one = format!("one{n}");
        let two = format!("two{n}");
        let (session, task) = store
            .create_session_with_task(
                keyed_session(&one, Some(&format!("o/r#{n}")), session_at),
                rich_task(&one, n + 1, task_at, Some(&format!("delivery-{n}"))),
            )
            .await
            .expect("create the session with its task");
        assert_eq!(session.id, sid(&one));
        assert_eq!(session.title, "Fix the build");
        assert_eq!(session.created_at, Timestamp(session_at));
        assert_eq!(session.last_active, Timestamp(session_at.max(task_at)));
        assert_eq!(task.session_id, session.id);
        assert_eq!(task.status, TaskStatus::Pending);
        assert_eq!(store.get_session(&session.id).await.unwrap(), session);
        assert_eq!(store.get_task(task.id).await.unwrap(), task);
        assert_eq!(
            store
                .find_session("github", &format!("o/r#{n}"))
                .await
                .unwrap(),
            Some(session.clone())
        );
        assert_eq!(
            store
                .find_task_by_idempotency_key("github", &format!("delivery-{n}"))
                .await
                .unwrap()
                .map(|t| t.id),
            Some(task.id)
        );

        // The same values through the two separate calls.
        let separate = store
            .create_session(keyed_session(&two, Some(&format!("o/r#{n}-b")), session_at))
            .await
            .unwrap();
        store
            .create_task(rich_task(
                &two,
                n + 2,
                task_at,
                Some(&format!("delivery-{n}-b")),
            ))
            .await
            .unwrap();
        let together = seen(&store, &session).await;
        assert_eq!(together.1.task_count, 1);
        assert_eq!(together.1.active_task_count, 1);
        assert_eq!(together.2, vec![task.clone()]);
        assert_eq!(
            together,
            renamed(seen(&store, &separate).await, &session, &task),
            "one write and two leave the same session and task"
        );
    }
    let totals = store.usage_totals().await.unwrap();
    assert_eq!((totals.sessions, totals.tasks), (4, 4));

    // A plain session without a key, with the default title and a minimal task.
    let (session, task) = store
        .create_session_with_task(new_session("plain", 1), new_task("plain", 99, 2))
        .await
        .unwrap();
    assert_eq!(session.channel_key, None);
    assert_eq!(session.last_active, Timestamp(2));
    assert_eq!(store.get_task(task.id).await.unwrap(), task);
}

/// Stored sessions and tasks, to show that a refused write stored nothing.
async fn census(store: &Store) -> (Vec<SessionSummary>, Vec<Task>) {
    let sessions = store.list_sessions(Page::first(100)).await.unwrap();
    let tasks = store
        .tasks_by_status(TaskStatus::Pending, Page::first(100))
        .await
        .unwrap();
    (sessions, tasks)
}

/// The kind of error with which `store` refuses `session` with `task`, after checking that
/// neither is readable (but for the `first` session and task stored before, when reused).
async fn refused(
    store: &Store,
    first: &Session,
    first_task: &Task,
    session: NewSession,
    task: NewTask,
) -> ErrorKind {
    let (sid, tid) = (session.id.clone(), task.id);
    let e = store
        .create_session_with_task(session, task)
        .await
        .expect_err("refused");
    if sid != first.id {
        assert_eq!(
            store.get_session(&sid).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "the session of a refused write is not stored ({e})"
        );
    }
    if tid != first_task.id {
        assert_eq!(
            store.get_task(tid).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "the task of a refused write is not stored ({e})"
        );
    }
    e.kind()
}

/// A refused `create_session_with_task` stores NOTHING, neither the session nor the task:
/// a taken session id, a taken channel key, a taken task id and a duplicate idempotency key
/// are each a `Conflict` (as the separate calls answer), a task that names another session or
/// a bad title are `InvalidInput`. Afterwards the new session's id and key, and the task's
/// id, are still free.
pub async fn a_refused_session_with_its_task_stores_nothing(store: Store) {
    let (first, first_task) = store
        .create_session_with_task(
            keyed_session("first", Some("o/r#1"), 1),
            rich_task("first", 1, 2, Some("delivery-1")),
        )
        .await
        .unwrap();
    let before = census(&store).await;
    let refused = |session, task| refused(&store, &first, &first_task, session, task);

    // The session's id is taken (the task would be new).
    assert_eq!(
        refused(
            keyed_session("first", None, 5),
            rich_task("first", 2, 6, None)
        )
        .await,
        ErrorKind::Conflict
    );
    // Its channel key is taken.
    assert_eq!(
        refused(
            keyed_session("second", Some("o/r#1"), 5),
            rich_task("second", 3, 6, None)
        )
        .await,
        ErrorKind::Conflict
    );
    // The task's idempotency key is taken in its channel (the session would be new).
    assert_eq!(
        refused(
            keyed_session("third", Some("o/r#3"), 5),
            rich_task("third", 4, 6, Some("delivery-1"))
        )
        .await,
        ErrorKind::Conflict
    );
    // The task's id is taken.
    assert_eq!(
        refused(
            keyed_session("fourth", Some("o/r#4"), 5),
            rich_task("fourth", 1, 6, None)
        )
        .await,
        ErrorKind::Conflict
    );
    // The task names another session.
    assert_eq!(
        refused(
            keyed_session("fifth", Some("o/r#5"), 5),
            rich_task("first", 5, 6, None)
        )
        .await,
        ErrorKind::InvalidInput
    );
    // A title no store takes.
    let mut bad = keyed_session("sixth", Some("o/r#6"), 5);
    bad.title = "two\nlines".into();
    assert_eq!(
        refused(bad, rich_task("sixth", 6, 6, None)).await,
        ErrorKind::InvalidInput
    );
    assert_eq!(
        census(&store).await,
        before,
        "refused writes change nothing, not even the first session's last_active"
    );
    assert_eq!(
        store.find_session("github", "o/r#3").await.unwrap(),
        None,
        "a refused session leaves its channel key free"
    );

    // Everything the refused writes would have used is still free.
    for (i, (session, key)) in [("second", "o/r#2"), ("third", "o/r#3"), ("fourth", "o/r#4")]
        .into_iter()
        .enumerate()
    {
        let n = 3 + i as u128;
        store
            .create_session_with_task(
                keyed_session(session, Some(key), 7),
                rich_task(session, n, 8, Some(&format!("delivery-{n}"))),
            )
            .await
            .expect("a free session and task");
    }
    // The same idempotency key in another channel is another key.
    let mut other_channel = new_task("fifth", 6, 8);
    other_channel.idempotency_key = Some("delivery-1".into());
    store
        .create_session_with_task(new_session("fifth", 7), other_channel)
        .await
        .expect("idempotency keys are per channel");
    let totals = store.usage_totals().await.unwrap();
    assert_eq!((totals.sessions, totals.tasks), (5, 5));
}

/// Concurrent writes for one channel key, and for one idempotency key: one of each wins,
/// the others are `Conflict` and leave nothing behind (on SQLite they may share one group
/// commit, where a loser's session must be taken back inside the shared transaction).
pub async fn concurrent_first_tasks_make_one_session_each_key(store: Store) {
    const N: u128 = 8;
    let mut calls = Vec::new();
    for i in 0..N {
        let store = store.clone();
        let id = format!("key-race-{i}");
        calls.push(tokio::spawn(async move {
            store
                .create_session_with_task(
                    keyed_session(&id, Some("o/r#race"), 1),
                    rich_task(&id, 100 + i, 2, None),
                )
                .await
        }));
    }
    for i in 0..N {
        let store = store.clone();
        let id = format!("event-race-{i}");
        calls.push(tokio::spawn(async move {
            store
                .create_session_with_task(
                    keyed_session(&id, Some(&format!("o/r#{i}")), 1),
                    rich_task(&id, 200 + i, 2, Some("the-event")),
                )
                .await
        }));
    }
    let mut won = Vec::new();
    for call in calls {
        match call.await.expect("no panic") {
            Ok((session, task)) => won.push((session, task)),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{e}"),
        }
    }
    assert_eq!(won.len(), 2, "one winner per key: {won:?}");
    let (sessions, tasks) = census(&store).await;
    assert_eq!(
        sessions.len(),
        2,
        "the losers left no session: {sessions:?}"
    );
    assert_eq!(tasks.len(), 2, "the losers left no task");
    for (session, task) in &won {
        assert_eq!(store.get_session(&session.id).await.unwrap(), *session);
        assert_eq!(store.get_task(task.id).await.unwrap(), *task);
    }
}
