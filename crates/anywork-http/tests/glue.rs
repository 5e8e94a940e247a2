//! The shared glue as a client sees it: every refusal is `{"error":{"code","message"}}` with a
//! status that says what went wrong and a message that says what to do.

use anywork_core::{Error, ErrorKind};
use anywork_http::{
    ApiError, JsonBody, PathParam, QueryParams, limit_body, method_not_allowed, no_route,
};
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Echo {
    text: String,
}

#[derive(Debug, Deserialize)]
struct Limit {
    n: u32,
}

async fn echo(JsonBody(body): JsonBody<Echo>) -> axum::Json<Value> {
    axum::Json(json!({ "text": body.text }))
}

async fn item(PathParam(id): PathParam<u32>, QueryParams(q): QueryParams<Limit>) -> String {
    format!("{id}/{}", q.n)
}

async fn gone() -> Result<String, ApiError> {
    Err(Error::new(ErrorKind::NotFound, "the thing is gone; make a new one").into())
}

fn app() -> Router {
    let routes = Router::new()
        .route("/echo", post(echo))
        .route("/items/{id}", get(item))
        .route("/gone", get(gone));
    limit_body(routes, 64)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn call(
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = app()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = to_bytes(res.into_body(), 1 << 16).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn assert_refused(got: (StatusCode, Value), status: StatusCode, code: &str, says: &str) {
    let (s, body) = got;
    assert_eq!(s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

const JSON: Option<&str> = Some("application/json");

#[tokio::test]
async fn good_requests_pass() {
    let (s, body) = call(Method::POST, "/echo", JSON, r#"{"text":"hi"}"#).await;
    assert_eq!((s, body), (StatusCode::OK, json!({"text": "hi"})));
}

#[tokio::test]
async fn bad_bodies_are_json_errors() {
    let bad = StatusCode::BAD_REQUEST;
    assert_refused(
        call(Method::POST, "/echo", JSON, "{nope").await,
        bad,
        "invalid_input",
        "not valid JSON",
    );
    assert_refused(
        call(Method::POST, "/echo", JSON, r#"{"txt":"hi"}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
        "wrong fields",
    );
    assert_refused(
        call(Method::POST, "/echo", None, r#"{"text":"hi"}"#).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_input",
        "Content-Type: application/json",
    );
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(100));
    assert_refused(
        call(Method::POST, "/echo", JSON, &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_input",
        "limit of 64 bytes",
    );
}

#[tokio::test]
async fn bad_paths_and_queries_are_json_errors() {
    let (s, _) = call(Method::GET, "/items/7?n=2", None, "").await;
    assert_eq!(s, StatusCode::OK);
    let bad = StatusCode::BAD_REQUEST;
    assert_refused(
        call(Method::GET, "/items/x?n=2", None, "").await,
        bad,
        "invalid_input",
        "",
    );
    assert_refused(
        call(Method::GET, "/items/7?n=-1", None, "").await,
        bad,
        "invalid_input",
        "bad query string",
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_and_errors_say_so() {
    assert_refused(
        call(Method::GET, "/nope", None, "").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "no route for GET /nope",
    );
    assert_refused(
        call(Method::DELETE, "/echo", None, "").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_input",
        "DELETE is not allowed on /echo",
    );
    assert_refused(
        call(Method::GET, "/gone", None, "").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "make a new one",
    );
}
