//! [`TaskStore`](anywork_core::TaskStore) implementations.
//!
//! - [`MemoryStore`]: always available; no durability.
//! - [`SqliteStore`] (feature `sqlite`, default): one file, embedded migrations, WAL, a
//!   group-commit writer that recovers from database errors.
//! - [`PostgresStore`] (feature `postgres`): embedded migrations of its own.
//!
//! [`connect`] picks one from a URL, so a binary can take `DATABASE_URL` and stay generic.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod quiet;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub mod sqlite_stats;

use std::sync::Arc;

use anywork_core::{Error, Result, TaskStore};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOptions, SqliteStore};
#[cfg(feature = "sqlite")]
pub use sqlite_stats::WriterStats;

/// Opens the store a URL names: `memory:`, `sqlite:PATH` / `sqlite::memory:` (feature
/// `sqlite`), or `postgres://...` / `postgresql://...` (feature `postgres`).
pub async fn connect(url: &str) -> Result<Arc<dyn TaskStore>> {
    if url == "memory:" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::connect(url).await?));
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresStore::connect(url, 10).await?));
    }
    let scheme = url.split(':').next().unwrap_or_default();
    Err(Error::invalid_input(format!(
        "no store for {scheme:?} URLs in this build: use memory:, sqlite:PATH{}",
        if cfg!(feature = "postgres") {
            " or postgres://..."
        } else {
            " (PostgreSQL needs the `postgres` feature of anywork-store)"
        }
    )))
}
