//! The HTTP side: REST API, WebSocket, web UI, OpenAPI document and metrics, over a
//! [`Dispatcher`]. Offered in pieces an embedder can mount alone ([`api_router`],
//! [`ws_router`], [`ui_router`]) or all together ([`router`]).

pub mod auth;
pub mod dto;
mod http_metrics;
mod openapi;
mod rest;
#[cfg(test)]
mod tests;
mod ui;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use anywork_runtime::Dispatcher;
use anywork_runtime::prometheus_client::metrics::gauge::Gauge;
use anywork_runtime::prometheus_client::registry::Registry;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use anywork_http::{ApiError, status_for};
pub use auth::ApiToken;
pub use openapi::openapi_document;

/// Options of the HTTP API. Start from [`Default`] and set the fields you need: new fields may
/// come in minor releases.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiOptions {
    /// Reported by `/api/health`.
    pub version: String,
    /// A problem the UI shows in its banner (e.g. no model is configured).
    pub warning: Option<String>,
    /// Whether the worker answers from the built-in fake model (the UI labels it).
    pub demo: bool,
    /// The set-up check made at start ([`Dispatcher::check_setup`](anywork_runtime::Dispatcher::check_setup)
    /// and the server's own findings), reported by `/api/health` as `setup`; the UI shows the
    /// problems in its banner.
    pub setup: Vec<anywork_core::SetupCheck>,
    /// Origins allowed by CORS ([`router`] only): empty for none, `*` for any.
    pub cors_origins: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest body of a channel event (`POST /api/channel/:type/webhook`), in bytes; a
    /// larger one is refused with 413 before any channel reads it. Never more than
    /// `max_body_bytes`.
    pub channel_max_body_bytes: usize,
    /// Longest long-poll of `/api/tasks/:id/logs?wait=`.
    pub max_wait: Duration,
    /// On shutdown ([`serve`]), how long running tasks may take to finish, their followers
    /// still connected, before they are interrupted and the connections closed.
    pub shutdown_grace: Duration,
    /// The API token every route but the open ones requires (see [`auth`]); `None`: no token.
    pub api_token: Option<ApiToken>,
    /// Whether `/api/health` and `/metrics` need the token too.
    pub protect_health: bool,
    /// Longest `channel_key` of `POST /api/tasks`, in bytes.
    pub max_channel_key_bytes: usize,
    /// Largest `channel_meta` of `POST /api/tasks`, in bytes of JSON.
    pub max_channel_meta_bytes: usize,
    /// WebSocket messages a connection may send per second (a burst of twice as many is
    /// allowed); more are answered with a `rate_limited` error, the connection stays. 0: no limit.
    pub ws_messages_per_second: u32,
    /// Open WebSocket connections per client address; more are refused with 429. 0: no limit.
    pub max_ws_per_client: usize,
    /// Refuse (403) API and WebSocket requests whose `Host` is not a loopback name or address
    /// (`localhost`, `127.0.0.1`, `[::1]`): against DNS rebinding, for a server on loopback
    /// without a token (the binary sets it then).
    pub loopback_hosts_only: bool,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            warning: None,
            demo: false,
            setup: Vec::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 2 * 1024 * 1024,
            channel_max_body_bytes: 1024 * 1024,
            max_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            api_token: None,
            protect_health: false,
            max_channel_key_bytes: 256,
            max_channel_meta_bytes: 16 * 1024,
            ws_messages_per_second: 20,
            max_ws_per_client: 32,
            loopback_hosts_only: false,
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
    websockets: Gauge,
    http_requests: http_metrics::HttpRequests,
    metrics: Registry,
    closing: tokio_util::sync::CancellationToken,
    /// Open WebSocket connections per client address.
    ws_clients: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl AppState {
    /// State over `dispatcher`; `/metrics` shows the dispatcher's metrics and the WebSocket
    /// connections.
    pub fn new(dispatcher: Dispatcher, options: ApiOptions) -> Self {
        let websockets = Gauge::default();
        let mut metrics = Registry::default();
        dispatcher.register_metrics(&mut metrics);
        metrics.register(
            "anywork_websocket_connections",
            "Open WebSocket connections",
            websockets.clone(),
        );
        let http_requests = http_metrics::HttpRequests::default();
        metrics.register(
            "anywork_http_requests",
            "API requests answered, by method, route pattern and status",
            http_requests.clone(),
        );
        Self {
            inner: Arc::new(StateInner {
                dispatcher,
                options,
                websockets,
                http_requests,
                metrics,
                closing: tokio_util::sync::CancellationToken::new(),
                ws_clients: Default::default(),
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
        self.inner.websockets.get().max(0) as usize
    }

    /// Fires when the server shuts down (WebSocket connections close on it).
    pub fn closing(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.closing
    }

    fn metrics(&self) -> &Registry {
        &self.inner.metrics
    }

    fn http_requests(&self) -> &http_metrics::HttpRequests {
        &self.inner.http_requests
    }

    /// Counts a new connection from `client`; `None` when that client has its most already.
    fn ws_opened(&self, client: Option<std::net::IpAddr>) -> Option<WsGuard> {
        if let Some(ip) = client {
            let max = self.options().max_ws_per_client;
            let mut clients = self
                .inner
                .ws_clients
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let open = clients.entry(ip).or_default();
            if max > 0 && *open >= max {
                return None;
            }
            *open += 1;
        }
        self.inner.websockets.inc();
        Some(WsGuard(self.clone(), client))
    }
}

/// Counts a WebSocket connection (and its client's) while it lives.
struct WsGuard(AppState, Option<std::net::IpAddr>);

impl Drop for WsGuard {
    fn drop(&mut self) {
        self.0.inner.websockets.dec();
        if let Some(ip) = self.1 {
            let mut clients = self
                .0
                .inner
                .ws_clients
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(open) = clients.get_mut(&ip) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    clients.remove(&ip);
                }
            }
        }
    }
}

/// The REST API (`/api/...`) and `/metrics`, with the body limit of [`ApiOptions`]. No
/// fallback, so that it merges into any app; [`router`] adds JSON 404s.
pub fn api_router(state: AppState) -> Router {
    let limit = state.options().max_body_bytes;
    let api = Router::new()
        .route("/api/health", get(rest::health))
        .route("/api/health/live", get(rest::live))
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
        .route("/api/usage", get(rest::usage))
        .route("/api/sessions/{id}/messages", get(rest::session_messages))
        .route("/api/tasks", post(rest::create_task))
        .route("/api/tasks/{id}", get(rest::get_task))
        .route("/api/tasks/{id}/logs", get(rest::task_logs))
        .route("/api/tasks/{id}/cancel", post(rest::cancel_task))
        .route("/api/tasks/{id}/input", post(rest::answer_task))
        .route("/api/deliveries", get(rest::list_deliveries))
        .route("/api/deliveries/{id}/retry", post(rest::retry_delivery))
        .route(
            "/api/workspace/{file}",
            get(rest::get_workspace_doc).put(rest::put_workspace_doc),
        )
        .route(
            "/api/sessions/{id}/workspace/{file}",
            get(rest::get_session_doc).put(rest::put_session_doc),
        )
        .route("/api/sessions/{id}/files", get(rest::session_files))
        .route("/api/sessions/{id}/files.zip", get(rest::session_files_zip))
        .route(
            "/api/sessions/{id}/files/{*path}",
            get(rest::session_file).put(rest::put_session_file).layer(
                axum::extract::DefaultBodyLimit::max(anywork_core::worker_api::MAX_UPLOAD_BYTES),
            ),
        )
        .route("/api/skills", get(rest::skills))
        .route("/api/admin/workers", get(rest::workers))
        .route("/api/admin/tasks", get(rest::active_tasks))
        .route("/metrics", get(rest::metrics))
        .method_not_allowed_fallback(anywork_http::method_not_allowed)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            http_metrics::count,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::guard_api,
        ));
    // The channel endpoint reads its body itself, with its own limit; channels verify their
    // senders themselves (signatures), not with the API token.
    let channels = Router::new()
        .route("/api/channel/{type}/webhook", post(rest::channel_webhook))
        .method_not_allowed_fallback(anywork_http::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::disable());
    anywork_http::limit_body(api, limit)
        .merge(channels)
        .with_state(state)
}

/// The WebSocket endpoint `/ws` (chat, follow, resume, cancel, input answers).
pub fn ws_router(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .method_not_allowed_fallback(anywork_http::method_not_allowed)
        .with_state(state)
}

/// The web UI: `/`, `/app.js`, `/style.css`, compiled in.
pub fn ui_router() -> Router {
    Router::new()
        .route("/", get(ui::index))
        .route("/app.js", get(ui::script))
        .route("/style.css", get(ui::style))
        .method_not_allowed_fallback(anywork_http::method_not_allowed)
}

/// All routes: [`api_router`], [`ws_router`] and [`ui_router`], JSON 404s for unknown routes,
/// and CORS for [`ApiOptions::cors_origins`].
pub fn router(state: AppState) -> Router {
    let cors = cors_layer(&state.options().cors_origins);
    let app = anywork_http::limit_uri(
        api_router(state.clone())
            .merge(ws_router(state))
            .merge(ui_router())
            .fallback(anywork_http::no_route),
    );
    match cors {
        Some(cors) => app.layer(cors).layer(middleware::from_fn(preflight_status)),
        None => app,
    }
}

/// Serves [`router`]`(state)` on `listener` until `shutdown` completes (TCP_NODELAY and hyper's
/// own refusals as JSON: see [`anywork_http::listener`]), then shuts down in order: the dispatcher stops taking and
/// starting tasks and gives running ones [`ApiOptions::shutdown_grace`] to finish
/// ([`Dispatcher::shutdown`]) while their WebSocket followers and long-polls are still
/// served; then WebSocket connections are closed with 1001 ("going away"), long-polls answer,
/// and the HTTP server ends. Clients' addresses are known to the handlers (the per-client
/// WebSocket limit).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = state.closing().clone();
    let (dispatcher, grace) = (state.dispatcher().clone(), state.options().shutdown_grace);
    let shutdown = async move {
        shutdown.await;
        dispatcher.shutdown(grace).await;
        // WebSocket connections and long-polls would keep a graceful shutdown waiting.
        closing.cancel();
    };
    axum::serve(
        anywork_http::listener(listener),
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// CORS for `origins` (`*` for any), or none when the list is empty.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static("x-webhook-secret"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// The status of a preflight the CORS layer answered: 204 when it allowed the origin (an
/// `Access-Control-Allow-Origin` in its answer), else 403, so that a foreign origin gets a
/// plain refusal.
async fn preflight_status(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = next.run(request).await;
    if preflight {
        let allowed = response
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        *response.status_mut() = if allowed {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::FORBIDDEN
        };
    }
    response
}
