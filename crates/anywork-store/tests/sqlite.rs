//! The conformance suite on [`SqliteStore`], each case on a fresh database file.

use anywork_core::TaskStore;
use anywork_store::SqliteStore;
use anywork_test::store_conformance::Fresh;

async fn fresh() -> Fresh {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open_in_dir(dir.path())
        .await
        .expect("open SQLite");
    Fresh::new(store).keeping(dir)
}

anywork_test::store_conformance_tests!(fresh);

#[tokio::test]
async fn data_survives_reopening_the_file() {
    use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskRequest};
    let dir = tempfile::tempdir().unwrap();
    let session = NewSession::new("webchat");
    let task = NewTask::from_request(session.id.clone(), TaskRequest::new("webchat", "hi"));
    {
        let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
        store.create_session(session.clone()).await.unwrap();
        store.create_task(task.clone()).await.unwrap();
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("kept"))])
            .await
            .unwrap();
    }
    // Reopening runs the migrations again: they must be a no-op on an up-to-date file.
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    assert_eq!(store.get_task(task.id).await.unwrap().message, "hi");
    let logs = store.read_logs(task.id, 0, 10).await.unwrap();
    assert_eq!(logs[0].event, TaskEvent::text("kept"));
    assert!(dir.path().join("anywork.db").exists());
}

#[tokio::test]
async fn unwritable_directory_is_a_clear_error() {
    let err = SqliteStore::open_in_dir("/proc/anywork-cannot-be-here")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DB_DIR"), "{err}");
}

#[tokio::test]
async fn connect_picks_the_store_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let store = anywork_store::connect(&url).await.unwrap();
    store
        .create_session(anywork_core::NewSession::new("webchat"))
        .await
        .unwrap();
    anywork_store::connect("memory:").await.unwrap();
    anywork_store::connect("sqlite::memory:").await.unwrap();
    let err = anywork_store::connect("mysql://x").await.err().unwrap();
    assert_eq!(err.kind(), anywork_core::ErrorKind::InvalidInput);
}

/// A store in a new folder whose database refuses, on demand, one kind of log row (a trigger
/// aborts the insert of a [`boom`] event), with a session and `n` pending tasks in it; the
/// folder (kept while the test runs), the store and the tasks.
async fn store_refusing_boom(
    n: usize,
) -> (tempfile::TempDir, SqliteStore, Vec<anywork_core::TaskId>) {
    use anywork_core::{NewSession, NewTask, TaskRequest};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    let admin = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join(SqliteStore::FILE_NAME).display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON task_logs WHEN NEW.type = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'boom is refused'); END",
    )
    .execute(&admin)
    .await
    .unwrap();
    let session = store.create_session(NewSession::new("web")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..n {
        let new = NewTask::from_request(
            session.id.clone(),
            TaskRequest::new("web", format!("task {i}")),
        );
        tasks.push(store.create_task(new).await.unwrap().id);
    }
    (dir, store, tasks)
}

/// The event whose log row [`store_refusing_boom`]'s database refuses.
fn boom() -> anywork_core::TaskEvent {
    anywork_core::TaskEvent::Other(anywork_core::WireEvent {
        kind: "boom".into(),
        content: String::new(),
        metadata: serde_json::json!({}),
    })
}

/// Writes that queue together share one transaction (group commit). One that fails its own
/// checks fails alone; one the database refuses spoils the shared transaction, which is then
/// rolled back and redone write by write, so that it still fails alone and every other write
/// lands exactly once.
#[tokio::test]
async fn writes_committed_together_still_fail_alone() {
    use anywork_core::{ErrorKind, NewTaskLog, TaskChange, TaskEvent, TaskId, TaskStatus};
    let (_dir, store, tasks) = store_refusing_boom(12).await;
    let boom = boom();
    // Started together on this single-threaded runtime, they all queue before the writer
    // runs, so they form one group.
    let (store_ref, boom) = (&store, &boom);
    let writes = tasks.iter().enumerate().map(|(i, &id)| async move {
        match i {
            0 => store_ref
                .append_logs(id, vec![NewTaskLog::now(boom.clone())])
                .await
                .map(|_| ()),
            1 => store_ref
                .append_logs(
                    TaskId::generate(),
                    vec![NewTaskLog::now(TaskEvent::text("x"))],
                )
                .await
                .map(|_| ()),
            2 => store_ref
                .update_task(
                    id,
                    TaskStatus::Running,
                    TaskChange::to(TaskStatus::Completed),
                )
                .await
                .map(|_| ()),
            3 => store_ref
                .update_task_and_append(
                    id,
                    TaskStatus::Pending,
                    TaskChange::to(TaskStatus::Running),
                    vec![NewTaskLog::now(TaskEvent::text("started"))],
                )
                .await
                .map(|_| ()),
            _ => store_ref
                .append_logs(id, vec![NewTaskLog::now(TaskEvent::text(format!("t{i}")))])
                .await
                .map(|_| ()),
        }
    });
    let results = futures_util::future::join_all(writes).await;

    let kind = |i: usize| results[i].as_ref().err().map(|e| e.kind());
    assert_eq!(kind(0), Some(ErrorKind::Storage), "{:?}", results[0]);
    assert_eq!(kind(1), Some(ErrorKind::NotFound));
    assert_eq!(kind(2), Some(ErrorKind::Conflict));
    for (i, r) in results.iter().enumerate().skip(3) {
        assert!(r.is_ok(), "write {i} failed: {r:?}");
    }
    // Nothing of the failed writes landed; everything else landed once.
    assert!(store.read_logs(tasks[0], 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store.get_task(tasks[2]).await.unwrap().status,
        TaskStatus::Pending
    );
    assert_eq!(
        store.get_task(tasks[3]).await.unwrap().status,
        TaskStatus::Running
    );
    for (i, &id) in tasks.iter().enumerate().skip(3) {
        let logs = store.read_logs(id, 0, 10).await.unwrap();
        assert_eq!(logs.len(), 1, "task {i}: {logs:?}");
        assert_eq!(logs[0].seq, 1);
    }
}

/// An idle writer closes its connection (giving its page cache back), and the next write
/// opens a new one: nothing written before or after is lost.
#[tokio::test]
async fn an_idle_writer_closes_its_connection_and_the_next_write_reopens_it() {
    use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskRequest};
    use std::time::Duration;

    async fn closes_after(store: &SqliteStore, before: u64) -> u64 {
        // Waits for the close; a writer that never closes fails after 30 s, not sooner.
        for _ in 0..600 {
            let now = store
                .writer_stats()
                .expect("a file has a writer")
                .idle_closes;
            if now > before {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the idle writer never closed its connection");
    }

    let (dir, store, session) = idle_closing_store(Duration::from_millis(100)).await;
    let closes = closes_after(&store, 0).await;

    // The write after the close reopens the connection.
    let task = NewTask::from_request(session.id.clone(), TaskRequest::new("webchat", "later"));
    store.create_task(task.clone()).await.unwrap();
    store
        .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("after"))])
        .await
        .unwrap();
    assert_eq!(store.get_task(task.id).await.unwrap().message, "later");
    assert_eq!(
        store.read_logs(task.id, 0, 10).await.unwrap()[0].event,
        TaskEvent::text("after")
    );
    // It closes again once idle; a closed writer waits for work without closing again.
    let again = closes_after(&store, closes).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.writer_stats().unwrap().idle_closes, again);

    // A store with the default setting keeps its writer open through a short pause.
    let other = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    other
        .create_session(NewSession::new("webchat"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(other.writer_stats().unwrap().idle_closes, 0);
}

/// A store in a temporary directory whose connections close after `idle_close` at rest, with
/// one session stored.
async fn idle_closing_store(
    idle_close: std::time::Duration,
) -> (tempfile::TempDir, SqliteStore, anywork_core::NewSession) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(
        dir.path().join("idle.db"),
        anywork_store::SqliteOptions::default().idle_close(idle_close),
    )
    .await
    .unwrap();
    let session = anywork_core::NewSession::new("webchat");
    store.create_session(session.clone()).await.unwrap();
    (dir, store, session)
}

/// An idle store holds no read connection: the background checkpoint skips its turns once it
/// has copied the whole WAL and nothing was written since, so the pool's connections close
/// after `idle_close`; the next read opens one, the next write brings the checkpoints back.
#[tokio::test]
async fn an_idle_store_closes_its_read_connections_and_stops_checkpointing() {
    use anywork_core::{NewTask, TaskRequest};
    use std::time::Duration;

    let (_dir, store, session) = idle_closing_store(Duration::from_millis(300)).await;
    assert_eq!(store.get_session(&session.id).await.unwrap().id, session.id);
    // The session's insert is checkpointed once, then the connections close (within 30 s,
    // or the test fails then, not sooner).
    let mut open = store.open_read_connections();
    for _ in 0..600 {
        if open == 0 && store.writer_stats().unwrap().background_checkpoints > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        open = store.open_read_connections();
    }
    assert_eq!(open, 0, "read connections still open on an idle store");
    // Three checkpoint periods with nothing written: no checkpoint ran.
    let before = store.writer_stats().unwrap().background_checkpoints;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(store.writer_stats().unwrap().background_checkpoints, before);
    assert_eq!(store.open_read_connections(), 0);

    // A read opens a connection again; a write brings the checkpoints back.
    assert_eq!(store.get_session(&session.id).await.unwrap().id, session.id);
    let task = NewTask::from_request(session.id.clone(), TaskRequest::new("webchat", "later"));
    store.create_task(task.clone()).await.unwrap();
    let mut now = before;
    for _ in 0..600 {
        now = store.writer_stats().unwrap().background_checkpoints;
        if now > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(now > before, "no checkpoint after a write");
    assert_eq!(store.get_task(task.id).await.unwrap().message, "later");
}

/// A read connection closes within `idle_close` of its last use, so that a server at rest
/// is down to no connection one `idle_close` after its last read: the pool looks at its idle
/// connections every `idle_close / 2` and closes those unused for that long. (When its idle
/// timeout was `idle_close` itself, it looked only every `idle_close`, and a connection last
/// used just after a look stayed open for nearly twice that: 7.4 s here.)
#[tokio::test]
async fn a_read_connection_closes_within_idle_close_of_its_last_use() {
    use std::time::{Duration, Instant};

    let idle_close = Duration::from_secs(4);
    let (_dir, store, session) = idle_closing_store(idle_close).await;
    // The session's insert brings one background checkpoint (on a read connection, 0.5 s
    // after the store opened and the pool first looked); then none, since nothing changes.
    for _ in 0..600 {
        if store.writer_stats().unwrap().background_checkpoints > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.get_session(&session.id).await.unwrap().id, session.id);
    let last_use = Instant::now();
    assert!(store.open_read_connections() > 0);
    // A quarter of `idle_close` to spare for a slow machine.
    let deadline = idle_close + idle_close / 4;
    while store.open_read_connections() > 0 && last_use.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.open_read_connections(),
        0,
        "a read connection still open {:?} after its last use (idle_close {idle_close:?})",
        last_use.elapsed()
    );
}

/// What a server reads on its own (tasks by status at start and for the reaper, the looks
/// for work, the outbox's and retention's looks, the store's size) goes to one connection,
/// one read after another or several at once. Before, a read right after another found the
/// first connection not yet back in the pool (it is pinged first) and opened another, with a
/// thread of its own: three at a server's start.
#[tokio::test]
async fn the_servers_own_reads_share_one_connection() {
    use anywork_core::{Page, TaskStatus, Timestamp};
    use std::time::Duration;

    let (_dir, store, _session) = idle_closing_store(Duration::from_secs(30)).await;
    let page = Page {
        limit: 500,
        offset: 0,
    };
    let now = Timestamp::now();
    // Start-up's reads of tasks by status, one after another.
    let none_by_status = async |statuses: &[TaskStatus]| {
        for status in statuses {
            assert!(
                store
                    .tasks_by_status(*status, page)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    };
    none_by_status(&[
        TaskStatus::Running,
        TaskStatus::InputRequired,
        TaskStatus::Pending,
    ])
    .await;
    assert!(store.expired_leases(now, 100).await.unwrap().is_empty());
    let until = Timestamp(now.0 + 60_000);
    let (claimed, deleted, size, claimable) = tokio::join!(
        store.claim_deliveries("srv", now, until, 16),
        store.delete_settled_deliveries(now, 200),
        store.store_size(),
        store.claimable(200),
    );
    assert!(claimed.unwrap().is_empty());
    assert_eq!(deleted.unwrap(), 0);
    assert!(size.unwrap().unwrap().bytes > 0);
    assert!(claimable.unwrap().is_empty());
    none_by_status(&[TaskStatus::Running, TaskStatus::Pending]).await;
    assert_eq!(store.open_read_connections(), 1);
}

/// What an idle server polls (claimable tasks, due deliveries, expired leases, settled
/// deliveries, the store's size) finds nothing, and is not read or written again while
/// nothing changes (the readiness heartbeat aside), however late it asks: the read
/// connections and the writer's stay closed. The first write of a row brings the looks back.
#[tokio::test]
async fn an_idle_servers_polls_touch_the_store_once_until_something_changes() {
    use anywork_core::{NewTask, TaskRequest, Timestamp};
    use std::time::Duration;

    async fn poll(store: &SqliteStore, now: i64) -> (usize, usize, usize, u64) {
        let (now, until) = (Timestamp(now), Timestamp(now + 60_000));
        assert!(store.store_size().await.unwrap().unwrap().bytes > 0);
        (
            store.claimable(200).await.unwrap().len(),
            store
                .claim_deliveries("srv", now, until, 16)
                .await
                .unwrap()
                .len(),
            store.expired_leases(now, 100).await.unwrap().len(),
            store.delete_settled_deliveries(now, 200).await.unwrap(),
        )
    }

    let (_dir, store, session) = idle_closing_store(Duration::from_millis(300)).await;
    assert_eq!(poll(&store, Timestamp::now().0).await, (0, 0, 0, 0));
    // A readiness check (each `/api/health`) writes its heartbeat only: no look is due again.
    store.check_ready().await.unwrap();
    // Every connection closes (within 30 s, or the test fails then).
    for _ in 0..600 {
        let idle_closes = store.writer_stats().unwrap().idle_closes;
        if store.open_read_connections() == 0 && idle_closes > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.open_read_connections(), 0);
    let before = store.writer_stats().unwrap();
    assert!(
        before.idle_closes > 0,
        "the writer's connection stayed open"
    );
    // The same looks, a day later: nothing read (a read leaves its connection open for
    // `idle_close`), nothing sent to the writer.
    let day = 86_400_000;
    assert_eq!(poll(&store, Timestamp::now().0 + day).await, (0, 0, 0, 0));
    assert_eq!(
        store.open_read_connections(),
        0,
        "an idle look read the store"
    );
    let after = store.writer_stats().unwrap();
    assert_eq!(after.writes, before.writes, "an idle look wrote");
    assert_eq!(after.idle_closes, before.idle_closes);

    let task = NewTask::from_request(session.id.clone(), TaskRequest::new("webchat", "hi"));
    store.create_task(task.clone()).await.unwrap();
    let claimable = store.claimable(200).await.unwrap();
    assert_eq!(
        claimable.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![task.id]
    );
    assert!(store.open_read_connections() > 0);
}

/// A write's last statement goes to SQLite with the `COMMIT` (nothing waits for its result): a
/// refusal there still fails that write alone, whether it ends a group of writes or runs on
/// its own, and the writer goes on working.
#[tokio::test]
async fn a_write_refused_at_its_last_statement_still_fails_alone() {
    use anywork_core::{ErrorKind, NewTaskLog, TaskEvent};
    let (_dir, store, tasks) = store_refusing_boom(6).await;
    let boom = || NewTaskLog::now(boom());
    // One group (queued together on this single-threaded runtime), the refused write last.
    let store_ref = &store;
    let writes = tasks.iter().enumerate().map(|(i, &id)| async move {
        let log = if i == 5 {
            boom()
        } else {
            NewTaskLog::now(TaskEvent::text(format!("t{i}")))
        };
        store_ref.append_logs(id, vec![log]).await
    });
    let results = futures_util::future::join_all(writes).await;
    for (i, r) in results.iter().enumerate().take(5) {
        assert_eq!(r.as_ref().ok(), Some(&1), "write {i}: {r:?}");
    }
    let refused = results[5].as_ref().unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Storage, "{refused:?}");
    assert!(refused.message().contains("append logs"), "{refused:?}");
    // Alone: refused again; the next write of the task lands with the first seq (the refused
    // ones reserved none).
    let alone = store.append_logs(tasks[5], vec![boom()]).await.unwrap_err();
    assert_eq!(alone.kind(), ErrorKind::Storage, "{alone:?}");
    let text = NewTaskLog::now(TaskEvent::text("after"));
    assert_eq!(store.append_logs(tasks[5], vec![text]).await.unwrap(), 1);
    for (i, &id) in tasks.iter().enumerate() {
        let logs = store.read_logs(id, 0, 10).await.unwrap();
        assert_eq!(logs.len(), 1, "task {i}: {logs:?}");
        assert_eq!(logs[0].seq, 1);
    }
}

/// SQLite reads a task's new `last_seq` back with a `SELECT … AND changes() = 1` after its
/// `UPDATE` rather than with `RETURNING`: a compare-and-set that matches no row reads nothing
/// back (and reserves no seq), even in a group where the write before it changed a row.
#[tokio::test]
async fn a_refused_compare_and_set_reads_no_seq_back_in_a_group() {
    use anywork_core::{ErrorKind, NewTaskLog, TaskChange, TaskEvent, TaskStatus};
    let (_dir, store, tasks) = store_refusing_boom(4).await;
    let logs = |n: usize| -> Vec<NewTaskLog> {
        (0..n)
            .map(|i| NewTaskLog::now(TaskEvent::text(format!("e{i}"))))
            .collect()
    };
    let start = |expected| (expected, TaskChange::to(TaskStatus::Running));
    let store_ref = &store;
    let writes = tasks.iter().enumerate().map(|(i, &id)| async move {
        match i {
            // Task 1 is pending, not running: refused, right after task 0's write.
            1 => {
                let (expected, change) = start(TaskStatus::Running);
                store_ref
                    .update_task_and_append(id, expected, change, logs(1))
                    .await
                    .map(|(_, last)| last)
            }
            2 => store_ref.append_logs(id, logs(3)).await,
            _ => {
                let (expected, change) = start(TaskStatus::Pending);
                store_ref
                    .update_task_and_append(id, expected, change, logs(i + 1))
                    .await
                    .map(|(_, last)| last)
            }
        }
    });
    let results = futures_util::future::join_all(writes).await;
    let last = |i: usize| results[i].as_ref().copied();
    assert_eq!(last(0).ok(), Some(1), "{:?}", results[0]);
    let refused = last(1).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Conflict, "{refused:?}");
    assert_eq!(last(2).ok(), Some(3), "{:?}", results[2]);
    assert_eq!(last(3).ok(), Some(4), "{:?}", results[3]);
    // The refused task wrote nothing and reserved no seq.
    let task1 = store.get_task(tasks[1]).await.unwrap();
    assert_eq!(task1.status, TaskStatus::Pending);
    assert!(store.read_logs(tasks[1], 0, 10).await.unwrap().is_empty());
    let (task1, last) = store
        .update_task_and_append(
            tasks[1],
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
            logs(2),
        )
        .await
        .unwrap();
    assert_eq!((task1.status, last), (TaskStatus::Running, 2));
    let seqs: Vec<u64> = store
        .read_logs(tasks[1], 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
}

/// A write of more log rows than one insert takes (1,000) sends them in several inserts, each
/// held back until the next goes, the last with the `COMMIT`: every row lands once, in order,
/// alone and in a group.
#[tokio::test]
async fn writes_of_many_log_rows_land_whole() {
    use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskRequest};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    let session = store.create_session(NewSession::new("web")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let new = NewTask::from_request(
            session.id.clone(),
            TaskRequest::new("web", format!("task {i}")),
        );
        tasks.push(store.create_task(new).await.unwrap().id);
    }
    let logs = |n: usize| {
        (0..n)
            .map(|i| NewTaskLog::now(TaskEvent::text(format!("line {i}"))))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store.append_logs(tasks[0], logs(2_500)).await.unwrap(),
        2_500
    );
    let store_ref = &store;
    let sizes = [1_500, 1_001];
    let writes = tasks[1..]
        .iter()
        .zip(sizes)
        .map(|(&id, n)| async move { store_ref.append_logs(id, logs(n)).await });
    let results = futures_util::future::join_all(writes).await;
    assert_eq!(results[0].as_ref().ok(), Some(&1_500), "{results:?}");
    assert_eq!(results[1].as_ref().ok(), Some(&1_001), "{results:?}");
    for (&id, n) in tasks.iter().zip([2_500, 1_500, 1_001]) {
        let read = store.read_logs(id, 0, 5_000).await.unwrap();
        assert_eq!(read.len(), n);
        for (i, log) in read.iter().enumerate() {
            assert_eq!(log.seq, i as u64 + 1);
            assert_eq!(log.event, TaskEvent::text(format!("line {i}")));
        }
    }
}

/// A lean status change with a few events inserts them in the call of its `UPDATE` (their
/// seqs counted back from the `last_seq` it set), and only if the `UPDATE` changed the task:
/// in one group, a refused compare-and-set right after a write that changed a row inserts
/// none of its events; the others get their events in order, gap-free, a long batch (more
/// than go with the `UPDATE`) too.
#[tokio::test]
async fn a_lean_change_inserts_its_events_only_if_it_changed_the_task() {
    use anywork_core::{NewTaskLog, TaskChange, TaskEvent, TaskStatus};
    let (_dir, store, tasks) = store_refusing_boom(4).await;
    let logs = |n: usize| -> Vec<NewTaskLog> {
        (0..n)
            .map(|i| NewTaskLog::now(TaskEvent::text(format!("e{i}"))))
            .collect()
    };
    let store_ref = &store;
    let sizes = [1, 2, 4, 6];
    let writes = tasks.iter().zip(sizes).enumerate().map(|(i, (&id, n))| {
        // Task 1 is pending, not running: refused, right after task 0's write.
        let expected = if i == 1 {
            TaskStatus::Running
        } else {
            TaskStatus::Pending
        };
        let change = TaskChange::to(TaskStatus::Running);
        async move {
            store_ref
                .update_task_lean(id, expected, change, logs(n), Vec::new())
                .await
        }
    });
    let results = futures_util::future::join_all(writes).await;
    assert_eq!(results[0].as_ref().ok(), Some(&1), "{:?}", results[0]);
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert_eq!(results[2].as_ref().ok(), Some(&4), "{:?}", results[2]);
    assert_eq!(results[3].as_ref().ok(), Some(&6), "{:?}", results[3]);
    let task1 = store.get_task(tasks[1]).await.unwrap();
    assert_eq!(task1.status, TaskStatus::Pending);
    assert!(store.read_logs(tasks[1], 0, 10).await.unwrap().is_empty());
    let again = store
        .update_task_lean(
            tasks[1],
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
            logs(2),
            Vec::new(),
        )
        .await;
    assert_eq!(again.ok(), Some(2), "no seq was reserved by the refusal");
    for (i, n) in [(0, 1), (1, 2), (2, 4), (3, 6)] {
        let read = store.read_logs(tasks[i], 0, 10).await.unwrap();
        let got: Vec<(u64, TaskEvent)> = read.into_iter().map(|l| (l.seq, l.event)).collect();
        let want: Vec<(u64, TaskEvent)> = (0..n)
            .map(|k| (k as u64 + 1, TaskEvent::text(format!("e{k}"))))
            .collect();
        assert_eq!(got, want, "task {i}");
        let task = store.get_task(tasks[i]).await.unwrap();
        assert_eq!(task.status, TaskStatus::Running);
    }
}

/// A claim: `running` now, on worker `w-1`, leased by `srv-1` for a minute.
fn claim() -> anywork_core::TaskChange {
    use anywork_core::{TaskChange, TaskStatus, Timestamp};
    let now = Timestamp::now();
    TaskChange::to(TaskStatus::Running)
        .at(now)
        .worker("w-1")
        .lease("srv-1", now.plus_millis(60_000))
}

/// At one session each write of a chat is one call to SQLite's connection thread (a message
/// to that thread and a wake-up of it, and one back): the new task stored, its session
/// touched and the task claimed with its `running` event, `BEGIN` to `COMMIT`, in one; its
/// end with its events and the `COMMIT` in one. A new task that must wait (another runs) is
/// one call too, stored pending with no event.
#[tokio::test]
async fn each_write_of_a_chat_alone_is_one_call_to_sqlites_thread() {
    use anywork_core::{
        NewSession, NewTask, NewTaskLog, TaskChange, TaskEvent, TaskRequest, TaskStatus, Timestamp,
    };
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    let session = store.create_session(NewSession::new("web")).await.unwrap();
    let calls = |store: &SqliteStore| store.writer_stats().unwrap().calls;
    let status = |status| NewTaskLog::now(TaskEvent::Status { status });
    let chat =
        |text: &str| NewTask::from_request(session.id.clone(), TaskRequest::new("web", text));
    let running = || vec![status(TaskStatus::Running)];
    let create_claimed =
        |text: &str| store.create_task_claimed(chat(text), claim(), running(), Vec::new());

    let before = calls(&store);
    let (first, last) = create_claimed("one").await.unwrap();
    assert_eq!((first.status, last), (TaskStatus::Running, Some(1)));
    assert_eq!(calls(&store) - before, 1, "create, touch and claim");

    let before = calls(&store);
    let (second, last) = create_claimed("two").await.unwrap();
    assert_eq!((second.status, last), (TaskStatus::Pending, None));
    assert_eq!(
        calls(&store) - before,
        1,
        "create and touch, the claim refused"
    );
    assert!(store.read_logs(second.id, 0, 10).await.unwrap().is_empty());

    let before = calls(&store);
    let done = TaskChange::to(TaskStatus::Completed).at(Timestamp::now());
    let events = vec![
        NewTaskLog::now(TaskEvent::text("hello")),
        status(TaskStatus::Completed),
    ];
    let last = store
        .update_task_lean(first.id, TaskStatus::Running, done, events, Vec::new())
        .await
        .unwrap();
    assert_eq!(last, 3);
    assert_eq!(calls(&store) - before, 1, "the end with its events");

    let stored = store.get_task(first.id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::Completed);
    assert_eq!(stored.worker_id.as_deref(), Some("w-1"));
    let logs: Vec<(u64, TaskEvent)> = store
        .read_logs(first.id, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.seq, l.event))
        .collect();
    assert_eq!(
        logs,
        [
            (
                1,
                TaskEvent::Status {
                    status: TaskStatus::Running
                }
            ),
            (2, TaskEvent::text("hello")),
            (
                3,
                TaskEvent::Status {
                    status: TaskStatus::Completed
                }
            ),
        ]
    );
    // Its end lets the second start.
    let claimed = store
        .claim_task_lean(second.id, claim(), running(), Vec::new())
        .await
        .unwrap();
    assert!(
        matches!(claimed, anywork_core::Claim::Claimed((), 1)),
        "{claimed:?}"
    );
}

/// A group of writes commits with its last write's last call. When that write's
/// compare-and-set did not apply (a claim that is not its session's turn), what it reads and
/// answers after runs in a transaction of its own: the group's other writes land once, and
/// the answer is as alone (busy, with the task the group just started).
#[tokio::test]
async fn a_group_committed_with_its_last_call_keeps_its_writes_when_that_write_then_reads() {
    use anywork_core::{Claim, NewTaskLog, TaskEvent, TaskStatus};
    let (_dir, store, tasks) = store_refusing_boom(3).await;
    let running = || {
        vec![NewTaskLog::now(TaskEvent::Status {
            status: TaskStatus::Running,
        })]
    };
    let store_ref = &store;
    // One group (queued together on this single-threaded runtime): the first task claimed,
    // a log appended to the third, the second task's claim (not its turn) last.
    let (first, appended, second) = futures_util::join!(
        store_ref.claim_task_lean(tasks[0], claim(), running(), Vec::new()),
        store_ref.append_logs(tasks[2], vec![NewTaskLog::now(TaskEvent::text("x"))]),
        store_ref.claim_task_lean(tasks[1], claim(), running(), Vec::new()),
    );
    assert!(matches!(first, Ok(Claim::Claimed((), 1))), "{first:?}");
    assert_eq!(appended.ok(), Some(1));
    match second {
        Ok(Claim::Busy(busy)) => {
            assert_eq!(busy.id, tasks[0]);
            assert_eq!(busy.status, TaskStatus::Running);
        }
        other => panic!("{other:?}"),
    }
    let batches = store.writer_stats().unwrap().batches;
    assert_eq!(
        store.task_status(tasks[0]).await.unwrap(),
        TaskStatus::Running
    );
    assert_eq!(
        store.task_status(tasks[1]).await.unwrap(),
        TaskStatus::Pending
    );
    for (id, n) in [(tasks[0], 1), (tasks[1], 0), (tasks[2], 1)] {
        assert_eq!(store.read_logs(id, 0, 10).await.unwrap().len(), n);
    }
    // Nothing is left open: the next write commits.
    store
        .append_logs(tasks[2], vec![NewTaskLog::now(TaskEvent::text("y"))])
        .await
        .unwrap();
    assert_eq!(store.writer_stats().unwrap().batches, batches + 1);
    assert_eq!(store.read_logs(tasks[2], 0, 10).await.unwrap().len(), 2);
}

/// A new task stored claimed in its create's call takes the first seqs of its log (1 to the
/// number of its events) without reading them back, and its events only when its claim
/// applied: in one group after a write that changed a row, a claimed create gets its four
/// events as seqs 1–4 and answers 4, one that must wait (its session busy) stores none and
/// reserves none, and a third gets its two; later appends go on after them.
#[tokio::test]
async fn a_task_created_claimed_in_a_group_takes_the_first_seqs_of_its_log() {
    use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskRequest, TaskStatus};
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(store.create_session(NewSession::new("web")).await.unwrap());
    }
    let chat =
        |i: usize| NewTask::from_request(sessions[i].id.clone(), TaskRequest::new("web", "hi"));
    let logs = |n: usize| -> Vec<NewTaskLog> {
        (0..n)
            .map(|k| NewTaskLog::now(TaskEvent::text(format!("e{k}"))))
            .collect()
    };
    let (busy, last) = store
        .create_task_claimed(chat(1), claim(), logs(1), Vec::new())
        .await
        .unwrap();
    assert_eq!((busy.status, last), (TaskStatus::Running, Some(1)));
    let store_ref = &store;
    let batches = store.writer_stats().unwrap().batches;
    // One group (queued together on this single-threaded runtime).
    let (appended, first, waits, second) = futures_util::join!(
        store_ref.append_logs(busy.id, logs(1)),
        store_ref.create_task_claimed(chat(0), claim(), logs(4), Vec::new()),
        store_ref.create_task_claimed(chat(1), claim(), logs(3), Vec::new()),
        store_ref.create_task_claimed(chat(2), claim(), logs(2), Vec::new()),
    );
    assert_eq!(
        store.writer_stats().unwrap().batches,
        batches + 1,
        "one group"
    );
    assert_eq!(appended.ok(), Some(2));
    let (first, last) = first.unwrap();
    assert_eq!((first.status, last), (TaskStatus::Running, Some(4)));
    let (waits, last) = waits.unwrap();
    assert_eq!((waits.status, last), (TaskStatus::Pending, None));
    let (second, last) = second.unwrap();
    assert_eq!((second.status, last), (TaskStatus::Running, Some(2)));
    assert!(store.read_logs(waits.id, 0, 10).await.unwrap().is_empty());
    for (id, n) in [(first.id, 4), (second.id, 2)] {
        let stored = store.get_task(id).await.unwrap();
        assert_eq!(stored.status, TaskStatus::Running);
        assert_eq!(stored.worker_id.as_deref(), Some("w-1"));
        assert!(stored.lease.is_some() && stored.started_at.is_some());
        let read: Vec<(u64, TaskEvent)> = store
            .read_logs(id, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.seq, l.event))
            .collect();
        let want: Vec<(u64, TaskEvent)> = (0..n)
            .map(|k| (k as u64 + 1, TaskEvent::text(format!("e{k}"))))
            .collect();
        assert_eq!(read, want);
        let next = store.append_logs(id, logs(1)).await.unwrap();
        assert_eq!(
            next,
            n as u64 + 1,
            "the log goes on after the claim's events"
        );
    }
    let stored = store.get_task(waits.id).await.unwrap();
    assert_eq!((stored.status, stored.lease), (TaskStatus::Pending, None));
    assert_eq!(store.append_logs(waits.id, logs(1)).await.unwrap(), 1);
}
