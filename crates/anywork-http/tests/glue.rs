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

/// Sends `request` raw over TCP to `app` served by [`anywork_http::serve`] and reads until the
/// server closes the connection.
async fn raw(request: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(anywork_http::serve(listener, app(), std::future::pending()));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // hyper may answer before it has read everything (a head too large): a failed write is fine.
    let _ = tcp.write_all(&request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut out),
    )
    .await
    .expect("the server closes the connection after refusing");
    server.abort();
    String::from_utf8(out).unwrap()
}

/// The JSON body of the last response in `answers`, checked against its `content-length`.
fn last_json_body(answers: &str) -> Value {
    let (head, body) = answers.rsplit_once("\r\n\r\n").expect("a complete answer");
    let head = head
        .rsplit("HTTP/1.1 ")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("content-type: application/json"), "{answers}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", body.len()))
            || head.ends_with(&format!("content-length: {}", body.len())),
        "{answers}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answers}"))
}

/// Issue 15, item 8: what hyper refuses before any route runs — a request target over its
/// 64 KiB, a head over its read buffer, a malformed request line or header, a version other
/// than 1.x — is a
/// JSON error too, also after good requests on the same connection.
#[tokio::test]
async fn refusals_below_the_router_are_json_errors() {
    let long = format!(
        "GET /items/1?n={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "9".repeat(70_000)
    );
    let answers =
        raw(format!("GET /items/7?n=3 HTTP/1.1\r\nhost: x\r\n\r\n{long}").into_bytes()).await;
    assert!(answers.starts_with("HTTP/1.1 200 OK\r\n"), "{answers}");
    assert!(answers.contains("\r\n\r\n7/3HTTP/1.1 414 "), "{answers}");
    let body = last_json_body(&answers);
    assert_eq!(body["error"]["code"], "invalid_input", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request body"),
        "{body}"
    );

    let big_head = format!(
        "GET /items/1?n=2 HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(600_000)
    );
    let answers = raw(big_head.into_bytes()).await;
    assert!(answers.starts_with("HTTP/1.1 431 "), "{answers}");
    assert!(
        last_json_body(&answers)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("headers")
    );

    for (request, status) in [
        (&b"G\x01T / HTTP/1.1\r\nhost: x\r\n\r\n"[..], "400"),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "400"),
        (b"GET / HTTP/2.5\r\nhost: x\r\n\r\n", "400"),
    ] {
        let answers = raw(request.to_vec()).await;
        assert!(
            answers.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answers}"
        );
        assert_eq!(last_json_body(&answers)["error"]["code"], "invalid_input");
    }
}
