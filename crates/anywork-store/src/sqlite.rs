//! [`SqliteStore`]: the embedded default. One file, WAL journal, zero set-up.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anywork_core::{Error, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

use crate::sql::{Embedded, db_err};

const MIGRATIONS: Embedded = Embedded(&[(
    1,
    "init",
    include_str!("../migrations/sqlite/0001_init.sql"),
)]);

/// A [`TaskStore`](anywork_core::TaskStore) in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
            .connect_with(options)
            .await
            .map_err(|e| db_err("open SQLite database", e))?;
        let migrator = sqlx::migrate::Migrator::new(MIGRATIONS)
            .await
            .map_err(|e| Error::internal(format!("bad embedded migrations: {e}")))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| Error::storage(format!("migrating the SQLite schema failed: {e}")))?;
        Ok(Self { pool })
    }
}

crate::sql::impl_sql_store!(SqliteStore, Sqlite, "BEGIN IMMEDIATE", "");
