//! REST handlers.

use std::time::Duration;

use anywork_core::{
    DeliveryId, DeliveryStatus, Error, InboundRequest, InputResponse, NewSession, Page,
    PushNotification, SessionId, SkillSpec, TaskId, TaskRequest, WireTask,
    spec::{McpServers, deserialize_mcp_servers_any, deserialize_skills_any},
};
use anywork_http::{ApiError, JsonBody, PathParam, QueryParams, RawBody};
use anywork_runtime::{InboundOutcome, WorkspaceDoc};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::dto::{log_json, session_json, summary_json};

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// Health and readiness: 200 `ok` when the store takes writes, else 503 with the reason as
/// `error` (`{code, message}`), so a load balancer stops sending work to a server that
/// cannot store it.
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let options = state.options();
    let ready = state.dispatcher().check_ready().await;
    let mut body = json!({
        "status": if ready.is_ok() { "ok" } else { "unavailable" },
        "version": options.version,
        "driver": state.dispatcher().driver_name(),
        "demo": options.demo,
    });
    if let Some(w) = &options.warning {
        body["warning"] = json!(w);
    }
    body["setup"] = json!(options.setup);
    match ready {
        Ok(()) => Json(body).into_response(),
        Err(e) => {
            body["error"] = json!({"code": e.kind().as_str(), "message": e.message()});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Liveness: the process answers (a store outage is not a reason to restart it).
pub(crate) async fn live() -> Json<Value> {
    Json(json!({"ok": true}))
}

pub(crate) async fn openapi() -> Json<Value> {
    Json(super::openapi_document())
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    use anywork_runtime::prometheus_client::encoding::prometheus_text;
    let mut text = String::with_capacity(2048);
    prometheus_text::encode(&mut text, state.metrics())
        .map_err(|e| Error::internal(format!("cannot render the metrics: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        text,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    offset: Option<u32>,
}

impl PageQuery {
    fn page(&self, default: u32, max: u32) -> Page {
        Page {
            limit: self.limit.unwrap_or(default).clamp(1, max),
            offset: self.offset.unwrap_or(0),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct SessionQuery {
    /// Only sessions whose title contains this (ignoring case); empty or absent: all.
    #[serde(default)]
    q: Option<String>,
    // Not `#[serde(flatten)]` of a PageQuery: flattened numbers do not parse from a query.
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    offset: Option<u32>,
}

/// `GET /api/sessions[?q=...]`: the list, or a search by title, paged.
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<SessionQuery>,
) -> ApiResult {
    let page = PageQuery {
        limit: q.limit,
        offset: q.offset,
    }
    .page(50, 500);
    let query = q.q.as_deref().map(str::trim).unwrap_or_default();
    let sessions = if query.is_empty() {
        state.dispatcher().sessions(page).await?
    } else {
        state.dispatcher().search_sessions(query, page).await?
    };
    Ok(Json(
        json!({"sessions": sessions.iter().map(summary_json).collect::<Vec<_>>()}),
    ))
}

/// `GET /api/usage`: cost and tokens summed over every session's tasks.
pub(crate) async fn usage(State(state): State<AppState>) -> ApiResult {
    let t = state.dispatcher().usage_totals().await?;
    Ok(Json(json!({
        "sessions": t.sessions,
        "tasks": t.tasks,
        "costUsd": t.cost_usd,
        "usage": t.usage,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSession {
    #[serde(default)]
    title: Option<String>,
    #[serde(default, alias = "channel_type", rename = "channelType")]
    channel_type: Option<String>,
}

pub(crate) async fn create_session(
    State(state): State<AppState>,
    RawBody(body): RawBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    // The body is optional: no body (or `{}`) makes an untitled web chat session.
    let body: CreateSession = if body.iter().all(u8::is_ascii_whitespace) {
        CreateSession {
            title: None,
            channel_type: None,
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid_input(format!("the request body has wrong fields: {e}")))?
    };
    let mut new = NewSession::new(body.channel_type.as_deref().unwrap_or("webchat"));
    if let Some(title) = body.title {
        new.title = title;
    }
    let session = state.dispatcher().create_session(new).await?;
    Ok((StatusCode::CREATED, Json(session_json(&session))))
}

pub(crate) async fn get_session(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    let session = state.dispatcher().session(&id).await?;
    Ok(Json(session_json(&session)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rename {
    title: String,
}

pub(crate) async fn rename_session(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
    JsonBody(body): JsonBody<Rename>,
) -> ApiResult {
    state.dispatcher().rename_session(&id, &body.title).await?;
    Ok(Json(json!({"success": true})))
}

pub(crate) async fn delete_session(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    state.dispatcher().delete_session(&id).await?;
    Ok(Json(json!({"success": true})))
}

pub(crate) async fn session_tasks(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult {
    let tasks = state
        .dispatcher()
        .session_tasks(&id, q.page(200, 1000))
        .await?;
    Ok(Json(
        json!({"tasks": tasks.iter().map(WireTask::from).collect::<Vec<_>>()}),
    ))
}

pub(crate) async fn session_messages(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    let messages = state.dispatcher().session_messages(&id).await?;
    Ok(Json(json!({"messages": messages})))
}

/// `POST /api/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTask {
    message: String,
    /// `sessionId` as the answers spell it, or `session_id`.
    #[serde(default, alias = "sessionId")]
    session_id: Option<SessionId>,
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    channel_key: Option<String>,
    #[serde(default)]
    channel_meta: Value,
    /// Names and/or inline objects, as the original's clients send them.
    #[serde(default, deserialize_with = "deserialize_skills_any")]
    skills: Vec<SkillSpec>,
    /// The original's list, the map by name, `[]`, `{}` or `null`.
    #[serde(default, deserialize_with = "deserialize_mcp_servers_any")]
    mcp_servers: McpServers,
    #[serde(default)]
    push_notification: Option<PushNotification>,
}

pub(crate) async fn create_task(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateTask>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let options = state.options();
    if let Some(key) = &body.channel_key
        && key.len() > options.max_channel_key_bytes
    {
        return Err(Error::invalid_input(format!(
            "`channel_key` is longer than {} bytes",
            options.max_channel_key_bytes
        ))
        .into());
    }
    let meta_len = serde_json::to_string(&body.channel_meta).map_or(0, |s| s.len());
    if meta_len > options.max_channel_meta_bytes {
        return Err(Error::invalid_input(format!(
            "`channel_meta` is larger than {} bytes of JSON",
            options.max_channel_meta_bytes
        ))
        .into());
    }
    let mut request = TaskRequest::new(
        body.channel_type.unwrap_or_else(|| "api".to_owned()),
        body.message,
    );
    request.session_id = body.session_id;
    request.channel_key = body.channel_key;
    request.channel_meta = body.channel_meta;
    request.skills = body.skills;
    request.mcp_servers = body.mcp_servers;
    request.push_notification = body.push_notification;
    let submitted = state.dispatcher().submit(request).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "taskId": submitted.task.id,
            "sessionId": submitted.task.session_id,
            "status": submitted.task.status,
        })),
    ))
}

pub(crate) async fn get_task(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
) -> ApiResult<Json<WireTask>> {
    let task = state.dispatcher().task(id).await?;
    Ok(Json(WireTask::from(&task)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct LogsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<u32>,
    /// Seconds to wait for a first new event when there is none yet.
    #[serde(default)]
    wait: Option<f64>,
}

pub(crate) async fn task_logs(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> ApiResult {
    let d = state.dispatcher();
    let limit = q.limit.unwrap_or(100).clamp(1, 500);
    // One more than asked, to tell whether there is more.
    let mut logs = d.task_logs(id, q.after, limit + 1).await?;
    // Clamped before it becomes a `Duration` (which panics past u64::MAX seconds).
    let max_wait = state.options().max_wait;
    let wait = q
        .wait
        .filter(|w| w.is_finite() && *w > 0.0)
        .map(|w| Duration::try_from_secs_f64(w.min(max_wait.as_secs_f64())).unwrap_or(max_wait));
    if logs.is_empty()
        && let Some(wait) = wait
    {
        // Long-poll: wait for the first new event (or the end of the task's events), then
        // answer from the log.
        let mut events = std::pin::pin!(d.events(id, q.after));
        // A shutdown ends the wait: the answer is what the log has.
        tokio::select! {
            _ = tokio::time::timeout(wait, events.next()) => {}
            _ = state.closing().cancelled() => {}
        }
        logs = d.task_logs(id, q.after, limit + 1).await?;
    }
    let has_more = logs.len() > limit as usize;
    logs.truncate(limit as usize);
    let next = logs.last().map_or(q.after, |l| l.seq);
    Ok(Json(json!({
        "logs": logs.iter().map(log_json).collect::<Vec<_>>(),
        "hasMore": has_more,
        "next": next,
    })))
}

/// 200 with the task once it ended; 202 with `status: canceling` when its worker has not
/// stopped yet (the run goes on stopping it; the `done` event tells the end).
pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
) -> ApiResult<Response> {
    let task = state.dispatcher().cancel(id).await?;
    if task.status.is_terminal() {
        return Ok(Json(WireTask::from(&task)).into_response());
    }
    let mut body = serde_json::to_value(WireTask::from(&task))
        .map_err(|e| Error::internal(format!("cannot encode the task: {e}")))?;
    body["status"] = json!("canceling");
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

pub(crate) async fn answer_task(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
    JsonBody(body): JsonBody<InputResponse>,
) -> ApiResult {
    state.dispatcher().respond(id, body).await?;
    Ok(Json(json!({"ok": true})))
}

/// `POST /api/channel/:type/webhook`. The body is read here, up to
/// [`ApiOptions::channel_max_body_bytes`](super::ApiOptions), so that an oversized one is
/// refused (413) before any channel sees it; then the channel verifies it (401) and parses
/// it (400). Nothing of the body or its headers is logged.
pub(crate) async fn channel_webhook(
    State(state): State<AppState>,
    PathParam(channel_type): PathParam<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    if state.dispatcher().channel(&channel_type).is_none() {
        return Err(Error::not_found(format!(
            "no channel of type {:?} is configured",
            channel_type.chars().take(64).collect::<String>()
        ))
        .into());
    }
    // The channel limit, within the API's own.
    let limit = state
        .options()
        .channel_max_body_bytes
        .min(state.options().max_body_bytes);
    let too_large = || {
        ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            Error::invalid_input(format!(
                "the request body is larger than the channel limit of {limit} bytes"
            )),
        )
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(too_large());
    }
    let mut chunks = body.into_data_stream();
    let mut body = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::from(Error::invalid_input(format!(
                "the request body could not be read: {e}"
            )))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let request = InboundRequest::new(
        headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
    );
    match state.dispatcher().inbound(&channel_type, request).await? {
        InboundOutcome::Submitted(submitted) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"taskId": submitted.task.id, "sessionId": submitted.task.session_id})),
        )
            .into_response()),
        InboundOutcome::Answered { task } => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"taskId": task.id, "sessionId": task.session_id, "answered": true})),
        )
            .into_response()),
        InboundOutcome::Responded(body) => Ok(Json(body).into_response()),
        InboundOutcome::Skipped { reason } => {
            Ok(Json(json!({"ok": true, "skipped": true, "reason": reason})).into_response())
        }
        other => Err(Error::internal(format!("unexpected inbound outcome {other:?}")).into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    offset: Option<u32>,
}

/// `GET /api/deliveries?status=pending|failed|sent|dead&limit=&offset=`: the outbox, oldest
/// first, secrets redacted.
pub(crate) async fn list_deliveries(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<DeliveriesQuery>,
) -> ApiResult {
    let status = match q.status.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<DeliveryStatus>()?),
        None => None,
    };
    let page = Page {
        limit: q.limit.unwrap_or(100).clamp(1, 500),
        offset: q.offset.unwrap_or(0),
    };
    let list = state.dispatcher().deliveries(status, page).await?;
    Ok(Json(json!({"deliveries": list})))
}

/// `POST /api/deliveries/:id/retry`: a dead delivery is sent again with a fresh budget.
pub(crate) async fn retry_delivery(
    State(state): State<AppState>,
    PathParam(id): PathParam<DeliveryId>,
) -> ApiResult {
    let delivery = state.dispatcher().retry_delivery(id).await?;
    Ok(Json(json!(delivery)))
}

pub(crate) async fn get_workspace_doc(
    State(state): State<AppState>,
    PathParam(file): PathParam<String>,
) -> ApiResult {
    let doc: WorkspaceDoc = file.parse()?;
    let doc = state.dispatcher().workspace_doc(doc).await?;
    Ok(Json(
        json!({"file": doc.file, "content": doc.content, "scope": "defaults"}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DocBody {
    content: String,
}

pub(crate) async fn put_workspace_doc(
    State(state): State<AppState>,
    PathParam(file): PathParam<String>,
    JsonBody(body): JsonBody<DocBody>,
) -> ApiResult {
    let doc: WorkspaceDoc = file.parse()?;
    let doc = state
        .dispatcher()
        .put_workspace_doc(doc, &body.content)
        .await?;
    Ok(Json(
        json!({"file": doc.file, "content": doc.content, "scope": "defaults"}),
    ))
}

/// `GET /api/sessions/:id/workspace/:file`: the session's own copy, from its running worker
/// (409 when none runs: nothing is started to read it).
pub(crate) async fn get_session_doc(
    State(state): State<AppState>,
    PathParam((id, file)): PathParam<(SessionId, String)>,
) -> ApiResult {
    let doc: WorkspaceDoc = file.parse()?;
    let doc = state.dispatcher().session_doc(&id, doc).await?;
    Ok(Json(
        json!({"file": doc.file, "content": doc.content, "scope": "session", "sessionId": id}),
    ))
}

/// `PUT /api/sessions/:id/workspace/:file`.
pub(crate) async fn put_session_doc(
    State(state): State<AppState>,
    PathParam((id, file)): PathParam<(SessionId, String)>,
    JsonBody(body): JsonBody<DocBody>,
) -> ApiResult {
    let doc: WorkspaceDoc = file.parse()?;
    let doc = state
        .dispatcher()
        .put_session_doc(&id, doc, &body.content)
        .await?;
    Ok(Json(
        json!({"file": doc.file, "content": doc.content, "scope": "session", "sessionId": id}),
    ))
}

/// `GET /api/admin/tasks`: the tasks not over yet (running, waiting for input, queued).
pub(crate) async fn active_tasks(State(state): State<AppState>) -> ApiResult {
    let tasks = state.dispatcher().active_tasks(200).await?;
    Ok(Json(json!({
        "tasks": tasks.iter().map(WireTask::from).collect::<Vec<_>>(),
        "running": state.dispatcher().running(),
        "queueDepth": state.dispatcher().queue_depth(),
    })))
}

/// `GET /api/skills`: `{"skills": [{name, description}], "invalid": [{name, error}]}`.
pub(crate) async fn skills(State(state): State<AppState>) -> ApiResult {
    let catalog = state.dispatcher().skill_catalog().await?;
    Ok(Json(json!(catalog)))
}

pub(crate) async fn workers(State(state): State<AppState>) -> ApiResult {
    let d = state.dispatcher();
    let workers = d.workers().await?;
    Ok(Json(json!({
        "driver": d.driver_name(),
        "workers": workers,
        "running": state.dispatcher().running(),
        "queueDepth": state.dispatcher().queue_depth(),
    })))
}

/// `GET /api/sessions/:id/files`: the session's `files/` listing.
pub(crate) async fn session_files(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    Ok(Json(state.dispatcher().session_files(&id).await?))
}

/// `GET /api/sessions/:id/files/*path`: one file, as an attachment unless `?inline=1`.
pub(crate) async fn session_file(
    State(state): State<AppState>,
    PathParam((id, path)): PathParam<(SessionId, String)>,
    QueryParams(q): QueryParams<FileQuery>,
) -> ApiResult<Response> {
    let bytes = state.dispatcher().session_file(&id, &path).await?;
    let name = path.rsplit('/').next().unwrap_or("file");
    Ok(file_response(
        bytes,
        "application/octet-stream",
        name,
        q.inline.unwrap_or(false),
    ))
}

/// `GET /api/sessions/:id/files.zip`: the session's `files/` as a zip.
pub(crate) async fn session_files_zip(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult<Response> {
    let bytes = state.dispatcher().session_files_zip(&id).await?;
    Ok(file_response(bytes, "application/zip", "files.zip", false))
}

/// `PUT /api/sessions/:id/files/*path`: the body becomes `files/<path>` (25 MiB at most).
pub(crate) async fn put_session_file(
    State(state): State<AppState>,
    PathParam((id, path)): PathParam<(SessionId, String)>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|rej| {
        ApiError::with_status(
            rej.status(),
            Error::invalid_input(format!(
                "the upload was not read ({}): a file in files/ is at most {} bytes",
                rej.body_text(),
                anywork_core::worker_api::MAX_UPLOAD_BYTES
            )),
        )
    })?;
    Ok(Json(
        state
            .dispatcher()
            .put_session_file(&id, &path, body.to_vec())
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    #[serde(default, deserialize_with = "flag")]
    inline: Option<bool>,
}

/// `1`/`true` or `0`/`false`.
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "1" | "true" => Ok(Some(true)),
        "0" | "false" => Ok(Some(false)),
        other => Err(serde::de::Error::custom(format!(
            "inline is 1 or 0, not {other:?}"
        ))),
    }
}

/// A download: never rendered by the browser as a page of this origin (`nosniff`, a sandbox
/// CSP), inline as plain text when asked, else an attachment named `name`.
fn file_response(bytes: Vec<u8>, content_type: &str, name: &str, inline: bool) -> Response {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (content_type, disposition) = if inline {
        ("text/plain; charset=utf-8".to_owned(), "inline".to_owned())
    } else {
        (
            content_type.to_owned(),
            format!("attachment; filename=\"{safe}\""),
        )
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CONTENT_SECURITY_POLICY, "sandbox".to_owned()),
        ],
        bytes,
    )
        .into_response()
}
