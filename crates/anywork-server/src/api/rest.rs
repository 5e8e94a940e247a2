//! REST handlers.

use std::time::Duration;

use anywork_core::{
    Error, ErrorKind, Inbound, InboundRequest, InputResponse, NewSession, Page, PushNotification,
    SessionId, SkillSpec, TaskId, TaskRequest, session::validate_title, spec::McpServers,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::dto::{log_json, session_json, summary_json, task_json};
use super::extract::{ApiError, JsonBody, PathParam, QueryParams};
use crate::metrics::Gauges;

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

pub(crate) async fn health(State(state): State<AppState>) -> Json<Value> {
    let options = state.options();
    let mut body = json!({
        "status": "ok",
        "version": options.version,
        "driver": state.dispatcher().driver().name(),
        "demo": options.demo,
    });
    if let Some(w) = &options.warning {
        body["warning"] = json!(w);
    }
    Json(body)
}

pub(crate) async fn openapi() -> Json<Value> {
    Json(super::openapi_document())
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let d = state.dispatcher();
    let text = d.metrics().render(Gauges {
        queue_depth: d.queue_depth(),
        running: d.running(),
        websockets: state.websockets(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
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

pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult {
    let sessions = state
        .dispatcher()
        .store()
        .list_sessions(q.page(50, 500))
        .await?;
    Ok(Json(
        json!({"sessions": sessions.iter().map(summary_json).collect::<Vec<_>>()}),
    ))
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
    body: Bytes,
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
    anywork_core::spec::validate_name("channel type", &new.channel_type)?;
    if let Some(title) = body.title {
        validate_title(&title)?;
        new.title = title;
    }
    let session = state.dispatcher().store().create_session(new).await?;
    Ok((StatusCode::CREATED, Json(session_json(&session))))
}

pub(crate) async fn get_session(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    let session = state.dispatcher().store().get_session(&id).await?;
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
    if body.title.trim().is_empty() {
        return Err(Error::invalid_input("`title` must not be empty").into());
    }
    validate_title(&body.title)?;
    state
        .dispatcher()
        .store()
        .set_session_title(&id, body.title.trim())
        .await?;
    Ok(Json(json!({"success": true})))
}

pub(crate) async fn delete_session(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    let d = state.dispatcher();
    d.store().get_session(&id).await?;
    // Stop what still runs, so no worker keeps working for a deleted session.
    let mut offset = 0;
    loop {
        let page = Page { limit: 500, offset };
        let tasks = d.store().tasks_by_session(&id, page).await?;
        for t in tasks.iter().filter(|t| t.status.is_active()) {
            if let Err(e) = d.cancel(t.id).await
                && e.kind() != ErrorKind::Conflict
            {
                tracing::warn!(task = %t.id, error = %e, "cannot cancel a task of a deleted session");
            }
        }
        if tasks.len() < page.limit as usize {
            break;
        }
        offset += page.limit;
    }
    d.store().delete_session(&id).await?;
    // The session is gone for good: its worker and its workspace storage (volume, claim) too.
    if let Err(e) = d.driver().purge(&id).await {
        tracing::warn!(session = %id, error = %e, "cannot purge the session's worker and workspace");
    }
    Ok(Json(json!({"success": true})))
}

pub(crate) async fn session_tasks(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult {
    let store = state.dispatcher().store();
    store.get_session(&id).await?;
    let tasks = store.tasks_by_session(&id, q.page(200, 1000)).await?;
    Ok(Json(
        json!({"tasks": tasks.iter().map(task_json).collect::<Vec<_>>()}),
    ))
}

pub(crate) async fn session_messages(
    State(state): State<AppState>,
    PathParam(id): PathParam<SessionId>,
) -> ApiResult {
    let d = state.dispatcher();
    d.store().get_session(&id).await?;
    let history = async {
        let worker = d.driver().get_worker(&id).await?;
        d.worker_client().messages(&worker, &id).await
    };
    let messages = match history.await {
        Ok(v) => v.get("messages").cloned().unwrap_or(v),
        Err(e) => {
            tracing::info!(session = %id, error = %e, "no history from the worker");
            json!([])
        }
    };
    Ok(Json(json!({"messages": messages})))
}

/// `POST /api/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTask {
    message: String,
    #[serde(default)]
    session_id: Option<SessionId>,
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    channel_key: Option<String>,
    #[serde(default)]
    channel_meta: Value,
    #[serde(default)]
    skills: Vec<SkillSpec>,
    #[serde(default)]
    mcp_servers: McpServers,
    #[serde(default)]
    push_notification: Option<PushNotification>,
}

pub(crate) async fn create_task(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateTask>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let request = TaskRequest {
        session_id: body.session_id,
        session_mode: Default::default(),
        channel_type: body.channel_type.unwrap_or_else(|| "api".to_owned()),
        channel_key: body.channel_key,
        channel_meta: body.channel_meta,
        message: body.message,
        skills: body.skills,
        mcp_servers: body.mcp_servers,
        push_notification: body.push_notification,
        idempotency_key: None,
    };
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
) -> ApiResult {
    let task = state.dispatcher().store().get_task(id).await?;
    Ok(Json(task_json(&task)))
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
    d.store().get_task(id).await?;
    // One more than asked, to tell whether there is more.
    let mut logs = d.store().read_logs(id, q.after, limit + 1).await?;
    let wait = q
        .wait
        .filter(|w| w.is_finite() && *w > 0.0)
        .map(|w| Duration::from_secs_f64(w).min(state.options().max_wait));
    if logs.is_empty()
        && let Some(wait) = wait
    {
        // Long-poll: wait for the first new event, then answer from the log.
        let (tx, mut rx) = mpsc::channel(1);
        let follow = crate::follow::follow(d, id, q.after, &tx);
        tokio::select! {
            _ = follow => {}
            _ = rx.recv() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        logs = d.store().read_logs(id, q.after, limit + 1).await?;
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

pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
) -> ApiResult {
    let task = state.dispatcher().cancel(id).await?;
    Ok(Json(task_json(&task)))
}

pub(crate) async fn answer_task(
    State(state): State<AppState>,
    PathParam(id): PathParam<TaskId>,
    JsonBody(body): JsonBody<InputResponse>,
) -> ApiResult {
    state.dispatcher().respond(id, body).await?;
    Ok(Json(json!({"ok": true})))
}

pub(crate) async fn channel_webhook(
    State(state): State<AppState>,
    PathParam(channel_type): PathParam<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let d = state.dispatcher();
    let channel = d.channel(&channel_type).cloned().ok_or_else(|| {
        Error::not_found(format!("no channel of type {channel_type:?} is configured"))
    })?;
    let request = InboundRequest {
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body: body.to_vec(),
    };
    match channel.parse(request).await? {
        Inbound::Task(mut request) => {
            request.channel_type = channel_type;
            let submitted = d.submit(*request).await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"taskId": submitted.task.id, "sessionId": submitted.task.session_id})),
            )
                .into_response())
        }
        Inbound::Respond(body) => Ok(Json(body).into_response()),
        Inbound::Skip { reason } => {
            Ok(Json(json!({"ok": true, "skipped": true, "reason": reason})).into_response())
        }
        // FollowUp / AnswerOnly (and any later kind) need the runtime's session lookup and
        // input answering (issue 14); until that is wired, they run nothing.
        other => Ok(Json(json!({"ok": true, "skipped": true,
            "reason": format!("{} requests are not handled by this server yet", inbound_kind(&other))}))
        .into_response()),
    }
}

fn inbound_kind(inbound: &Inbound) -> &'static str {
    match inbound {
        Inbound::Task(_) => "task",
        Inbound::FollowUp(_) => "follow-up",
        Inbound::AnswerOnly(_) => "answer",
        Inbound::Respond(_) => "respond",
        Inbound::Skip { .. } => "skip",
        _ => "unknown",
    }
}

fn doc_name(file: &str) -> Result<&'static str, ApiError> {
    match file {
        "soul" => Ok("soul"),
        "agents" => Ok("agents"),
        _ => Err(ApiError::from(Error::not_found(format!(
            "no workspace file {file:?}; use `soul` or `agents`"
        )))),
    }
}

/// The session id used to reach a worker for workspace-wide files.
fn workspace_session() -> SessionId {
    SessionId::new("workspace").unwrap_or_else(|_| SessionId::generate())
}

pub(crate) async fn get_workspace_doc(
    State(state): State<AppState>,
    PathParam(file): PathParam<String>,
) -> ApiResult {
    let doc = doc_name(&file)?;
    let d = state.dispatcher();
    let worker = d.any_worker(&workspace_session()).await?;
    let v = d.worker_client().get_doc(&worker, doc).await?;
    Ok(Json(
        json!({"file": v.get("file"), "content": v.get("content")}),
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
    let doc = doc_name(&file)?;
    let d = state.dispatcher();
    let worker = d.any_worker(&workspace_session()).await?;
    let v = d
        .worker_client()
        .put_doc(&worker, doc, &body.content)
        .await?;
    Ok(Json(
        json!({"file": v.get("file"), "content": body.content}),
    ))
}

pub(crate) async fn workers(State(state): State<AppState>) -> ApiResult {
    let driver = state.dispatcher().driver();
    let workers = driver.list().await?;
    Ok(Json(json!({
        "driver": driver.name(),
        "workers": workers,
        "running": state.dispatcher().running(),
        "queueDepth": state.dispatcher().queue_depth(),
    })))
}
