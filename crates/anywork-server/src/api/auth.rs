//! Who may call the API, and from where: the bearer token ([`ApiToken`]), the WebSocket
//! `Origin` check and the JSON-only rule for state-changing requests (no cross-site form
//! posts). Middleware over [`AppState`]; the settings are [`ApiOptions`](super::ApiOptions)
//! fields, so an embedder mounting [`api_router`](super::api_router) gets the same checks.
//!
//! - A token, when set, is required by every route of [`api_router`](super::api_router) and by
//!   `/ws`, as `Authorization: Bearer <token>`; a browser's WebSocket may carry it as the
//!   subprotocol `anywork.token.<token>` (the server answers with `anywork` when offered), or
//!   send `{"type":"auth","token":"…"}` as its first message. Compared in constant time.
//! - Open without the token: `/api/health/live` (`{"ok":true}` and nothing else: what a
//!   liveness probe, which carries no token, asks), `/api/health` and `/metrics` (unless
//!   [`protect_health`](super::ApiOptions::protect_health)), and the channel webhooks
//!   (`/api/channel/{type}/webhook`), which verify their senders themselves (signatures).
//! - `/ws`: a browser's `Origin` must be the server's own (same host and port as `Host`) or
//!   listed in `cors_origins`; a client that sends no `Origin` (not a browser) is let in.
//! - `POST`/`PUT`/`PATCH`/`DELETE` with a `Content-Type` other than JSON, or with a body and no
//!   `Content-Type`, get `415`: the forms a foreign page can post without CORS never pass.

use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AppState;

/// The WebSocket subprotocol the server selects when a client offers it.
pub const WS_PROTOCOL: &str = "anywork";
/// Prefix of the subprotocol that carries the token (`anywork.token.<token>`).
pub const WS_TOKEN_PREFIX: &str = "anywork.token.";

/// The API token. Its `Debug` shows no value.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl ApiToken {
    /// A token; `None` when `token` is empty after trimming. Tokens carried in a WebSocket
    /// subprotocol must be visible ASCII without separators (hex or base64url are).
    pub fn new(token: &str) -> Option<Self> {
        let t = token.trim();
        (!t.is_empty()).then(|| Self(Arc::from(t)))
    }

    /// Whether `candidate` is the token, compared in constant time (the length aside).
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }

    /// The value (to send it, e.g. in tests); never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// An error answer `{"error":{"code","message"}}` with an explicit code.
pub(crate) fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut response = (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"anywork\""),
        );
    }
    response
}

/// What a request said about the token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Presented {
    /// No token in the headers.
    None,
    /// The right token.
    Valid,
    /// A token, but not the right one.
    Wrong,
}

/// The token of `Authorization: Bearer …` or, for WebSockets, of the `anywork.token.…`
/// subprotocol.
pub(crate) fn presented(token: &ApiToken, headers: &HeaderMap) -> Presented {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .strip_prefix("Bearer ")
                .or_else(|| v.trim().strip_prefix("bearer "))
                .unwrap_or("")
                .trim()
                .to_owned()
        });
    let protocol = ws_token_protocol(headers).map(|p| p[WS_TOKEN_PREFIX.len()..].to_owned());
    match bearer.or(protocol) {
        None => Presented::None,
        Some(t) if token.matches(&t) => Presented::Valid,
        Some(_) => Presented::Wrong,
    }
}

/// The `anywork.token.…` value offered in `Sec-WebSocket-Protocol`, if any.
pub(crate) fn ws_token_protocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.starts_with(WS_TOKEN_PREFIX))
        .map(str::to_owned)
}

fn missing_token() -> Response {
    refuse(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this server requires its API token: send `Authorization: Bearer <token>` (the value \
         of ANYWORK_API_TOKEN)",
    )
}

fn wrong_token() -> Response {
    refuse(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the API token is wrong: send the value of the server's ANYWORK_API_TOKEN",
    )
}

/// Whether `path` is open without the token.
fn is_open(state: &AppState, path: &str) -> bool {
    // Liveness tells nothing but that the process answers: open even with protect_health,
    // since a probe without the token would otherwise restart a healthy server.
    let live = path == "/api/health/live";
    let public = matches!(path, "/api/health" | "/metrics") && !state.options().protect_health;
    // Channels verify their own senders (signatures, shared secrets).
    live || public || is_webhook(path)
}

/// Whether `path` is a channel webhook (`/api/channel/{type}/webhook`).
fn is_webhook(path: &str) -> bool {
    path.starts_with("/api/channel/") && path.ends_with("/webhook")
}

/// Middleware of [`api_router`](super::api_router): the token, then the JSON-only rule.
pub(crate) async fn guard_api(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    // Channel webhooks verify their senders themselves, and may come through a tunnel.
    if !is_webhook(&path)
        && let Some(refused) = check_host(&state, request.headers())
    {
        return refused;
    }
    if let Some(token) = &state.options().api_token
        && !is_open(&state, &path)
    {
        match presented(token, request.headers()) {
            Presented::Valid => {}
            Presented::None => return missing_token(),
            Presented::Wrong => return wrong_token(),
        }
    }
    if !is_webhook(&path)
        && !is_upload(&request, &path)
        && let Some(refused) = check_content_type(&request)
    {
        return refused;
    }
    next.run(request).await
}

/// A file upload (`PUT /api/sessions/:id/files/<path>`) takes raw bytes of any type: no form
/// can send a `PUT`, and a page of another origin needs the CORS preflight this server
/// refuses unless `cors_origins` lets it.
fn is_upload(request: &Request, path: &str) -> bool {
    request.method() == Method::PUT
        && path.starts_with("/api/sessions/")
        && path
            .splitn(5, '/')
            .nth(4)
            .is_some_and(|rest| rest.starts_with("files/"))
}

/// `403` for a `Host` that is not loopback when [`loopback_hosts_only`](super::ApiOptions::loopback_hosts_only):
/// a page whose name was rebound to 127.0.0.1 still sends its own name.
fn check_host(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    if !state.options().loopback_hosts_only {
        return None;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    }
    .trim_end_matches('.')
    .to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        refuse(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!(
                "this server answers only to localhost names without an API token (Host {host:?}); \
                 set ANYWORK_API_TOKEN to reach it by another name"
            ),
        )
    })
}

/// `415` for a state-changing request whose body is not declared JSON.
fn check_content_type(request: &Request) -> Option<Response> {
    if !matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return None;
    }
    let headers = request.headers();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() != "0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    let json = |ct: &str| {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
    };
    let ok = match &content_type {
        Some(ct) => json(ct),
        None => !has_body,
    };
    (!ok).then(|| {
        refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "{} requests take a JSON body: send `Content-Type: application/json` (got {})",
                request.method(),
                content_type
                    .as_deref()
                    .map_or("none".to_owned(), |c| format!("{c:?}"))
            ),
        )
    })
}

/// What the WebSocket upgrade decided.
pub(crate) enum WsAccess {
    /// In: the token came with the upgrade, or no token is needed.
    Authenticated,
    /// In, but the first message must be `{"type":"auth","token":…}`.
    AwaitAuth,
}

/// The checks of `/ws` before the upgrade: `Origin`, then the token.
pub(crate) fn check_ws(state: &AppState, headers: &HeaderMap) -> Result<WsAccess, Box<Response>> {
    if let Some(refused) = check_host(state, headers) {
        return Err(Box::new(refused));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(state, origin, headers) {
            return Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!(
                    "a WebSocket from origin {origin:?} is not allowed: only pages of this server \
                     or of an origin listed in CORS_ORIGINS may connect"
                ),
            )));
        }
    }
    let Some(token) = &state.options().api_token else {
        return Ok(WsAccess::Authenticated);
    };
    match presented(token, headers) {
        Presented::Valid => Ok(WsAccess::Authenticated),
        Presented::None => Ok(WsAccess::AwaitAuth),
        Presented::Wrong => Err(Box::new(wrong_token())),
    }
}

/// Whether a first WebSocket message `text` is an `auth` message with the right token.
pub(crate) fn ws_auth_message(state: &AppState, text: &str) -> bool {
    let Some(token) = &state.options().api_token else {
        return true;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    value["type"] == "auth" && value["token"].as_str().is_some_and(|t| token.matches(t))
}

/// `Origin` is this server's (same host and port as the `Host` header) or listed.
fn origin_allowed(state: &AppState, origin: &str, headers: &HeaderMap) -> bool {
    let listed = &state.options().cors_origins;
    if listed
        .iter()
        .any(|o| o == "*" || o.trim_end_matches('/') == origin)
    {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |a: &str| {
        let a = a.to_ascii_lowercase();
        // `[::1]:3001`, `host:3001`, or no port.
        let has_port = a.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !a.ends_with(']')
        });
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    with_port(authority) == with_port(host)
}
