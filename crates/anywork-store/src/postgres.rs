//! [`PostgresStore`]: for servers that share one database or need more than one host.

use std::str::FromStr;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use anywork_core::{ChangeFeed, Error, FeedItem, LogChange, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tokio::sync::mpsc;

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
    (
        4,
        "idle hold",
        include_str!("../migrations/postgres/0004_idle_hold.sql"),
    ),
    (
        5,
        "active tasks",
        include_str!("../migrations/postgres/0005_active_tasks.sql"),
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
    /// The subscribers of the change feed, and whether its listener runs.
    feed: Arc<Mutex<Feed>>,
}

/// The change feed's state: one `LISTEN` connection per store, fanned out to subscribers.
#[derive(Debug, Default)]
struct Feed {
    subscribers: Vec<Subscriber>,
    listening: bool,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<FeedItem>,
    /// A change was dropped because this subscriber was full: it is told `Gap` next.
    owes_gap: bool,
}

/// Changes a subscriber may have unread before it is told `Gap` instead.
const FEED_QUEUE: usize = 1024;

/// How long the listener waits before it connects again after a failure.
const LISTEN_RETRY: Duration = Duration::from_millis(500);

fn lock_feed(feed: &Mutex<Feed>) -> std::sync::MutexGuard<'_, Feed> {
    feed.lock().unwrap_or_else(|e| e.into_inner())
}

impl Feed {
    /// Tells every subscriber `item`; drops the ones that are gone.
    fn send(&mut self, item: FeedItem) {
        self.subscribers.retain_mut(|s| {
            if s.owes_gap {
                match s.tx.try_send(FeedItem::Gap) {
                    Ok(()) => s.owes_gap = false,
                    Err(mpsc::error::TrySendError::Full(_)) => return true,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            match s.tx.try_send(item) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.owes_gap = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// A subscriber's end of the feed.
struct FeedStream(mpsc::Receiver<FeedItem>);

impl futures_core::Stream for FeedStream {
    type Item = FeedItem;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<FeedItem>> {
        self.0.poll_recv(cx)
    }
}

/// Parses a `TASK_ID:FIRST:LAST` payload, `:done` after it when the append held the task's
/// `done` (an older server sends no such suffix, and ignores it).
fn parse_change(payload: &str) -> Option<(LogChange, bool)> {
    let mut parts = payload.split(':');
    let task_id = parts.next()?.parse().ok()?;
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    let ended = parts.next() == Some("done");
    Some((
        LogChange {
            task_id,
            first,
            last,
        },
        ended,
    ))
}

/// Listens on the log channel and fans the changes out, until no subscriber is left. Each
/// (re)connection is told as `Gap`: what was appended meanwhile was not heard.
async fn listen(pool: PgPool, feed: Arc<Mutex<Feed>>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for log changes; trying again");
                tokio::time::sleep(LISTEN_RETRY).await;
                if stop_listening(&feed) {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(crate::sql::LOG_CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for log changes; trying again");
            tokio::time::sleep(LISTEN_RETRY).await;
            continue;
        }
        lock_feed(&feed).send(FeedItem::Gap);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Some((change, ended)) = parse_change(n.payload()) {
                        let mut feed = lock_feed(&feed);
                        feed.send(FeedItem::Changed(change));
                        if ended {
                            feed.send(FeedItem::Ended(change.task_id));
                        }
                    }
                }
                // The connection broke: the next call connects again; what was sent
                // meanwhile is lost.
                Ok(None) => lock_feed(&feed).send(FeedItem::Gap),
                Err(e) => {
                    tracing::warn!(error = %e, "listening for log changes failed; trying again");
                    lock_feed(&feed).send(FeedItem::Gap);
                    tokio::time::sleep(LISTEN_RETRY).await;
                    break;
                }
            }
            if stop_listening(&feed) {
                return;
            }
        }
    }
}

/// Whether the listener may stop (nobody subscribes any more); marks it stopped if so.
fn stop_listening(feed: &Mutex<Feed>) -> bool {
    let mut feed = lock_feed(feed);
    feed.subscribers.retain(|s| !s.tx.is_closed());
    if feed.subscribers.is_empty() {
        feed.listening = false;
        return true;
    }
    false
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
        Ok(Self {
            pool,
            feed: Arc::default(),
        })
    }
}

crate::sql::impl_sql_store!(
    PostgresStore,
    Postgres,
    "BEGIN",
    " FOR UPDATE",
    " FOR UPDATE SKIP LOCKED",
    true,
    false
);

impl PostgresStore {
    /// Shared by every server that connects to the database.
    fn one_process(&self) -> bool {
        false
    }

    /// Other servers write too: every look reads.
    fn quiet(&self) -> Option<&crate::quiet::Quiet> {
        None
    }

    /// The background looks share the pool with every other read.
    fn upkeep_pool(&self) -> &PgPool {
        &self.pool
    }

    /// The change feed: a `LISTEN` on the log channel (one connection of the pool, taken on
    /// the first subscription and given back when the last subscriber is gone), fed by the
    /// `pg_notify` each append sends in its transaction.
    fn subscribe(&self) -> Option<ChangeFeed> {
        let (tx, rx) = mpsc::channel(FEED_QUEUE);
        let mut feed = lock_feed(&self.feed);
        feed.subscribers.push(Subscriber {
            tx,
            owes_gap: false,
        });
        if !feed.listening {
            // Outside a runtime there is nobody to feed.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                feed.subscribers.pop();
                return None;
            };
            feed.listening = true;
            runtime.spawn(listen(self.pool.clone(), self.feed.clone()));
        }
        Some(Box::pin(FeedStream(rx)))
    }

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

/// PostgreSQL's writes open their transaction with `BEGIN` of their own: every query goes to
/// the connection as it is (no lead).
impl<'c, 'a: 'c> sqlx::Executor<'c> for &'c mut crate::sql::Tx<'a, sqlx::PgConnection> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> futures_core::stream::BoxStream<
        'e,
        std::result::Result<
            sqlx::Either<sqlx::postgres::PgQueryResult, sqlx::postgres::PgRow>,
            sqlx::Error,
        >,
    >
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Postgres>,
    {
        debug_assert!(self.lead.is_none(), "no lead on PostgreSQL");
        self.conn.fetch_many(query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> futures_core::future::BoxFuture<
        'e,
        std::result::Result<Option<sqlx::postgres::PgRow>, sqlx::Error>,
    >
    where
        'c: 'e,
        E: 'q + sqlx::Execute<'q, Postgres>,
    {
        debug_assert!(self.lead.is_none(), "no lead on PostgreSQL");
        self.conn.fetch_optional(query)
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [sqlx::postgres::PgTypeInfo],
    ) -> futures_core::future::BoxFuture<
        'e,
        std::result::Result<sqlx::postgres::PgStatement<'q>, sqlx::Error>,
    >
    where
        'c: 'e,
    {
        self.conn.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> futures_core::future::BoxFuture<
        'e,
        std::result::Result<sqlx::Describe<Postgres>, sqlx::Error>,
    >
    where
        'c: 'e,
    {
        self.conn.describe(sql)
    }
}

impl crate::sql::Tx<'_, sqlx::PgConnection> {
    /// Runs the statement now: PostgreSQL's writes hold nothing back.
    pub(crate) async fn hold(
        &mut self,
        sql: std::borrow::Cow<'static, str>,
        args: sqlx::postgres::PgArguments,
        ctx: std::borrow::Cow<'static, str>,
    ) -> Result<()> {
        sqlx::query_with(&sql, args)
            .execute(&mut *self.conn)
            .await
            .map(drop)
            .map_err(|e| db_err(&ctx, e))
    }
}
