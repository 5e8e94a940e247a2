//! [`PostgresStore`]: for servers that share one database or need more than one host.

use std::str::FromStr;
use std::time::Duration;

use anywork_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::sql::{Embedded, db_err};

const MIGRATIONS: Embedded = Embedded(&[(
    1,
    "init",
    include_str!("../migrations/postgres/0001_init.sql"),
)]);

/// A [`TaskStore`](anywork_core::TaskStore) in PostgreSQL.
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
            .acquire_timeout(Duration::from_secs(10))
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

crate::sql::impl_sql_store!(PostgresStore, Postgres, "BEGIN", " FOR UPDATE");

impl PostgresStore {
    /// Every write runs in a transaction of its own: PostgreSQL takes concurrent writers.
    async fn write(&self, op: WriteOp) -> Result<Reply> {
        self.write_on_pool(&op).await
    }
}
