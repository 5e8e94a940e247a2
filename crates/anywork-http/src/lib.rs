//! The HTTP glue AnyWork's server and worker share, so that both answer errors the same way
//! and `anywork-core` stays free of HTTP:
//!
//! - [`ApiError`] (`{"error":{"code","message"}}` with the status of [`status_for`]) and
//!   extractors whose rejections are such errors: [`JsonBody`], [`PathParam`], [`QueryParams`];
//!   [`limit_body`]; the fallbacks [`no_route`] and [`method_not_allowed`].
//! - [`serve`]: an axum app on a listener with TCP_NODELAY and a graceful shutdown;
//!   [`listener`], the listener it uses, whose refusals made by hyper itself (400, 414,
//!   431, 505 before any route runs) carry a JSON error body too.
//! - With feature `binary`, what a `main` needs: [`init_tracing`] and [`shutdown_signal`].

mod extract;
mod listen;

pub use extract::{
    ApiError, JsonBody, MAX_URI_BYTES, PathParam, QueryParams, RawBody, limit_body, limit_uri,
    method_not_allowed, no_route, status_for,
};
pub use listen::{JsonErrors, JsonListener, listener};

use std::future::Future;

/// Serves `app` on `listener` until `shutdown` completes, with TCP_NODELAY: small frames (SSE
/// events, WebSocket messages) would otherwise wait for the peer's delayed ACK (~40 ms), and
/// hyper's own refusals as JSON errors ([`listener`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(self::listener(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). `LOG_FORMAT=json` writes one JSON
/// object per line (timestamp, level, target, fields, span); the default is text, coloured
/// only when stderr is a terminal. An unknown `LOG_FORMAT` is refused. Call once, at the start
/// of `main`.
#[cfg(feature = "binary")]
pub fn init_tracing() -> Result<(), String> {
    use std::io::IsTerminal as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let format = std::env::var("LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.trim().to_ascii_lowercase().as_str() {
        "" | "text" => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        "json" => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        other => {
            return Err(format!(
                "LOG_FORMAT={other:?} is not known: use `text` (the default) or `json`"
            ));
        }
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send), logging it.
#[cfg(feature = "binary")]
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
