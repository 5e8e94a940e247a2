//! [`SqliteStore`]: the embedded default. One file, WAL journal, zero set-up.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anywork_core::{Error, ErrorKind, Result, StoreSize};
use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use sqlx::sqlite::{
    SqliteArguments, SqliteAutoVacuum, SqliteConnectOptions, SqliteConnection, SqliteJournalMode,
    SqlitePoolOptions, SqliteQueryResult, SqliteRow, SqliteStatement, SqliteSynchronous,
    SqliteTypeInfo,
};
use sqlx::{
    ConnectOptions as _, Connection as _, Describe, Either, Executor as _, Sqlite, SqlitePool,
};
use tokio::sync::{mpsc, oneshot};

use crate::quiet::Quiet;
use crate::sql::{Embedded, Ending, Held, Tx, db_err};
use crate::sqlite_stats::{Counters, WriterStats};

const MIGRATIONS: Embedded = Embedded(&[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "outbox dedupe retention",
        include_str!("../migrations/sqlite/0002_outbox_dedupe_retention.sql"),
    ),
    (
        3,
        "settings",
        include_str!("../migrations/sqlite/0003_settings.sql"),
    ),
    (
        4,
        "idle hold",
        include_str!("../migrations/sqlite/0004_idle_hold.sql"),
    ),
    (
        5,
        "active tasks",
        include_str!("../migrations/sqlite/0005_active_tasks.sql"),
    ),
]);

/// Writes one transaction may hold at most (group commit).
const MAX_BATCH: usize = 256;

/// How often the WAL is copied into the database file, off the writer.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL length (4 KiB pages) past which the writer checkpoints it to the end itself, so that
/// the WAL starts over: at its first idle moment (no write queued) after a background
/// checkpoint found the WAL this long, when that checkpoint has just copied nearly all of it.
const WAL_LIMIT_FRAMES: i64 = 8192;

/// WAL length past which the writer checkpoints without waiting for an idle moment (a writer
/// that never finds one would let the WAL grow without end).
const WAL_HARD_LIMIT_FRAMES: i64 = 4 * WAL_LIMIT_FRAMES;

/// Free pages one compaction step gives back (8 MiB of 4 KiB pages): the writer does one
/// step at a time between other writes.
const VACUUM_STEP_PAGES: i64 = 2048;

/// Settings of a [`SqliteStore`] besides its file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long a write waits for a lock another process holds on the file before it fails
    /// with `Unavailable` (retryable). Default: 10 s.
    pub busy_timeout: Duration,
    /// A cap on the database file, in pages (`PRAGMA max_page_count`); a write past it fails
    /// as on a full disk. Default: none (the disk is the limit).
    pub max_page_count: Option<u64>,
    /// How long the writer's connection may sit unused before it is closed (the next write
    /// opens a new one), how old a read connection may grow before it is replaced (they
    /// take turns, so none sits idle for long), and the longest an unused read connection
    /// stays open (it closes between `idle_close / 2` and `idle_close` after its last use).
    /// Each connection holds a page cache of up to 2 MB (SQLite's default `cache_size`) in
    /// the C library's allocator, which gives that memory back only when the whole
    /// connection is freed. Default: 30 s.
    pub idle_close: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(10),
            max_page_count: None,
            idle_close: Duration::from_secs(30),
        }
    }
}

impl SqliteOptions {
    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn busy_timeout(mut self, wait: Duration) -> Self {
        self.busy_timeout = wait;
        self
    }

    /// Sets [`max_page_count`](Self::max_page_count).
    pub fn max_page_count(mut self, pages: u64) -> Self {
        self.max_page_count = Some(pages);
        self
    }

    /// Sets [`idle_close`](Self::idle_close).
    pub fn idle_close(mut self, after: Duration) -> Self {
        self.idle_close = after;
        self
    }
}

/// A [`TaskStore`](anywork_core::TaskStore) in a SQLite file.
///
/// Reads use a small pool. SQLite lets one writer in at a time, so writes go to one writer
/// connection owned by a task of their own, which commits the writes that queued meanwhile
/// together in one transaction (group commit): under load that saves a transaction, WAL
/// pages and the lock hand-off per write, and writers never spin on `SQLITE_BUSY`.
/// A write that fails its checks (conflict, not found…) fails alone; a database error
/// spoils the shared transaction, which is then rolled back and every write of it retried on
/// its own, so that only the failing one fails.
///
/// The writer survives database errors: after one, it checks that its connection is out of
/// the failed transaction and opens a fresh connection if not (SQLite rolls a transaction
/// back by itself on a full disk, which left the old connection refusing every later
/// `BEGIN`). So once the cause is gone (space freed, the lock released), writes work again
/// with no restart. A full disk is `Unavailable` with "the disk is full" in its message; a
/// lock held by another process past [`SqliteOptions::busy_timeout`] is `Unavailable` too.
///
/// The file (and SQLite's `-wal` and `-shm` files, which take its mode) is private to its
/// owner: created `0600`, tightened to that if it was more open; a directory the store
/// creates is `0700`. New files use incremental auto-vacuum, so
/// [`compact`](anywork_core::TaskStore::compact) can give space back bit by bit; a file made
/// by an older version needs one [`vacuum`](SqliteStore::vacuum) for that.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for what the server does on its own, at start and at rest (the
    /// restart reads, the looks for work, the store's size, the WAL checkpoints), taken in
    /// turn; `None` in memory (the one pooled connection serves everything). Each read given
    /// back to a pool holds its connection until a ping on it returns, so the next read
    /// right after found none idle and opened one more connection, with its thread: start-up
    /// opened three read connections for reads made one after another.
    upkeep: Option<SqlitePool>,
    /// The group-commit writer; `None` for an in-memory database (one connection only),
    /// whose writes take a pooled connection each.
    writer: Option<mpsc::Sender<Job>>,
    /// What the writer and the checkpoints did; `None` in memory.
    counters: Option<Arc<Counters>>,
    /// The database file; `None` in memory.
    path: Option<PathBuf>,
    /// The looks that found nothing since the last change; `None` in memory.
    quiet: Option<Arc<Quiet>>,
}

/// What the writer does for a caller.
#[derive(Debug)]
enum Work {
    /// A write, grouped with the others queued with it.
    Write(WriteOp),
    /// A statement that must run outside any transaction (vacuum, checkpoint), alone.
    Raw(Cow<'static, str>),
}

/// Work waiting for the writer, and who waits for its reply.
#[derive(Debug)]
struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Reply>>,
    /// When it was queued.
    queued: Instant,
}

impl SqliteStore {
    /// The file name used inside `DB_DIR`, as in the original AnyWork.
    pub const FILE_NAME: &'static str = "anywork.db";

    /// Opens (creating if needed, `0700`) `<dir>/anywork.db` and brings its schema up to date.
    pub async fn open_in_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        create_private_dir(dir).map_err(|e| {
            Error::unavailable(format!(
                "cannot create database directory {}: {e} (set DB_DIR to a writable directory)",
                dir.display()
            ))
            .with_source(e)
        })?;
        Self::open(dir.join(Self::FILE_NAME)).await
    }

    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// [`open`](Self::open) with explicit [`SqliteOptions`].
    pub async fn open_with(path: impl AsRef<Path>, settings: SqliteOptions) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true);
        Self::connect_with(options, 4, settings).await
    }

    /// Opens a database from a `sqlite:` URL (`sqlite:///data/anywork.db`, `sqlite::memory:`).
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid_input(format!("bad SQLite URL {url:?}: {e}")))?
            .create_if_missing(true);
        // Every connection to `:memory:` is a separate database: keep exactly one.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let connections = if in_memory { 1 } else { 4 };
        Self::connect_with(options, connections, SqliteOptions::default()).await
    }

    /// Opens the pool (`max_connections == 1`: an in-memory database, no separate writer).
    async fn connect_with(
        options: SqliteConnectOptions,
        max_connections: u32,
        settings: SqliteOptions,
    ) -> Result<Self> {
        let in_memory = max_connections == 1;
        let path = (!in_memory).then(|| options.get_filename().to_path_buf());
        if let Some(path) = &path {
            prepare_private_file(path)?;
        }
        let mut options = options
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(settings.busy_timeout)
            .foreign_keys(true);
        if let Some(pages) = settings.max_page_count {
            options = options.pragma("max_page_count", pages.to_string());
        }
        let pool = SqlitePoolOptions::new().max_connections(max_connections);
        let pool = if in_memory {
            // The one connection is the database.
            pool.min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            // Under reads the connections take turns, so none of them stays idle for long:
            // each is replaced once it is `idle_close` old, and with it its page cache. An
            // idle store (no reads, and no checkpoint since nothing was written) closes them
            // all, each with its thread and its page cache: the pool looks every
            // `idle_close / 2` and closes those unused since its last look, so that a read
            // connection closes within `idle_close` of its last use (with an idle timeout of
            // `idle_close`, it looked only every `idle_close`: up to twice that).
            pool.min_connections(0)
                .idle_timeout(settings.idle_close / 2)
                .max_lifetime(settings.idle_close)
        };
        // On a file, the upkeep connection is opened first (it reports a file that cannot be
        // opened) and runs the migrations; the other reads open theirs when they come.
        let (pool, upkeep) = if in_memory {
            let pool = pool
                .connect_with(options.clone())
                .await
                .map_err(|e| db_err("open SQLite database", e))?;
            (pool, None)
        } else {
            let upkeep = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(settings.idle_close / 2)
                .max_lifetime(settings.idle_close)
                .connect_with(options.clone())
                .await
                .map_err(|e| db_err("open SQLite database", e))?;
            (pool.connect_lazy_with(options.clone()), Some(upkeep))
        };
        let migrator = sqlx::migrate::Migrator::new(MIGRATIONS)
            .await
            .map_err(|e| Error::internal(format!("bad embedded migrations: {e}")))?;
        migrator
            .run(upkeep.as_ref().unwrap_or(&pool))
            .await
            .map_err(|e| Error::storage(format!("migrating the SQLite schema failed: {e}")))?;
        let counters = (!in_memory).then(|| Arc::new(Counters::default()));
        let quiet = path.as_ref().map(|_| Arc::new(Quiet::new()));
        let writer = if let (Some(counters), Some(quiet)) = (&counters, &quiet) {
            // The writer never checkpoints on commit: the WAL fsyncs of a checkpoint would
            // hold up every write queued behind it. A background task checkpoints instead.
            // A reopened writer must find the file, never make an empty one.
            let writer = Writer::open(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", "0")
                    .create_if_missing(false),
            )
            .await?;
            let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
            let wal = Arc::new(WalState::default());
            tokio::spawn(write_loop(
                writer,
                rx,
                wal.clone(),
                counters.clone(),
                quiet.clone(),
                settings.idle_close,
            ));
            tokio::spawn(checkpoint_loop(
                upkeep.clone().unwrap_or_else(|| pool.clone()),
                tx.downgrade(),
                wal,
                counters.clone(),
            ));
            Some(tx)
        } else {
            None
        };
        Ok(Self {
            pool,
            upkeep,
            writer,
            counters,
            path,
            quiet,
        })
    }

    /// How many read connections are open now (each with a thread and a page cache): none
    /// once the store has been idle for [`SqliteOptions::idle_close`]. For diagnosis.
    pub fn open_read_connections(&self) -> u32 {
        self.pool.size() + self.upkeep.as_ref().map_or(0, |u| u.size())
    }

    /// What the writer and the WAL checkpoints have done since the store was opened: how long
    /// writes waited for the writer, how long its group commits took, and each checkpoint
    /// with its time and whether the writes waited for it. `None` for an in-memory database
    /// (no writer of its own). For diagnosis: counting costs a few atomic additions per write.
    pub fn writer_stats(&self) -> Option<WriterStats> {
        self.counters.as_ref().map(|c| c.snapshot())
    }

    async fn write(&self, op: WriteOp) -> Result<Reply> {
        match &self.writer {
            Some(_) => self.submit(Work::Write(op)).await,
            None => self.write_on_pool(&op).await,
        }
    }

    /// Runs `sql` outside any transaction: on the writer, between two groups of writes.
    async fn maintain(&self, sql: impl Into<Cow<'static, str>>) -> Result<()> {
        let sql = sql.into();
        if self.writer.is_some() {
            return self.submit(Work::Raw(sql)).await.map(drop);
        }
        sqlx::query(&sql)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| db_err("database maintenance", e))
    }

    async fn submit(&self, work: Work) -> Result<Reply> {
        let gone =
            || Error::unavailable("the SQLite writer has stopped; restart the server to reopen it");
        let writer = self.writer.as_ref().ok_or_else(gone)?;
        let (reply, answer) = oneshot::channel();
        let queued = Instant::now();
        writer
            .send(Job {
                work,
                reply,
                queued,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn pragma(&self, name: &str) -> Result<i64> {
        let (value,): (i64,) = sqlx::query_as(&format!("PRAGMA {name}"))
            .fetch_one(self.upkeep_pool())
            .await
            .map_err(|e| db_err(&format!("read PRAGMA {name}"), e))?;
        Ok(value)
    }

    /// Rewrites the whole file once with incremental auto-vacuum on, which a database
    /// created before this version lacks (a new one has it), and gives all free pages back.
    /// It needs free disk space about the size of the database and holds up every write
    /// while it runs (seconds per GiB), so run it in a quiet moment; after it,
    /// [`compact`](anywork_core::TaskStore::compact) works in small steps.
    pub async fn vacuum(&self) -> Result<()> {
        self.maintain("PRAGMA auto_vacuum = INCREMENTAL").await?;
        self.maintain("VACUUM").await?;
        if self.path.is_some() {
            self.maintain("PRAGMA wal_checkpoint(TRUNCATE)").await?;
        }
        Ok(())
    }

    /// Incremental vacuum in steps of [`VACUUM_STEP_PAGES`], then a checkpoint that also
    /// truncates the WAL; the bytes by which the database shrank.
    async fn compact_files(&self) -> Result<u64> {
        if self.pragma("auto_vacuum").await? != 2 {
            tracing::warn!(
                "this SQLite database was created without incremental auto-vacuum, so \
                 compaction cannot give space back; run SqliteStore::vacuum once (it rewrites \
                 the file)"
            );
            return Ok(0);
        }
        let page_size = self.pragma("page_size").await?;
        let before = self.pragma("page_count").await?;
        let mut free = self.pragma("freelist_count").await?;
        let mut steps = free / VACUUM_STEP_PAGES + 2;
        while free > 0 && steps > 0 {
            self.maintain(format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})"))
                .await?;
            let left = self.pragma("freelist_count").await?;
            if left >= free {
                break; // nothing moved (new free pages keep coming): enough for this call
            }
            free = left;
            steps -= 1;
        }
        if self.path.is_some() {
            self.maintain("PRAGMA wal_checkpoint(TRUNCATE)").await?;
        }
        let after = self.pragma("page_count").await?;
        Ok(crate::sql::to_u64((before - after) * page_size))
    }

    /// Pages in use or free, plus the WAL file. The pages are read again only once the store
    /// changed (an idle store is not read); the WAL file's length is taken each time.
    async fn measure(&self) -> Result<StoreSize> {
        let mark = self.quiet.as_ref().map(|q| q.mark());
        let kept = match (&self.quiet, mark) {
            (Some(q), Some(at)) => q.size(at),
            _ => None,
        };
        let pages = match kept {
            Some(pages) => pages,
            None => {
                let page_size = crate::sql::to_u64(self.pragma("page_size").await?);
                let pages = crate::sql::to_u64(self.pragma("page_count").await?);
                let free = crate::sql::to_u64(self.pragma("freelist_count").await?);
                let pages = StoreSize {
                    bytes: pages * page_size,
                    reclaimable_bytes: free * page_size,
                };
                if let (Some(q), Some(at)) = (&self.quiet, mark) {
                    q.measured(at, pages);
                }
                pages
            }
        };
        let wal = self
            .path
            .as_ref()
            .and_then(|p| std::fs::metadata(sidecar(p, "-wal")).ok())
            .map_or(0, |m| m.len());
        Ok(StoreSize {
            bytes: pages.bytes + wal,
            ..pages
        })
    }
}

/// `path` with `suffix` appended to its file name (`anywork.db-wal`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `dir` and its missing parents with mode `0700`; an existing directory is left as
/// it is.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the database file with mode `0600` before SQLite opens it (SQLite gives its `-wal`
/// and `-shm` files the mode of the database file), and takes group and other access away
/// from files that have it.
fn prepare_private_file(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::unavailable(format!(
                    "cannot create the database file {}: {e} (set DB_DIR to a writable \
                     directory)",
                    path.display()
                ))
                .with_source(e));
            }
        }
        for file in [
            path.to_path_buf(),
            sidecar(path, "-wal"),
            sidecar(path, "-shm"),
        ] {
            let Ok(meta) = std::fs::metadata(&file) else {
                continue;
            };
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                let private = std::fs::Permissions::from_mode(mode & 0o700);
                match std::fs::set_permissions(&file, private) {
                    Ok(()) => tracing::info!(
                        file = %file.display(),
                        "database file was readable by others; made it private (0600)"
                    ),
                    Err(e) => tracing::warn!(
                        file = %file.display(),
                        error = %e,
                        "database file is readable by others and could not be made private"
                    ),
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// An error like `e`, for each of several writes that it failed together.
fn copy(e: &Error) -> Error {
    Error::new(e.kind(), e.message())
}

/// Why a group commit failed.
enum GroupFailure {
    /// Before any write ran (the lock could not be had, the connection is gone): every write
    /// of the group fails with this, no write is tried alone.
    Begin(Error),
    /// A write or the commit: each write is redone alone.
    Batch(Error),
}

/// The writer's connection, reopened when a failed transaction left it unusable.
struct Writer {
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    /// Calls the writes made to the connection's thread, not yet counted in
    /// [`Counters::calls`].
    calls: u64,
}

impl Writer {
    async fn open(options: SqliteConnectOptions) -> Result<Self> {
        let conn = options
            .connect()
            .await
            .map_err(|e| db_err("open the SQLite writer connection", e))?;
        Ok(Self {
            conn: Some(conn),
            options,
            calls: 0,
        })
    }

    /// The connection, opened again if the last one was dropped.
    async fn conn(&mut self) -> Result<&mut SqliteConnection> {
        if self.conn.is_none() {
            let conn = self
                .options
                .connect()
                .await
                .map_err(|e| db_err("reopen the SQLite writer connection", e))?;
            tracing::info!("SQLite writer connection reopened");
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| Error::internal("SQLite writer connection missing"))
    }

    /// Closes the connection (the next write opens a new one): what it held, its page cache
    /// and its statements, goes back to the system with it.
    async fn close(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::debug!(error = %e, "closing the idle SQLite writer connection");
        }
    }

    /// After a database error: makes sure the next transaction starts on a clean connection.
    /// The writes open and end their transactions with statements of their own (no sqlx
    /// `Transaction`, whose count of open transactions a rollback that SQLite had done
    /// already — it does on a full disk or an I/O error — left wrong, refusing every `BEGIN`
    /// after), so one more `ROLLBACK` ends whatever transaction a failure left open, and fails
    /// with "no transaction is active" on a connection that is out of it already. A
    /// connection on which it fails otherwise (a dead one) is closed; the next write opens a
    /// new one.
    async fn recover(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        self.calls += 1;
        let healthy = match sqlx::query("ROLLBACK").execute(&mut *conn).await {
            Ok(_) => true,
            Err(sqlx::Error::Database(e)) => e.message().contains("no transaction is active"),
            Err(_) => false,
        } && !conn.is_in_transaction();
        if !healthy && let Some(conn) = self.conn.take() {
            tracing::warn!("SQLite writer connection left unusable by a failed write; reopening");
            let _ = conn.close().await;
        }
    }

    /// `op` alone in its own transaction.
    async fn write_alone(&mut self, op: &WriteOp) -> Result<Reply> {
        let mut calls = 0;
        let reply = write_one(self.conn().await?, op, &mut calls).await;
        self.calls += calls;
        if let Err(e) = &reply
            && !is_logical(e)
        {
            self.recover().await;
        }
        reply
    }

    /// A passive checkpoint: the WAL's length and how much of it is in the database file
    /// now, in frames.
    async fn checkpoint(&mut self) -> Result<(i64, i64)> {
        let done = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(self.conn().await?)
            .await;
        match done {
            Ok((_busy, frames, copied)) => Ok((frames, copied)),
            Err(e) => {
                self.recover().await;
                Err(db_err("WAL checkpoint", e))
            }
        }
    }

    /// A statement outside any transaction.
    async fn raw(&mut self, sql: &str) -> Result<Reply> {
        let done = sqlx::query(sql).execute(self.conn().await?).await;
        match done {
            Ok(_) => Ok(Reply::Unit),
            Err(e) => {
                self.recover().await;
                Err(db_err("database maintenance", e))
            }
        }
    }

    /// The replies of `ops`, in order, after they are committed.
    async fn run_batch(&mut self, ops: &[&WriteOp]) -> Vec<Result<Reply>> {
        if let [op] = ops {
            return vec![self.write_alone(op).await];
        }
        let mut calls = 0;
        let failure = match self.conn().await {
            Ok(conn) => match shared(conn, ops, &mut calls).await {
                Ok(replies) => {
                    self.calls += calls;
                    // A write run alone after the group was committed with its last call
                    // may have failed on the database: as after any write alone.
                    if let Some(Err(e)) = replies.last()
                        && !is_logical(e)
                    {
                        self.recover().await;
                    }
                    return replies;
                }
                Err(failure) => failure,
            },
            Err(e) => GroupFailure::Begin(e),
        };
        self.calls += calls;
        self.recover().await;
        match failure {
            GroupFailure::Begin(e) => ops.iter().map(|_| Err(copy(&e))).collect(),
            GroupFailure::Batch(e) => {
                tracing::debug!(error = %e, writes = ops.len(), "group commit failed; writing one by one");
                let mut replies: Vec<Result<Reply>> = Vec::with_capacity(ops.len());
                for op in ops {
                    // After a store-wide failure (disk full, lock, I/O), the next writes
                    // would only fail the same way, one slow attempt each.
                    let store_wide = match replies.last() {
                        Some(Err(e)) if e.kind() == ErrorKind::Unavailable => Some(copy(e)),
                        _ => None,
                    };
                    replies.push(match store_wide {
                        Some(e) => Err(e),
                        None => self.write_alone(op).await,
                    });
                }
                replies
            }
        }
    }
}

/// What the background checkpoints tell the writer.
#[derive(Debug, Default)]
struct WalState {
    /// The WAL's length (frames) at the last background checkpoint.
    frames: AtomicI64,
    /// A background checkpoint found the WAL past [`WAL_LIMIT_FRAMES`] and copied it: the
    /// writer should start it over at its next idle moment.
    restart_due: AtomicBool,
    /// Rounds of the writer that wrote something (a commit that wrote a row, a maintenance
    /// statement): the background checkpoint skips its turn while this has not moved since a
    /// checkpoint that copied the whole WAL, so that an idle store holds no read connection.
    written: AtomicU64,
}

/// The writer: takes the work queued so far, runs consecutive writes in one transaction and
/// maintenance statements alone, in order, answers each. Ends when every store handle is gone.
async fn write_loop(
    mut writer: Writer,
    mut jobs: mpsc::Receiver<Job>,
    wal: Arc<WalState>,
    counters: Arc<Counters>,
    quiet: Arc<Quiet>,
    idle_close: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The end of the writer's last checkpoint, while writes queued before it are served.
    let mut checkpoint_ended: Option<Instant> = None;
    loop {
        // An open connection waits `idle_close` for work, then closes (`recv_many` is
        // cancel-safe: nothing queued is lost to the timeout).
        let received = if writer.conn.is_some() {
            match tokio::time::timeout(idle_close, jobs.recv_many(&mut batch, MAX_BATCH)).await {
                Ok(n) => n,
                Err(_) => {
                    writer.close().await;
                    counters.idle_closes.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        } else {
            jobs.recv_many(&mut batch, MAX_BATCH).await
        };
        if received == 0 {
            break;
        }
        let started = Instant::now();
        for job in &batch {
            counters.queue_wait.record(started - job.queued);
        }
        if let Some(end) = checkpoint_ended {
            let behind = batch.iter().filter(|j| j.queued < end).count();
            counters
                .writes_behind_checkpoint
                .fetch_add(behind as u64, Ordering::Relaxed);
            if batch.last().is_none_or(|j| j.queued >= end) {
                checkpoint_ended = None;
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            let end = batch[start..]
                .iter()
                .position(|j| matches!(j.work, Work::Raw(_)))
                .map_or(batch.len(), |n| start + n);
            let writes: Vec<&WriteOp> = batch[start..end]
                .iter()
                .filter_map(|j| match &j.work {
                    Work::Write(op) => Some(op),
                    Work::Raw(_) => None,
                })
                .collect();
            if !writes.is_empty() {
                let (bg_started, bg_ended) = (
                    counters.background_started.load(Ordering::Relaxed),
                    counters.background_ended.load(Ordering::Relaxed),
                );
                let t = Instant::now();
                replies.extend(writer.run_batch(&writes).await);
                let took = t.elapsed();
                let overlapped = bg_started != bg_ended
                    || counters.background_started.load(Ordering::Relaxed) != bg_started;
                if overlapped {
                    counters.batch_time_during_checkpoint.record(took);
                } else {
                    counters.batch_time.record(took);
                }
                counters.batches.fetch_add(1, Ordering::Relaxed);
                counters
                    .writes
                    .fetch_add(writes.len() as u64, Ordering::Relaxed);
                counters
                    .calls
                    .fetch_add(std::mem::take(&mut writer.calls), Ordering::Relaxed);
            }
            if let Some(Job {
                work: Work::Raw(sql),
                ..
            }) = batch.get(end)
            {
                replies.push(writer.raw(sql).await);
            }
            start = end + 1;
        }
        // A round whose writes all found nothing to do (the outbox's claim of an idle
        // server) wrote nothing: no checkpoint is due. One that wrote only the readiness
        // heartbeat changed nothing the looks that found nothing read.
        let mut wrote = false;
        for (job, reply) in batch.iter().zip(&replies) {
            match writes(&job.work, reply) {
                Wrote::Nothing => {}
                Wrote::Heartbeat => wrote = true,
                Wrote::Rows => {
                    wrote = true;
                    quiet.changed();
                    break;
                }
            }
        }
        if wrote {
            wal.written.fetch_add(1, Ordering::Relaxed);
        }
        for (job, reply) in batch.drain(..).zip(replies) {
            let _ = job.reply.send(reply);
        }
        // Under steady writes the background checkpoint never sees the end of the WAL, so
        // it cannot start over; the writer, who alone appends, checkpoints it to the end.
        // Every write waits meanwhile (a copy of what the background checkpoint left, and two
        // fsyncs), so it does so when none is queued, right after a background checkpoint
        // copied the rest — or at once if the WAL grew far past its limit.
        let due = wal.restart_due.load(Ordering::Relaxed) && jobs.is_empty();
        if due || wal.frames.load(Ordering::Relaxed) >= WAL_HARD_LIMIT_FRAMES {
            wal.restart_due.store(false, Ordering::Relaxed);
            wal.frames.store(0, Ordering::Relaxed);
            let at = Instant::now();
            let frames = match writer.checkpoint().await {
                Ok(frames) => frames,
                Err(e) => {
                    tracing::warn!(error = %e, "SQLite checkpoint failed");
                    (0, 0)
                }
            };
            counters.checkpoint(at, true, frames);
            checkpoint_ended = Some(Instant::now());
        }
    }
    if let Some(conn) = writer.conn.take() {
        let _ = conn.close().await;
    }
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`], on a read connection
/// (a passive checkpoint waits for nobody), and tells the writer how long the WAL is.
/// Skips its turn when nothing was written since a checkpoint that copied the whole WAL, so
/// that the read connections of an idle store close (`idle_close`). Ends with the writer.
async fn checkpoint_loop(
    pool: SqlitePool,
    writer: mpsc::WeakSender<Job>,
    wal: Arc<WalState>,
    counters: Arc<Counters>,
) {
    // `wal.written` when the last checkpoint copied the whole WAL.
    let mut settled_at: Option<u64> = None;
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if writer.upgrade().is_none() {
            return;
        }
        let written = wal.written.load(Ordering::Relaxed);
        if settled_at == Some(written) {
            continue;
        }
        settled_at = None;
        let at = Instant::now();
        counters.background_started.fetch_add(1, Ordering::Relaxed);
        let done = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await;
        counters.background_ended.fetch_add(1, Ordering::Relaxed);
        match done {
            Ok((busy, frames, copied)) => {
                if busy == 0 && copied == frames {
                    settled_at = Some(written);
                }
                counters.checkpoint(at, false, (frames, copied));
                wal.frames.store(frames, Ordering::Relaxed);
                if frames >= WAL_LIMIT_FRAMES {
                    wal.restart_due.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                counters.checkpoint(at, false, (0, 0));
                tracing::warn!(error = %e, "SQLite checkpoint failed");
            }
        }
    }
}

/// Runs every write of `ops` in one transaction. `Err` (and nothing written) when one of
/// them failed other than by its own checks, or the commit failed; the transaction may then
/// still be open (the caller's [`Writer::recover`] rolls it back). The calls made to the
/// connection's thread are added to `calls`.
async fn shared(
    conn: &mut SqliteConnection,
    ops: &[&WriteOp],
    calls: &mut u64,
) -> std::result::Result<Vec<Result<Reply>>, GroupFailure> {
    let mut tx = Tx::begin(conn);
    let done = shared_in(&mut tx, ops).await;
    *calls += u64::from(tx.calls);
    done
}

async fn shared_in<'a>(
    tx: &mut Tx<'a, SqliteConnection>,
    ops: &[&'a WriteOp],
) -> std::result::Result<Vec<Result<Reply>>, GroupFailure> {
    let ctx = "group commit";
    let mut replies = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let last = i + 1 == ops.len();
        // The group's `COMMIT` may go with the last write's last call.
        tx.end_early = last;
        let applied = apply(tx, op).await;
        if tx.ended {
            // Committed with that call: every write of the group is in, and what the last
            // one ran after it (in a transaction of its own) is that write's alone.
            replies.push(end_alone(tx, applied, "write").await);
            return Ok(replies);
        }
        let mut reply = applied.map_err(Ending::Write);
        // What an op held back goes now, so that its failure is this op's; the last op's
        // goes with the COMMIT.
        if reply.is_ok()
            && !last
            && let Err(e) = tx.flush().await
        {
            reply = Err(e);
        }
        if let Some(failure) = tx.failure.take() {
            reply = Err(failure);
        }
        match reply {
            Ok(reply) => replies.push(Ok(reply)),
            Err(Ending::Begin(e)) => return Err(GroupFailure::Begin(db_err(ctx, e))),
            Err(Ending::Write(e)) if is_logical(&e) => replies.push(Err(e)),
            Err(Ending::Write(e)) => return Err(GroupFailure::Batch(e)),
            Err(Ending::Commit(e)) => return Err(GroupFailure::Batch(db_err(ctx, e))),
        }
    }
    match tx.commit().await {
        Ok(()) => Ok(replies),
        Err(Ending::Begin(e)) => Err(GroupFailure::Begin(db_err(ctx, e))),
        Err(Ending::Write(e)) if is_logical(&e) => {
            // The last op's held statement refused by its checks: that op fails, the others
            // commit (as when it ran before the commit).
            if let Some(last) = replies.last_mut() {
                *last = Err(e);
            }
            match tx.commit().await {
                Ok(()) => Ok(replies),
                Err(Ending::Begin(e) | Ending::Commit(e)) => {
                    Err(GroupFailure::Batch(db_err(ctx, e)))
                }
                Err(Ending::Write(e)) => Err(GroupFailure::Batch(e)),
            }
        }
        Err(Ending::Write(e)) => Err(GroupFailure::Batch(e)),
        Err(Ending::Commit(e)) => Err(GroupFailure::Batch(db_err(ctx, e))),
    }
}

/// Runs `op` alone in a transaction of its own on the writer's connection: committed when it
/// succeeds, rolled back when it fails (as the shared `write_alone`, without its sqlx
/// `Transaction`: the `BEGIN IMMEDIATE` goes with the op's first statement, the `COMMIT`
/// with its last when nothing waits for that one's result, or with the call the op marks as
/// its last). The calls made to the connection's thread are added to `calls`.
async fn write_one(conn: &mut SqliteConnection, op: &WriteOp, calls: &mut u64) -> Result<Reply> {
    let mut tx = Tx::begin(conn);
    tx.end_early = true;
    let applied = apply(&mut tx, op).await;
    let reply = end_alone(&mut tx, applied, "write").await;
    *calls += u64::from(tx.calls);
    reply
}

/// Ends the transaction of a write that ran alone in it (or ran last in a group committed
/// with its last call, then alone): commits it when the write succeeded, rolls it back when
/// it failed.
async fn end_alone(
    tx: &mut Tx<'_, SqliteConnection>,
    applied: Result<Reply>,
    ctx: &str,
) -> Result<Reply> {
    let mut ended = match applied {
        Ok(reply) => tx.commit().await.map(|()| reply),
        Err(e) => Err(Ending::Write(e)),
    };
    if let Some(failure) = tx.failure.take() {
        ended = Err(failure);
    }
    match ended {
        Ok(reply) => Ok(reply),
        Err(Ending::Begin(e)) => Err(db_err(ctx, e)),
        Err(Ending::Write(e)) => {
            tx.rollback().await;
            Err(e)
        }
        Err(Ending::Commit(e)) => {
            tx.rollback().await;
            Err(db_err(ctx, e))
        }
    }
}

/// What one call to the connection's thread failed in.
enum Failed {
    /// The lead (`BEGIN`): nothing after it ran.
    Lead(sqlx::Error),
    /// The statement the call was made for.
    Main(sqlx::Error),
    /// The statement after it (`COMMIT`).
    Trail(sqlx::Error),
}

impl<'a> Tx<'a, SqliteConnection> {
    /// A transaction on `conn` (the writer's) that begins with its first statement: `BEGIN
    /// IMMEDIATE` (the write lock at once, so that writers queue on the busy timeout instead
    /// of failing on lock upgrade) goes to SQLite's thread in the same call.
    fn begin(conn: &'a mut SqliteConnection) -> Self {
        Self {
            conn,
            lead: Some("BEGIN IMMEDIATE; "),
            begun: false,
            may_hold: true,
            held: None,
            failure: None,
            end_early: false,
            last_call: false,
            ended: false,
            calls: 0,
        }
    }

    /// One call to the connection's thread: the lead if it has not gone yet, `sql` with
    /// `args`, then `trail` (`; COMMIT`) if given. The results of `sql` only; all of them (a
    /// statement that returns rows is stepped to its end). The statements are told apart by
    /// their `;` (none of this crate's SQL has one in a literal).
    async fn call(
        &mut self,
        sql: &str,
        args: Option<SqliteArguments<'_>>,
        trail: Option<&str>,
    ) -> std::result::Result<Vec<Either<SqliteQueryResult, SqliteRow>>, Failed> {
        self.calls += 1;
        let lead = self.lead.take();
        let text: Cow<'_, str> = match (lead, trail) {
            (None, None) => sql.into(),
            (lead, trail) => format!("{}{sql}{}", lead.unwrap_or(""), trail.unwrap_or("")).into(),
        };
        let led = lead.map_or(0, |l| l.matches(';').count());
        let ends = led + 1 + sql.matches(';').count();
        let mut done = 0;
        let mut out = Vec::new();
        // Arguments (even none) make sqlx keep the statement prepared.
        let mut results = self
            .conn
            .fetch_many((text.as_ref(), Some(args.unwrap_or_default())));
        while let Some(result) = results.next().await {
            match result {
                Ok(Either::Left(step)) => {
                    if (led..ends).contains(&done) {
                        out.push(Either::Left(step));
                    }
                    done += 1;
                    if done == led {
                        self.begun = true;
                    }
                }
                Ok(Either::Right(row)) => out.push(Either::Right(row)),
                Err(e) if done < led => return Err(Failed::Lead(e)),
                Err(e) if done < ends => return Err(Failed::Main(e)),
                Err(e) => return Err(Failed::Trail(e)),
            }
        }
        Ok(out)
    }

    /// Holds back a statement whose result nobody waits for, to go with the next call (the
    /// one held before goes first, on its own). Where nothing is held (`may_hold` off) it
    /// runs now.
    pub(crate) async fn hold(
        &mut self,
        sql: Cow<'static, str>,
        args: SqliteArguments<'a>,
        ctx: Cow<'static, str>,
    ) -> Result<()> {
        if !self.may_hold {
            return sqlx::query_with(&sql, args)
                .execute(&mut *self.conn)
                .await
                .map(drop)
                .map_err(|e| db_err(&ctx, e));
        }
        if let Err(e) = self.flush().await {
            return Err(match e {
                Ending::Write(e) => e,
                other => {
                    self.failure = Some(other);
                    db_err(&ctx, went_ahead_failed())
                }
            });
        }
        self.held = Some(Held { sql, args, ctx });
        Ok(())
    }

    /// Sends the statement held back, if any, on its own.
    async fn flush(&mut self) -> std::result::Result<(), Ending> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        match self.call(&held.sql, Some(held.args), None).await {
            Ok(_) => Ok(()),
            Err(Failed::Lead(e)) => Err(Ending::Begin(e)),
            Err(Failed::Main(e) | Failed::Trail(e)) => Err(Ending::Write(db_err(&held.ctx, e))),
        }
    }

    /// Commits what the writes did, with the statement held back if any; nothing to do when
    /// none of them ran a statement.
    async fn commit(&mut self) -> std::result::Result<(), Ending> {
        let done = match self.held.take() {
            Some(held) => {
                let done = self
                    .call(&held.sql, Some(held.args), Some("; COMMIT"))
                    .await;
                return match done {
                    Ok(_) => Ok(()),
                    Err(Failed::Lead(e)) => Err(Ending::Begin(e)),
                    Err(Failed::Main(e)) => Err(Ending::Write(db_err(&held.ctx, e))),
                    Err(Failed::Trail(e)) => Err(Ending::Commit(e)),
                };
            }
            None if !self.begun => return Ok(()),
            None => self.call("COMMIT", None, None).await,
        };
        match done {
            Ok(_) => Ok(()),
            Err(Failed::Lead(e) | Failed::Main(e) | Failed::Trail(e)) => Err(Ending::Commit(e)),
        }
    }

    /// Rolls back what the writes did (its own failure is the next [`Writer::recover`]'s).
    async fn rollback(&mut self) {
        self.held = None;
        if self.begun {
            let _ = self.call("ROLLBACK", None, None).await;
            self.begun = false;
        }
    }
}

crate::sql::impl_sql_store!(SqliteStore, Sqlite, "BEGIN IMMEDIATE", "", "", false, true);

impl SqliteStore {
    /// No change feed: one server per SQLite file, whose followers hear its own runs.
    fn subscribe(&self) -> Option<anywork_core::ChangeFeed> {
        None
    }

    /// One server per SQLite file (docs/scaling.md).
    fn one_process(&self) -> bool {
        true
    }

    /// The looks that found nothing since the last change; `None` in memory.
    fn quiet(&self) -> Option<&Quiet> {
        self.quiet.as_deref()
    }

    /// Where the server's own looks read ([`SqliteStore::upkeep`]).
    fn upkeep_pool(&self) -> &SqlitePool {
        self.upkeep.as_ref().unwrap_or(&self.pool)
    }
}

/// What a job of the writer wrote.
enum Wrote {
    /// Nothing: a write that found nothing to do (the outbox's claim, or the deletion of
    /// settled deliveries, of an idle server).
    Nothing,
    /// Only the readiness heartbeat (`check_ready`, each `/api/health`).
    Heartbeat,
    /// Rows (or anything else: a maintenance statement, a failure).
    Rows,
}

fn writes(work: &Work, reply: &Result<Reply>) -> Wrote {
    match (work, reply) {
        (Work::Write(WriteOp::ClaimDeliveries { .. }), Ok(Reply::Deliveries(d)))
            if d.is_empty() =>
        {
            Wrote::Nothing
        }
        (Work::Write(WriteOp::DeleteSettledDeliveries { .. }), Ok(Reply::Count(0))) => {
            Wrote::Nothing
        }
        (Work::Write(WriteOp::Heartbeat(_)), Ok(_)) => Wrote::Heartbeat,
        _ => Wrote::Rows,
    }
}

/// The stand-in error a query answers when what went ahead of it in its call failed (the
/// real failure is kept in [`Tx::failure`], and the query did not run).
fn went_ahead_failed() -> sqlx::Error {
    sqlx::Error::Protocol("the statements sent ahead of this one failed".into())
}

/// The stand-in error a query answers when the `COMMIT` that went after it in its call failed
/// (the real failure is kept in [`Tx::failure`]; nothing of the transaction is committed).
fn commit_after_failed() -> sqlx::Error {
    sqlx::Error::Protocol("the commit sent after this statement failed".into())
}

impl<'c, 'a: 'c> sqlx::Executor<'c> for &'c mut Tx<'a, SqliteConnection> {
    type Database = Sqlite;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        mut query: E,
    ) -> BoxStream<'e, std::result::Result<Either<SqliteQueryResult, SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Sqlite>,
    {
        let ending = std::mem::take(&mut self.last_call)
            && self.end_early
            && (self.begun || self.lead.is_some());
        if self.lead.is_none() && self.held.is_none() && !ending {
            self.calls += 1;
            return self.conn.fetch_many(query);
        }
        let sql = query.sql();
        let args = query.take_arguments();
        let run = async move {
            if let Err(e) = self.flush().await {
                self.failure = Some(e);
                return vec![Err(went_ahead_failed())];
            }
            let args = match args {
                Ok(args) => args,
                Err(e) => return vec![Err(sqlx::Error::Encode(e))],
            };
            match self.call(sql, args, ending.then_some("; COMMIT")).await {
                Ok(results) => {
                    if ending {
                        // Committed: whatever runs next opens a transaction of its own.
                        self.begun = false;
                        self.ended = true;
                        self.lead = Some("BEGIN IMMEDIATE; ");
                    }
                    results.into_iter().map(Ok).collect()
                }
                Err(Failed::Lead(e)) => {
                    self.failure = Some(Ending::Begin(e));
                    vec![Err(went_ahead_failed())]
                }
                Err(Failed::Main(e)) => vec![Err(e)],
                Err(Failed::Trail(e)) => {
                    self.failure = Some(Ending::Commit(e));
                    vec![Err(commit_after_failed())]
                }
            }
        };
        Box::pin(stream::once(run).flat_map(stream::iter))
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, std::result::Result<Option<SqliteRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Sqlite>,
    {
        if self.lead.is_none() && self.held.is_none() && !(self.last_call && self.end_early) {
            self.last_call = false;
            self.calls += 1;
            return self.conn.fetch_optional(query);
        }
        let mut results = self.fetch_many(query);
        Box::pin(async move {
            while let Some(result) = results.try_next().await? {
                if let Either::Right(row) = result {
                    return Ok(Some(row));
                }
            }
            Ok(None)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [SqliteTypeInfo],
    ) -> BoxFuture<'e, std::result::Result<SqliteStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.conn.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, std::result::Result<Describe<Sqlite>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.conn.describe(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The details of SQLite's plan for `sql` (an `EXPLAIN QUERY PLAN`), its `$1` bound to a
    /// task id and its `$2`, if any, to a time.
    async fn plan_details(store: &SqliteStore, sql: &str) -> Vec<String> {
        let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(sql).bind("t1");
        if sql.contains("$2") {
            query = query.bind(0_i64);
        }
        let plan = query.fetch_all(&store.pool).await.unwrap();
        plan.into_iter().map(|(_, _, _, detail)| detail).collect()
    }

    /// [`plan_details`] of a claim's `UPDATE` with its turn's condition, then `more`, on a
    /// fresh store.
    async fn claim_plan(more: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
        let sql = format!(
            "EXPLAIN QUERY PLAN UPDATE tasks SET status = 'running' WHERE id = $1 \
             AND status = 'pending'{}{more}",
            crate::sql::CLAIM_TURN
        );
        plan_details(&store, &sql).await
    }

    /// A claim reads the active tasks of its session alone (the partial index of migration
    /// 0005), whatever the session's history: its turn's `NOT EXISTS` states the index's
    /// condition as the index does. A change of either text that loses the index fails here.
    #[tokio::test]
    async fn a_claims_turn_reads_the_sessions_active_tasks_alone() {
        let details = claim_plan("").await;
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("SEARCH o USING") && d.contains("tasks_session_active")),
            "{details:?}"
        );
    }

    /// A new task's claimed insert states its turn as a claim does (`sql::CLAIM_TURN`, the
    /// claimed task's columns bound instead): a change of one without the other fails here.
    #[test]
    fn a_created_tasks_turn_is_the_claims_turn() {
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let turn = crate::sql::CLAIM_TURN
            .replace("tasks.session_id", "?")
            .replace("tasks.created_at", "?")
            .replace("tasks.id", "?");
        let turn = words(&turn);
        let turn = turn.strip_prefix("AND ").unwrap();
        let insert = words(crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH);
        assert!(
            insert.contains(&format!("CASE WHEN {turn} AND NOT EXISTS")),
            "{insert}"
        );
    }

    /// A new task stored claimed in its insert (`sql::INSERT_TASK_CLAIMED_THEN_TOUCH`) checks
    /// the reaper's hold on its session by the session's primary key, not by a scan of the
    /// sessions, and its turn by a search of the session's active tasks.
    #[tokio::test]
    async fn a_task_created_claimed_reads_its_turn_and_its_sessions_hold_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
        let insert = crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH
            .split("; UPDATE")
            .next()
            .unwrap();
        let details = plan_details(&store, &format!("EXPLAIN QUERY PLAN {insert}")).await;
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("SEARCH s USING")
                    && d.contains("sqlite_autoindex_sessions_1")),
            "{details:?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.starts_with("SEARCH o USING") && d.contains("tasks_session_active")),
            "{details:?}"
        );
        assert!(
            !details.iter().any(|d| d.starts_with("SCAN")),
            "{details:?}"
        );
    }
}
