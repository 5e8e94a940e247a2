//! The SQL implementation shared by [`SqliteStore`](crate::SqliteStore) and
//! [`PostgresStore`](crate::PostgresStore).
//!
//! Both backends run the same SQL text (`$N` placeholders, `RETURNING`, `CASE` instead of
//! `MAX`/`GREATEST`), so the implementation is written once as a macro and expanded per
//! backend; only connection set-up, the transaction opener and row locking differ.

use std::borrow::Cow;

use anywork_core::{Error, TaskEvent, WireEvent};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// How long a readiness check waits for its write.
pub(crate) const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Rows per multi-row `INSERT` when appending logs (5 parameters each).
pub(crate) const LOG_CHUNK: usize = 1000;

/// SQLite: most log rows inserted in the call of the status change that reserves their seqs
/// (`update_lean`); more go in an insert of their own after it.
pub(crate) const LOGS_WITH_UPDATE: usize = 4;

/// Room for `push_logs_after_update`'s text besides its rows (16 bytes each: `, (?, ?, ?, ?)`).
pub(crate) const LOGS_AFTER_UPDATE_CAPACITY: usize = 192;

/// Room for the text of `update_lean`'s statement, its longest (a claim's, with the turn's
/// `NOT EXISTS`, and SQLite's read back of `last_seq`) included, so that it is not grown while
/// written.
pub(crate) const UPDATE_LEAN_CAPACITY: usize = 800;

/// A claim's condition that it is its session's turn: no other task of the session running
/// or waiting for input, and none pending that came before it. `=` chains, not `IN (…)`:
/// see [`STATUS_IS_ACTIVE`]. Its first term, as the partial index `tasks_session_active`
/// states it (migration 0005), lets the database read the session's active tasks alone, not
/// every task the session ever had: a claim's cost does not grow with the session's history.
pub(crate) const CLAIM_TURN: &str = " AND NOT EXISTS (SELECT 1 FROM tasks o \
    WHERE o.session_id = tasks.session_id \
    AND (o.status = 'pending' OR o.status = 'running' OR o.status = 'input_required') \
    AND (o.status = 'running' OR o.status = 'input_required' \
      OR (o.status = 'pending' AND (o.created_at < tasks.created_at \
        OR (o.created_at = tasks.created_at AND o.id < tasks.id)))))";

/// SQLite: how an `UPDATE tasks … WHERE id = $2 …` that reserves seqs reads the task's new
/// `last_seq` back — a second statement in the same call, not `RETURNING last_seq` (which
/// PostgreSQL keeps). SQLite gathers a `RETURNING`'s rows in a temporary b-tree of their own
/// (opened, its 4 KiB page zeroed, and closed, per statement), and the statement, then counted
/// as one that may write several rows, gets a statement journal in the group commit's
/// transaction (each page it changes copied to it first); the `SELECT` by primary key costs
/// less than both. `changes() = 1`: a row only if the `UPDATE` changed the task's
/// (`changes()` counts the rows of the last `INSERT`, `UPDATE` or `DELETE` that ended on the
/// connection, not what triggers did; test
/// `a_refused_compare_and_set_reads_no_seq_back_in_a_group` in `tests/sqlite.rs`).
pub(crate) const LAST_SEQ_AFTER_UPDATE: &str =
    "; SELECT last_seq FROM tasks WHERE id = $2 AND changes() = 1";

pub(crate) const TASK_COLUMNS: &str = "id, session_id, channel_type, channel_meta, status, \
    message, skills, mcp_servers, result, structured_output, error, cost_usd, input_tokens, \
    output_tokens, cache_creation_input_tokens, cache_read_input_tokens, num_turns, duration_ms, \
    worker_id, push_notification, lease_owner, lease_expires_at, idempotency_key, created_at, \
    started_at, finished_at, logs_deleted_at";

pub(crate) const DELIVERY_COLUMNS: &str = "seq, id, task_id, target, payload, status, attempts, \
    next_attempt_at, last_error, claim_owner, claim_until, created_at, updated_at";

/// Deliveries a sender may still claim.
pub(crate) const OPEN: &str = "('pending', 'failed')";

/// Statuses of a finished task.
pub(crate) const TERMINAL: &str = "('completed', 'failed', 'canceled')";

/// Inserts a session: id, channel type and key, title, created at, last active.
pub(crate) const INSERT_SESSION: &str = "INSERT INTO sessions (id, channel_type, channel_key, \
    title, created_at, last_active) VALUES ($1, $2, $3, $4, $5, $6)";

/// [`INSERT_SESSION`] that inserts nothing (no error) when the id or the channel key is taken.
pub(crate) const INSERT_SESSION_IF_FREE: &str = "INSERT INTO sessions (id, channel_type, \
    channel_key, title, created_at, last_active) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT DO NOTHING";

/// Inserts a new task's columns (the others keep their defaults).
pub(crate) const INSERT_TASK: &str = "INSERT INTO tasks (id, session_id, channel_type, \
    channel_meta, status, message, skills, mcp_servers, push_notification, idempotency_key, \
    created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// [`INSERT_TASK`] that inserts nothing (no error) when the id or the idempotency key is taken.
pub(crate) const INSERT_TASK_IF_FREE: &str = "INSERT INTO tasks (id, session_id, channel_type, \
    channel_meta, status, message, skills, mcp_servers, push_notification, idempotency_key, \
    created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING";

/// Moves a session's `last_active` forward to `$1` (never back); session id `$2`.
pub(crate) const TOUCH_SESSION: &str = "UPDATE sessions SET last_active = \
    CASE WHEN last_active < $1 THEN $1 ELSE last_active END WHERE id = $2";

/// [`TOUCH_SESSION`] that returns the session's `idle_hold_until`.
pub(crate) const TOUCH_SESSION_RETURNING: &str = "UPDATE sessions SET last_active = \
    CASE WHEN last_active < $1 THEN $1 ELSE last_active END WHERE id = $2 \
    RETURNING idle_hold_until";

/// SQLite: [`INSERT_TASK`], then [`TOUCH_SESSION`] of the task's session at its creation
/// (the insert's `$2` and `$11`: one set of arguments for both), in one call.
pub(crate) const INSERT_TASK_THEN_TOUCH: &str = "INSERT INTO tasks (id, session_id, \
    channel_type, channel_meta, status, message, skills, mcp_servers, push_notification, \
    idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11); \
    UPDATE sessions SET last_active = CASE WHEN last_active < $11 THEN $11 ELSE last_active END \
    WHERE id = $2";

/// [`INSERT_TASK_THEN_TOUCH`], then the session's `idle_hold_until` if the touch changed it:
/// read by a third statement, not `RETURNING` (see [`LAST_SEQ_AFTER_UPDATE`]).
pub(crate) const INSERT_TASK_THEN_TOUCH_RETURNING: &str = "INSERT INTO tasks (id, session_id, \
    channel_type, channel_meta, status, message, skills, mcp_servers, push_notification, \
    idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11); \
    UPDATE sessions SET last_active = CASE WHEN last_active < $11 THEN $11 ELSE last_active END \
    WHERE id = $2; SELECT idle_hold_until FROM sessions WHERE id = $2 AND changes() = 1";

/// SQLite's create-claimed in one call: the insert of a new task (its arguments anonymous,
/// `?`, bound in order — id, session, channel type, channel meta, message, skills, MCP
/// servers, push notification, idempotency key, created at — then those of its status), whose
/// status is the claim's (the last argument) when the task can start now, else `pending`: no
/// other task of its session running or waiting for input and none pending before it (the
/// claim's turn, [`CLAIM_TURN`] word for word with the new task's session, created at (twice)
/// and id bound; a test in `sqlite.rs` compares them), and no reaper's hold on the session
/// past now (session, now); then the touch of its session (`$10`, `$2`: named, so that the
/// statements after it take their anonymous arguments after the insert's 17). Decided in the insert, not by an `UPDATE` of the status after it: the
/// task's entries in `tasks_status` and `tasks_session_active` are written once instead of
/// written and moved. A single-row `VALUES` (an `INSERT … SELECT` that reads `tasks` would be
/// copied to a temporary b-tree first).
pub(crate) const INSERT_TASK_CLAIMED_THEN_TOUCH: &str = "INSERT INTO tasks (id, session_id, \
    channel_type, channel_meta, message, skills, mcp_servers, push_notification, \
    idempotency_key, created_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
    CASE WHEN NOT EXISTS (SELECT 1 FROM tasks o WHERE o.session_id = ? \
    AND (o.status = 'pending' OR o.status = 'running' OR o.status = 'input_required') \
    AND (o.status = 'running' OR o.status = 'input_required' \
      OR (o.status = 'pending' AND (o.created_at < ? OR (o.created_at = ? AND o.id < ?))))) \
    AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = ? AND s.idle_hold_until > ?) \
    THEN ? ELSE 'pending' END); \
    UPDATE sessions SET last_active = CASE WHEN last_active < $10 THEN $10 ELSE last_active END \
    WHERE id = $2; ";

/// The `LISTEN/NOTIFY` channel of log appends; payload `TASK_ID:FIRST_SEQ:LAST_SEQ`.
#[allow(dead_code)]
pub(crate) const LOG_CHANNEL: &str = "anywork_logs";

pub(crate) const ACTIVE: &str = "('pending', 'running', 'input_required')";

/// `status IN ACTIVE` as comparisons, for statements that look at one task or one session's
/// tasks: SQLite builds a temporary b-tree for a constant `IN` list of more than two values
/// on every run of the statement (≈ 10k instructions), a chain of `=` costs a few compares.
pub(crate) const STATUS_IS_ACTIVE: &str =
    "(status = 'pending' OR status = 'running' OR status = 'input_required')";

/// A connection inside a write transaction, as the writes ([`WriteOp`]s, in the
/// `impl_sql_store!` expansion) run their statements on it: an [`Executor`](sqlx::Executor)
/// that passes every query on to `conn`. On SQLite's writer it saves calls to the
/// connection's thread (each one a message and a wake-up each way): `lead` (`BEGIN
/// IMMEDIATE; `) goes ahead of the first statement in the same call, and a statement whose
/// result no write waits for ([`hold`](Tx::hold): the inserts of logs and deliveries that end
/// a write) is held back to go with the next call, the `COMMIT` when it is the last.
#[derive(Debug)]
pub(crate) struct Tx<'a, C> {
    pub(crate) conn: &'a mut C,
    /// Statements (no parameters, each ending in `;`) still to go ahead of the next call.
    pub(crate) lead: Option<&'static str>,
    /// Whether `lead` went and succeeded: a transaction is open.
    pub(crate) begun: bool,
    /// Whether statements may be held back (only where the writer sends what is held before
    /// it commits).
    pub(crate) may_hold: bool,
    /// The statement held back.
    #[cfg(feature = "sqlite")]
    pub(crate) held: Option<Held<'a>>,
    /// What failed in a call of a query whose own answer was then a stand-in: the lead, the
    /// statement held back that went first, or the `COMMIT` that went after it.
    pub(crate) failure: Option<Ending>,
    /// Whether the write's transaction may end with the call the write marks as its last
    /// ([`last_call`](Tx::last_call)): set by SQLite's writer for a write alone and for the
    /// last write of a group, whose `COMMIT` then goes in that call.
    pub(crate) end_early: bool,
    /// The write marked its next call as its last: when that call does what the write hopes
    /// for, nothing of the write runs after it; when it does not, it wrote nothing (and what
    /// the write then runs goes in a transaction opened again).
    pub(crate) last_call: bool,
    /// The `COMMIT` went with a call ([`end_early`](Tx::end_early)): what the transaction held
    /// is committed, and what runs after it runs in a new one.
    pub(crate) ended: bool,
    /// Calls made to the connection (SQLite: to its thread).
    pub(crate) calls: u32,
}

/// A statement held back ([`Tx::hold`]), with the context its error is named with.
#[cfg(feature = "sqlite")]
#[derive(Debug)]
pub(crate) struct Held<'a> {
    pub(crate) sql: Cow<'static, str>,
    pub(crate) args: sqlx::sqlite::SqliteArguments<'a>,
    pub(crate) ctx: Cow<'static, str>,
}

/// Why a write's transaction did not end as the write asked.
#[derive(Debug)]
pub(crate) enum Ending {
    /// Its `BEGIN` failed: nothing began.
    Begin(sqlx::Error),
    /// A statement of the write failed, named as the write names it.
    Write(Error),
    /// Its `COMMIT` failed.
    Commit(sqlx::Error),
}

impl<'a, C> Tx<'a, C> {
    /// `conn`, already in its transaction: every query goes as it is, when it is made.
    pub(crate) fn plain(conn: &'a mut C) -> Self {
        Self {
            conn,
            lead: None,
            begun: true,
            may_hold: false,
            #[cfg(feature = "sqlite")]
            held: None,
            failure: None,
            end_early: false,
            last_call: false,
            ended: false,
            calls: 0,
        }
    }

    /// Marks the next call as the write's last (see [`last_call`](Tx::last_call)).
    pub(crate) fn last_call(&mut self) {
        self.last_call = true;
    }
}

/// Migrations compiled into the binary (no `sqlx::migrate!` macro, so no proc-macro build).
#[derive(Debug)]
pub(crate) struct Embedded(pub &'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<Result<Vec<Migration>, BoxDynError>> {
        let migrations = self
            .0
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        Box::pin(async move { Ok(migrations) })
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What to tell a user when the disk under the database is full.
pub(crate) const DISK_FULL: &str = "the disk is full: free space on the volume that holds the \
    database (DB_DIR, or PostgreSQL's data directory), or shorten the retention of finished \
    tasks; writes work again by themselves once there is room";

/// Maps a database error to AnyWork's error kinds: constraint violations become
/// `Conflict`/`NotFound`; lock contention, a full disk, I/O trouble, an unreachable, shutting
/// down or read-only server become `Unavailable` (retryable: the same write may succeed later).
pub(crate) fn db_err(context: &str, e: sqlx::Error) -> Error {
    let err = match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Error::conflict(format!("{context}: already exists"))
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            Error::not_found(format!("{context}: referenced row does not exist"))
        }
        sqlx::Error::Database(db) => match db.code().as_deref().map(Code::of) {
            Some(Code::Busy) => Error::unavailable(format!(
                "{context}: database is busy (another connection or process holds its \
                     write lock), try again ({db})"
            )),
            Some(Code::DiskFull) => Error::unavailable(format!("{context}: {DISK_FULL} ({db})")),
            Some(Code::Io) => Error::unavailable(format!(
                "{context}: disk I/O error ({db}); check that the disk holding the database \
                 is not full or failing"
            )),
            Some(Code::ServerDown) => Error::unavailable(format!(
                "{context}: PostgreSQL is shutting down, starting or out of resources ({db}); \
                 try again shortly"
            )),
            Some(Code::ReadOnly) => Error::unavailable(format!(
                "{context}: the database is read-only ({db}); check the permissions of the \
                 SQLite file, or point DATABASE_URL at the PostgreSQL primary"
            )),
            _ => Error::storage(format!("{context}: {e}")),
        },
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => {
            Error::unavailable(format!("{context}: database unreachable ({e})"))
        }
        _ => Error::storage(format!("{context}: {e}")),
    };
    err.with_source(e)
}

/// The database error codes [`db_err`] treats specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Busy,
    DiskFull,
    Io,
    ServerDown,
    ReadOnly,
    Other,
}

impl Code {
    /// SQLite reports (extended) numeric result codes, PostgreSQL five-character SQLSTATEs.
    fn of(code: &str) -> Code {
        if code.len() == 5 {
            return match code {
                // serialization failure, deadlock, lock_not_available
                "40001" | "40P01" | "55P03" => Code::Busy,
                "53100" => Code::DiskFull,
                "58030" => Code::Io,
                // read_only_sql_transaction (a standby)
                "25006" => Code::ReadOnly,
                // admin/crash shutdown, cannot connect now, out of memory or connections,
                // connection exceptions
                c if c.starts_with("57P") || c.starts_with("53") || c.starts_with("08") => {
                    Code::ServerDown
                }
                _ => Code::Other,
            };
        }
        // The primary SQLite code is the low byte of the extended one.
        match code.parse::<i32>().map(|c| c & 0xff) {
            Ok(5 | 6) => Code::Busy,  // SQLITE_BUSY, SQLITE_LOCKED
            Ok(13) => Code::DiskFull, // SQLITE_FULL
            Ok(10) => Code::Io,       // SQLITE_IOERR
            Ok(8) => Code::ReadOnly,  // SQLITE_READONLY
            _ => Code::Other,
        }
    }
}

pub(crate) fn corrupt(column: &str, e: impl std::fmt::Display) -> Error {
    Error::storage(format!("stored column `{column}` cannot be read: {e}"))
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A stored log row back to an event. The payload is the event's wire JSON, so any text
/// (NUL included, which PostgreSQL `TEXT` refuses raw) round-trips. A payload this version
/// cannot type is kept as [`TaskEvent::Other`] rather than dropped.
pub(crate) fn event_from_row(kind: &str, payload: &str) -> TaskEvent {
    let wire = serde_json::from_str::<WireEvent>(payload).unwrap_or_else(|_| WireEvent {
        kind: kind.to_owned(),
        content: payload.to_owned(),
        metadata: serde_json::Value::Object(Default::default()),
    });
    TaskEvent::try_from(wire.clone()).unwrap_or(TaskEvent::Other(wire))
}

/// Expands the whole [`TaskStore`](anywork_core::TaskStore) implementation for one backend.
///
/// - `$store`: the store type, with fields `pool: sqlx::Pool<$db>`.
/// - `$db`: the sqlx database type.
/// - `$begin`: the statement that opens a write transaction (`BEGIN IMMEDIATE` on SQLite, so
///   that writers queue on the busy timeout instead of failing on lock upgrade).
/// - `$for_update`: the row-lock suffix of a `SELECT` inside a write transaction.
/// - `$skip_locked`: the suffix of a `SELECT` that picks rows to work on while other servers
///   do the same (`FOR UPDATE SKIP LOCKED` on PostgreSQL; SQLite has one writer at a time).
/// - `$notify`: whether each log append also sends `pg_notify` on [`LOG_CHANNEL`] (in the
///   same transaction, so it is delivered on commit): PostgreSQL's change feed.
/// - `$one_call`: whether a query may hold several statements, which then go to the database
///   in one call (SQLite; PostgreSQL prepares one statement per query).
macro_rules! impl_sql_store {
    (
        $store:ty,
        $db:ty,
        $begin:expr,
        $for_update:expr,
        $skip_locked:expr,
        $notify:expr,
        $one_call:expr
    ) => {
        type Row = <$db as sqlx::Database>::Row;

        /// Typed reads of one row's columns; a value that does not decode is reported with
        /// its column's name.
        struct Cols<'r>(&'r Row);

        impl Cols<'_> {
            fn get<T>(&self, c: &str) -> anywork_core::Result<T>
            where
                T: for<'q> sqlx::Decode<'q, $db> + sqlx::Type<$db>,
            {
                use sqlx::Row as _;
                self.0.try_get::<T, _>(c).map_err(|e| $crate::sql::corrupt(c, e))
            }

            fn str(&self, c: &str) -> anywork_core::Result<String> {
                self.get(c)
            }

            fn opt_str(&self, c: &str) -> anywork_core::Result<Option<String>> {
                self.get(c)
            }

            fn i64(&self, c: &str) -> anywork_core::Result<i64> {
                self.get(c)
            }

            fn time(&self, c: &str) -> anywork_core::Result<anywork_core::Timestamp> {
                self.i64(c).map(anywork_core::Timestamp)
            }

            fn opt_time(&self, c: &str) -> anywork_core::Result<Option<anywork_core::Timestamp>> {
                Ok(self.get::<Option<i64>>(c)?.map(anywork_core::Timestamp))
            }

            /// A text column parsed with `FromStr` (ids, statuses).
            fn parse<T: std::str::FromStr>(&self, c: &str) -> anywork_core::Result<T>
            where
                T::Err: std::fmt::Display,
            {
                self.str(c)?.parse().map_err(|e| $crate::sql::corrupt(c, e))
            }

            /// A column of JSON text.
            fn json<T: serde::de::DeserializeOwned>(&self, c: &str) -> anywork_core::Result<T> {
                serde_json::from_str(&self.str(c)?).map_err(|e| $crate::sql::corrupt(c, e))
            }

            /// A nullable column of JSON text.
            fn opt_json<T: serde::de::DeserializeOwned>(
                &self,
                c: &str,
            ) -> anywork_core::Result<Option<T>> {
                self.opt_str(c)?
                    .map(|s| serde_json::from_str(&s).map_err(|e| $crate::sql::corrupt(c, e)))
                    .transpose()
            }

            /// A lease stored as an owner and an expiry column (both set, or none).
            fn lease(
                &self,
                owner: &str,
                until: &str,
            ) -> anywork_core::Result<Option<anywork_core::Lease>> {
                Ok(match (self.opt_str(owner)?, self.opt_time(until)?) {
                    (Some(owner), Some(expires_at)) => {
                        Some(anywork_core::Lease { owner, expires_at })
                    }
                    _ => None,
                })
            }
        }

        fn task_from_row(row: &Row) -> anywork_core::Result<anywork_core::Task> {
            use $crate::sql::to_u64;
            use anywork_core::*;
            let r = Cols(row);
            Ok(Task {
                id: r.parse("id")?,
                session_id: r.parse("session_id")?,
                channel_type: r.str("channel_type")?,
                channel_meta: r.json("channel_meta")?,
                status: r.parse("status")?,
                message: r.json("message")?,
                skills: r.json("skills")?,
                mcp_servers: r.json("mcp_servers")?,
                result: r.opt_json("result")?,
                structured_output: r.opt_json("structured_output")?,
                error: r.opt_json("error")?,
                cost_usd: r.get("cost_usd")?,
                usage: TokenUsage {
                    input_tokens: to_u64(r.i64("input_tokens")?),
                    output_tokens: to_u64(r.i64("output_tokens")?),
                    cache_creation_input_tokens: to_u64(r.i64("cache_creation_input_tokens")?),
                    cache_read_input_tokens: to_u64(r.i64("cache_read_input_tokens")?),
                },
                num_turns: u32::try_from(r.i64("num_turns")?).unwrap_or(0),
                duration_ms: r.get::<Option<i64>>("duration_ms")?.map(to_u64),
                worker_id: r.opt_str("worker_id")?,
                push_notification: r.opt_json("push_notification")?,
                lease: r.lease("lease_owner", "lease_expires_at")?,
                idempotency_key: r.opt_str("idempotency_key")?,
                created_at: r.time("created_at")?,
                started_at: r.opt_time("started_at")?,
                finished_at: r.opt_time("finished_at")?,
                logs_deleted_at: r.opt_time("logs_deleted_at")?,
            })
        }

        /// A delivery row and its `seq` (the enqueue order).
        fn delivery_from_row(row: &Row) -> anywork_core::Result<(i64, anywork_core::Delivery)> {
            let r = Cols(row);
            let delivery = anywork_core::Delivery {
                id: r.parse("id")?,
                task_id: r.parse("task_id")?,
                target: r.json("target")?,
                payload: r.json("payload")?,
                status: r.parse("status")?,
                attempts: u32::try_from(r.i64("attempts")?).unwrap_or(u32::MAX),
                next_attempt_at: r.time("next_attempt_at")?,
                last_error: r.opt_json("last_error")?,
                claim: r.lease("claim_owner", "claim_until")?,
                created_at: r.time("created_at")?,
                updated_at: r.time("updated_at")?,
            };
            Ok((r.i64("seq")?, delivery))
        }

        /// Rows in enqueue order, without their seq.
        fn deliveries_from_rows(rows: &[Row]) -> anywork_core::Result<Vec<anywork_core::Delivery>> {
            let mut out = rows
                .iter()
                .map(delivery_from_row)
                .collect::<anywork_core::Result<Vec<_>>>()?;
            out.sort_by_key(|(seq, _)| *seq);
            Ok(out.into_iter().map(|(_, d)| d).collect())
        }

        fn session_from_row(row: &Row) -> anywork_core::Result<anywork_core::Session> {
            let r = Cols(row);
            Ok(anywork_core::Session {
                id: r.parse("id")?,
                channel_type: r.str("channel_type")?,
                channel_key: r.opt_str("channel_key")?,
                title: r.str("title")?,
                created_at: r.time("created_at")?,
                last_active: r.time("last_active")?,
            })
        }

        /// `(type, payload, created_at)` rows for the log table. A log whose wire JSON was
        /// made already ([`NewTaskLog::now_encoded`](anywork_core::NewTaskLog::now_encoded))
        /// is written as it is: the same bytes, not encoded a second time.
        fn encode_logs(
            logs: Vec<anywork_core::NewTaskLog>,
        ) -> anywork_core::Result<Vec<(String, String, i64)>> {
            logs.into_iter()
                .map(|log| {
                    if let Some(json) = log.wire_json() {
                        return Ok((log.event.kind().to_owned(), json.to_owned(), log.timestamp.0));
                    }
                    let wire = anywork_core::WireEvent::from(log.event);
                    Ok((wire.kind.clone(), json_text(&wire)?, log.timestamp.0))
                })
                .collect()
        }

        /// The `UpdateTask` of a status change with its events and deliveries (`lean`: answer
        /// the last seq only).
        fn update_op(
            id: anywork_core::TaskId,
            expected: anywork_core::TaskStatus,
            change: anywork_core::TaskChange,
            logs: Vec<anywork_core::NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
            lean: bool,
        ) -> anywork_core::Result<WriteOp> {
            Ok(WriteOp::UpdateTask {
                id,
                expected,
                change: Box::new(change),
                rows: Some(encode_logs(logs)?),
                deliveries: deliveries.into_iter().map(|d| d.into_delivery(id)).collect(),
                lean,
            })
        }

        /// The `ClaimTask` of a claim with its events and deliveries (`lean`: answer the last
        /// seq only when claimed).
        fn claim_op(
            id: anywork_core::TaskId,
            change: anywork_core::TaskChange,
            logs: Vec<anywork_core::NewTaskLog>,
            deliveries: Vec<anywork_core::NewDelivery>,
            lean: bool,
        ) -> anywork_core::Result<WriteOp> {
            anywork_core::store::check_claim(&change)?;
            Ok(WriteOp::ClaimTask {
                id,
                change: Box::new(change),
                rows: encode_logs(logs)?,
                deliveries: deliveries.into_iter().map(|d| d.into_delivery(id)).collect(),
                lean,
            })
        }

        fn json_text<T: serde::Serialize>(value: &T) -> anywork_core::Result<String> {
            serde_json::to_string(value)
                .map_err(|e| anywork_core::Error::internal(format!("cannot encode JSON: {e}")))
        }

        /// One write of the store, as data: run alone in its own transaction, or with others
        /// in one transaction (SQLite's group commit). Running it must either succeed, or fail
        /// with a "logical" error (conflict, not found, invalid transition or input) before
        /// writing anything, or fail with another error, which spoils the whole transaction.
        #[derive(Debug)]
        pub(crate) enum WriteOp {
            CreateSession(anywork_core::Session),
            SetSessionTitle(anywork_core::SessionId, String),
            TouchSession(anywork_core::SessionId, anywork_core::Timestamp),
            DeleteSession(anywork_core::SessionId),
            CreateTask(Box<anywork_core::Task>),
            /// A new task, claimed in the same transaction when it can start now
            /// (`create_task_claimed`).
            CreateTaskClaimed {
                task: Box<anywork_core::Task>,
                change: Box<anywork_core::TaskChange>,
                rows: Vec<(String, String, i64)>,
                deliveries: Vec<anywork_core::Delivery>,
                /// A reaper's hold on the session that ends after this keeps the task pending.
                now: anywork_core::Timestamp,
            },
            /// A new session and its first task, both or neither; the task claimed in the same
            /// transaction when the claim is given (`create_session_with_task_claimed`).
            CreateSessionWithTask(
                Box<anywork_core::Session>,
                Box<anywork_core::Task>,
                Option<Box<FirstClaim>>,
            ),
            UpdateTask {
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: Box<anywork_core::TaskChange>,
                rows: Option<Vec<(String, String, i64)>>,
                deliveries: Vec<anywork_core::Delivery>,
                /// Answer `Seq` (the last seq) without reading the task's row when the
                /// compare-and-set succeeds (`update_task_lean`).
                lean: bool,
            },
            ClaimDeliveries {
                owner: String,
                now: anywork_core::Timestamp,
                until: anywork_core::Timestamp,
                limit: u32,
            },
            RecordAttempt {
                id: anywork_core::DeliveryId,
                owner: String,
                attempt: anywork_core::DeliveryAttempt,
                at: anywork_core::Timestamp,
            },
            RetryDelivery(anywork_core::DeliveryId, anywork_core::Timestamp),
            DeleteSettledDeliveries {
                before: anywork_core::Timestamp,
                limit: u32,
            },
            DeleteFinishedLogs {
                finished_before: anywork_core::Timestamp,
                max_tasks: u32,
                now: anywork_core::Timestamp,
            },
            Heartbeat(anywork_core::Timestamp),
            RenewLease {
                id: anywork_core::TaskId,
                owner: String,
                expires_at: anywork_core::Timestamp,
            },
            AppendLogs(anywork_core::TaskId, Vec<(String, String, i64)>),
            /// `AppendLogs` refused (`Conflict`) once the task is over.
            AppendLogsWhileActive(anywork_core::TaskId, Vec<(String, String, i64)>),
            ClaimTask {
                id: anywork_core::TaskId,
                change: Box<anywork_core::TaskChange>,
                rows: Vec<(String, String, i64)>,
                deliveries: Vec<anywork_core::Delivery>,
                /// Answer `Seq` (the last seq) without reading the task's row when the task
                /// is claimed (`claim_task_lean`).
                lean: bool,
            },
            PutSetting {
                key: String,
                value: String,
                at: anywork_core::Timestamp,
            },
            /// Answers `Count(1)` when held, `Count(0)` when refused.
            HoldIdleSession {
                session: anywork_core::SessionId,
                owner: String,
                now: anywork_core::Timestamp,
                until: anywork_core::Timestamp,
            },
            ReleaseIdleHold {
                session: anywork_core::SessionId,
                owner: String,
            },
        }

        /// The claim of a new session's first task (`create_session_with_task_claimed`).
        #[derive(Debug)]
        pub(crate) struct FirstClaim {
            change: anywork_core::TaskChange,
            rows: Vec<(String, String, i64)>,
            deliveries: Vec<anywork_core::Delivery>,
        }

        /// What a [`WriteOp`] returns.
        #[derive(Debug)]
        pub(crate) enum Reply {
            Unit,
            Session(anywork_core::Session),
            Task(Box<anywork_core::Task>, u64),
            /// A new session and its first task; the last seq when the task was claimed.
            Created(Box<anywork_core::Session>, Box<anywork_core::Task>, Option<u64>),
            Seq(u64),
            Delivery(Box<anywork_core::Delivery>),
            Deliveries(Vec<anywork_core::Delivery>),
            Count(u64),
            DeletedLogs(anywork_core::DeletedLogs),
            Claim(Box<anywork_core::Claim>),
            /// `CreateTaskClaimed`: the last seq when the task was claimed.
            CreatedClaimed(Option<u64>),
        }

        fn unexpected_reply(reply: Reply) -> anywork_core::Error {
            anywork_core::Error::internal(format!("store write answered {reply:?}"))
        }

        /// A connection inside a write's transaction, as the writes see it.
        type Conn<'a> = $crate::sql::Tx<'a, <$db as sqlx::Database>::Connection>;

        /// Whether `e` left the transaction as it was (a check that failed before writing).
        #[allow(dead_code)]
        pub(crate) fn is_logical(e: &anywork_core::Error) -> bool {
            use anywork_core::ErrorKind::*;
            matches!(
                e.kind(),
                Conflict | NotFound | InvalidTransition | InvalidInput
            )
        }

        /// Runs `op` inside the transaction open on `conn`.
        pub(crate) async fn apply<'a>(
            conn: &mut Conn<'a>,
            op: &'a WriteOp,
        ) -> anywork_core::Result<Reply> {
            use $crate::sql::db_err;
            match op {
                WriteOp::CreateSession(session) => {
                    insert_session(conn, session, $crate::sql::INSERT_SESSION)
                        .await
                        .map_err(|e| db_err(&format!("create session {}", session.id), e))?;
                    Ok(Reply::Session(session.clone()))
                }
                WriteOp::SetSessionTitle(id, title) => {
                    let done = sqlx::query("UPDATE sessions SET title = $1 WHERE id = $2")
                        .bind(title)
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err("rename session", e))?;
                    if done.rows_affected() == 0 {
                        return Err(anywork_core::Error::not_found(format!(
                            "session {id} not found"
                        )));
                    }
                    Ok(Reply::Unit)
                }
                WriteOp::TouchSession(id, at) => {
                    let done = sqlx::query(
                        $crate::sql::TOUCH_SESSION,
                    )
                    .bind(at.0)
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err("touch session", e))?;
                    if done.rows_affected() == 0 {
                        return Err(anywork_core::Error::not_found(format!(
                            "session {id} not found"
                        )));
                    }
                    Ok(Reply::Unit)
                }
                WriteOp::DeleteSession(id) => {
                    let ctx = "delete session";
                    // A missing session has no tasks (they reference it): checked first, so
                    // that `NotFound` writes nothing.
                    let found = sqlx::query("SELECT 1 FROM sessions WHERE id = $1")
                        .bind(id.as_str())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    if found.is_none() {
                        return Err(anywork_core::Error::not_found(format!(
                            "session {id} not found"
                        )));
                    }
                    for table in ["task_logs", "deliveries"] {
                        sqlx::query(&format!(
                            "DELETE FROM {table} WHERE task_id IN \
                             (SELECT id FROM tasks WHERE session_id = $1)"
                        ))
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    }
                    sqlx::query("DELETE FROM tasks WHERE session_id = $1")
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    sqlx::query("DELETE FROM sessions WHERE id = $1")
                        .bind(id.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    Ok(Reply::Unit)
                }
                WriteOp::CreateTask(task) => {
                    let ctx = "create task";
                    // The touch after the insert, so that a duplicate id is `Conflict` before
                    // a missing session is `NotFound`, as in every store.
                    let (touched, _) = insert_and_touch(conn, task, false, ctx).await?;
                    if touched == 0 {
                        return Err(undo_insert(conn, task, ctx).await);
                    }
                    Ok(Reply::Task(task.clone(), 0))
                }
                WriteOp::CreateTaskClaimed {
                    task,
                    change,
                    rows,
                    deliveries,
                    now,
                } => {
                    let ctx = "create a claimed task";
                    if $one_call && deliveries.is_empty() {
                        // SQLite: the insert, the touch and the claim in one call.
                        if let Some(reply) =
                            insert_touch_claim(conn, task, change, rows, *now, ctx).await?
                        {
                            return Ok(reply);
                        }
                    }
                    // The touch answers the reaper's hold; on PostgreSQL it takes the
                    // session's row lock, which claimers of the session take too: the claim
                    // below sees every task of the session committed before it.
                    let (_, hold) = insert_and_touch(conn, task, true, ctx).await?;
                    let Some(hold) = hold else {
                        return Err(undo_insert(conn, task, ctx).await);
                    };
                    let held = Cols(&hold)
                        .opt_time("idle_hold_until")?
                        .is_some_and(|until| until > *now);
                    if held || duplicate_delivery(conn, deliveries).await?.is_some() {
                        return Ok(Reply::CreatedClaimed(None));
                    }
                    let pending = anywork_core::TaskStatus::Pending;
                    let Some((last, written)) = update_lean(
                        conn,
                        task.id,
                        pending,
                        change,
                        rows,
                        true,
                        deliveries.is_empty(),
                    )
                    .await?
                    else {
                        return Ok(Reply::CreatedClaimed(None));
                    };
                    if !written {
                        insert_logs(conn, task.id, rows, last).await?;
                    }
                    for d in deliveries {
                        insert_delivery(conn, d).await?;
                    }
                    Ok(Reply::CreatedClaimed(Some($crate::sql::to_u64(last))))
                }
                WriteOp::CreateSessionWithTask(session, task, claim) => {
                    // Both inserts skip a row whose id or unique key is taken instead of
                    // failing, so that a conflict leaves the transaction usable (PostgreSQL
                    // aborts one on a failed statement): the session is taken back if its
                    // task is refused, and the conflict writes nothing.
                    let what = || format!("create session {}", session.id);
                    let made = insert_session(conn, session, $crate::sql::INSERT_SESSION_IF_FREE)
                        .await
                        .map_err(|e| db_err(&what(), e))?;
                    if made == 0 {
                        return Err(anywork_core::Error::conflict(match &session.channel_key {
                            Some(key) => format!(
                                "{}: already exists (its id, or a {} session with key {key:?})",
                                what(),
                                session.channel_type
                            ),
                            None => format!("{}: already exists", what()),
                        }));
                    }
                    let made = insert_task(conn, task, $crate::sql::INSERT_TASK_IF_FREE)
                        .await?
                        .map_err(|e| db_err(&creating_task(task), e))?;
                    if made == 0 {
                        sqlx::query("DELETE FROM sessions WHERE id = $1")
                            .bind(session.id.as_str())
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| db_err(&what(), e))?;
                        return Err(anywork_core::Error::conflict(format!(
                            "{}: already exists",
                            creating_task(task)
                        )));
                    }
                    let Some(claim) = claim else {
                        return Ok(Reply::Created(session.clone(), task.clone(), None));
                    };
                    // The session is new: nothing of it is active or held, so the claim is
                    // the task's unless a delivery id is taken (then it stays pending).
                    if duplicate_delivery(conn, &claim.deliveries).await?.is_some() {
                        return Ok(Reply::Created(session.clone(), task.clone(), None));
                    }
                    let pending = anywork_core::TaskStatus::Pending;
                    let Some((last, written)) =
                        update_lean(
                            conn,
                            task.id,
                            pending,
                            &claim.change,
                            &claim.rows,
                            true,
                            claim.deliveries.is_empty(),
                        )
                            .await?
                    else {
                        return Ok(Reply::Created(session.clone(), task.clone(), None));
                    };
                    if !written {
                        insert_logs(conn, task.id, &claim.rows, last).await?;
                    }
                    for d in &claim.deliveries {
                        insert_delivery(conn, d).await?;
                    }
                    Ok(Reply::Created(
                        session.clone(),
                        task.clone(),
                        Some($crate::sql::to_u64(last)),
                    ))
                }
                WriteOp::UpdateTask {
                    id,
                    expected,
                    change,
                    rows,
                    deliveries,
                    lean,
                } => {
                    // Duplicate delivery ids are found before anything is written, so that
                    // the failure stays "logical" (the op writes nothing).
                    if let Some(dup) = duplicate_delivery(conn, deliveries).await? {
                        return Err(anywork_core::Error::conflict(format!(
                            "delivery {dup} already exists"
                        )));
                    }
                    let appended = rows.as_deref().unwrap_or_default();
                    if *lean {
                        // Without reading the row; when it does not apply (a lost race, an
                        // illegal change, an unknown task), the read below tells why.
                        if let Some((last, written)) =
                            update_lean(
                                conn,
                                *id,
                                *expected,
                                change,
                                appended,
                                false,
                                deliveries.is_empty(),
                            )
                            .await?
                        {
                            if !written {
                                insert_logs(conn, *id, appended, last).await?;
                            }
                            for d in deliveries {
                                insert_delivery(conn, d).await?;
                            }
                            return Ok(Reply::Seq($crate::sql::to_u64(last)));
                        }
                    }
                    let locked = lock_task(conn, *id).await?;
                    let (task, last) =
                        update_locked(conn, locked, *expected, change, appended).await?;
                    insert_logs(conn, *id, appended, last).await?;
                    for d in deliveries {
                        insert_delivery(conn, d).await?;
                    }
                    let last = if rows.is_some() { $crate::sql::to_u64(last) } else { 0 };
                    Ok(Reply::Task(Box::new(task), last))
                }
                WriteOp::ClaimDeliveries {
                    owner,
                    now,
                    until,
                    limit,
                } => {
                    // The inner SELECT picks the due rows (skipping rows another claimer has
                    // locked, on PostgreSQL); the outer UPDATE repeats the conditions as a
                    // compare-and-set, so two claimers can never both take a row.
                    let sql = format!(
                        "UPDATE deliveries SET claim_owner = $1, claim_until = $2 \
                         WHERE seq IN (SELECT d.seq FROM deliveries d \
                           WHERE d.status IN {open} AND d.next_attempt_at <= $3 \
                           AND (d.claim_until IS NULL OR d.claim_until <= $3) \
                           AND NOT EXISTS (SELECT 1 FROM deliveries o \
                             WHERE o.task_id = d.task_id AND o.kind = d.kind \
                             AND o.address = d.address AND o.seq < d.seq \
                             AND o.status IN {open}) \
                           ORDER BY d.next_attempt_at, d.seq LIMIT $4{skip}) \
                         AND status IN {open} \
                         AND (claim_until IS NULL OR claim_until <= $3) \
                         RETURNING {cols}",
                        open = $crate::sql::OPEN,
                        skip = $skip_locked,
                        cols = $crate::sql::DELIVERY_COLUMNS,
                    );
                    let rows = sqlx::query(&sql)
                        .bind(owner)
                        .bind(until.0)
                        .bind(now.0)
                        .bind(i64::from(*limit))
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|e| db_err("claim deliveries", e))?;
                    let mut claimed = rows
                        .iter()
                        .map(delivery_from_row)
                        .collect::<anywork_core::Result<Vec<_>>>()?;
                    claimed.sort_by_key(|(seq, d)| (d.next_attempt_at, *seq));
                    Ok(Reply::Deliveries(claimed.into_iter().map(|(_, d)| d).collect()))
                }
                WriteOp::RecordAttempt {
                    id,
                    owner,
                    attempt,
                    at,
                } => {
                    let mut d = lock_delivery(conn, *id).await?;
                    let before = d.status;
                    attempt.apply(&mut d, owner, *at)?;
                    store_delivery(conn, &d, before, Some(owner)).await?;
                    Ok(Reply::Delivery(Box::new(d)))
                }
                WriteOp::RetryDelivery(id, now) => {
                    let mut d = lock_delivery(conn, *id).await?;
                    let before = d.status;
                    d.retry(*now)?;
                    store_delivery(conn, &d, before, None).await?;
                    Ok(Reply::Delivery(Box::new(d)))
                }
                WriteOp::DeleteSettledDeliveries { before, limit } => {
                    let sql = format!(
                        "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries \
                         WHERE status IN ('sent', 'dead') AND updated_at < $1 \
                         ORDER BY updated_at, seq LIMIT $2{})",
                        $skip_locked
                    );
                    let done = sqlx::query(&sql)
                        .bind(before.0)
                        .bind(i64::from(*limit))
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err("delete settled deliveries", e))?;
                    Ok(Reply::Count(done.rows_affected()))
                }
                WriteOp::DeleteFinishedLogs {
                    finished_before,
                    max_tasks,
                    now,
                } => {
                    let ctx = "delete the logs of finished tasks";
                    let sql = format!(
                        "SELECT id FROM tasks WHERE finished_at IS NOT NULL \
                         AND logs_deleted_at IS NULL AND finished_at < $1 AND status IN {} \
                         ORDER BY finished_at, id LIMIT $2{}",
                        $crate::sql::TERMINAL,
                        $skip_locked
                    );
                    let ids = sqlx::query(&sql)
                        .bind(finished_before.0)
                        .bind(i64::from(*max_tasks))
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    let mut deleted = anywork_core::DeletedLogs::default();
                    for row in &ids {
                        let id = Cols(row).str("id")?;
                        let gone = sqlx::query("DELETE FROM task_logs WHERE task_id = $1")
                            .bind(&id)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| db_err(ctx, e))?;
                        sqlx::query("UPDATE tasks SET logs_deleted_at = $1 WHERE id = $2")
                            .bind(now.0)
                            .bind(&id)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| db_err(ctx, e))?;
                        deleted.tasks += 1;
                        deleted.events += gone.rows_affected();
                    }
                    Ok(Reply::DeletedLogs(deleted))
                }
                WriteOp::Heartbeat(at) => {
                    sqlx::query("UPDATE store_heartbeat SET beat_at = $1 WHERE id = 1")
                        .bind(at.0)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err("readiness heartbeat", e))?;
                    Ok(Reply::Unit)
                }
                WriteOp::RenewLease {
                    id,
                    owner,
                    expires_at,
                } => {
                    let sql = format!(
                        "UPDATE tasks SET lease_expires_at = $1 WHERE id = $2 \
                         AND lease_owner = $3 AND {}",
                        $crate::sql::STATUS_IS_ACTIVE
                    );
                    let done = sqlx::query(&sql)
                        .bind(expires_at.0)
                        .bind(id.to_string())
                        .bind(owner)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| db_err("renew lease", e))?;
                    if done.rows_affected() == 0 {
                        // Tell "no such task" apart from "not yours".
                        lock_task(conn, *id).await?;
                        return Err(anywork_core::Error::conflict(format!(
                            "task {id} is not leased by {owner:?}"
                        )));
                    }
                    Ok(Reply::Unit)
                }
                WriteOp::AppendLogs(id, rows) => {
                    Ok(Reply::Seq(append_in(conn, *id, rows, false).await?))
                }
                WriteOp::AppendLogsWhileActive(id, rows) => {
                    Ok(Reply::Seq(append_in(conn, *id, rows, true).await?))
                }
                WriteOp::ClaimTask {
                    id,
                    change,
                    rows,
                    deliveries,
                    lean,
                } => {
                    use anywork_core::Claim;
                    let ctx = "claim a task";
                    let claim = |c| Ok(Reply::Claim(Box::new(c)));
                    #[allow(clippy::const_is_empty)]
                    let row_locks = !$for_update.is_empty();
                    if row_locks {
                        // The session's row lock makes claimers of one session take turns
                        // (PostgreSQL): what they read next is settled.
                        let row = sqlx::query("SELECT session_id FROM tasks WHERE id = $1")
                            .bind(id.to_string())
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(|e| db_err(ctx, e))?
                            .ok_or_else(|| {
                                anywork_core::Error::not_found(format!("task {id} not found"))
                            })?;
                        let session = Cols(&row).str("session_id")?;
                        sqlx::query(&format!(
                            "SELECT id FROM sessions WHERE id = $1{}",
                            $for_update
                        ))
                        .bind(&session)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(|e| db_err(ctx, e))?;
                    }
                    if *lean && duplicate_delivery(conn, deliveries).await?.is_none() {
                        // One statement claims the task if it is pending and its session's
                        // turn, without reading its row; otherwise (nothing written) the
                        // reads below tell why.
                        let pending = anywork_core::TaskStatus::Pending;
                        if let Some((last, written)) =
                            update_lean(conn, *id, pending, change, rows, true, deliveries.is_empty())
                                .await?
                        {
                            if !written {
                                insert_logs(conn, *id, rows, last).await?;
                            }
                            for d in deliveries {
                                insert_delivery(conn, d).await?;
                            }
                            return Ok(Reply::Seq($crate::sql::to_u64(last)));
                        }
                    }
                    // SQLite has one writer at a time (this transaction): nothing to lock,
                    // and the task's row names its session.
                    let task = lock_task(conn, *id).await?;
                    let session = task.session_id.as_str().to_owned();
                    if task.status != anywork_core::TaskStatus::Pending {
                        return claim(Claim::NotPending(task));
                    }
                    // One read for both questions: an active task of the session sorts
                    // first (busy), else its oldest pending one (whose turn it is). Most
                    // often that is this task: its id and status tell, and only another
                    // task's whole row is read.
                    let first = sqlx::query(&format!(
                        "SELECT id, status FROM tasks WHERE session_id = $1 AND {} \
                         ORDER BY CASE WHEN status = 'pending' THEN 1 ELSE 0 END, \
                         created_at, id LIMIT 1",
                        $crate::sql::STATUS_IS_ACTIVE
                    ))
                    .bind(&session)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
                    if let Some(row) = first {
                        let (first, status): (anywork_core::TaskId, anywork_core::TaskStatus) =
                            (Cols(&row).parse("id")?, Cols(&row).parse("status")?);
                        if first != *id || status != anywork_core::TaskStatus::Pending {
                            let other = sqlx::query(&format!(
                                "SELECT {} FROM tasks WHERE id = $1",
                                $crate::sql::TASK_COLUMNS
                            ))
                            .bind(first.to_string())
                            .fetch_one(&mut *conn)
                            .await
                            .map_err(|e| db_err(ctx, e))?;
                            let other = task_from_row(&other)?;
                            return claim(if status == anywork_core::TaskStatus::Pending {
                                Claim::NotFirst(other)
                            } else {
                                Claim::Busy(other)
                            });
                        }
                    }
                    if let Some(dup) = duplicate_delivery(conn, deliveries).await? {
                        return Err(anywork_core::Error::conflict(format!(
                            "delivery {dup} already exists"
                        )));
                    }
                    // The task row read above is the locked one: no second read.
                    let (task, last) = update_locked(
                        conn,
                        task,
                        anywork_core::TaskStatus::Pending,
                        change,
                        rows,
                    )
                    .await?;
                    insert_logs(conn, *id, rows, last).await?;
                    for d in deliveries {
                        insert_delivery(conn, d).await?;
                    }
                    claim(Claim::Claimed(task, $crate::sql::to_u64(last)))
                }
                WriteOp::PutSetting { key, value, at } => {
                    sqlx::query(
                        "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                         updated_at = excluded.updated_at",
                    )
                    .bind(key)
                    .bind(value)
                    .bind(at.0)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err("save setting", e))?;
                    Ok(Reply::Unit)
                }
                WriteOp::HoldIdleSession {
                    session,
                    owner,
                    now,
                    until,
                } => {
                    let ctx = "hold an idle session";
                    // The session's row lock (PostgreSQL) orders the hold with `create_task`,
                    // which takes it too (it touches the session): the conditional UPDATE
                    // below, a statement of its own, sees every task created before it.
                    let found = sqlx::query(&format!(
                        "SELECT id FROM sessions WHERE id = $1{}",
                        $for_update
                    ))
                    .bind(session.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
                    if found.is_none() {
                        return Err(anywork_core::Error::not_found(format!(
                            "session {session} not found"
                        )));
                    }
                    let done = sqlx::query(&format!(
                        "UPDATE sessions SET idle_hold_owner = $2, idle_hold_until = $3 \
                         WHERE id = $1 \
                         AND (idle_hold_until IS NULL OR idle_hold_until <= $4 \
                           OR idle_hold_owner = $2) \
                         AND NOT EXISTS (SELECT 1 FROM tasks \
                           WHERE session_id = $1 AND status IN {})",
                        $crate::sql::ACTIVE
                    ))
                    .bind(session.as_str())
                    .bind(owner)
                    .bind(until.0)
                    .bind(now.0)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
                    Ok(Reply::Count(done.rows_affected()))
                }
                WriteOp::ReleaseIdleHold { session, owner } => {
                    sqlx::query(
                        "UPDATE sessions SET idle_hold_owner = NULL, idle_hold_until = NULL \
                         WHERE id = $1 AND idle_hold_owner = $2",
                    )
                    .bind(session.as_str())
                    .bind(owner)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err("release an idle hold", e))?;
                    Ok(Reply::Unit)
                }
            }
        }

        /// Inserts `session` with `sql` (one of [`INSERT_SESSION`](crate::sql::INSERT_SESSION)
        /// and its `_IF_FREE` form): the rows inserted.
        async fn insert_session(
            conn: &mut Conn<'_>,
            session: &anywork_core::Session,
            sql: &str,
        ) -> Result<u64, sqlx::Error> {
            let done = sqlx::query(sql)
                .bind(session.id.as_str())
                .bind(&session.channel_type)
                .bind(&session.channel_key)
                .bind(&session.title)
                .bind(session.created_at.0)
                .bind(session.last_active.0)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        }

        /// Inserts `task` with `sql` (one of [`INSERT_TASK`](crate::sql::INSERT_TASK) and its
        /// `_IF_FREE` form): the rows inserted, or the database's error (the outer `Err` is a
        /// column that does not encode).
        async fn insert_task(
            conn: &mut Conn<'_>,
            task: &anywork_core::Task,
            sql: &str,
        ) -> anywork_core::Result<Result<u64, sqlx::Error>> {
            let done = insert_task_query(task, sql)?.execute(&mut *conn).await;
            Ok(done.map(|d| d.rows_affected()))
        }

        /// Inserts `task` and touches its session at the task's creation (in one call where
        /// the store can, `$one_call`): the rows the touch changed (0: the session is gone),
        /// and with `returning` the row of the session's `idle_hold_until` it returned. A
        /// failed insert is named as in [`insert_task`] (the touch did not run then), a
        /// failed touch with `ctx`.
        async fn insert_and_touch(
            conn: &mut Conn<'_>,
            task: &anywork_core::Task,
            returning: bool,
            ctx: &str,
        ) -> anywork_core::Result<(u64, Option<Row>)> {
            if $one_call {
                let sql = if returning {
                    $crate::sql::INSERT_TASK_THEN_TOUCH_RETURNING
                } else {
                    $crate::sql::INSERT_TASK_THEN_TOUCH
                };
                return insert_then_touch(conn, task, sql, ctx).await;
            }
            insert_task(conn, task, $crate::sql::INSERT_TASK)
                .await?
                .map_err(|e| db_err(&creating_task(task), e))?;
            let touch = if returning {
                $crate::sql::TOUCH_SESSION_RETURNING
            } else {
                $crate::sql::TOUCH_SESSION
            };
            let touch = sqlx::query(touch)
                .bind(task.created_at.0)
                .bind(task.session_id.as_str());
            if returning {
                let row = touch
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
                Ok((u64::from(row.is_some()), row))
            } else {
                let done = touch.execute(&mut *conn).await.map_err(|e| db_err(ctx, e))?;
                Ok((done.rows_affected(), None))
            }
        }

        /// `$one_call` only: `sql` ([`INSERT_TASK_THEN_TOUCH`](crate::sql::INSERT_TASK_THEN_TOUCH)
        /// or its `_RETURNING` form) in one call: the rows the touch changed, and the row it
        /// returned. A failed insert is named as in [`insert_task`] (the touch did not run
        /// then), a failed touch with `ctx`.
        async fn insert_then_touch(
            conn: &mut Conn<'_>,
            task: &anywork_core::Task,
            sql: &str,
            ctx: &str,
        ) -> anywork_core::Result<(u64, Option<Row>)> {
            use futures_util::StreamExt as _;
            use sqlx::Executor as _;
            let query = insert_task_query(task, sql)?;
            let mut results = (&mut *conn).fetch_many(query);
            let (mut steps, mut touched, mut row) = (0, 0, None);
            while let Some(result) = results.next().await {
                match result {
                    Ok(sqlx::Either::Left(done)) => {
                        steps += 1;
                        if steps == 2 {
                            touched = done.rows_affected();
                        }
                    }
                    Ok(sqlx::Either::Right(r)) => row = Some(r),
                    Err(e) if steps == 0 => {
                        return Err($crate::sql::db_err(&creating_task(task), e));
                    }
                    Err(e) => return Err($crate::sql::db_err(ctx, e)),
                }
            }
            Ok((touched, row))
        }

        /// SQLite (`$one_call`): `CreateTaskClaimed` without deliveries in one call: the
        /// insert of `task`, stored with the claim's status if it is the session's turn and
        /// no reaper's hold on the session lasts past `now` (the hold the two-call path reads
        /// back from the touch), else `pending`
        /// ([`INSERT_TASK_CLAIMED_THEN_TOUCH`](crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH));
        /// the touch of its session at the task's creation; and the rest of the claim with its
        /// events ([`push_lean`]), which applies only if the insert stored that status. The
        /// call is the write's last ([`Tx::last_call`]): the task is stored whether or not it
        /// is claimed, and nothing else is written. `None` when the claim cannot be tried so
        /// (more rows than go with it, a change the lean claim does not take, a claim to
        /// `pending`): nothing ran, the caller takes the two-call path.
        ///
        /// [`Tx::last_call`]: crate::sql::Tx::last_call
        async fn insert_touch_claim(
            conn: &mut Conn<'_>,
            task: &anywork_core::Task,
            change: &anywork_core::TaskChange,
            rows: &[(String, String, i64)],
            now: anywork_core::Timestamp,
            ctx: &str,
        ) -> anywork_core::Result<Option<Reply>> {
            use futures_util::StreamExt as _;
            use sqlx::Executor as _;
            let pending = anywork_core::TaskStatus::Pending;
            if rows.len() > $crate::sql::LOGS_WITH_UPDATE
                || task.status != pending
                || change.status == pending
                || !lean_applies(pending, change)
            {
                return Ok(None);
            }
            let mut sql = String::with_capacity(
                $crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH.len()
                    + $crate::sql::UPDATE_LEAN_CAPACITY
                    + lean_room(rows),
            );
            sql.push_str($crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH);
            let mut args = <$db as sqlx::Database>::Arguments::<'_>::default();
            push_claimed_task_args(&mut args, task, change.status, now)?;
            push_lean(&mut sql, &mut args, task.id, pending, change, rows, false, true)?;
            conn.last_call();
            let mut results = (&mut *conn).fetch_many(sqlx::query_with(&sql, args));
            // A missing session fails the insert (foreign keys are on for every connection of
            // the store: `NotFound`), so the touch always finds its row. The third statement
            // is the rest of the claim: it changed the new task's row if the insert stored it
            // claimed, or nothing (then the rows were not inserted either); a claimed task's
            // log ends at the last of `rows`.
            let (mut steps, mut claimed) = (0, false);
            while let Some(result) = results.next().await {
                match result {
                    Ok(sqlx::Either::Left(done)) => {
                        if steps == 2 {
                            claimed = done.rows_affected() == 1;
                        }
                        steps += 1;
                    }
                    Ok(sqlx::Either::Right(_)) => {}
                    Err(e) if steps == 0 => {
                        return Err($crate::sql::db_err(&creating_task(task), e));
                    }
                    Err(e) if steps == 1 => return Err($crate::sql::db_err(ctx, e)),
                    Err(e) => return Err($crate::sql::db_err("update task", e)),
                }
            }
            let last = u64::try_from(rows.len()).unwrap_or(u64::MAX);
            Ok(Some(Reply::CreatedClaimed(claimed.then_some(last))))
        }

        /// The arguments of
        /// [`INSERT_TASK_CLAIMED_THEN_TOUCH`](crate::sql::INSERT_TASK_CLAIMED_THEN_TOUCH),
        /// in order: `task`'s columns, those of the claim's turn and of the hold at `now`,
        /// and the status of the claimed task.
        fn push_claimed_task_args<'a>(
            args: &mut <$db as sqlx::Database>::Arguments<'a>,
            task: &'a anywork_core::Task,
            claimed: anywork_core::TaskStatus,
            now: anywork_core::Timestamp,
        ) -> anywork_core::Result<()> {
            use sqlx::Arguments as _;
            let push = task.push_notification.as_ref().map(json_text).transpose()?;
            let meta = json_text(&task.channel_meta)?;
            let message = json_text(&task.message)?;
            let skills = json_text(&task.skills)?;
            let mcp = json_text(&task.mcp_servers)?;
            let id = task.id.to_string();
            let added = (|| -> Result<(), sqlx::error::BoxDynError> {
                args.add(id.clone())?;
                args.add(task.session_id.as_str())?;
                args.add(task.channel_type.as_str())?;
                args.add(meta)?;
                args.add(message)?;
                args.add(skills)?;
                args.add(mcp)?;
                args.add(push)?;
                args.add(task.idempotency_key.as_deref())?;
                args.add(task.created_at.0)?;
                // The turn: the session's other active tasks, against this one's place.
                args.add(task.session_id.as_str())?;
                args.add(task.created_at.0)?;
                args.add(task.created_at.0)?;
                args.add(id)?;
                // The reaper's hold.
                args.add(task.session_id.as_str())?;
                args.add(now.0)?;
                args.add(claimed.as_str())?;
                Ok(())
            })();
            added.map_err(|e| $crate::sql::db_err("create task", sqlx::Error::Encode(e)))
        }

        /// The insert of `task` with `sql`, its arguments bound.
        fn insert_task_query<'q>(
            task: &'q anywork_core::Task,
            sql: &'q str,
        ) -> anywork_core::Result<
            sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
        > {
            let push = task.push_notification.as_ref().map(json_text).transpose()?;
            Ok(sqlx::query(sql)
                .bind(task.id.to_string())
                .bind(task.session_id.as_str())
                .bind(&task.channel_type)
                .bind(json_text(&task.channel_meta)?)
                .bind(task.status.as_str())
                .bind(json_text(&task.message)?)
                .bind(json_text(&task.skills)?)
                .bind(json_text(&task.mcp_servers)?)
                .bind(push)
                .bind(&task.idempotency_key)
                .bind(task.created_at.0))
        }

        /// Undoes the insert of `task` whose session turned out not to exist (a logical error
        /// writes nothing): its `NotFound`, or the database error of the undo.
        async fn undo_insert(
            conn: &mut Conn<'_>,
            task: &anywork_core::Task,
            ctx: &str,
        ) -> anywork_core::Error {
            match sqlx::query("DELETE FROM tasks WHERE id = $1")
                .bind(task.id.to_string())
                .execute(&mut *conn)
                .await
            {
                Ok(_) => anywork_core::Error::not_found(format!(
                    "session {} not found",
                    task.session_id
                )),
                Err(e) => db_err(ctx, e),
            }
        }

        /// How a failed insert of `task` is named in its error.
        fn creating_task(task: &anywork_core::Task) -> String {
            match &task.idempotency_key {
                Some(key) => format!(
                    "create task {} (idempotency key {key:?} of channel {})",
                    task.id, task.channel_type
                ),
                None => format!("create task {}", task.id),
            }
        }

        /// The compare-and-set of `update_task` on `task`, its row as locked by
        /// [`lock_task`] inside the transaction on `conn`, reserving the seqs of `rows` in the
        /// same `UPDATE` (which [`insert_logs`] then writes): the task as changed and its last
        /// seq.
        async fn update_locked(
            conn: &mut Conn<'_>,
            mut task: anywork_core::Task,
            expected: anywork_core::TaskStatus,
            change: &anywork_core::TaskChange,
            rows: &[(String, String, i64)],
        ) -> anywork_core::Result<(anywork_core::Task, i64)> {
            use $crate::sql::to_i64;
            let ctx = "update task";
            let id = task.id;
            if task.status != expected {
                return Err(anywork_core::Error::conflict(format!(
                    "task {id} is {} now, not {expected}",
                    task.status
                )));
            }
            change.apply(&mut task)?;
            let structured = task.structured_output.as_ref().map(json_text).transpose()?;
            let result = task.result.as_ref().map(json_text).transpose()?;
            let error = task.error.as_ref().map(json_text).transpose()?;
            let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            let done = sqlx::query(
                "UPDATE tasks SET status = $1, result = $2, structured_output = $3, \
                 error = $4, cost_usd = $5, input_tokens = $6, output_tokens = $7, \
                 cache_creation_input_tokens = $8, cache_read_input_tokens = $9, \
                 num_turns = $10, duration_ms = $11, worker_id = $12, lease_owner = $13, \
                 lease_expires_at = $14, started_at = $15, finished_at = $16, \
                 last_seq = last_seq + $19 WHERE id = $17 AND status = $18 RETURNING last_seq",
            )
            .bind(task.status.as_str())
            .bind(result)
            .bind(structured)
            .bind(error)
            .bind(task.cost_usd)
            .bind(to_i64(task.usage.input_tokens))
            .bind(to_i64(task.usage.output_tokens))
            .bind(to_i64(task.usage.cache_creation_input_tokens))
            .bind(to_i64(task.usage.cache_read_input_tokens))
            .bind(i64::from(task.num_turns))
            .bind(task.duration_ms.map(to_i64))
            .bind(&task.worker_id)
            .bind(task.lease.as_ref().map(|l| l.owner.clone()))
            .bind(task.lease.as_ref().map(|l| l.expires_at.0))
            .bind(task.started_at.map(|t| t.0))
            .bind(task.finished_at.map(|t| t.0))
            .bind(id.to_string())
            .bind(expected.as_str())
            .bind(count)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| $crate::sql::db_err(ctx, e))?;
            let Some(row) = done else {
                return Err(anywork_core::Error::conflict(format!(
                    "task {id} changed concurrently"
                )));
            };
            Ok((task, Cols(&row).i64("last_seq")?))
        }

        /// The compare-and-set of `update_task` without reading the task's row: one
        /// `UPDATE … WHERE id = … AND status = expected [AND the lease is change.if_lease]
        /// RETURNING last_seq` that sets what `change` sets (as [`TaskChange::apply`] does)
        /// and reserves `count` seqs. With `turn`, only if it is the task's session's turn
        /// (no task of the session `running` or `input_required`, no older `pending` one):
        /// the claim. `None` when it did not apply, with nothing written: the task is unknown,
        /// not `expected`, not leased as required, not its session's turn, or the change is
        /// one `apply` refuses from `expected` (checked here, not written) — the caller then
        /// reads the row to answer why. With `last` (the caller has nothing more to write
        /// when it applies), the call is marked as the write's last ([`Tx::last_call`]: on
        /// SQLite's writer the `COMMIT` may go with it) when it writes every row of `rows`.
        ///
        /// [`TaskChange::apply`]: anywork_core::TaskChange::apply
        /// [`Tx::last_call`]: crate::sql::Tx::last_call
        async fn update_lean(
            conn: &mut Conn<'_>,
            id: anywork_core::TaskId,
            expected: anywork_core::TaskStatus,
            change: &anywork_core::TaskChange,
            rows: &[(String, String, i64)],
            turn: bool,
            last: bool,
        ) -> anywork_core::Result<Option<(i64, bool)>> {
            if !lean_applies(expected, change) {
                return Ok(None);
            }
            let room = lean_room(rows);
            let mut sql = String::with_capacity($crate::sql::UPDATE_LEAN_CAPACITY + room);
            let mut args = <$db as sqlx::Database>::Arguments::<'_>::default();
            let with_rows =
                push_lean(&mut sql, &mut args, id, expected, change, rows, turn, false)?;
            if last && (with_rows || rows.is_empty()) {
                conn.last_call();
            }
            // Every statement of the call runs (`fetch_optional` on the connection would stop
            // SQLite's after the first row, before the logs' insert).
            let row = sqlx::query_with(&sql, args)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| $crate::sql::db_err("update task", e))?
                .into_iter()
                .next();
            row.map(|row| Ok((Cols(&row).i64("last_seq")?, with_rows)))
                .transpose()
        }

        /// Whether [`update_lean`] may try `change` from `expected` (else the caller reads
        /// the row to tell why not).
        fn lean_applies(
            expected: anywork_core::TaskStatus,
            change: &anywork_core::TaskChange,
        ) -> bool {
            expected.check_transition(change.status).is_ok()
                && !change
                    .outcome
                    .as_ref()
                    .is_some_and(|o| o.status != change.status)
        }

        /// Room for the text of the log rows [`push_lean`] may add.
        fn lean_room(rows: &[(String, String, i64)]) -> usize {
            if $one_call && !rows.is_empty() && rows.len() <= $crate::sql::LOGS_WITH_UPDATE {
                $crate::sql::LOGS_AFTER_UPDATE_CAPACITY + 16 * rows.len()
            } else {
                0
            }
        }

        /// Writes [`update_lean`]'s statements (after what `sql` holds already, their
        /// arguments after `args`'s, as anonymous `?`): whether they insert `rows` too
        /// (SQLite, a few rows). With `created` (SQLite's create-claimed in one call), the
        /// task was inserted in the same call with the change's status if it could be claimed
        /// (else `pending`): the `UPDATE` sets the rest of the change where the task has that
        /// status, and nothing is read back (the task is new: its log starts at seq 1).
        #[allow(clippy::too_many_arguments)]
        fn push_lean<'a>(
            sql: &mut String,
            args: &mut <$db as sqlx::Database>::Arguments<'a>,
            id: anywork_core::TaskId,
            expected: anywork_core::TaskStatus,
            change: &'a anywork_core::TaskChange,
            rows: &'a [(String, String, i64)],
            turn: bool,
            created: bool,
        ) -> anywork_core::Result<bool> {
            use anywork_core::TaskStatus;
            use $crate::sql::to_i64;
            let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            let status = change.status;
            // Written with `push_arg`, not a `QueryBuilder`: its `push` formats every piece
            // of text through `write!` (≈ 4k instructions per statement here, twice per task).
            // SQLite: a few rows go in the same call (see `push_logs_after_update`); a long
            // batch is inserted after it by the caller, as on PostgreSQL (a statement text per
            // row count, each kept prepared: few of them).
            let with_rows =
                $one_call && !rows.is_empty() && rows.len() <= $crate::sql::LOGS_WITH_UPDATE;
            let id = id.to_string();
            let id_again = id.clone();
            let result = change
                .outcome
                .as_ref()
                .map(|o| {
                    Ok::<_, anywork_core::Error>((
                        o.result.as_ref().map(json_text).transpose()?,
                        o.structured_output.as_ref().map(json_text).transpose()?,
                    ))
                })
                .transpose()?;
            // `apply` copies the outcome's error, then the change's own over it.
            let error = match (&change.error, &change.outcome) {
                (Some(e), _) => Some(Some(json_text(e)?)),
                (None, Some(o)) => Some(o.error.as_ref().map(json_text).transpose()?),
                (None, None) => None,
            };
            let built = (|| -> Result<(), sqlx::error::BoxDynError> {
                if created {
                    // The insert in the same call stored the claimed status, or `pending`.
                    push_arg(&mut *sql, &mut *args, count, "UPDATE tasks SET last_seq = last_seq + ")?;
                } else {
                    push_arg(&mut *sql, &mut *args, status.as_str(), "UPDATE tasks SET status = ")?;
                    push_arg(&mut *sql, &mut *args, count, ", last_seq = last_seq + ")?;
                }
                if let Some(worker) = &change.worker_id {
                    push_arg(&mut *sql, &mut *args, worker.as_str(), ", worker_id = ")?;
                }
                if status == TaskStatus::Running {
                    push_arg(&mut *sql, &mut *args, change.at.0, ", started_at = COALESCE(started_at, ")?;
                    sql.push(')');
                }
                if status.is_terminal() || status == TaskStatus::Pending {
                    sql.push_str(", lease_owner = NULL, lease_expires_at = NULL");
                } else if let Some(lease) = &change.lease {
                    push_arg(&mut *sql, &mut *args, lease.owner.as_str(), ", lease_owner = ")?;
                    push_arg(&mut *sql, &mut *args, lease.expires_at.0, ", lease_expires_at = ")?;
                }
                if status.is_terminal() {
                    push_arg(&mut *sql, &mut *args, change.at.0, ", finished_at = ")?;
                }
                if let (Some(o), Some((result, structured))) = (&change.outcome, result) {
                    push_arg(&mut *sql, &mut *args, result, ", result = ")?;
                    push_arg(&mut *sql, &mut *args, structured, ", structured_output = ")?;
                    push_arg(&mut *sql, &mut *args, o.cost_usd, ", cost_usd = ")?;
                    push_arg(&mut *sql, &mut *args, to_i64(o.usage.input_tokens), ", input_tokens = ")?;
                    push_arg(&mut *sql, &mut *args, to_i64(o.usage.output_tokens), ", output_tokens = ")?;
                    push_arg(
                        &mut *sql,
                        &mut *args,
                        to_i64(o.usage.cache_creation_input_tokens),
                        ", cache_creation_input_tokens = ",
                    )?;
                    push_arg(
                        &mut *sql,
                        &mut *args,
                        to_i64(o.usage.cache_read_input_tokens),
                        ", cache_read_input_tokens = ",
                    )?;
                    push_arg(&mut *sql, &mut *args, i64::from(o.num_turns), ", num_turns = ")?;
                    push_arg(&mut *sql, &mut *args, to_i64(o.duration_ms), ", duration_ms = ")?;
                }
                if let Some(error) = error {
                    push_arg(&mut *sql, &mut *args, error, ", error = ")?;
                }
                push_arg(&mut *sql, &mut *args, id, " WHERE id = ")?;
                let was = if created { status } else { expected };
                push_arg(&mut *sql, &mut *args, was.as_str(), " AND status = ")?;
                if let Some(lease) = &change.if_lease {
                    push_arg(&mut *sql, &mut *args, lease.owner.as_str(), " AND lease_owner = ")?;
                    push_arg(&mut *sql, &mut *args, lease.expires_at.0, " AND lease_expires_at = ")?;
                }
                if turn {
                    sql.push_str($crate::sql::CLAIM_TURN);
                }
                if $one_call && created {
                    // SQLite's create-claimed: a task inserted in this call, whose log is
                    // empty (`last_seq` 0): the claim takes seqs 1 to `count`, and the caller
                    // learns whether it applied from the rows the `UPDATE` changed. Nothing
                    // to read back, and the rows need no join with the task's row.
                    if with_rows {
                        push_new_task_logs(&mut *sql, &mut *args, rows, id_again)?;
                    }
                } else if $one_call {
                    // SQLite: see LAST_SEQ_AFTER_UPDATE (the id bound again, as `?`).
                    let select = "; SELECT last_seq FROM tasks WHERE id = ";
                    let logs_id = with_rows.then(|| id_again.clone());
                    push_arg(&mut *sql, &mut *args, id_again, select)?;
                    sql.push_str(" AND changes() = 1");
                    if let Some(logs_id) = logs_id {
                        push_logs_after_update(&mut *sql, &mut *args, rows, logs_id)?;
                    }
                } else {
                    sql.push_str(" RETURNING last_seq");
                }
                Ok(())
            })();
            built.map_err(|e| $crate::sql::db_err("update task", sqlx::Error::Encode(e)))?;
            Ok(with_rows)
        }

        /// SQLite: the insert of `rows` into the task's log, as the last statement of
        /// `update_lean`'s call: their seqs counted back from the `last_seq` the `UPDATE`
        /// just set, and only if it changed the task's row (`changes() = 1`, as the read
        /// back before it). The logs go in the same call as the change instead of one of
        /// their own after it: one round trip to SQLite's thread fewer (a wake-up of it and
        /// one back) per status change with events.
        fn push_logs_after_update<'a>(
            sql: &mut String,
            args: &mut <$db as sqlx::Database>::Arguments<'a>,
            rows: &'a [(String, String, i64)],
            id: String,
        ) -> Result<(), sqlx::error::BoxDynError> {
            let count = rows.len();
            sql.push_str(
                "; INSERT INTO task_logs (task_id, seq, type, payload, created_at) \
                 SELECT t.id, t.last_seq - v.column1, v.column2, v.column3, v.column4 \
                 FROM tasks t, (VALUES ",
            );
            for (i, (kind, payload, at)) in rows.iter().enumerate() {
                let back = i64::try_from(count - 1 - i).unwrap_or(i64::MAX);
                push_arg(sql, args, back, if i == 0 { "(" } else { ", (" })?;
                push_arg(sql, args, kind.as_str(), ", ")?;
                push_arg(sql, args, payload.as_str(), ", ")?;
                push_arg(sql, args, *at, ", ")?;
                sql.push(')');
            }
            push_arg(sql, args, id, ") v WHERE t.id = ")?;
            sql.push_str(" AND changes() = 1");
            Ok(())
        }

        /// SQLite: the insert of `rows` as the first entries of the log of a task inserted
        /// in the same call (seqs 1 to `rows.len()`, which the claim before it reserved from
        /// `last_seq` 0), only if that claim changed the task's row (`changes() = 1`: the
        /// `UPDATE`'s count until this statement ends). Without the join with `tasks` that
        /// [`push_logs_after_update`] needs to count the seqs back from `last_seq`.
        fn push_new_task_logs<'a>(
            sql: &mut String,
            args: &mut <$db as sqlx::Database>::Arguments<'a>,
            rows: &'a [(String, String, i64)],
            id: String,
        ) -> Result<(), sqlx::error::BoxDynError> {
            push_arg(
                sql,
                args,
                id,
                "; INSERT INTO task_logs (task_id, seq, type, payload, created_at) SELECT ",
            )?;
            sql.push_str(", v.column1, v.column2, v.column3, v.column4 FROM (VALUES ");
            for (i, (kind, payload, at)) in rows.iter().enumerate() {
                let seq = i64::try_from(i + 1).unwrap_or(i64::MAX);
                push_arg(sql, args, seq, if i == 0 { "(" } else { ", (" })?;
                push_arg(sql, args, kind.as_str(), ", ")?;
                push_arg(sql, args, payload.as_str(), ", ")?;
                push_arg(sql, args, *at, ", ")?;
                sql.push(')');
            }
            sql.push_str(") v WHERE changes() = 1");
            Ok(())
        }

        /// The first of `deliveries` whose id is taken (in the table, or by an earlier one of
        /// them), if any.
        async fn duplicate_delivery(
            conn: &mut Conn<'_>,
            deliveries: &[anywork_core::Delivery],
        ) -> anywork_core::Result<Option<anywork_core::DeliveryId>> {
            for (i, d) in deliveries.iter().enumerate() {
                let dup_in_op = deliveries[..i].iter().any(|o| o.id == d.id);
                if dup_in_op || delivery_exists(conn, d.id).await? {
                    return Ok(Some(d.id));
                }
            }
            Ok(None)
        }

        /// Appends `rows` to `task_id`'s log inside the transaction on `conn`; the last seq.
        /// With `while_active`, only while the task is active (`Conflict` otherwise).
        async fn append_in<'a>(
            conn: &mut Conn<'a>,
            task_id: anywork_core::TaskId,
            rows: &'a [(String, String, i64)],
            while_active: bool,
        ) -> anywork_core::Result<u64> {
            let ctx = "append logs";
            let id = task_id.to_string();
            let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            // Reserving the seq range first also takes the task's row lock, which serializes
            // appenders of one task so that seqs commit in order, gap-free, and orders the
            // append after a status change of the task's in flight (its `done`: PostgreSQL
            // checks the status again on the row as that change left it). With no rows, this
            // reads the last seq (and `NotFound` for an unknown task).
            let read_back = if $one_call {
                $crate::sql::LAST_SEQ_AFTER_UPDATE
            } else {
                " RETURNING last_seq"
            };
            let sql = if while_active {
                format!(
                    "UPDATE tasks SET last_seq = last_seq + $1 WHERE id = $2 AND {}{read_back}",
                    $crate::sql::STATUS_IS_ACTIVE
                )
            } else {
                format!("UPDATE tasks SET last_seq = last_seq + $1 WHERE id = $2{read_back}")
            };
            let row = sqlx::query(&sql)
                .bind(count)
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| $crate::sql::db_err(ctx, e))?;
            let row = match row {
                Some(row) => row,
                None if while_active => {
                    // Tell "no such task" apart from "over".
                    let task = lock_task(conn, task_id).await?;
                    anywork_core::store::check_log_open(&task)?;
                    return Err(anywork_core::Error::conflict(format!(
                        "task {task_id} changed while its events were appended"
                    )));
                }
                None => {
                    return Err(anywork_core::Error::not_found(format!(
                        "task {task_id} not found"
                    )));
                }
            };
            let last = Cols(&row).i64("last_seq")?;
            insert_logs(conn, task_id, rows, last).await?;
            Ok($crate::sql::to_u64(last))
        }

        /// Writes `rows`, whose seqs were reserved up to `last`, to `task_id`'s log inside the
        /// transaction on `conn` (and tells the change feed, on PostgreSQL).
        async fn insert_logs<'a>(
            conn: &mut Conn<'a>,
            task_id: anywork_core::TaskId,
            rows: &'a [(String, String, i64)],
            last: i64,
        ) -> anywork_core::Result<()> {
            let ctx = "append logs";
            if rows.is_empty() {
                return Ok(());
            }
            let id = task_id.to_string();
            let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            let mut seq = last - count;
            for chunk in rows.chunks($crate::sql::LOG_CHUNK) {
                // The statement and its arguments as `QueryBuilder::push_values` makes them,
                // the arguments borrowing the rows (not the builder), so that the insert can be
                // held back: nothing waits for its result, it may go with the next call.
                let mut sql = String::from(
                    "INSERT INTO task_logs (task_id, seq, type, payload, created_at) VALUES ",
                );
                let mut args = <$db as sqlx::Database>::Arguments::<'a>::default();
                let encode = |e| $crate::sql::db_err(ctx, sqlx::Error::Encode(e));
                for (i, (kind, payload, at)) in chunk.iter().enumerate() {
                    seq += 1;
                    sql.push_str(if i == 0 { "(" } else { ", (" });
                    push_arg(&mut sql, &mut args, id.clone(), "").map_err(encode)?;
                    push_arg(&mut sql, &mut args, seq, ", ").map_err(encode)?;
                    push_arg(&mut sql, &mut args, kind.as_str(), ", ").map_err(encode)?;
                    push_arg(&mut sql, &mut args, payload.as_str(), ", ").map_err(encode)?;
                    push_arg(&mut sql, &mut args, *at, ", ").map_err(encode)?;
                    sql.push(')');
                }
                conn.hold(sql.into(), args, ctx.into()).await?;
            }
            if $notify && count > 0 {
                // `:done` tells the servers that run the task that it is over (FeedItem::Ended).
                let ends = rows.iter().any(|(kind, _, _)| kind == "done");
                let payload = format!(
                    "{id}:{}:{last}{}",
                    last - count + 1,
                    if ends { ":done" } else { "" }
                );
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind($crate::sql::LOG_CHANNEL)
                    .bind(payload)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| $crate::sql::db_err(ctx, e))?;
            }
            Ok(())
        }

        /// Adds `value` to `args` and its placeholder to `sql`, after `sep`.
        fn push_arg<'a, T>(
            sql: &mut String,
            args: &mut <$db as sqlx::Database>::Arguments<'a>,
            value: T,
            sep: &str,
        ) -> Result<(), sqlx::error::BoxDynError>
        where
            T: 'a + sqlx::Encode<'a, $db> + sqlx::Type<$db>,
        {
            use sqlx::Arguments as _;
            args.add(value)?;
            sql.push_str(sep);
            args.format_placeholder(sql)?;
            Ok(())
        }

        async fn lock_task(
            conn: &mut Conn<'_>,
            id: anywork_core::TaskId,
        ) -> anywork_core::Result<anywork_core::Task> {
            let sql = format!(
                "SELECT {} FROM tasks WHERE id = $1{}",
                $crate::sql::TASK_COLUMNS,
                $for_update
            );
            let row = sqlx::query(&sql)
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| $crate::sql::db_err("read task", e))?
                .ok_or_else(|| anywork_core::Error::not_found(format!("task {id} not found")))?;
            task_from_row(&row)
        }

        async fn delivery_exists(
            conn: &mut Conn<'_>,
            id: anywork_core::DeliveryId,
        ) -> anywork_core::Result<bool> {
            Ok(sqlx::query("SELECT 1 FROM deliveries WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| $crate::sql::db_err("read delivery", e))?
                .is_some())
        }

        async fn insert_delivery<'a>(
            conn: &mut Conn<'a>,
            d: &'a anywork_core::Delivery,
        ) -> anywork_core::Result<()> {
            use sqlx::Execute as _;
            const SQL: &str = "INSERT INTO deliveries (id, task_id, kind, address, target, \
                payload, status, attempts, next_attempt_at, created_at, updated_at) \
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
            let ctx = || format!("enqueue delivery {}", d.id);
            let args = sqlx::query::<$db>(SQL)
            .bind(d.id.to_string())
            .bind(d.task_id.to_string())
            .bind(d.target.kind())
            .bind(d.target.address())
            .bind(json_text(&d.target)?)
            .bind(json_text(&d.payload)?)
            .bind(d.status.as_str())
            .bind(i64::from(d.attempts))
            .bind(d.next_attempt_at.0)
            .bind(d.created_at.0)
            .bind(d.updated_at.0)
            .take_arguments()
            .map_err(|e| $crate::sql::db_err(&ctx(), sqlx::Error::Encode(e)))?
            .unwrap_or_default();
            // Nothing waits for the insert's result: it may go with the next call.
            conn.hold(SQL.into(), args, ctx().into()).await
        }

        /// The delivery `id` read on `db`; `lock` is the row-lock suffix of the `SELECT`.
        async fn select_delivery<'c, E>(
            db: E,
            id: anywork_core::DeliveryId,
            lock: &str,
        ) -> anywork_core::Result<anywork_core::Delivery>
        where
            E: sqlx::Executor<'c, Database = $db>,
        {
            let sql = format!(
                "SELECT {} FROM deliveries WHERE id = $1{lock}",
                $crate::sql::DELIVERY_COLUMNS
            );
            let row = sqlx::query(&sql)
                .bind(id.to_string())
                .fetch_optional(db)
                .await
                .map_err(|e| $crate::sql::db_err("read delivery", e))?
                .ok_or_else(|| anywork_core::Error::not_found(format!("delivery {id} not found")))?;
            Ok(delivery_from_row(&row)?.1)
        }

        async fn lock_delivery(
            conn: &mut Conn<'_>,
            id: anywork_core::DeliveryId,
        ) -> anywork_core::Result<anywork_core::Delivery> {
            select_delivery(&mut *conn, id, $for_update).await
        }

        /// Writes the mutable fields of `d` back, if it still has status `before` (and, with
        /// `owner`, is still claimed by it): a compare-and-set, `Conflict` when it lost.
        async fn store_delivery(
            conn: &mut Conn<'_>,
            d: &anywork_core::Delivery,
            before: anywork_core::DeliveryStatus,
            owner: Option<&str>,
        ) -> anywork_core::Result<()> {
            let last_error = d.last_error.as_ref().map(json_text).transpose()?;
            let done = sqlx::query(
                "UPDATE deliveries SET status = $1, attempts = $2, next_attempt_at = $3, \
                 last_error = $4, claim_owner = $5, claim_until = $6, updated_at = $7 \
                 WHERE id = $8 AND status = $9 \
                 AND ($10 IS NULL OR claim_owner = $10)",
            )
            .bind(d.status.as_str())
            .bind(i64::from(d.attempts))
            .bind(d.next_attempt_at.0)
            .bind(last_error)
            .bind(d.claim.as_ref().map(|c| c.owner.clone()))
            .bind(d.claim.as_ref().map(|c| c.expires_at.0))
            .bind(d.updated_at.0)
            .bind(d.id.to_string())
            .bind(before.as_str())
            .bind(owner)
            .execute(&mut *conn)
            .await
            .map_err(|e| $crate::sql::db_err("update delivery", e))?;
            if done.rows_affected() == 0 {
                return Err(anywork_core::Error::conflict(format!(
                    "delivery {} changed concurrently",
                    d.id
                )));
            }
            Ok(())
        }

        /// Runs `op` alone in a transaction of its own on `conn`: committed when it succeeds,
        /// rolled back when it fails.
        pub(crate) async fn write_alone(
            conn: &mut <$db as sqlx::Database>::Connection,
            op: &WriteOp,
        ) -> anywork_core::Result<Reply> {
            use sqlx::Connection as _;
            let ctx = "write";
            let mut tx = conn
                .begin_with($begin)
                .await
                .map_err(|e| $crate::sql::db_err(ctx, e))?;
            let reply = match apply(&mut $crate::sql::Tx::plain(&mut *tx), op).await {
                Ok(reply) => reply,
                Err(e) => {
                    // Rolled back now, not when the connection is next used: a dropped
                    // transaction's rollback waits for that, and until then its row locks
                    // stand (PostgreSQL's `SKIP LOCKED` claims skipped a delivery that a
                    // refused retry had locked: a flaky conformance case under load).
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            };
            tx.commit().await.map_err(|e| $crate::sql::db_err(ctx, e))?;
            Ok(reply)
        }

        impl $store {
            /// The row `sql` (with the task's id as `$1`) reads of task `id`; `NotFound` when
            /// there is none, `ctx` naming the read in a database error.
            async fn task_row(
                &self,
                sql: &str,
                id: anywork_core::TaskId,
                ctx: &'static str,
            ) -> anywork_core::Result<Row> {
                sqlx::query(sql)
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err(ctx, e))?
                    .ok_or_else(|| anywork_core::Error::not_found(format!("task {id} not found")))
            }

            /// Runs `op` in a transaction of its own on a pooled connection.
            async fn write_on_pool(&self, op: &WriteOp) -> anywork_core::Result<Reply> {
                let mut conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| $crate::sql::db_err("write", e))?;
                write_alone(&mut conn, op).await
            }

            /// Sessions with their task counts, most recently active first; only those whose
            /// title contains `query` (ignoring case, literally) when there is one.
            async fn session_summaries(
                &self,
                query: Option<&str>,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::SessionSummary>> {
                let pattern = query
                    .filter(|q| !q.is_empty())
                    .map(anywork_core::session::like_contains_pattern);
                // LOWER on both sides: the two backends fold the same letters on both.
                let filter = if pattern.is_some() {
                    "WHERE LOWER(s.title) LIKE LOWER($3) ESCAPE '\\'"
                } else {
                    ""
                };
                let sql = format!(
                    "SELECT s.id, s.channel_type, s.channel_key, s.title, s.created_at, \
                     s.last_active, \
                     (SELECT COUNT(*) FROM tasks t WHERE t.session_id = s.id) AS task_count, \
                     (SELECT COUNT(*) FROM tasks t WHERE t.session_id = s.id \
                       AND t.status IN {}) AS active_task_count \
                     FROM sessions s {filter} ORDER BY s.last_active DESC, s.id DESC \
                     LIMIT $1 OFFSET $2",
                    $crate::sql::ACTIVE
                );
                let mut q = sqlx::query(&sql)
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset));
                if let Some(p) = &pattern {
                    q = q.bind(p.as_str());
                }
                let rows = q
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("list sessions", e))?;
                rows.iter()
                    .map(|row| {
                        let count = |c: &str| Cols(row).i64(c).map($crate::sql::to_u64);
                        Ok(anywork_core::SessionSummary {
                            session: session_from_row(row)?,
                            task_count: count("task_count")?,
                            active_task_count: count("active_task_count")?,
                        })
                    })
                    .collect()
            }

            /// Whether `sql` (`SELECT EXISTS(...)`) finds a row.
            async fn exists(&self, sql: &str, ctx: &str) -> anywork_core::Result<bool> {
                let (found,): (i64,) = sqlx::query_as(sql)
                    .fetch_one(self.upkeep_pool())
                    .await
                    .map_err(|e| $crate::sql::db_err(ctx, e))?;
                Ok(found != 0)
            }

            /// Tasks whose `column` equals `value`, oldest first. `column` is one of ours,
            /// never the caller's.
            async fn tasks_where(
                &self,
                pool: &sqlx::Pool<$db>,
                column: &'static str,
                value: &str,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                let sql = format!(
                    "SELECT {} FROM tasks WHERE {column} = $1 ORDER BY created_at, id \
                     LIMIT $2 OFFSET $3",
                    $crate::sql::TASK_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(value)
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset))
                    .fetch_all(pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("list tasks", e))?
                    .iter()
                    .map(task_from_row)
                    .collect()
            }
        }

        #[async_trait::async_trait]
        impl anywork_core::TaskStore for $store {
            async fn get_setting(&self, key: &str) -> anywork_core::Result<Option<String>> {
                anywork_core::store::validate_setting_key(key)?;
                let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("read setting", e))?;
                row.as_ref().map(|r| Cols(r).str("value")).transpose()
            }

            async fn put_setting(&self, key: &str, value: &str) -> anywork_core::Result<()> {
                anywork_core::store::validate_setting_key(key)?;
                let op = WriteOp::PutSetting {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    at: anywork_core::Timestamp::now(),
                };
                self.write(op).await.map(drop)
            }

            async fn create_session(
                &self,
                new: anywork_core::NewSession,
            ) -> anywork_core::Result<anywork_core::Session> {
                anywork_core::session::validate_title(&new.title)?;
                match self.write(WriteOp::CreateSession(new.into_session())).await? {
                    Reply::Session(s) => Ok(s),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn get_session(
                &self,
                id: &anywork_core::SessionId,
            ) -> anywork_core::Result<anywork_core::Session> {
                let row = sqlx::query(
                    "SELECT id, channel_type, channel_key, title, created_at, last_active \
                     FROM sessions WHERE id = $1",
                )
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| $crate::sql::db_err("read session", e))?
                .ok_or_else(|| anywork_core::Error::not_found(format!("session {id} not found")))?;
                session_from_row(&row)
            }

            async fn find_session(
                &self,
                channel_type: &str,
                channel_key: &str,
            ) -> anywork_core::Result<Option<anywork_core::Session>> {
                sqlx::query(
                    "SELECT id, channel_type, channel_key, title, created_at, last_active \
                     FROM sessions WHERE channel_type = $1 AND channel_key = $2",
                )
                .bind(channel_type)
                .bind(channel_key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| $crate::sql::db_err("find session", e))?
                .as_ref()
                .map(session_from_row)
                .transpose()
            }

            async fn list_sessions(
                &self,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::SessionSummary>> {
                self.session_summaries(None, page).await
            }

            async fn search_sessions(
                &self,
                query: &str,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::SessionSummary>> {
                self.session_summaries(Some(query), page).await
            }

            async fn usage_totals(&self) -> anywork_core::Result<anywork_core::UsageTotals> {
                // SUM of a BIGINT is NUMERIC on PostgreSQL: cast back for one decoder.
                let row = sqlx::query(
                    "SELECT (SELECT COUNT(*) FROM sessions) AS sessions, COUNT(*) AS tasks, \
                     CAST(COALESCE(SUM(cost_usd), 0.0) AS DOUBLE PRECISION) AS cost_usd, \
                     CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens, \
                     CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens, \
                     CAST(COALESCE(SUM(cache_creation_input_tokens), 0) AS BIGINT) \
                       AS cache_creation_input_tokens, \
                     CAST(COALESCE(SUM(cache_read_input_tokens), 0) AS BIGINT) \
                       AS cache_read_input_tokens \
                     FROM tasks",
                )
                .fetch_one(&self.pool)
                .await
                .map_err(|e| $crate::sql::db_err("sum usage", e))?;
                let n = |c: &str| Cols(&row).i64(c).map($crate::sql::to_u64);
                let cost: f64 = Cols(&row).get("cost_usd")?;
                Ok(anywork_core::UsageTotals {
                    sessions: n("sessions")?,
                    tasks: n("tasks")?,
                    cost_usd: cost,
                    usage: anywork_core::TokenUsage {
                        input_tokens: n("input_tokens")?,
                        output_tokens: n("output_tokens")?,
                        cache_creation_input_tokens: n("cache_creation_input_tokens")?,
                        cache_read_input_tokens: n("cache_read_input_tokens")?,
                    },
                })
            }

            async fn set_session_title(
                &self,
                id: &anywork_core::SessionId,
                title: &str,
            ) -> anywork_core::Result<()> {
                anywork_core::session::validate_title(title)?;
                self.write(WriteOp::SetSessionTitle(id.clone(), title.to_owned()))
                    .await
                    .map(drop)
            }

            async fn touch_session(
                &self,
                id: &anywork_core::SessionId,
                at: anywork_core::Timestamp,
            ) -> anywork_core::Result<()> {
                self.write(WriteOp::TouchSession(id.clone(), at)).await.map(drop)
            }

            async fn delete_session(
                &self,
                id: &anywork_core::SessionId,
            ) -> anywork_core::Result<()> {
                self.write(WriteOp::DeleteSession(id.clone())).await.map(drop)
            }

            async fn create_task(
                &self,
                new: anywork_core::NewTask,
            ) -> anywork_core::Result<anywork_core::Task> {
                match self.write(WriteOp::CreateTask(Box::new(new.into_task()))).await? {
                    Reply::Task(t, _) => Ok(*t),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn create_task_claimed(
                &self,
                new: anywork_core::NewTask,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<(anywork_core::Task, Option<u64>)> {
                anywork_core::store::check_claim(&change)?;
                let mut task = new.into_task();
                let id = task.id;
                let op = WriteOp::CreateTaskClaimed {
                    task: Box::new(task.clone()),
                    change: Box::new(change.clone()),
                    rows: encode_logs(logs)?,
                    deliveries: deliveries.into_iter().map(|d| d.into_delivery(id)).collect(),
                    now: anywork_core::Timestamp::now(),
                };
                match self.write(op).await? {
                    Reply::CreatedClaimed(None) => Ok((task, None)),
                    Reply::CreatedClaimed(Some(last)) => {
                        // What the claim's `UPDATE` wrote (the conformance suite holds the
                        // two to agree).
                        if change.apply(&mut task).is_err() {
                            task = self.get_task(id).await?;
                        }
                        Ok((task, Some(last)))
                    }
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn create_session_with_task(
                &self,
                session: anywork_core::NewSession,
                task: anywork_core::NewTask,
            ) -> anywork_core::Result<(anywork_core::Session, anywork_core::Task)> {
                anywork_core::store::check_first_task(&session, &task)?;
                anywork_core::session::validate_title(&session.title)?;
                let task = task.into_task();
                let mut session = session.into_session();
                // What `create_task` does to the session's `last_active`, in the insert.
                session.last_active = session.last_active.max(task.created_at);
                let op = WriteOp::CreateSessionWithTask(Box::new(session), Box::new(task), None);
                match self.write(op).await? {
                    Reply::Created(s, t, _) => Ok((*s, *t)),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn create_session_with_task_claimed(
                &self,
                session: anywork_core::NewSession,
                task: anywork_core::NewTask,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<(
                anywork_core::Session,
                anywork_core::Task,
                Option<u64>,
            )> {
                anywork_core::store::check_first_task(&session, &task)?;
                anywork_core::store::check_claim(&change)?;
                anywork_core::session::validate_title(&session.title)?;
                let mut task = task.into_task();
                let id = task.id;
                let mut session = session.into_session();
                session.last_active = session.last_active.max(task.created_at);
                let claim = FirstClaim {
                    change: change.clone(),
                    rows: encode_logs(logs)?,
                    deliveries: deliveries.into_iter().map(|d| d.into_delivery(id)).collect(),
                };
                let op = WriteOp::CreateSessionWithTask(
                    Box::new(session),
                    Box::new(task.clone()),
                    Some(Box::new(claim)),
                );
                match self.write(op).await? {
                    Reply::Created(s, t, None) => Ok((*s, *t, None)),
                    Reply::Created(s, _, Some(last)) => {
                        // What the claim's `UPDATE` wrote, as `create_task_claimed` answers.
                        if change.apply(&mut task).is_err() {
                            task = self.get_task(id).await?;
                        }
                        Ok((*s, task, Some(last)))
                    }
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn get_task(
                &self,
                id: anywork_core::TaskId,
            ) -> anywork_core::Result<anywork_core::Task> {
                let sql = format!(
                    "SELECT {} FROM tasks WHERE id = $1",
                    $crate::sql::TASK_COLUMNS
                );
                task_from_row(&self.task_row(&sql, id, "read task").await?)
            }

            async fn task_status(
                &self,
                id: anywork_core::TaskId,
            ) -> anywork_core::Result<anywork_core::TaskStatus> {
                let row = self
                    .task_row("SELECT status FROM tasks WHERE id = $1", id, "read task status")
                    .await?;
                Cols(&row).parse("status")
            }

            async fn hold_idle_session(
                &self,
                session_id: &anywork_core::SessionId,
                owner: &str,
                now: anywork_core::Timestamp,
                until: anywork_core::Timestamp,
            ) -> anywork_core::Result<bool> {
                let op = WriteOp::HoldIdleSession {
                    session: session_id.clone(),
                    owner: owner.to_owned(),
                    now,
                    until,
                };
                match self.write(op).await? {
                    Reply::Count(n) => Ok(n > 0),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn release_idle_hold(
                &self,
                session_id: &anywork_core::SessionId,
                owner: &str,
            ) -> anywork_core::Result<()> {
                let op = WriteOp::ReleaseIdleHold {
                    session: session_id.clone(),
                    owner: owner.to_owned(),
                };
                self.write(op).await.map(drop)
            }

            async fn task_status_for_start(
                &self,
                id: anywork_core::TaskId,
            ) -> anywork_core::Result<(
                anywork_core::TaskStatus,
                Option<anywork_core::Timestamp>,
            )> {
                let row = self
                    .task_row(
                        "SELECT t.status, s.idle_hold_until FROM tasks t \
                         JOIN sessions s ON s.id = t.session_id WHERE t.id = $1",
                        id,
                        "read task status",
                    )
                    .await?;
                Ok((Cols(&row).parse("status")?, Cols(&row).opt_time("idle_hold_until")?))
            }

            async fn find_task_by_idempotency_key(
                &self,
                channel_type: &str,
                idempotency_key: &str,
            ) -> anywork_core::Result<Option<anywork_core::Task>> {
                let sql = format!(
                    "SELECT {} FROM tasks WHERE channel_type = $1 AND idempotency_key = $2",
                    $crate::sql::TASK_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(channel_type)
                    .bind(idempotency_key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("find task by idempotency key", e))?
                    .as_ref()
                    .map(task_from_row)
                    .transpose()
            }

            async fn update_task(
                &self,
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: anywork_core::TaskChange,
            ) -> anywork_core::Result<anywork_core::Task> {
                let op = WriteOp::UpdateTask {
                    id,
                    expected,
                    change: Box::new(change),
                    rows: None,
                    deliveries: Vec::new(),
                    lean: false,
                };
                match self.write(op).await? {
                    Reply::Task(t, _) => Ok(*t),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn update_task_and_append(
                &self,
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
            ) -> anywork_core::Result<(anywork_core::Task, u64)> {
                self.update_task_and_enqueue(id, expected, change, logs, Vec::new())
                    .await
            }

            async fn update_task_and_enqueue(
                &self,
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<(anywork_core::Task, u64)> {
                let op = update_op(id, expected, change, logs, deliveries, false)?;
                match self.write(op).await? {
                    Reply::Task(t, last) => Ok((*t, last)),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn update_task_lean(
                &self,
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<u64> {
                let op = update_op(id, expected, change, logs, deliveries, true)?;
                match self.write(op).await? {
                    Reply::Seq(last) | Reply::Task(_, last) => Ok(last),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn tasks_by_session(
                &self,
                session_id: &anywork_core::SessionId,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                self.tasks_where(&self.pool, "session_id", session_id.as_str(), page)
                    .await
            }

            async fn tasks_by_status(
                &self,
                status: anywork_core::TaskStatus,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                // Start-up, the reaper and recovery: upkeep.
                self.tasks_where(self.upkeep_pool(), "status", status.as_str(), page)
                    .await
            }

            async fn tasks_by_session_in_status(
                &self,
                session_id: &anywork_core::SessionId,
                status: anywork_core::TaskStatus,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                // The session's index (`tasks_session`) finds its tasks; the status is checked
                // on those rows only.
                let sql = format!(
                    "SELECT {} FROM tasks WHERE session_id = $1 AND status = $2 \
                     ORDER BY created_at, id LIMIT $3 OFFSET $4",
                    $crate::sql::TASK_COLUMNS
                );
                sqlx::query(&sql)
                    .bind(session_id.as_str())
                    .bind(status.as_str())
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("list a session's tasks", e))?
                    .iter()
                    .map(task_from_row)
                    .collect()
            }

            async fn renew_lease(
                &self,
                id: anywork_core::TaskId,
                owner: &str,
                expires_at: anywork_core::Timestamp,
            ) -> anywork_core::Result<()> {
                let op = WriteOp::RenewLease {
                    id,
                    owner: owner.to_owned(),
                    expires_at,
                };
                self.write(op).await.map(drop)
            }

            async fn expired_leases(
                &self,
                now: anywork_core::Timestamp,
                limit: u32,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                use $crate::quiet::Look;
                let mark = match self.quiet().map(|q| q.look(Look::Leases)) {
                    Some(None) => return Ok(Vec::new()),
                    Some(mark) => mark,
                    None => None,
                };
                let sql = format!(
                    "SELECT {} FROM tasks WHERE status IN {} AND lease_expires_at IS NOT NULL \
                     AND lease_expires_at <= $1 ORDER BY created_at, id LIMIT $2",
                    $crate::sql::TASK_COLUMNS,
                    $crate::sql::ACTIVE
                );
                let tasks = sqlx::query(&sql)
                    .bind(now.0)
                    .bind(i64::from(limit))
                    .fetch_all(self.upkeep_pool())
                    .await
                    .map_err(|e| $crate::sql::db_err("find expired leases", e))?
                    .iter()
                    .map(task_from_row)
                    .collect::<anywork_core::Result<Vec<_>>>()?;
                // With no lease at all, none can expire before something is written.
                if tasks.is_empty()
                    && let (Some(q), Some(at)) = (self.quiet(), mark)
                {
                    let leased = format!(
                        "SELECT EXISTS(SELECT 1 FROM tasks WHERE status IN {} \
                         AND lease_expires_at IS NOT NULL)",
                        $crate::sql::ACTIVE
                    );
                    if !self.exists(&leased, "look for leases").await? {
                        q.found_nothing(Look::Leases, at);
                    }
                }
                Ok(tasks)
            }

            async fn claim_task(
                &self,
                id: anywork_core::TaskId,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<anywork_core::Claim> {
                let op = claim_op(id, change, logs, deliveries, false)?;
                match self.write(op).await? {
                    Reply::Claim(claim) => Ok(*claim),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn claim_task_lean(
                &self,
                id: anywork_core::TaskId,
                change: anywork_core::TaskChange,
                logs: Vec<anywork_core::NewTaskLog>,
                deliveries: Vec<anywork_core::NewDelivery>,
            ) -> anywork_core::Result<anywork_core::Claim<()>> {
                use anywork_core::Claim;
                let op = claim_op(id, change, logs, deliveries, true)?;
                match self.write(op).await? {
                    Reply::Seq(last) => Ok(Claim::Claimed((), last)),
                    Reply::Claim(claim) => Ok((*claim).map(drop)),
                    other => Err(unexpected_reply(other)),
                }
            }

            fn change_feed(&self) -> Option<anywork_core::ChangeFeed> {
                self.subscribe()
            }

            fn shared(&self) -> bool {
                !self.one_process()
            }

            async fn claimable(
                &self,
                limit: u32,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                use $crate::quiet::Look;
                let mark = match self.quiet().map(|q| q.look(Look::Claimable)) {
                    Some(None) => return Ok(Vec::new()),
                    Some(mark) => mark,
                    None => None,
                };
                let sql = format!(
                    "SELECT {} FROM tasks t WHERE t.status = 'pending' \
                     AND NOT EXISTS (SELECT 1 FROM tasks o WHERE o.session_id = t.session_id \
                       AND (o.status IN ('running', 'input_required') \
                         OR (o.status = 'pending' AND (o.created_at < t.created_at \
                           OR (o.created_at = t.created_at AND o.id < t.id))))) \
                     ORDER BY t.created_at, t.id LIMIT $1",
                    $crate::sql::TASK_COLUMNS
                        .split(", ")
                        .map(|c| format!("t.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let tasks = sqlx::query(&sql)
                    .bind(i64::from(limit))
                    .fetch_all(self.upkeep_pool())
                    .await
                    .map_err(|e| $crate::sql::db_err("find claimable tasks", e))?
                    .iter()
                    .map(task_from_row)
                    .collect::<anywork_core::Result<Vec<_>>>()?;
                if tasks.is_empty()
                    && let (Some(q), Some(at)) = (self.quiet(), mark)
                {
                    q.found_nothing(Look::Claimable, at);
                }
                Ok(tasks)
            }

            async fn append_logs(
                &self,
                task_id: anywork_core::TaskId,
                logs: Vec<anywork_core::NewTaskLog>,
            ) -> anywork_core::Result<u64> {
                if logs.is_empty() {
                    let row = self
                        .task_row("SELECT last_seq FROM tasks WHERE id = $1", task_id, "append logs")
                        .await?;
                    return Ok($crate::sql::to_u64(Cols(&row).i64("last_seq")?));
                }
                match self.write(WriteOp::AppendLogs(task_id, encode_logs(logs)?)).await? {
                    Reply::Seq(last) => Ok(last),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn append_logs_while_active(
                &self,
                task_id: anywork_core::TaskId,
                logs: Vec<anywork_core::NewTaskLog>,
            ) -> anywork_core::Result<u64> {
                if logs.is_empty() {
                    let task = self.get_task(task_id).await?;
                    anywork_core::store::check_log_open(&task)?;
                    return self.append_logs(task_id, logs).await;
                }
                let op = WriteOp::AppendLogsWhileActive(task_id, encode_logs(logs)?);
                match self.write(op).await? {
                    Reply::Seq(last) => Ok(last),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn read_logs(
                &self,
                task_id: anywork_core::TaskId,
                after: u64,
                limit: u32,
            ) -> anywork_core::Result<Vec<anywork_core::TaskLog>> {
                let rows = sqlx::query(
                    "SELECT seq, type, payload, created_at FROM task_logs \
                     WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(task_id.to_string())
                .bind($crate::sql::to_i64(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| $crate::sql::db_err("read logs", e))?;
                rows.iter()
                    .map(|row| {
                        let r = Cols(row);
                        Ok(anywork_core::TaskLog {
                            task_id,
                            seq: $crate::sql::to_u64(r.i64("seq")?),
                            event: $crate::sql::event_from_row(&r.str("type")?, &r.str("payload")?),
                            timestamp: r.time("created_at")?,
                        })
                    })
                    .collect()
            }

            async fn claim_deliveries(
                &self,
                owner: &str,
                now: anywork_core::Timestamp,
                until: anywork_core::Timestamp,
                limit: u32,
            ) -> anywork_core::Result<Vec<anywork_core::Delivery>> {
                use $crate::quiet::Look;
                let mark = match self.quiet().map(|q| q.look(Look::Deliveries)) {
                    Some(None) => return Ok(Vec::new()),
                    Some(mark) => mark,
                    None => None,
                };
                let op = WriteOp::ClaimDeliveries {
                    owner: owner.to_owned(),
                    now,
                    until,
                    limit,
                };
                let claimed = match self.write(op).await? {
                    Reply::Deliveries(d) => d,
                    other => return Err(unexpected_reply(other)),
                };
                // With no delivery open, none can fall due before something is written.
                if claimed.is_empty()
                    && let (Some(q), Some(at)) = (self.quiet(), mark)
                {
                    let open = format!(
                        "SELECT EXISTS(SELECT 1 FROM deliveries WHERE status IN {})",
                        $crate::sql::OPEN
                    );
                    if !self.exists(&open, "look for open deliveries").await? {
                        q.found_nothing(Look::Deliveries, at);
                    }
                }
                Ok(claimed)
            }

            async fn record_delivery_attempt(
                &self,
                id: anywork_core::DeliveryId,
                owner: &str,
                attempt: anywork_core::DeliveryAttempt,
                at: anywork_core::Timestamp,
            ) -> anywork_core::Result<anywork_core::Delivery> {
                let op = WriteOp::RecordAttempt {
                    id,
                    owner: owner.to_owned(),
                    attempt,
                    at,
                };
                match self.write(op).await? {
                    Reply::Delivery(d) => Ok(*d),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn get_delivery(
                &self,
                id: anywork_core::DeliveryId,
            ) -> anywork_core::Result<anywork_core::Delivery> {
                select_delivery(&self.pool, id, "").await
            }

            async fn list_deliveries(
                &self,
                status: Option<anywork_core::DeliveryStatus>,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Delivery>> {
                let cols = $crate::sql::DELIVERY_COLUMNS;
                let rows = match status {
                    Some(status) => {
                        let sql = format!(
                            "SELECT {cols} FROM deliveries WHERE status = $1 ORDER BY seq \
                             LIMIT $2 OFFSET $3"
                        );
                        sqlx::query(&sql)
                            .bind(status.as_str())
                            .bind(i64::from(page.limit))
                            .bind(i64::from(page.offset))
                            .fetch_all(&self.pool)
                            .await
                    }
                    None => {
                        let sql =
                            format!("SELECT {cols} FROM deliveries ORDER BY seq LIMIT $1 OFFSET $2");
                        sqlx::query(&sql)
                            .bind(i64::from(page.limit))
                            .bind(i64::from(page.offset))
                            .fetch_all(&self.pool)
                            .await
                    }
                }
                .map_err(|e| $crate::sql::db_err("list deliveries", e))?;
                deliveries_from_rows(&rows)
            }

            async fn retry_delivery(
                &self,
                id: anywork_core::DeliveryId,
                now: anywork_core::Timestamp,
            ) -> anywork_core::Result<anywork_core::Delivery> {
                match self.write(WriteOp::RetryDelivery(id, now)).await? {
                    Reply::Delivery(d) => Ok(*d),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn delete_settled_deliveries(
                &self,
                before: anywork_core::Timestamp,
                limit: u32,
            ) -> anywork_core::Result<u64> {
                use $crate::quiet::Look;
                let mark = match self.quiet().map(|q| q.look(Look::Settled)) {
                    Some(None) => return Ok(0),
                    Some(mark) => mark,
                    None => None,
                };
                let n = match self
                    .write(WriteOp::DeleteSettledDeliveries { before, limit })
                    .await?
                {
                    Reply::Count(n) => n,
                    other => return Err(unexpected_reply(other)),
                };
                // With no delivery settled, none can age past `before` before something is
                // written.
                if n == 0
                    && let (Some(q), Some(at)) = (self.quiet(), mark)
                {
                    let settled = "SELECT EXISTS(SELECT 1 FROM deliveries \
                                   WHERE status IN ('sent', 'dead'))";
                    if !self.exists(settled, "look for settled deliveries").await? {
                        q.found_nothing(Look::Settled, at);
                    }
                }
                Ok(n)
            }

            async fn delete_finished_logs(
                &self,
                finished_before: anywork_core::Timestamp,
                max_tasks: u32,
                now: anywork_core::Timestamp,
            ) -> anywork_core::Result<anywork_core::DeletedLogs> {
                let op = WriteOp::DeleteFinishedLogs {
                    finished_before,
                    max_tasks,
                    now,
                };
                match self.write(op).await? {
                    Reply::DeletedLogs(d) => Ok(d),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn compact(&self) -> anywork_core::Result<u64> {
                self.compact_files().await
            }

            async fn store_size(&self) -> anywork_core::Result<Option<anywork_core::StoreSize>> {
                self.measure().await.map(Some)
            }

            async fn check_ready(&self) -> anywork_core::Result<()> {
                let wait = $crate::sql::READY_TIMEOUT;
                let beat = self.write(WriteOp::Heartbeat(anywork_core::Timestamp::now()));
                match tokio::time::timeout(wait, beat).await {
                    Ok(reply) => reply.map(drop),
                    Err(_) => Err(anywork_core::Error::unavailable(format!(
                        "the database took no write within {} s (locked by another process, \
                         overloaded or unreachable); check the database server and the disk",
                        wait.as_secs()
                    ))),
                }
            }
        }
    };
}

pub(crate) use impl_sql_store;

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn error_codes_of_both_backends() {
        // SQLite: primary and extended result codes.
        assert_eq!(Code::of("5"), Code::Busy);
        assert_eq!(Code::of("517"), Code::Busy); // SQLITE_BUSY_SNAPSHOT
        assert_eq!(Code::of("6"), Code::Busy);
        assert_eq!(Code::of("13"), Code::DiskFull);
        assert_eq!(Code::of("778"), Code::Io); // SQLITE_IOERR_WRITE
        assert_eq!(Code::of("8"), Code::ReadOnly);
        assert_eq!(Code::of("2067"), Code::Other); // a unique violation, matched earlier
        // PostgreSQL SQLSTATEs.
        assert_eq!(Code::of("40001"), Code::Busy);
        assert_eq!(Code::of("53100"), Code::DiskFull);
        assert_eq!(Code::of("57P01"), Code::ServerDown); // admin_shutdown
        assert_eq!(Code::of("08006"), Code::ServerDown);
        assert_eq!(Code::of("25006"), Code::ReadOnly);
        assert_eq!(Code::of("23505"), Code::Other);
    }
}
