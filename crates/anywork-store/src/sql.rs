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

/// Rows per multi-row `INSERT` when appending logs (5 parameters each).
pub(crate) const LOG_CHUNK: usize = 1000;

pub(crate) const TASK_COLUMNS: &str = "id, session_id, channel_type, channel_meta, status, \
    message, skills, mcp_servers, result, structured_output, error, cost_usd, input_tokens, \
    output_tokens, cache_creation_input_tokens, cache_read_input_tokens, num_turns, duration_ms, \
    worker_id, push_notification, lease_owner, lease_expires_at, created_at, started_at, \
    finished_at";

/// Moves a session's `last_active` forward to `$1` (never back); session id `$2`.
pub(crate) const TOUCH_SESSION: &str = "UPDATE sessions SET last_active = \
    CASE WHEN last_active < $1 THEN $1 ELSE last_active END WHERE id = $2";

pub(crate) const ACTIVE: &str = "('pending', 'running', 'input_required')";

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

/// Maps a database error to AnyWork's error kinds: constraint violations become
/// `Conflict`/`NotFound`, connection trouble and lock contention `Unavailable`.
pub(crate) fn db_err(context: &str, e: sqlx::Error) -> Error {
    let err = match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Error::conflict(format!("{context}: already exists"))
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            Error::not_found(format!("{context}: referenced row does not exist"))
        }
        // SQLITE_BUSY / SQLITE_LOCKED, PostgreSQL serialization failure / deadlock.
        sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("5" | "6" | "40001" | "40P01")) =>
        {
            Error::unavailable(format!("{context}: database is busy, try again ({db})"))
        }
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
macro_rules! impl_sql_store {
    ($store:ty, $db:ty, $begin:expr, $for_update:expr) => {
        type Row = <$db as sqlx::Database>::Row;

        fn task_from_row(row: &Row) -> anywork_core::Result<anywork_core::Task> {
            use $crate::sql::{corrupt, to_u64};
            use anywork_core::*;
            use sqlx::Row as _;
            let get_str = |c: &str| row.try_get::<String, _>(c).map_err(|e| corrupt(c, e));
            let get_opt_str =
                |c: &str| row.try_get::<Option<String>, _>(c).map_err(|e| corrupt(c, e));
            let get_i64 = |c: &str| row.try_get::<i64, _>(c).map_err(|e| corrupt(c, e));
            let get_opt_i64 =
                |c: &str| row.try_get::<Option<i64>, _>(c).map_err(|e| corrupt(c, e));
            fn json<T: serde::de::DeserializeOwned>(c: &str, s: &str) -> Result<T> {
                serde_json::from_str(s).map_err(|e| corrupt(c, e))
            }
            let lease = match (get_opt_str("lease_owner")?, get_opt_i64("lease_expires_at")?) {
                (Some(owner), Some(at)) => Some(Lease {
                    owner,
                    expires_at: Timestamp(at),
                }),
                _ => None,
            };
            Ok(Task {
                id: get_str("id")?.parse().map_err(|e| corrupt("id", e))?,
                session_id: SessionId::new(get_str("session_id")?)
                    .map_err(|e| corrupt("session_id", e))?,
                channel_type: get_str("channel_type")?,
                channel_meta: json("channel_meta", &get_str("channel_meta")?)?,
                status: get_str("status")?.parse().map_err(|e| corrupt("status", e))?,
                message: json("message", &get_str("message")?)?,
                skills: json("skills", &get_str("skills")?)?,
                mcp_servers: json("mcp_servers", &get_str("mcp_servers")?)?,
                result: get_opt_str("result")?
                    .map(|s| json("result", &s))
                    .transpose()?,
                structured_output: get_opt_str("structured_output")?
                    .map(|s| json("structured_output", &s))
                    .transpose()?,
                error: get_opt_str("error")?
                    .map(|s| json("error", &s))
                    .transpose()?,
                cost_usd: row
                    .try_get::<Option<f64>, _>("cost_usd")
                    .map_err(|e| corrupt("cost_usd", e))?,
                usage: TokenUsage {
                    input_tokens: to_u64(get_i64("input_tokens")?),
                    output_tokens: to_u64(get_i64("output_tokens")?),
                    cache_creation_input_tokens: to_u64(get_i64("cache_creation_input_tokens")?),
                    cache_read_input_tokens: to_u64(get_i64("cache_read_input_tokens")?),
                },
                num_turns: u32::try_from(get_i64("num_turns")?).unwrap_or(0),
                duration_ms: get_opt_i64("duration_ms")?.map(to_u64),
                worker_id: get_opt_str("worker_id")?,
                push_notification: get_opt_str("push_notification")?
                    .map(|s| json("push_notification", &s))
                    .transpose()?,
                lease,
                created_at: Timestamp(get_i64("created_at")?),
                started_at: get_opt_i64("started_at")?.map(Timestamp),
                finished_at: get_opt_i64("finished_at")?.map(Timestamp),
            })
        }

        fn session_from_row(row: &Row) -> anywork_core::Result<anywork_core::Session> {
            use $crate::sql::corrupt;
            use anywork_core::*;
            use sqlx::Row as _;
            let get_str = |c: &str| row.try_get::<String, _>(c).map_err(|e| corrupt(c, e));
            Ok(Session {
                id: SessionId::new(get_str("id")?).map_err(|e| corrupt("id", e))?,
                channel_type: get_str("channel_type")?,
                channel_key: row
                    .try_get::<Option<String>, _>("channel_key")
                    .map_err(|e| corrupt("channel_key", e))?,
                title: get_str("title")?,
                created_at: Timestamp(
                    row.try_get::<i64, _>("created_at").map_err(|e| corrupt("created_at", e))?,
                ),
                last_active: Timestamp(
                    row.try_get::<i64, _>("last_active").map_err(|e| corrupt("last_active", e))?,
                ),
            })
        }

        /// `(type, payload, created_at)` rows for the log table.
        fn encode_logs(
            logs: Vec<anywork_core::NewTaskLog>,
        ) -> anywork_core::Result<Vec<(String, String, i64)>> {
            logs.into_iter()
                .map(|log| {
                    let wire = anywork_core::WireEvent::from(log.event);
                    Ok((wire.kind.clone(), json_text(&wire)?, log.timestamp.0))
                })
                .collect()
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
            UpdateTask {
                id: anywork_core::TaskId,
                expected: anywork_core::TaskStatus,
                change: Box<anywork_core::TaskChange>,
                rows: Option<Vec<(String, String, i64)>>,
            },
            RenewLease {
                id: anywork_core::TaskId,
                owner: String,
                expires_at: anywork_core::Timestamp,
            },
            AppendLogs(anywork_core::TaskId, Vec<(String, String, i64)>),
        }

        /// What a [`WriteOp`] returns.
        #[derive(Debug)]
        pub(crate) enum Reply {
            Unit,
            Session(anywork_core::Session),
            Task(Box<anywork_core::Task>, u64),
            Seq(u64),
        }

        fn unexpected_reply(reply: Reply) -> anywork_core::Error {
            anywork_core::Error::internal(format!("store write answered {reply:?}"))
        }

        type Conn = <$db as sqlx::Database>::Connection;

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
        pub(crate) async fn apply(conn: &mut Conn, op: &WriteOp) -> anywork_core::Result<Reply> {
            use $crate::sql::db_err;
            match op {
                WriteOp::CreateSession(session) => {
                    sqlx::query(
                        "INSERT INTO sessions (id, channel_type, channel_key, title, created_at, \
                         last_active) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(session.id.as_str())
                    .bind(&session.channel_type)
                    .bind(&session.channel_key)
                    .bind(&session.title)
                    .bind(session.created_at.0)
                    .bind(session.last_active.0)
                    .execute(&mut *conn)
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
                    sqlx::query(
                        "DELETE FROM task_logs WHERE task_id IN \
                         (SELECT id FROM tasks WHERE session_id = $1)",
                    )
                    .bind(id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
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
                    let push = task.push_notification.as_ref().map(json_text).transpose()?;
                    sqlx::query(
                        "INSERT INTO tasks (id, session_id, channel_type, channel_meta, status, \
                         message, skills, mcp_servers, push_notification, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    )
                    .bind(task.id.to_string())
                    .bind(task.session_id.as_str())
                    .bind(&task.channel_type)
                    .bind(json_text(&task.channel_meta)?)
                    .bind(task.status.as_str())
                    .bind(json_text(&task.message)?)
                    .bind(json_text(&task.skills)?)
                    .bind(json_text(&task.mcp_servers)?)
                    .bind(push)
                    .bind(task.created_at.0)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err(&format!("create task {}", task.id), e))?;
                    // After the insert, so that a duplicate id is `Conflict` before a missing
                    // session is `NotFound`, as in every store.
                    let touched = sqlx::query(
                        $crate::sql::TOUCH_SESSION,
                    )
                    .bind(task.created_at.0)
                    .bind(task.session_id.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db_err(ctx, e))?;
                    if touched.rows_affected() == 0 {
                        // Undo the insert: a logical error writes nothing.
                        sqlx::query("DELETE FROM tasks WHERE id = $1")
                            .bind(task.id.to_string())
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| db_err(ctx, e))?;
                        return Err(anywork_core::Error::not_found(format!(
                            "session {} not found",
                            task.session_id
                        )));
                    }
                    Ok(Reply::Task(task.clone(), 0))
                }
                WriteOp::UpdateTask {
                    id,
                    expected,
                    change,
                    rows,
                } => {
                    let task = update_in(conn, *id, *expected, change).await?;
                    let last = match rows {
                        Some(rows) => append_in(conn, *id, rows).await?,
                        None => 0,
                    };
                    Ok(Reply::Task(Box::new(task), last))
                }
                WriteOp::RenewLease {
                    id,
                    owner,
                    expires_at,
                } => {
                    let sql = format!(
                        "UPDATE tasks SET lease_expires_at = $1 WHERE id = $2 \
                         AND lease_owner = $3 AND status IN {}",
                        $crate::sql::ACTIVE
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
                WriteOp::AppendLogs(id, rows) => Ok(Reply::Seq(append_in(conn, *id, rows).await?)),
            }
        }

        /// The compare-and-set of `update_task`, inside the transaction on `conn`.
        async fn update_in(
            conn: &mut Conn,
            id: anywork_core::TaskId,
            expected: anywork_core::TaskStatus,
            change: &anywork_core::TaskChange,
        ) -> anywork_core::Result<anywork_core::Task> {
            use $crate::sql::to_i64;
            let ctx = "update task";
            let mut task = lock_task(conn, id).await?;
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
            let done = sqlx::query(
                "UPDATE tasks SET status = $1, result = $2, structured_output = $3, \
                 error = $4, cost_usd = $5, input_tokens = $6, output_tokens = $7, \
                 cache_creation_input_tokens = $8, cache_read_input_tokens = $9, \
                 num_turns = $10, duration_ms = $11, worker_id = $12, lease_owner = $13, \
                 lease_expires_at = $14, started_at = $15, finished_at = $16 \
                 WHERE id = $17 AND status = $18",
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
            .execute(&mut *conn)
            .await
            .map_err(|e| $crate::sql::db_err(ctx, e))?;
            if done.rows_affected() == 0 {
                return Err(anywork_core::Error::conflict(format!(
                    "task {id} changed concurrently"
                )));
            }
            Ok(task)
        }

        /// Appends `rows` to `task_id`'s log inside the transaction on `conn`; the last seq.
        async fn append_in(
            conn: &mut Conn,
            task_id: anywork_core::TaskId,
            rows: &[(String, String, i64)],
        ) -> anywork_core::Result<u64> {
            use sqlx::Row as _;
            let ctx = "append logs";
            let id = task_id.to_string();
            let count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
            // Reserving the seq range first also takes the task's row lock, which serializes
            // appenders of one task so that seqs commit in order, gap-free. With no rows, this
            // reads the last seq (and `NotFound` for an unknown task).
            let row = sqlx::query(
                "UPDATE tasks SET last_seq = last_seq + $1 WHERE id = $2 RETURNING last_seq",
            )
            .bind(count)
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| $crate::sql::db_err(ctx, e))?
            .ok_or_else(|| anywork_core::Error::not_found(format!("task {task_id} not found")))?;
            let last: i64 = row
                .try_get("last_seq")
                .map_err(|e| $crate::sql::corrupt("last_seq", e))?;
            let mut seq = last - count;
            for chunk in rows.chunks($crate::sql::LOG_CHUNK) {
                let mut insert = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO task_logs (task_id, seq, type, payload, created_at) ",
                );
                insert.push_values(chunk, |mut b, (kind, payload, at)| {
                    seq += 1;
                    b.push_bind(id.as_str())
                        .push_bind(seq)
                        .push_bind(kind.as_str())
                        .push_bind(payload.as_str())
                        .push_bind(*at);
                });
                insert
                    .build()
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| $crate::sql::db_err(ctx, e))?;
            }
            Ok($crate::sql::to_u64(last))
        }

        async fn lock_task(
            conn: &mut Conn,
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

        /// Runs `op` alone in a transaction of its own on `conn`: committed when it succeeds,
        /// rolled back when it fails.
        pub(crate) async fn write_alone(
            conn: &mut Conn,
            op: &WriteOp,
        ) -> anywork_core::Result<Reply> {
            use sqlx::Connection as _;
            let ctx = "write";
            let mut tx = conn
                .begin_with($begin)
                .await
                .map_err(|e| $crate::sql::db_err(ctx, e))?;
            let reply = apply(&mut tx, op).await?;
            tx.commit().await.map_err(|e| $crate::sql::db_err(ctx, e))?;
            Ok(reply)
        }

        impl $store {
            /// Runs `op` in a transaction of its own on a pooled connection.
            async fn write_on_pool(&self, op: &WriteOp) -> anywork_core::Result<Reply> {
                let mut conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(|e| $crate::sql::db_err("write", e))?;
                write_alone(&mut conn, op).await
            }

            /// Tasks whose `column` equals `value`, oldest first. `column` is one of ours,
            /// never the caller's.
            async fn tasks_where(
                &self,
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
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("list tasks", e))?
                    .iter()
                    .map(task_from_row)
                    .collect()
            }
        }

        #[async_trait::async_trait]
        impl anywork_core::TaskStore for $store {
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
                use sqlx::Row as _;
                let sql = format!(
                    "SELECT s.id, s.channel_type, s.channel_key, s.title, s.created_at, \
                     s.last_active, \
                     (SELECT COUNT(*) FROM tasks t WHERE t.session_id = s.id) AS task_count, \
                     (SELECT COUNT(*) FROM tasks t WHERE t.session_id = s.id \
                       AND t.status IN {}) AS active_task_count \
                     FROM sessions s ORDER BY s.last_active DESC, s.id DESC \
                     LIMIT $1 OFFSET $2",
                    $crate::sql::ACTIVE
                );
                let rows = sqlx::query(&sql)
                    .bind(i64::from(page.limit))
                    .bind(i64::from(page.offset))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("list sessions", e))?;
                rows.iter()
                    .map(|row| {
                        let count = |c: &str| {
                            row.try_get::<i64, _>(c)
                                .map(|n| $crate::sql::to_u64(n))
                                .map_err(|e| $crate::sql::corrupt(c, e))
                        };
                        Ok(anywork_core::SessionSummary {
                            session: session_from_row(row)?,
                            task_count: count("task_count")?,
                            active_task_count: count("active_task_count")?,
                        })
                    })
                    .collect()
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

            async fn get_task(
                &self,
                id: anywork_core::TaskId,
            ) -> anywork_core::Result<anywork_core::Task> {
                let sql = format!(
                    "SELECT {} FROM tasks WHERE id = $1",
                    $crate::sql::TASK_COLUMNS
                );
                let row = sqlx::query(&sql)
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("read task", e))?
                    .ok_or_else(|| {
                        anywork_core::Error::not_found(format!("task {id} not found"))
                    })?;
                task_from_row(&row)
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
                let op = WriteOp::UpdateTask {
                    id,
                    expected,
                    change: Box::new(change),
                    rows: Some(encode_logs(logs)?),
                };
                match self.write(op).await? {
                    Reply::Task(t, last) => Ok((*t, last)),
                    other => Err(unexpected_reply(other)),
                }
            }

            async fn tasks_by_session(
                &self,
                session_id: &anywork_core::SessionId,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                self.tasks_where("session_id", session_id.as_str(), page).await
            }

            async fn tasks_by_status(
                &self,
                status: anywork_core::TaskStatus,
                page: anywork_core::Page,
            ) -> anywork_core::Result<Vec<anywork_core::Task>> {
                self.tasks_where("status", status.as_str(), page).await
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
                let sql = format!(
                    "SELECT {} FROM tasks WHERE status IN {} AND lease_expires_at IS NOT NULL \
                     AND lease_expires_at <= $1 ORDER BY created_at, id LIMIT $2",
                    $crate::sql::TASK_COLUMNS,
                    $crate::sql::ACTIVE
                );
                sqlx::query(&sql)
                    .bind(now.0)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| $crate::sql::db_err("find expired leases", e))?
                    .iter()
                    .map(task_from_row)
                    .collect()
            }

            async fn append_logs(
                &self,
                task_id: anywork_core::TaskId,
                logs: Vec<anywork_core::NewTaskLog>,
            ) -> anywork_core::Result<u64> {
                use sqlx::Row as _;
                if logs.is_empty() {
                    let row = sqlx::query("SELECT last_seq FROM tasks WHERE id = $1")
                        .bind(task_id.to_string())
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| $crate::sql::db_err("append logs", e))?
                        .ok_or_else(|| {
                            anywork_core::Error::not_found(format!("task {task_id} not found"))
                        })?;
                    let last: i64 = row
                        .try_get("last_seq")
                        .map_err(|e| $crate::sql::corrupt("last_seq", e))?;
                    return Ok($crate::sql::to_u64(last));
                }
                match self.write(WriteOp::AppendLogs(task_id, encode_logs(logs)?)).await? {
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
                use $crate::sql::corrupt;
                use sqlx::Row as _;
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
                        let s = |c: &str| row.try_get::<String, _>(c).map_err(|e| corrupt(c, e));
                        let i = |c: &str| row.try_get::<i64, _>(c).map_err(|e| corrupt(c, e));
                        Ok(anywork_core::TaskLog {
                            task_id,
                            seq: $crate::sql::to_u64(i("seq")?),
                            event: $crate::sql::event_from_row(&s("type")?, &s("payload")?),
                            timestamp: anywork_core::Timestamp(i("created_at")?),
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(crate) use impl_sql_store;
