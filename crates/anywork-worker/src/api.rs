//! The worker's HTTP API, as an axum [`Router`].
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /health` | | `{"status":"ok","version","executor","busy_sessions":[..],"sandbox"}` |
//! | `POST /prepare` | `{session_id, skills?, mcp_servers?, soul?, repository?: {url, git_ref?, dir, token?}}` (the repository is fetched shallowly into `dir` and checked out, each time) | `{"status":"ready"}` |
//! | `POST /chat` | `{task_id, session_id, message}` | `text/event-stream` of [`TaskEvent`](anywork_core::TaskEvent)s |
//! | `GET /chat/attach?task_id=&after_seq=` | | the same stream from the event after seq `after_seq` (SSE `id`s are seqs), for a client that lost it; 404 if the task is unknown |
//! | `POST /cancel` | `{task_id}` | `{"status": <final status>, "task_id"}`, or 202 `canceling` |
//! | `POST /input` | `{task_id, request_id, answer?, allow?}` | `{"status":"accepted"}` |
//! | `GET /sessions/{id}/messages` | | `{"messages":[..]}` |
//! | `DELETE /sessions/{id}` | | `{"status":"deleted","session_id"}`; 409 while a task runs in it |
//! | `GET /sessions/{id}/files` | | `{"files":[{path,size,modified}]}` |
//! | `GET /workspace/{soul\|agents}?session_id=` | | `{"file":"SOUL.md","content":..}` |
//! | `PUT /workspace/{soul\|agents}?session_id=` | `{content}` | `{"file":"SOUL.md","status":"saved"}` |
//!
//! With a [secret](crate::WorkerConfig::secret) every call but `GET /health` must carry it in
//! the `X-AnyWork-Worker-Secret` header ([`SECRET_HEADER`]), else it is answered 401
//! `unauthorized` (compared in constant time); `/health` without it answers only
//! `{"status":"ok"}`.
//!
//! Errors are `{"error":{"code":<ErrorKind::as_str>,"message":..}}` with the status of
//! [`status_for`]; bodies that cannot be read answer 400 (bad JSON), 413 (too large), 415 (not
//! JSON) or 422 (wrong fields), in the same shape with code `invalid_input` (the glue shared
//! with the server, `anywork-http`).
//!
//! `/chat` answers 4xx JSON only when the request itself is refused (bad body, session busy,
//! task id already running, workspace unusable). Once accepted, it always answers 200 with an
//! event stream that ends with exactly one `done`: if the executor cannot start, the stream is
//! that single `failed` done.

use std::future::Future;
use std::sync::Arc;

use anywork_core::worker_api::{
    ATTACH_PATH, CANCEL_PATH, CHAT_PATH, CancelRequest, ChatRequest, HEALTH_PATH, INPUT_PATH,
    InputAnswer, PREPARE_PATH, PrepareRequest, SECRET_HEADER,
};
use anywork_core::{Error, ErrorKind, ExecutionRequest, InputResponse, SessionId};
pub use anywork_http::{ApiError, JsonBody, PathParam, QueryParams, status_for};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::history::HistoryMessage;
use crate::run;
use crate::state::WorkerState;
use crate::workspace::WorkspaceDoc;

/// The worker's routes over `state`.
pub fn router(state: WorkerState) -> Router {
    let limit = state.config().max_body_bytes;
    let routes = Router::new()
        .route(HEALTH_PATH, get(health))
        .route(PREPARE_PATH, post(prepare))
        .route(CHAT_PATH, post(chat))
        .route(ATTACH_PATH, get(attach))
        .route(CANCEL_PATH, post(cancel))
        .route(INPUT_PATH, post(input))
        .route("/sessions/{id}", delete(delete_session))
        .route("/sessions/{id}/messages", get(messages))
        .route("/sessions/{id}/files", get(files))
        .route("/sessions/{id}/files.zip", get(files_zip))
        .route(
            "/sessions/{id}/files/{*path}",
            get(read_file)
                .put(write_file)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::files::MAX_UPLOAD_BYTES,
                )),
        )
        .route("/workspace/{file}", get(get_doc).put(put_doc))
        .route(
            crate::pull_request::MCP_PATH,
            post(crate::pull_request::mcp_endpoint)
                .get(crate::pull_request::mcp_no_stream)
                .delete(crate::pull_request::mcp_no_stream),
        );
    anywork_http::limit_uri(
        anywork_http::limit_body(routes, limit)
            .fallback(anywork_http::no_route)
            .method_not_allowed_fallback(anywork_http::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_secret,
            )),
    )
    .with_state(state)
}

/// Whether `headers` carry the worker's secret (always, for a worker without one).
fn authorized(state: &WorkerState, headers: &HeaderMap) -> bool {
    match &state.config().secret {
        None => true,
        Some(secret) => headers
            .get(SECRET_HEADER)
            .is_some_and(|v| secret.matches(v.as_bytes())),
    }
}

/// Refuses every call without the secret, except `GET /health` (which then says little).
async fn require_secret(
    State(state): State<WorkerState>,
    request: Request,
    next: Next,
) -> Response {
    // The tool endpoint checks its own per-session secret: the agent's CLI calls it.
    let path = request.uri().path();
    if path == HEALTH_PATH
        || path == crate::pull_request::MCP_PATH
        || authorized(&state, request.headers())
    {
        return next.run(request).await;
    }
    ApiError::from(Error::unauthorized(
        "this worker requires its secret in the X-AnyWork-Worker-Secret header: the server \
         sends the one its driver gave the worker (for a static worker, set \
         STATIC_WORKER_SECRET on the server to the worker's WORKER_SECRET)",
    ))
    .into_response()
}

/// Serves the worker's API on `listener` until `shutdown` completes (with TCP_NODELAY, so
/// that small SSE frames do not wait for the client's delayed ACK).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WorkerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    anywork_http::serve(listener, router(state), shutdown).await
}

/// Runs blocking workspace I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anywork_core::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(Error::internal(format!("a workspace operation failed: {e}")).into()),
    }
}

fn session_param(id: String) -> Result<SessionId, ApiError> {
    SessionId::new(id).map_err(ApiError::from)
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn health(State(state): State<WorkerState>, headers: HeaderMap) -> Json<Value> {
    if !authorized(&state, &headers) {
        // Enough for probes; what runs here is for the server only.
        return Json(json!({ "status": "ok" }));
    }
    let busy: Vec<String> = state
        .busy_sessions()
        .into_iter()
        .map(String::from)
        .collect();
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "executor": state.executor().name(),
        "busy_sessions": busy,
        "sandbox": state.config().sandbox.status(),
    }))
}

async fn prepare(
    State(state): State<WorkerState>,
    JsonBody(body): JsonBody<PrepareRequest>,
) -> Result<Json<Value>, ApiError> {
    let workspace = state.workspace().clone();
    let repository = body.repository;
    let session_id = body.session_id.clone();
    if let Some(r) = &repository {
        r.validate()?;
    }
    let dir = blocking(move || {
        workspace.prepare_seeded(
            &body.session_id,
            &body.skills.unwrap_or_default(),
            &body.mcp_servers.unwrap_or_default(),
            body.soul.as_deref(),
            body.default_soul.as_deref(),
            body.default_agents.as_deref(),
        )
    })
    .await?;
    match repository {
        Some(repo) => {
            let base = crate::git::checkout(&dir, &repo).await?;
            state.set_session_repo(&session_id, repo, &dir, base);
        }
        None => state.clear_session_repo(&session_id),
    }
    Ok(Json(json!({ "status": "ready" })))
}

async fn chat(
    State(state): State<WorkerState>,
    JsonBody(body): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    if body.message.trim().is_empty() {
        return Err(Error::invalid_input("`message` must not be empty").into());
    }
    #[allow(unused_mut)]
    let mut guard = state.reserve(body.task_id, &body.session_id)?;
    let workspace = state.workspace().clone();
    let session_id = body.session_id.clone();
    let user = HistoryMessage::user(body.task_id, body.message.clone());
    let dir = blocking(move || {
        let dir = workspace.ensure_session(&session_id)?;
        workspace.append_history(&session_id, &user)?;
        Ok(dir)
    })
    .await?;
    #[allow(unused_mut)]
    let mut request = ExecutionRequest::new(body.task_id, body.session_id, body.message, dir);
    #[cfg(feature = "pull-requests")]
    if let Some(repo) = state.session_repo(&request.session_id) {
        let mcp = state.config().self_url.as_ref().map(|u| {
            (
                format!("{u}{}", crate::pull_request::MCP_PATH),
                state.session_tool_secret(&request.session_id),
            )
        });
        if let Some(tool) = crate::pull_request::TaskPullRequests::new(
            repo,
            request.session_id.clone(),
            request.task_id,
            guard.opened().clone(),
            mcp,
        ) {
            let tool: Arc<dyn anywork_core::PullRequestOpener> = Arc::new(tool);
            guard.serve_tool(tool.clone());
            request = request.with_pull_requests(Some(tool));
        }
    }
    // The client is attached before the run starts.
    let events = run::journal_stream(guard.journal().clone(), 0);
    run::spawn(guard, request);
    Ok(sse(&state, events))
}

/// An SSE answer of `events`, with keep-alive comments.
fn sse(
    state: &WorkerState,
    events: impl futures_util::Stream<
        Item = Result<axum::response::sse::Event, std::convert::Infallible>,
    > + Send
    + 'static,
) -> Response {
    // A zero interval would send comments without pause.
    let interval = state
        .config()
        .keep_alive
        .max(std::time::Duration::from_millis(100));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(interval))
        .into_response()
}

#[derive(Debug, Deserialize)]
struct AttachQuery {
    task_id: anywork_core::TaskId,
    #[serde(default)]
    after_seq: usize,
}

/// `GET /chat/attach?task_id=&after_seq=`: the run's events after `after_seq`, live, to its
/// `done`; 404 when this worker does not have the task (any more).
async fn attach(
    State(state): State<WorkerState>,
    QueryParams(q): QueryParams<AttachQuery>,
) -> Result<Response, ApiError> {
    let journal = state.journal(q.task_id)?;
    Ok(sse(&state, run::journal_stream(journal, q.after_seq)))
}

async fn cancel(
    State(state): State<WorkerState>,
    JsonBody(body): JsonBody<CancelRequest>,
) -> Result<Response, ApiError> {
    let (signal, mut ended) = state.cancel_handle(body.task_id)?;
    signal.notify_one();
    // The driver ends the run within the grace period; allow a little more for the rest.
    let wait = state.config().cancel_grace + std::time::Duration::from_secs(1);
    let result = tokio::time::timeout(wait, async {
        ended.wait_for(Option::is_some).await.map(|status| *status)
    })
    .await;
    let task_id = body.task_id.to_string();
    Ok(match result {
        Ok(Ok(Some(status))) => {
            Json(json!({ "status": status.as_str(), "task_id": task_id })).into_response()
        }
        // The run went away without a status (its request was dropped before it started).
        Ok(_) => Json(json!({ "status": "canceled", "task_id": task_id })).into_response(),
        Err(_) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "canceling", "task_id": task_id })),
        )
            .into_response(),
    })
}

async fn input(
    State(state): State<WorkerState>,
    JsonBody(body): JsonBody<InputAnswer>,
) -> Result<Json<Value>, ApiError> {
    if body.request_id.is_empty() {
        return Err(Error::invalid_input("`request_id` must not be empty").into());
    }
    let control: Arc<dyn anywork_core::ExecutionControl> = state.control(body.task_id)?;
    let response = InputResponse {
        request_id: body.request_id,
        answer: body.answer.unwrap_or_default(),
        allow: body.allow,
    };
    let timeout = state.config().control_timeout;
    match tokio::time::timeout(timeout, control.respond(response)).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "accepted" }))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("the executor did not take the answer within {timeout:?}"),
        )
        .into()),
    }
}

async fn messages(
    State(state): State<WorkerState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    let session = session_param(id)?;
    let workspace = state.workspace().clone();
    let messages = blocking(move || workspace.history(&session)).await?;
    Ok(Json(json!({ "messages": messages })))
}

/// Deletes the session's whole workspace. The session is held busy meanwhile, so no task
/// starts in it; one running already makes this a 409.
async fn delete_session(
    State(state): State<WorkerState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    let session = session_param(id)?;
    let hold = state
        .reserve(anywork_core::TaskId::generate(), &session)
        .map_err(|e| {
            Error::conflict(format!(
                "cannot delete session {session} while a task runs in it: {}",
                e.message()
            ))
        })?;
    let workspace = state.workspace().clone();
    let target = session.clone();
    blocking(move || workspace.delete_session(&target)).await?;
    drop(hold);
    Ok(Json(
        json!({ "status": "deleted", "session_id": session.as_str() }),
    ))
}

async fn files(
    State(state): State<WorkerState>,
    PathParam(id): PathParam<String>,
) -> Result<Json<Value>, ApiError> {
    let session = session_param(id)?;
    let workspace = state.workspace().clone();
    let listing = blocking(move || workspace.list_files(&session)).await?;
    let value = serde_json::to_value(&listing)
        .map_err(|e| Error::internal(format!("cannot encode the file list: {e}")))?;
    Ok(Json(value))
}

/// `GET /sessions/{id}/files/{*path}`: the file's bytes.
async fn read_file(
    State(state): State<WorkerState>,
    PathParam((id, path)): PathParam<(String, String)>,
) -> Result<Response, ApiError> {
    let session = session_param(id)?;
    let workspace = state.workspace().clone();
    let bytes = blocking(move || crate::files::read_file(&workspace, &session, &path)).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

/// `PUT /sessions/{id}/files/{*path}`: the body becomes the file (at most
/// [`MAX_UPLOAD_BYTES`](crate::files::MAX_UPLOAD_BYTES)).
async fn write_file(
    State(state): State<WorkerState>,
    PathParam((id, path)): PathParam<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|rej| {
        ApiError::with_status(
            rej.status(),
            Error::invalid_input(format!(
                "the upload was not read ({}): a file in files/ is at most {} bytes",
                rej.body_text(),
                crate::files::MAX_UPLOAD_BYTES
            )),
        )
    })?;
    let session = session_param(id)?;
    let workspace = state.workspace().clone();
    let size = body.len();
    let (p, session_for_write) = (path.clone(), session.clone());
    blocking(move || crate::files::write_file(&workspace, &session_for_write, &p, &body)).await?;
    Ok(Json(
        json!({ "path": path, "size": size, "status": "saved" }),
    ))
}

/// `GET /sessions/{id}/files.zip`: the session's `files/` as a zip.
async fn files_zip(
    State(state): State<WorkerState>,
    PathParam(id): PathParam<String>,
) -> Result<Response, ApiError> {
    let session = session_param(id)?;
    let workspace = state.workspace().clone();
    let bytes = blocking(move || crate::files::zip_files(&workspace, &session)).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/zip")],
        bytes,
    )
        .into_response())
}

/// Query of `/workspace/{file}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocQuery {
    #[serde(default)]
    session_id: Option<String>,
}

/// Body of `PUT /workspace/{file}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DocBody {
    content: String,
}

fn doc_param(file: &str) -> Result<WorkspaceDoc, ApiError> {
    WorkspaceDoc::from_slug(file).ok_or_else(|| {
        Error::not_found(format!(
            "unknown workspace file {file:?}: use `soul` (SOUL.md) or `agents` (AGENTS.md)"
        ))
        .into()
    })
}

fn doc_session(query: DocQuery) -> Result<Option<SessionId>, ApiError> {
    query.session_id.map(session_param).transpose()
}

async fn get_doc(
    State(state): State<WorkerState>,
    PathParam(file): PathParam<String>,
    QueryParams(query): QueryParams<DocQuery>,
) -> Result<Json<Value>, ApiError> {
    let doc = doc_param(&file)?;
    let session = doc_session(query)?;
    let workspace = state.workspace().clone();
    let content = blocking(move || workspace.read_doc(session.as_ref(), doc)).await?;
    Ok(Json(json!({ "file": doc.file_name(), "content": content })))
}

async fn put_doc(
    State(state): State<WorkerState>,
    PathParam(file): PathParam<String>,
    QueryParams(query): QueryParams<DocQuery>,
    JsonBody(body): JsonBody<DocBody>,
) -> Result<Json<Value>, ApiError> {
    let doc = doc_param(&file)?;
    let session = doc_session(query)?;
    let workspace = state.workspace().clone();
    blocking(move || workspace.write_doc(session.as_ref(), doc, &body.content)).await?;
    Ok(Json(json!({ "file": doc.file_name(), "status": "saved" })))
}
