//! Faults injected into a real SQLite file: a full disk (a small tmpfs when the tests run as
//! root and may mount, else a page cap on the database), a write lock held by another
//! process, and the file modes and compaction that keep the file private and small.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anywork_core::{
    ErrorKind, NewSession, NewTask, NewTaskLog, Page, TaskChange, TaskEvent, TaskId, TaskRequest,
    TaskStatus, TaskStore, Timestamp,
};
use anywork_store::{SqliteOptions, SqliteStore};

async fn task_in(store: &SqliteStore) -> TaskId {
    let session = store
        .create_session(NewSession::new("webchat"))
        .await
        .unwrap();
    let task = NewTask::from_request(session.id, TaskRequest::new("webchat", "hi"));
    store.create_task(task).await.unwrap().id
}

/// Appends `n` events of 64 KiB to `task` (pending), ends it and deletes its log: free
/// pages for compaction.
async fn fill_then_forget(store: &SqliteStore, task: TaskId, n: usize) {
    for i in 0..n {
        store
            .append_logs(task, vec![chunk(i, 64 * 1024)])
            .await
            .unwrap();
    }
    store
        .update_task(
            task,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled),
        )
        .await
        .unwrap();
    let deleted = store
        .delete_finished_logs(Timestamp(i64::MAX), 10, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(deleted.events, n as u64);
}

fn chunk(i: usize, bytes: usize) -> NewTaskLog {
    NewTaskLog::now(TaskEvent::text(format!("{i:06}:{}", "x".repeat(bytes))))
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no mount in the sandbox), or
    /// when `ANYWORK_TEST_NO_TMPFS` is set (to run the fallback).
    fn mount(bytes: u64) -> Option<Self> {
        if std::env::var_os("ANYWORK_TEST_NO_TMPFS").is_some() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// How this run makes the disk full, and how it frees space again.
enum FullDisk {
    /// A tmpfs of a few MiB with a ballast file: deleting the ballast frees space.
    Tmpfs { fs: Tmpfs, ballast: PathBuf },
    /// `PRAGMA max_page_count` on every connection: deleting data frees pages.
    PageCap { dir: tempfile::TempDir },
}

/// Disk full wedged the SQLite writer for good (issue 15, defect 1): after one `SQLITE_FULL`
/// every write failed with "attempted to call begin_with at non-zero transaction depth",
/// also once space was freed. Now the failed writes say the disk is full, the readiness
/// check fails, and everything works again as soon as there is room — with every write that
/// was accepted kept, and none that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_clearly_and_they_work_again_once_space_is_freed() {
    // The ballast is twice what is left for the database: once freed, it holds the WAL's
    // pages that SQLite copies into the database file before it can reuse the WAL.
    let disk = match Tmpfs::mount(12 * 1024 * 1024) {
        Some(fs) => {
            let ballast = fs.path().join("ballast");
            std::fs::write(&ballast, vec![7u8; 8 * 1024 * 1024]).unwrap();
            FullDisk::Tmpfs { fs, ballast }
        }
        None => FullDisk::PageCap {
            dir: tempfile::tempdir().unwrap(),
        },
    };
    let store = match &disk {
        FullDisk::Tmpfs { fs, .. } => {
            eprintln!("disk full by: a 12 MiB tmpfs with an 8 MiB ballast file");
            SqliteStore::open_in_dir(fs.path().join("data"))
                .await
                .unwrap()
        }
        FullDisk::PageCap { dir } => {
            eprintln!("disk full by: PRAGMA max_page_count (cannot mount a tmpfs here)");
            SqliteStore::open_with(
                dir.path().join(SqliteStore::FILE_NAME),
                SqliteOptions::default().max_page_count(1024),
            )
            .await
            .unwrap()
        }
    };
    // With the page cap, space is freed by deleting this filler session.
    let filler = task_in(&store).await;
    let task = task_in(&store).await;

    // Fill the disk to the last byte: large writes until one fails, then small ones (SQLite
    // reuses WAL space it already has, so small writes fit a while longer).
    let mut accepted = 0usize;
    let mut i = 0;
    for size in [16 * 1024, 512] {
        let mut failure = None;
        for _ in 0..20_000 {
            i += 1;
            let target = if i % 2 == 0 { task } else { filler };
            match store.append_logs(target, vec![chunk(i, size)]).await {
                Ok(_) => accepted += usize::from(target == task),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let err = failure.expect("the disk filled up");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("the disk is full"), "{err}");
        assert!(
            err.to_string().contains("free space"),
            "says what to do: {err}"
        );
    }

    // The readiness check makes a one-page write: on a full disk it fails once even that
    // has no room (each check takes a WAL frame, so a few checks use up what the appends
    // left). A page cap refuses only growth, which an in-place one-page write never needs.
    if let FullDisk::Tmpfs { .. } = &disk {
        let mut not_ready = None;
        for _ in 0..1000 {
            if let Err(e) = store.check_ready().await {
                not_ready = Some(e);
                break;
            }
        }
        let ready = not_ready.expect("a full disk makes the store not ready");
        assert_eq!(ready.kind(), ErrorKind::Unavailable, "{ready}");
        assert!(ready.to_string().contains("the disk is full"), "{ready}");
    }
    let together: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append_logs(task, vec![chunk(i, 64 * 1024)]).await })
        })
        .collect();
    for w in together {
        if let Err(e) = w.await.unwrap() {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        } else {
            accepted += 1;
        }
    }
    // Still full: still failing, still clearly.
    let again = store
        .append_logs(task, vec![chunk(0, 256 * 1024)])
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Unavailable, "{again}");

    // Free space, the way an operator would.
    match &disk {
        FullDisk::Tmpfs { ballast, .. } => std::fs::remove_file(ballast).unwrap(),
        FullDisk::PageCap { .. } => {
            let filler_session = store.get_task(filler).await.unwrap().session_id;
            store.delete_session(&filler_session).await.unwrap();
        }
    }
    // The background checkpoint first moves the WAL into the database file; ready as soon
    // as that is done (bounded wait, no restart).
    let mut ready = store.check_ready().await;
    for _ in 0..300 {
        if ready.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = store.check_ready().await;
    }
    ready.expect("ready again once there is room");
    let last = store
        .append_logs(task, vec![chunk(9999, 1024)])
        .await
        .expect("writes work again with no restart");
    accepted += 1;
    store
        .update_task(
            task,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();

    // Every accepted write is there once, numbered without a gap; no failed one landed.
    let mut logs = Vec::new();
    loop {
        let page = store.read_logs(task, logs.len() as u64, 500).await.unwrap();
        if page.is_empty() {
            break;
        }
        logs.extend(page);
    }
    assert_eq!(logs.len(), accepted);
    assert_eq!(last, accepted as u64);
    assert!(logs.iter().enumerate().all(|(i, l)| l.seq == i as u64 + 1));
    drop(store);
}

/// Holds SQLite's write lock on `db` from another process (Python's sqlite3) until told.
struct LockHolder {
    child: Child,
}

impl LockHolder {
    fn take(db: &Path) -> Self {
        let script = "import sqlite3, sys\n\
            c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
            c.execute('BEGIN IMMEDIATE')\n\
            print('locked', flush=True)\n\
            sys.stdin.readline()\n\
            c.execute('ROLLBACK')\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (it holds the lock from another process)");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        Self { child }
    }

    fn release(mut self) {
        let _ = self.child.stdin.as_mut().unwrap().write_all(b"go\n");
        let _ = self.child.wait();
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another process holding the write lock: a write waits for it up to the busy timeout and
/// succeeds if it is released in time; past the timeout, queued writes fail together with a
/// retryable error (not one timeout each), readiness fails, and the store works once the
/// lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_waits_then_fails_retryably_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(SqliteStore::FILE_NAME);
    let store = SqliteStore::open_with(
        &db,
        SqliteOptions::default().busy_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let task = task_in(&store).await;

    // Released while the write waits: the write goes through.
    let lock = LockHolder::take(&db);
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.append_logs(task, vec![chunk(1, 10)]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.release();
    assert_eq!(waiting.await.unwrap().unwrap(), 1);

    // Held past the busy timeout: every queued write fails, retryably.
    let lock = LockHolder::take(&db);
    let store = Arc::new(store);
    let writes: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append_logs(task, vec![chunk(i, 10)]).await })
        })
        .collect();
    for w in writes {
        let err = w.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("busy"), "{err}");
    }
    let ready = store.check_ready().await.unwrap_err();
    assert_eq!(ready.kind(), ErrorKind::Unavailable, "{ready}");
    lock.release();

    store
        .check_ready()
        .await
        .expect("ready once the lock is gone");
    assert_eq!(
        store
            .append_logs(task, vec![chunk(2, 10)])
            .await
            .expect("writes work again"),
        2,
        "none of the failed writes landed"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The database and SQLite's `-wal`/`-shm` files are `0600`, a directory the store makes is
/// `0700`, and a file left readable by others is made private when opened.
#[tokio::test]
async fn database_files_are_private_to_their_owner() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data").join("anywork");
    let store = SqliteStore::open_in_dir(&dir).await.unwrap();
    task_in(&store).await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&root.path().join("data")), 0o700);
    let db = dir.join(SqliteStore::FILE_NAME);
    for file in [
        db.clone(),
        dir.join("anywork.db-wal"),
        dir.join("anywork.db-shm"),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    drop(store);

    // A file an older version left world-readable.
    let old = root.path().join("old.db");
    std::fs::write(&old, b"").unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = format!("sqlite://{}", old.display());
    let store = anywork_store::connect(&url).await.unwrap();
    store
        .create_session(NewSession::new("webchat"))
        .await
        .unwrap();
    assert_eq!(mode(&old), 0o600);
}

/// New files use incremental auto-vacuum, so `compact` gives the space of deleted logs back
/// to the file system; a file without it is told to `vacuum` once, which converts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_deleted_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    let task = task_in(&store).await;
    fill_then_forget(&store, task, 64).await;
    let full = store.store_size().await.unwrap().unwrap();
    assert!(
        full.reclaimable_bytes >= 3 * 1024 * 1024,
        "deleted logs leave free pages: {full:?}"
    );
    let freed = store.compact().await.unwrap();
    assert!(freed >= 3 * 1024 * 1024, "freed {freed} of {full:?}");
    let small = store.store_size().await.unwrap().unwrap();
    assert!(
        small.bytes + 3 * 1024 * 1024 <= full.bytes,
        "{full:?} → {small:?}"
    );
    assert_eq!(small.reclaimable_bytes, 0);
    let file = std::fs::metadata(dir.path().join(SqliteStore::FILE_NAME)).unwrap();
    assert!(
        file.len() < 1024 * 1024,
        "the file shrank: {} bytes",
        file.len()
    );
    store.check_ready().await.unwrap();
}

/// A database created without incremental auto-vacuum (by an older version): `compact`
/// cannot shrink it, `vacuum` converts it once, and the data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_database_is_converted_by_one_vacuum() {
    use sqlx::ConnectOptions as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SqliteStore::FILE_NAME);
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::None)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE made_by_an_old_version (x INTEGER)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let task = task_in(&store).await;
    fill_then_forget(&store, task, 16).await;
    assert_eq!(
        auto_vacuum(&path).await,
        0,
        "the old file has no auto-vacuum"
    );
    assert_eq!(store.compact().await.unwrap(), 0);
    let before = store.store_size().await.unwrap().unwrap();
    store.vacuum().await.unwrap();
    assert_eq!(auto_vacuum(&path).await, 2, "incremental from now on");
    let after = store.store_size().await.unwrap().unwrap();
    assert!(after.bytes < before.bytes, "{before:?} → {after:?}");
    assert_eq!(
        store
            .tasks_by_session(
                &store.get_task(task).await.unwrap().session_id,
                Page::first(5)
            )
            .await
            .unwrap()
            .len(),
        1
    );
    store.check_ready().await.unwrap();
}

/// `PRAGMA auto_vacuum` of the file at `path`, read on a connection of its own.
async fn auto_vacuum(path: &Path) -> i64 {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    mode
}

/// A new database gets incremental auto-vacuum before its first table.
#[tokio::test]
async fn a_new_database_uses_incremental_auto_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    assert_eq!(
        auto_vacuum(&dir.path().join(SqliteStore::FILE_NAME)).await,
        2
    );
    drop(store);
}
