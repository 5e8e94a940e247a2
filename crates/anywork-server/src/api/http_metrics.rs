//! `anywork_http_requests_total{method, route, status}`: every answered API request, counted
//! under its route pattern (`/api/tasks/{id}`, never the ids themselves).

use anywork_runtime::prometheus_client::metrics::counter::Counter;
use anywork_runtime::prometheus_client::metrics::family::Family;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// The counters, by method, route pattern and status.
pub(crate) type HttpRequests = Family<[(&'static str, String); 3], Counter>;

/// Counts the request once its answer is ready.
pub(crate) async fn count(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let response = next.run(request).await;
    state
        .http_requests()
        .get_or_create(&[
            ("method", method),
            ("route", route),
            ("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}
