//! The HTTP side: REST API, WebSocket, web UI, OpenAPI document and metrics, over a
//! [`Dispatcher`]. [`router`] gives an axum `Router` an embedder can nest in its own app.

pub mod dto;
mod extract;
mod openapi;
mod rest;
#[cfg(test)]
mod tests;
mod ui;
mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use extract::{ApiError, status_for};
pub use openapi::openapi_document;

use crate::dispatcher::Dispatcher;

/// Options of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Reported by `/api/health`.
    pub version: String,
    /// A problem the UI shows in its banner (e.g. no model is configured).
    pub warning: Option<String>,
    /// Whether the worker answers from the built-in fake model (the UI labels it).
    pub demo: bool,
    /// Origins allowed by CORS: empty for none, `*` for any.
    pub cors_origins: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest long-poll of `/api/tasks/:id/logs?wait=`.
    pub max_wait: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            warning: None,
            demo: false,
            cors_origins: Vec::new(),
            max_body_bytes: 2 * 1024 * 1024,
            max_wait: Duration::from_secs(30),
        }
    }
}

/// Shared by every handler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<StateInner>,
}

#[derive(Debug)]
struct StateInner {
    dispatcher: Dispatcher,
    options: ApiOptions,
    websockets: AtomicUsize,
    closing: tokio_util::sync::CancellationToken,
}

impl AppState {
    /// State over `dispatcher`.
    pub fn new(dispatcher: Dispatcher, options: ApiOptions) -> Self {
        Self {
            inner: Arc::new(StateInner {
                dispatcher,
                options,
                websockets: AtomicUsize::new(0),
                closing: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.inner.dispatcher
    }

    /// The options.
    pub fn options(&self) -> &ApiOptions {
        &self.inner.options
    }

    /// Open WebSocket connections.
    pub fn websockets(&self) -> usize {
        self.inner.websockets.load(Ordering::Relaxed)
    }

    /// Fires when the server shuts down (WebSocket connections close on it).
    pub fn closing(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.closing
    }

    fn ws_opened(&self) -> WsGuard {
        self.inner.websockets.fetch_add(1, Ordering::Relaxed);
        WsGuard(self.clone())
    }
}

/// Counts a WebSocket connection while it lives.
struct WsGuard(AppState);

impl Drop for WsGuard {
    fn drop(&mut self) {
        self.0.inner.websockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All routes: `/api/...`, `/ws`, `/metrics` and the web UI.
pub fn router(state: AppState) -> Router {
    let limit = state.options().max_body_bytes;
    let api = Router::new()
        .route("/api/health", get(rest::health))
        .route("/api/openapi.json", get(rest::openapi))
        .route(
            "/api/sessions",
            get(rest::list_sessions).post(rest::create_session),
        )
        .route(
            "/api/sessions/{id}",
            get(rest::get_session)
                .patch(rest::rename_session)
                .delete(rest::delete_session),
        )
        .route("/api/sessions/{id}/tasks", get(rest::session_tasks))
        .route("/api/sessions/{id}/messages", get(rest::session_messages))
        .route("/api/tasks", post(rest::create_task))
        .route("/api/tasks/{id}", get(rest::get_task))
        .route("/api/tasks/{id}/logs", get(rest::task_logs))
        .route("/api/tasks/{id}/cancel", post(rest::cancel_task))
        .route("/api/tasks/{id}/input", post(rest::answer_task))
        .route("/api/channel/{type}/webhook", post(rest::channel_webhook))
        .route(
            "/api/workspace/{file}",
            get(rest::get_workspace_doc).put(rest::put_workspace_doc),
        )
        .route("/api/admin/workers", get(rest::workers))
        .route("/metrics", get(rest::metrics))
        .route("/ws", get(ws::upgrade))
        .route("/", get(ui::index))
        .route("/app.js", get(ui::script))
        .route("/style.css", get(ui::style))
        .fallback(extract::no_route)
        .method_not_allowed_fallback(extract::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit));
    let cors = !state.options().cors_origins.is_empty();
    let app = api.with_state(state.clone());
    if cors {
        app.layer(middleware::from_fn_with_state(state, cors_layer))
    } else {
        app
    }
}

/// Serves `router(state)` on `listener` until `shutdown` completes, with TCP_NODELAY (small
/// WebSocket frames would otherwise wait for delayed ACKs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let closing = state.closing().clone();
    let shutdown = async move {
        shutdown.await;
        // WebSocket connections would keep a graceful shutdown waiting forever.
        closing.cancel();
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// CORS for the configured origins: answers preflights and marks responses.
async fn cors_layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let allowed = origin.as_deref().and_then(|o| {
        let origins = &state.options().cors_origins;
        if origins.iter().any(|a| a == "*") {
            Some("*".to_owned())
        } else {
            origins.iter().find(|a| a.as_str() == o).cloned()
        }
    });
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        if allowed.is_some() {
            StatusCode::NO_CONTENT.into_response()
        } else {
            StatusCode::FORBIDDEN.into_response()
        }
    } else {
        next.run(request).await
    };
    if let Some(allowed) = allowed
        && let Ok(value) = HeaderValue::from_str(&allowed)
    {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type, authorization, x-webhook-secret"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    response
}
