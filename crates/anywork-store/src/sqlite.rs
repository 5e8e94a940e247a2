//! [`SqliteStore`]: the embedded default. One file, WAL journal, zero set-up.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anywork_core::{Error, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _, Sqlite, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::sql::{Embedded, db_err};

const MIGRATIONS: Embedded = Embedded(&[(
    1,
    "init",
    include_str!("../migrations/sqlite/0001_init.sql"),
)]);

/// Writes one transaction may hold at most (group commit).
const MAX_BATCH: usize = 256;

/// How often the WAL is copied into the database file, off the writer.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL length (4 KiB pages) at which the writer checkpoints it to the end itself.
const WAL_LIMIT_FRAMES: i64 = 8192;

/// A [`TaskStore`](anywork_core::TaskStore) in a SQLite file.
///
/// Reads use a small pool. SQLite lets one writer in at a time, so writes go to one writer
/// connection owned by a task of their own, which commits the writes that queued meanwhile
/// together in one transaction (group commit): under load that saves a transaction, WAL
/// pages and the lock hand-off per write, and writers never spin on `SQLITE_BUSY`.
/// A write that fails its checks (conflict, not found…) fails alone; a database error
/// spoils the shared transaction, which is then rolled back and every write of it retried on
/// its own, so that only the failing one fails.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The group-commit writer; `None` for an in-memory database (one connection only),
    /// whose writes take a pooled connection each.
    writer: Option<mpsc::Sender<Job>>,
}

/// A write waiting for the writer, and who waits for its reply.
#[derive(Debug)]
struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<Reply>>,
}

impl SqliteStore {
    /// The file name used inside `DB_DIR`, as in the original AnyWork.
    pub const FILE_NAME: &'static str = "anywork.db";

    /// Opens (creating if needed) `<dir>/anywork.db` and brings its schema up to date.
    pub async fn open_in_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
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
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true);
        Self::connect_with(options, 4).await
    }

    /// Opens a database from a `sqlite:` URL (`sqlite:///data/anywork.db`, `sqlite::memory:`).
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid_input(format!("bad SQLite URL {url:?}: {e}")))?
            .create_if_missing(true);
        // Every connection to `:memory:` is a separate database: keep exactly one.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        Self::connect_with(options, if in_memory { 1 } else { 4 }).await
    }

    /// Opens the pool (`max_connections == 1`: an in-memory database, no separate writer).
    async fn connect_with(options: SqliteConnectOptions, max_connections: u32) -> Result<Self> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let mut pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1);
        if max_connections == 1 {
            pool = pool.idle_timeout(None).max_lifetime(None);
        }
        let pool = pool
            .connect_with(options.clone())
            .await
            .map_err(|e| db_err("open SQLite database", e))?;
        let migrator = sqlx::migrate::Migrator::new(MIGRATIONS)
            .await
            .map_err(|e| Error::internal(format!("bad embedded migrations: {e}")))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| Error::storage(format!("migrating the SQLite schema failed: {e}")))?;
        let writer = if max_connections == 1 {
            None
        } else {
            // The writer never checkpoints on commit: the WAL fsyncs of a checkpoint would
            // hold up every write queued behind it. A background task checkpoints instead.
            let conn = options
                .clone()
                .pragma("wal_autocheckpoint", "0")
                .connect()
                .await
                .map_err(|e| db_err("open the SQLite writer connection", e))?;
            let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
            let wal_frames = Arc::new(AtomicI64::new(0));
            tokio::spawn(write_loop(conn, rx, wal_frames.clone()));
            tokio::spawn(checkpoint_loop(pool.clone(), tx.downgrade(), wal_frames));
            Some(tx)
        };
        Ok(Self { pool, writer })
    }

    async fn write(&self, op: WriteOp) -> Result<Reply> {
        let Some(writer) = &self.writer else {
            return self.write_on_pool(&op).await;
        };
        let gone = || Error::unavailable("the SQLite writer has stopped");
        let (reply, answer) = oneshot::channel();
        writer.send(Job { op, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The writer: takes the writes queued so far, runs them in one transaction, answers them.
/// Ends when every store handle is gone.
async fn write_loop(
    mut conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    wal_frames: Arc<AtomicI64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let replies = run_batch(&mut conn, &batch).await;
        for (job, reply) in batch.drain(..).zip(replies) {
            let _ = job.reply.send(reply);
        }
        // Under steady writes the background checkpoint never sees the end of the WAL, so
        // it cannot start over; the writer, who alone appends, checkpoints it to the end.
        if wal_frames.load(Ordering::Relaxed) >= WAL_LIMIT_FRAMES {
            wal_frames.store(0, Ordering::Relaxed);
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut conn)
                .await
            {
                tracing::warn!(error = %e, "SQLite checkpoint failed");
            }
        }
    }
    let _ = conn.close().await;
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`], on a read connection
/// (a passive checkpoint waits for nobody), and tells the writer how long the WAL is.
/// Ends with the writer.
async fn checkpoint_loop(
    pool: SqlitePool,
    writer: mpsc::WeakSender<Job>,
    wal_frames: Arc<AtomicI64>,
) {
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if writer.upgrade().is_none() {
            return;
        }
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok((_busy, frames, _done)) => wal_frames.store(frames, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed"),
        }
    }
}

/// The replies of `batch`, in order, after they are committed.
async fn run_batch(conn: &mut SqliteConnection, batch: &[Job]) -> Vec<Result<Reply>> {
    if let [job] = batch {
        return vec![write_alone(conn, &job.op).await];
    }
    match shared(conn, batch).await {
        Ok(replies) => replies,
        Err(e) => {
            tracing::debug!(error = %e, writes = batch.len(), "group commit failed; writing one by one");
            let mut replies = Vec::with_capacity(batch.len());
            for job in batch {
                replies.push(write_alone(conn, &job.op).await);
            }
            replies
        }
    }
}

/// Runs every write of `batch` in one transaction. `Err` (and nothing written) when one of
/// them failed other than by its own checks, or the commit failed.
async fn shared(conn: &mut SqliteConnection, batch: &[Job]) -> Result<Vec<Result<Reply>>> {
    let ctx = "group commit";
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_err(ctx, e))?;
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        match apply(&mut tx, &job.op).await {
            Err(e) if !is_logical(&e) => return Err(e), // dropping `tx` rolls back
            reply => replies.push(reply),
        }
    }
    tx.commit().await.map_err(|e| db_err(ctx, e))?;
    Ok(replies)
}

crate::sql::impl_sql_store!(SqliteStore, Sqlite, "BEGIN IMMEDIATE", "");
