//! [`PostgresStore`]: for servers that share one database or need more than one host.

use std::str::FromStr;
use std::time::Duration;

use anywork_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::sql::{Embedded, db_err};

const MIGRATIONS: Embedded = Embedded(&[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "outbox dedupe retention",
        include_str!("../migrations/postgres/0002_outbox_dedupe_retention.sql"),
    ),
    (
        3,
        "settings",
        include_str!("../migrations/postgres/0003_settings.sql"),
    ),
]);

/// How long a write waits for a pooled connection (the server down: each attempt to reach
/// it is retried until then) before it fails with `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The tables whose size [`TaskStore::store_size`](anywork_core::TaskStore::store_size)
/// reports.
const TABLES: &str = "('sessions', 'tasks', 'task_logs', 'deliveries', 'store_heartbeat')";

/// A [`TaskStore`](anywork_core::TaskStore) in PostgreSQL.
///
/// Several servers may share one database: status changes are compare-and-set, log seqs are
/// reserved under the task's row lock, and deliveries are claimed with
/// `FOR UPDATE SKIP LOCKED` plus a compare-and-set on the claim, so one delivery has one
/// sender at a time. When the server goes away, calls fail with `Unavailable` within
/// about five seconds (the pool's acquire timeout), and the pool reconnects by itself when it
/// is back: every connection is checked before use, broken ones are replaced.
/// Space freed by deletions is reused by PostgreSQL's autovacuum, which must stay on.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:5432/db`, as in `DATABASE_URL`) with up to
    /// `max_connections` connections and brings the schema up to date.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            Error::invalid_input(format!(
                "bad PostgreSQL URL in DATABASE_URL: {e} (expected postgres://user:pass@host:port/db)"
            ))
        })?;
        Self::connect_with(options, max_connections).await
    }

    /// Connects with explicit options (e.g. a `search_path` per test schema) and migrates.
    pub async fn connect_with(options: PgConnectOptions, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(|e| db_err("connect to PostgreSQL (check DATABASE_URL)", e))?;
        let migrator = sqlx::migrate::Migrator::new(MIGRATIONS)
            .await
            .map_err(|e| Error::internal(format!("bad embedded migrations: {e}")))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| Error::storage(format!("migrating the PostgreSQL schema failed: {e}")))?;
        Ok(Self { pool })
    }
}

crate::sql::impl_sql_store!(
    PostgresStore,
    Postgres,
    "BEGIN",
    " FOR UPDATE",
    " FOR UPDATE SKIP LOCKED"
);

impl PostgresStore {
    /// Every write runs in a transaction of its own: PostgreSQL takes concurrent writers.
    async fn write(&self, op: WriteOp) -> Result<Reply> {
        self.write_on_pool(&op).await
    }

    /// Nothing to do: autovacuum makes the space of deleted rows reusable in place (the
    /// files do not shrink; `VACUUM FULL` would, but locks the tables while it runs).
    async fn compact_files(&self) -> Result<u64> {
        Ok(0)
    }

    /// The tables of this store (in the current schema) with their indexes and TOAST.
    async fn measure(&self) -> Result<anywork_core::StoreSize> {
        let sql = format!(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname IN {TABLES}"
        );
        let (bytes,): (i64,) = sqlx::query_as(&sql)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_err("measure the store", e))?;
        Ok(anywork_core::StoreSize {
            bytes: crate::sql::to_u64(bytes),
            reclaimable_bytes: 0,
        })
    }
}
