//! JSON errors and extractors whose rejections are JSON errors, and the fallbacks that answer
//! unknown routes and methods the same way.

use anywork_core::{Error, ErrorKind};
use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

/// The HTTP status of each [`ErrorKind`]: the one place this mapping is made.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An error answer: `{"error":{"code","message"}}` with the matching status (5xx are logged).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: Error,
}

impl ApiError {
    /// An answer with an explicit status (for statuses no [`ErrorKind`] maps to, like 413).
    pub fn with_status(status: StatusCode, error: Error) -> Self {
        Self { status, error }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error.
    pub fn error(&self) -> &Error {
        &self.error
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self {
            status: status_for(error.kind()),
            error,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, error = %self.error, "request failed");
        }
        let body =
            json!({"error": {"code": self.error.kind().as_str(), "message": self.error.message()}});
        (self.status, Json(body)).into_response()
    }
}

fn invalid(status: StatusCode, message: String) -> ApiError {
    ApiError::with_status(status, Error::invalid_input(message))
}

/// The fallback for unknown routes: 404 `not_found`, naming the method and path.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    Error::not_found(format!("no route for {method} {}", uri.path())).into()
}

/// The fallback for a known route and a method it does not take: 405 `invalid_input`.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    invalid(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// The largest request body of a router, as [`limit_body`] set it (read by [`JsonBody`] to
/// say what the limit is).
#[derive(Debug, Clone, Copy)]
struct BodyLimit(usize);

/// Limits `router`'s request bodies to `bytes`; a larger JSON body answers 413 naming the limit.
pub fn limit_body<S: Clone + Send + Sync + 'static>(router: Router<S>, bytes: usize) -> Router<S> {
    router
        .layer(DefaultBodyLimit::max(bytes))
        .layer(Extension(BodyLimit(bytes)))
}

/// A JSON body; malformed, mistyped or oversized bodies answer a JSON [`ApiError`] (400 bad
/// JSON, 413 too large, 415 not JSON, 422 wrong fields; code `invalid_input`).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let rej = match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => return Ok(Self(value)),
            Err(rej) => rej,
        };
        let status = rej.status();
        let message = match &rej {
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => match limit {
                Some(limit) => {
                    format!("the request body is larger than the limit of {limit} bytes")
                }
                None => "the request body is larger than the server's limit".to_owned(),
            },
            JsonRejection::MissingJsonContentType(_) => {
                "the request body must be JSON with `Content-Type: application/json`".to_owned()
            }
            JsonRejection::JsonSyntaxError(_) => {
                format!("the request body is not valid JSON: {}", rej.body_text())
            }
            JsonRejection::JsonDataError(_) => {
                format!("the request body has wrong fields: {}", rej.body_text())
            }
            _ => rej.body_text(),
        };
        Err(invalid(status, message))
    }
}

/// The raw request body (for signatures computed over its bytes); one over the body limit
/// answers a JSON [`ApiError`] (413 naming the limit), like [`JsonBody`].
#[derive(Debug)]
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Self(bytes)),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(invalid(
                StatusCode::PAYLOAD_TOO_LARGE,
                match limit {
                    Some(limit) => {
                        format!("the request body is larger than the limit of {limit} bytes")
                    }
                    None => "the request body is larger than the server's limit".to_owned(),
                },
            )),
            Err(rej) => Err(invalid(rej.status(), rej.body_text())),
        }
    }
}

/// The longest request target (path and query) [`limit_uri`] lets through.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Answers requests whose path and query are longer than [`MAX_URI_BYTES`] with a JSON 414
/// (`invalid_input`) before any route sees them.
pub fn limit_uri<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.layer(axum::middleware::from_fn(uri_guard))
}

async fn uri_guard(request: Request, next: axum::middleware::Next) -> Response {
    let len = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return invalid(
            StatusCode::URI_TOO_LONG,
            format!(
                "the request's path and query take {len} bytes; the limit is {MAX_URI_BYTES}: \
                 send large values in a request body"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// A path parameter; a bad one answers a JSON [`ApiError`] (400).
#[derive(Debug)]
pub struct PathParam<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|rej: PathRejection| invalid(StatusCode::BAD_REQUEST, rej.body_text()))
    }
}

/// A query string; a bad one answers a JSON [`ApiError`] (400).
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|rej: QueryRejection| {
                invalid(
                    StatusCode::BAD_REQUEST,
                    format!("bad query string: {}", rej.body_text()),
                )
            })
    }
}
