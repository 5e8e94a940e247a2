//! The attack suite of the API (issue 11): each attack against a real server over HTTP and
//! WebSocket fails with a clear error, and the legitimate request beside it works.
//!
//! Foreign-origin WebSocket, cross-site form POST, API calls without / with a wrong token,
//! request-supplied MCP commands, SSRF targets (loopback, metadata, private, a name resolving
//! to loopback, a redirect to loopback), and a grep for configured secrets in everything the
//! server stores, logs and answers.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::{McpAccess, McpCatalog, OutboundPolicy};
use anywork_runtime::{DispatcherConfig, FirstWords};
use anywork_server::{ApiOptions, ApiToken};
use anywork_test::fake_llm::{FakeLlm, Reply};
use common::{TestServer, WAIT, WorkerProcess, free_port, wait_healthy};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "t0ken-for-the-attack-suite";

/// A server over a worker URL nobody needs (tasks are refused before they run, or their
/// run does not matter), with `options`.
async fn server_with(config: DispatcherConfig, options: ApiOptions) -> TestServer {
    let url = format!("http://127.0.0.1:{}", free_port());
    TestServer::start_with_options(&url, config, FirstWords, options).await
}

fn with_token() -> ApiOptions {
    let mut options = ApiOptions::default();
    options.api_token = ApiToken::new(TOKEN);
    options
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

/// Opens `/ws` with extra headers; `Err((status, body))` when the upgrade is refused.
async fn ws_connect(
    http_url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    (u16, Value),
> {
    let url = format!("{}/ws", http_url.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().expect("a header value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(ok) => Ok(ok),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("unexpected WebSocket error: {e}"),
    }
}

async fn ws_next(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<Value> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
        {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_without_or_with_a_wrong_token_are_refused() {
    let server = server_with(DispatcherConfig::default(), with_token()).await;
    let http = reqwest::Client::new();
    let sessions = format!("{}/api/sessions", server.url);

    let (status, body, headers) = send(http.get(&sessions)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_code(&body), "unauthorized");
    assert!(error_message(&body).contains("ANYWORK_API_TOKEN"), "{body}");
    assert!(headers.contains_key("www-authenticate"));
    let (status, body, _) = send(http.get(&sessions).bearer_auth("wrong")).await;
    assert_eq!(status, 401, "{body}");
    assert!(error_message(&body).contains("wrong"), "{body}");
    let (status, body, _) = send(
        http.post(&sessions)
            .bearer_auth(format!("{TOKEN}x"))
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 401, "{body}");

    // The legitimate calls.
    let (status, body, _) = send(http.get(&sessions).bearer_auth(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = send(
        http.post(&sessions)
            .bearer_auth(TOKEN)
            .json(&json!({"title": "t"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // Health and metrics stay open; the UI loads without the token (it asks for it).
    let (status, _, _) = send(http.get(format!("{}/api/health", server.url))).await;
    assert_eq!(status, 200);
    let (status, body, _) = send(http.get(format!("{}/api/health/live", server.url))).await;
    assert_eq!((status, &body), (200, &json!({"ok": true})));
    let r = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{}/", server.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // With ANYWORK_PROTECT_HEALTH, health needs it too.
    let mut options = with_token();
    options.protect_health = true;
    let guarded = server_with(DispatcherConfig::default(), options).await;
    let (status, _, _) = send(http.get(format!("{}/api/health", guarded.url))).await;
    assert_eq!(status, 401);
    // Liveness stays open (a Kubernetes probe carries no token), and says nothing more.
    let (status, body, _) = send(http.get(format!("{}/api/health/live", guarded.url))).await;
    assert_eq!((status, &body), (200, &json!({"ok": true})));
    let (status, _, _) = send(
        http.get(format!("{}/api/health", guarded.url))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let r = http
        .get(format!("{}/metrics", guarded.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_needs_the_token_as_header_subprotocol_or_first_message() {
    let server = server_with(DispatcherConfig::default(), with_token()).await;

    // A wrong token in the header: refused at the upgrade.
    let bearer_wrong = "Bearer nope".to_owned();
    let (status, body) = ws_connect(&server.url, &[("authorization", &bearer_wrong)])
        .await
        .expect_err("refused");
    assert_eq!(status, 401, "{body}");
    assert_eq!(error_code(&body), "unauthorized");
    let (status, _) = ws_connect(
        &server.url,
        &[("sec-websocket-protocol", "anywork, anywork.token.nope")],
    )
    .await
    .expect_err("refused");
    assert_eq!(status, 401);

    // No token: the first message must authenticate; anything else closes the connection.
    let (mut ws, _) = ws_connect(&server.url, &[]).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "chat", "message": "run something"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = ws_next(&mut ws).await.expect("an error");
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["content"].as_str().unwrap().contains("API token"),
        "{reply}"
    );
    assert!(ws_next(&mut ws).await.is_none(), "the connection is closed");
    assert_eq!(
        server.dispatcher().queue_depth() + server.dispatcher().running(),
        0
    );

    // The legitimate ways in: header, subprotocol (echoed as `anywork`), first message.
    let bearer = format!("Bearer {TOKEN}");
    let (mut ws, _) = ws_connect(&server.url, &[("authorization", &bearer)])
        .await
        .unwrap();
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "pong");

    let protocols = format!("anywork, anywork.token.{TOKEN}");
    let (mut ws, response) = ws_connect(&server.url, &[("sec-websocket-protocol", &protocols)])
        .await
        .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "anywork",
        "the browser's offered protocol is answered, not the token"
    );
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "pong");

    let (mut ws, _) = ws_connect(&server.url, &[]).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "auth", "token": TOKEN}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "authenticated");
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origin_websocket_is_refused() {
    let mut options = ApiOptions::default();
    options.cors_origins = vec!["https://app.example".into()];
    let server = server_with(DispatcherConfig::default(), options).await;
    let port = server.url.rsplit(':').next().unwrap().to_owned();

    for evil in [
        "https://evil.example",
        "http://127.0.0.1.evil.example",
        "http://localhost:1",
        "null",
    ] {
        let (status, body) = ws_connect(&server.url, &[("origin", evil)])
            .await
            .err()
            .unwrap_or_else(|| panic!("origin {evil} was let in"));
        assert_eq!(status, 403, "{evil}: {body}");
        assert_eq!(error_code(&body), "forbidden_origin", "{body}");
        assert!(error_message(&body).contains("CORS_ORIGINS"), "{body}");
    }
    // The server's own pages, a listed origin, and non-browser clients (no Origin) get in.
    let own = format!("http://127.0.0.1:{port}");
    for headers in [
        vec![("origin", own.as_str())],
        vec![("origin", "https://app.example")],
        vec![],
    ] {
        let (mut ws, _) = ws_connect(&server.url, &headers)
            .await
            .unwrap_or_else(|e| panic!("{headers:?} refused: {e:?}"));
        ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .unwrap();
        assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "pong");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_form_posts_are_refused() {
    let server = server_with(DispatcherConfig::default(), ApiOptions::default()).await;
    let http = reqwest::Client::new();
    let sessions = format!("{}/api/sessions", server.url);
    // What an HTML form on another site can send without CORS.
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", "title=pwned"),
        ("text/plain", r#"{"title":"pwned"}"#),
        ("multipart/form-data; boundary=x", "--x--"),
        ("application/x-www-form-urlencoded", ""),
    ] {
        let (status, answer, _) = send(
            http.post(&sessions)
                .header("content-type", content_type)
                .body(body),
        )
        .await;
        assert_eq!(status, 415, "{content_type}: {answer}");
        assert_eq!(error_code(&answer), "unsupported_media_type");
        assert!(
            error_message(&answer).contains("application/json"),
            "{answer}"
        );
    }
    let (status, answer, _) = send(
        http.post(format!("{}/api/tasks", server.url))
            .header("content-type", "text/plain")
            .body(r#"{"message":"hi"}"#),
    )
    .await;
    assert_eq!(status, 415, "{answer}");
    let (_, list, _) = send(http.get(&sessions)).await;
    assert_eq!(
        list["sessions"].as_array().unwrap().len(),
        0,
        "nothing was made"
    );

    // The legitimate calls: JSON, and a POST with no body at all.
    let (status, answer, _) = send(http.post(&sessions).json(&json!({"title": "ok"}))).await;
    assert_eq!(status, 201, "{answer}");
    let (status, answer, _) = send(http.post(&sessions)).await;
    assert_eq!(status, 201, "{answer}");
    // Webhooks keep their own rules (not a 415: the channel answers for itself).
    let (status, answer, _) = send(
        http.post(format!("{}/api/channel/webhook/webhook", server.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("a=b"),
    )
    .await;
    assert_ne!(status, 415, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_supplied_mcp_commands_are_refused_and_catalog_names_work() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("done"));
    let workspace = tempfile::tempdir().unwrap();
    let worker = WorkerProcess::start_in(&fake, workspace.path()).await;
    let secret_file = workspace.path().join("docs-token");
    std::fs::write(&secret_file, "Bearer from-a-file\n").unwrap();
    // The "secret" comes from a variable the test process has anyway.
    let path_value = std::env::var("PATH").unwrap();
    let catalog = McpCatalog::from_json(
        &json!({
            "calc": {
                "command": anywork_test::bins::test_mcp_server(),
                "env": {"CALC_TOKEN": {"env": "PATH"}}
            },
            "docs": {
                "type": "http",
                "url": "https://127.0.0.1:1/mcp",
                "headers": {"Authorization": {"file": secret_file}}
            }
        })
        .to_string(),
    )
    .unwrap();
    let mut config = DispatcherConfig::default();
    config.mcp = McpAccess::new(catalog, false);
    let server =
        TestServer::start_with_options(&worker.url, config, FirstWords, ApiOptions::default())
            .await;

    // The attack of the issue, over REST (map and list forms) and over the WebSocket.
    for servers in [
        json!({"evil": {"command": "sh", "args": ["-c", "id; env"]}}),
        json!([{"name": "evil", "transport": "stdio", "command": "sh", "args": ["-c", "id"]}]),
    ] {
        let (status, body) = server
            .post(
                "/api/tasks",
                json!({"message": "hi", "mcp_servers": servers}),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        let message = error_message(&body);
        assert!(message.contains("may not start a command"), "{body}");
        assert!(message.contains("ALLOW_REQUEST_MCP_COMMANDS"), "{body}");
        assert!(message.contains("calc, docs"), "{body}");
    }
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "mcp_servers": ["nope"]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_message(&body).contains("not in the server's MCP catalog"),
        "{body}"
    );
    let mut ws = server.ws().await;
    ws.send(json!({"type": "chat", "message": "hi",
        "mcp_servers": {"evil": {"command": "sh", "args": ["-c", "id"]}}}))
        .await;
    let reply = ws.recv().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["content"]
            .as_str()
            .unwrap()
            .contains("may not start a command"),
        "{reply}"
    );
    assert_eq!(
        server.dispatcher().queue_depth() + server.dispatcher().running(),
        0
    );

    // Catalog names work in every form; a request's own config for a catalog name is
    // replaced by the catalog's.
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "mcp_servers": ["calc", {"name": "docs", "command": "sh"}]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let task = server.wait_final(body["taskId"].as_str().unwrap()).await;
    assert_eq!(task["status"], "completed", "{task}");
    // The worker got the secrets (read at dispatch) ...
    let session = body["sessionId"].as_str().unwrap();
    let mcp_file = std::fs::read_dir(workspace.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(".mcp.json"))
        .find(|p| p.is_file() && p.to_string_lossy().contains(session))
        .expect("the session's .mcp.json");
    let mcp: Value = serde_json::from_str(&std::fs::read_to_string(mcp_file).unwrap()).unwrap();
    assert_eq!(
        mcp["mcpServers"]["calc"]["env"]["CALC_TOKEN"],
        path_value.as_str()
    );
    assert_eq!(
        mcp["mcpServers"]["docs"]["headers"]["Authorization"],
        "Bearer from-a-file"
    );
    assert_ne!(mcp["mcpServers"]["docs"]["command"], "sh");
    // ... and the stored task never held them.
    let stored = server
        .dispatcher()
        .task(body["taskId"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap();
    let row = serde_json::to_string(&stored).unwrap();
    assert!(
        !row.contains(&path_value) && !row.contains("from-a-file"),
        "{row}"
    );
    assert!(row.contains(McpCatalog::REDACTED), "{row}");
}

/// A tiny HTTP receiver on `ip`: records each POST's `Authorization`; answers with `answer`.
async fn receiver(
    ip: &str,
    answer: impl Fn() -> axum::response::Response + Clone + Send + Sync + 'static,
) -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let (seen, answer) = (seen.clone(), answer.clone());
        async move {
            seen.lock().unwrap().push(
                headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            );
            answer()
        }
    });
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

fn ok() -> axum::response::Response {
    axum::response::IntoResponse::into_response(axum::http::StatusCode::OK)
}

fn redirect_to(url: String) -> impl Fn() -> axum::response::Response + Clone + Send + Sync {
    move || {
        axum::response::IntoResponse::into_response((
            axum::http::StatusCode::TEMPORARY_REDIRECT,
            [("location", url.clone())],
        ))
    }
}

async fn wait_for_hits(hits: &Arc<Mutex<Vec<Option<String>>>>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while hits.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no request arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_targets_are_refused_at_intake_with_the_reason() {
    let server = server_with(DispatcherConfig::default(), ApiOptions::default()).await;
    for (url, reason) in [
        ("https://127.0.0.1/hook", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.0.0.1/hook", "private"),
        ("https://localhost/hook", "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://example.com/hook", "plain http is not allowed"),
        // Refused for its scheme (by the request's own checks or by the policy).
        ("file:///etc/passwd", "https"),
    ] {
        let (status, body) = server
            .post(
                "/api/tasks",
                json!({"message": "hi", "push_notification": {"url": url, "authorization": "Bearer x"}}),
            )
            .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert!(error_message(&body).contains(reason), "{url}: {body}");
        // Request-chosen HTTP MCP servers go through the same policy.
        let (status, body) = server
            .post(
                "/api/tasks",
                json!({"message": "hi", "mcp_servers": {"x": {"type": "http", "url": url}}}),
            )
            .await;
        // A URL that is not http(s) is refused while the body is read (422), an address by
        // the outbound policy (400): both before anything is stored.
        assert!(status == 400 || status == 422, "MCP {url}: {status} {body}");
        assert_eq!(body["error"]["code"], "invalid_input", "MCP {url}: {body}");
    }
    assert_eq!(
        server.dispatcher().queue_depth() + server.dispatcher().running(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_notifications_reach_allowed_receivers_only_and_never_follow_a_redirect_inside() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("pushed"));
    let worker = WorkerProcess::start(&fake).await;
    // The operator allows one internal receiver: 127.0.0.1 over http.
    let mut config = DispatcherConfig::default();
    config.outbound = OutboundPolicy::strict()
        .with_http(true)
        .allow_list("127.0.0.1")
        .unwrap();
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;

    // Legitimate: the allowed receiver gets the outcome with the caller's Authorization.
    let (good, good_hits) = receiver("127.0.0.1", ok).await;
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": format!("http://{good}/hook"), "authorization": "Bearer mine"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_for_hits(&good_hits).await;
    assert_eq!(good_hits.lock().unwrap()[0].as_deref(), Some("Bearer mine"));

    // Attack: the allowed receiver redirects to another loopback address (not allowed).
    let (inner, inner_hits) = receiver("127.0.0.2", ok).await;
    let (bouncer, bouncer_hits) =
        receiver("127.0.0.1", redirect_to(format!("http://{inner}/steal"))).await;
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": format!("http://{bouncer}/hook"), "authorization": "Bearer mine"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    server.wait_final(body["taskId"].as_str().unwrap()).await;
    wait_for_hits(&bouncer_hits).await;
    // The refusal is final (no retry): give a follow-up the time a redirect would take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        inner_hits.lock().unwrap().is_empty(),
        "the redirect into 127.0.0.2 was followed"
    );
    assert_eq!(
        bouncer_hits.lock().unwrap().len(),
        1,
        "a refused redirect is not retried"
    );

    // Control: the same redirect to an address the operator allows is followed.
    let mut config = DispatcherConfig::default();
    config.outbound = OutboundPolicy::strict()
        .with_http(true)
        .allow_list("127.0.0.1, 127.0.0.2")
        .unwrap();
    let open = TestServer::start_with(&worker.url, config, FirstWords).await;
    let (status, body) = open
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": format!("http://{bouncer}/hook")}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    wait_for_hits(&inner_hits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_what_a_caller_can_make_the_server_store_or_do() {
    let mut options = ApiOptions::default();
    options.ws_messages_per_second = 2;
    options.max_ws_per_client = 2;
    let server = server_with(DispatcherConfig::default(), options).await;
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "channel_key": "k".repeat(257)}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("channel_key"), "{body}");
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "channel_meta": {"blob": "x".repeat(20_000)}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("channel_meta"), "{body}");
    // A long request target: over the API's 8 KiB (the router's check) and over hyper's own
    // 64 KiB (refused before any route runs; raw, as no HTTP client sends such a target): both
    // JSON 414s.
    let url = format!("{}/api/tasks?x={}", server.url, "y".repeat(20_000));
    let (status, body, _) = send(reqwest::Client::new().get(url)).await;
    assert_eq!(status, 414);
    assert_eq!(error_code(&body), "invalid_input");
    assert!(error_message(&body).contains("request body"));
    let answer = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = server.url.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let target = format!("/api/tasks?x={}", "y".repeat(70_000));
        let request = format!("GET {target} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        let _ = tcp.write_all(request.as_bytes()).await;
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
            .await
            .expect("the server closes after refusing")
            .unwrap();
        String::from_utf8(out).unwrap()
    };
    assert!(answer.starts_with("HTTP/1.1 414 "), "{answer}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("content-type: application/json"), "{head}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(error_code(&body), "invalid_input", "{body}");
    assert!(error_message(&body).contains("request body"), "{body}");

    // Messages per second: the burst passes, then a rate_limited error; the connection stays.
    let mut ws = server.ws().await;
    let mut limited = None;
    for _ in 0..10 {
        ws.send(json!({"type": "ping"})).await;
    }
    for _ in 0..10 {
        let m = ws.recv().await;
        if m["type"] == "error" {
            limited = Some(m);
            break;
        }
    }
    let limited = limited.expect("a rate_limited error");
    assert_eq!(limited["metadata"]["code"], "rate_limited", "{limited}");
    assert!(limited["content"].as_str().unwrap().contains("per second"));
    // Connections per client address: the third is refused, the first two work.
    let _second = server.ws().await;
    let (status, body) = ws_connect(&server.url, &[]).await.expect_err("refused");
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code(&body), "rate_limited");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ws.send(json!({"type": "ping"})).await;
    let m = ws.recv_until(|m| m["type"] == "pong").await;
    assert_eq!(m.last().unwrap()["type"], "pong");
}

/// Runs the real binary with secrets set to values holding `MARKER`, runs tasks (one that
/// completes with a catalog MCP server, one that fails reading a catalog secret, one the
/// model fails), then greps every API answer, the SQLite files and every log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_secrets_appear_in_no_answer_row_or_log_line() {
    const MARKER: &str = "SECRETMARKER7f3a";
    let fake = FakeLlm::start().await;
    fake.set_responder(|req| {
        if req.contains_text("please fail") {
            Reply::error(400, "invalid_request_error", "the model broke")
        } else {
            Reply::text("fine")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("data");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{MARKER}-token\n")).unwrap();
    let header_file = dir.path().join("header");
    std::fs::write(&header_file, format!("Bearer {MARKER}-header")).unwrap();
    let catalog = dir.path().join("mcp.json");
    std::fs::write(
        &catalog,
        json!({"mcpServers": {
            "calc": {"command": anywork_test::bins::test_mcp_server(),
                     "env": {"CALC_TOKEN": {"env": "CALC_SECRET"}, "PLAIN": format!("{MARKER}-plain")}},
            "docs": {"type": "http", "url": "https://127.0.0.1:1/mcp",
                     "headers": {"Authorization": {"file": header_file}}},
            "broken": {"command": "true", "env": {"K": {"file": dir.path().join("missing")}}}
        }})
        .to_string(),
    )
    .unwrap();
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_anywork-server"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("SERVER_PORT", port.to_string())
        .env("DB_DIR", &db_dir)
        .env("CONTAINER_DRIVER", "local")
        .env("SANDBOX", "off")
        .env("EXECUTOR", "native")
        .env("API_KEY", format!("{MARKER}-model-key"))
        .env("API_BASE_URL", format!("{}/v1", fake.url()))
        .env("MODEL", "fake-model")
        .env("ANYWORK_API_TOKEN_FILE", &token_file)
        .env("MCP_SERVERS_FILE", &catalog)
        .env("CALC_SECRET", format!("{MARKER}-env"))
        .env("WEBHOOK_SECRET", format!("{MARKER}-webhook"))
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start anywork-server");
    // Read its logs as they come: at debug level they fill a pipe's buffer within a minute,
    // and a server whose log writes block stops answering.
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut all = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut all).await;
            }
            all
        })
    };
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{url}/api/health")).await;
    let http = reqwest::Client::new();
    let token = format!("{MARKER}-token");
    let mut answers = Vec::new();
    let mut call = async |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, format!("{url}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        answers.push(format!("{path}: {text}"));
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let mut tasks = Vec::new();
    for (message, servers) in [
        ("hello", json!(["calc", "docs"])),
        ("please fail", json!(["calc"])),
        ("hello again", json!(["broken"])),
    ] {
        let (status, body) = call(
            reqwest::Method::POST,
            "/api/tasks",
            Some(json!({"message": message, "mcp_servers": servers,
                "push_notification": {"url": "https://push.invalid/x", "authorization": "Bearer caller"}})),
        )
        .await;
        // push.invalid does not resolve: refused at intake, with a clear message.
        assert_eq!(status, 400, "{body}");
        let (status, body) = call(
            reqwest::Method::POST,
            "/api/tasks",
            Some(json!({"message": message, "mcp_servers": servers})),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        tasks.push(body["taskId"].as_str().unwrap().to_owned());
    }
    let mut statuses = Vec::new();
    for task in &tasks {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, t) = call(reqwest::Method::GET, &format!("/api/tasks/{task}"), None).await;
            if matches!(t["status"].as_str(), Some("completed" | "failed")) {
                statuses.push((t["status"].clone(), t["error"].clone()));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{task} never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        call(
            reqwest::Method::GET,
            &format!("/api/tasks/{task}/logs?limit=500"),
            None,
        )
        .await;
    }
    assert_eq!(statuses[0].0, "completed", "{statuses:?}");
    assert_eq!(statuses[1].0, "failed", "{statuses:?}");
    assert_eq!(statuses[2].0, "failed", "{statuses:?}");
    assert!(
        statuses[2].1.as_str().unwrap_or("").contains("missing"),
        "the failure names the file: {statuses:?}"
    );
    let (_, sessions) = call(reqwest::Method::GET, "/api/sessions", None).await;
    for s in sessions["sessions"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        call(reqwest::Method::GET, &format!("/api/sessions/{id}"), None).await;
        call(
            reqwest::Method::GET,
            &format!("/api/sessions/{id}/tasks"),
            None,
        )
        .await;
        call(
            reqwest::Method::GET,
            &format!("/api/sessions/{id}/messages"),
            None,
        )
        .await;
    }
    for path in [
        "/api/health",
        "/api/admin/workers",
        "/metrics",
        "/api/openapi.json",
    ] {
        call(reqwest::Method::GET, path, None).await;
    }
    // A webhook with a wrong secret, and a wrong token: their errors must not echo secrets.
    let r = http
        .post(format!("{url}/api/channel/webhook/webhook"))
        .header("x-webhook-secret", "wrong")
        .json(&json!({"message": "x"}))
        .send()
        .await
        .unwrap();
    answers.push(r.text().await.unwrap());
    let r = http
        .get(format!("{url}/api/sessions"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    answers.push(r.text().await.unwrap());

    for answer in &answers {
        assert!(
            !answer.contains(MARKER),
            "an API answer holds a secret: {answer}"
        );
    }
    // Every stored row: the SQLite files, byte for byte.
    let mut files = 0;
    for entry in std::fs::read_dir(&db_dir).unwrap().filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_file() {
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "{} holds a secret",
                path.display()
            );
        }
    }
    assert!(files > 0, "the database files were read");
    // Every log line.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let logs = String::from_utf8_lossy(&stderr.await.unwrap()).into_owned()
        + &String::from_utf8_lossy(&stdout.await.unwrap());
    assert!(logs.lines().count() > 10, "logs were captured: {logs}");
    for line in logs.lines() {
        assert!(!line.contains(MARKER), "a log line holds a secret: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_anywork-server"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SERVER_HOST", "0.0.0.0")
            .env("SERVER_PORT", free_port().to_string())
            .env("DB_DIR", dir.path())
            .env("CONTAINER_DRIVER", "static")
            .env("STATIC_WORKER_URL", "http://127.0.0.1:9")
            .env("RUST_LOG", "warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    };
    let out = run(&[]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("ANYWORK_API_TOKEN"),
        "{stderr}"
    );
    let out = run(&[("ANYWORK_API_TOKEN_FILE", "/nonexistent/token")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ANYWORK_API_TOKEN_FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With a token (or the explicit opt-out) it starts and serves.
    for extra in [
        [("ANYWORK_API_TOKEN", TOKEN)],
        [("ANYWORK_INSECURE_NO_AUTH", "1")],
    ] {
        let port = free_port();
        let mut cmd = tokio::process::Command::from(run(&extra));
        let _child = cmd
            .env("SERVER_PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_healthy(&format!("http://127.0.0.1:{port}/api/health")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_to_a_loopback_server_without_a_token_is_refused() {
    let mut options = ApiOptions::default();
    options.loopback_hosts_only = true;
    let server = server_with(DispatcherConfig::default(), options).await;
    let http = reqwest::Client::new();
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    let evil = format!("rebound.evil.example:{port}");
    let (status, body, _) = send(
        http.post(format!("{}/api/sessions", server.url))
            .header("host", &evil)
            .json(&json!({})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "forbidden_host");
    assert!(error_message(&body).contains("ANYWORK_API_TOKEN"), "{body}");
    let origin = format!("http://{evil}");
    let (status, body) = ws_connect(&server.url, &[("host", &evil), ("origin", &origin)])
        .await
        .expect_err("refused");
    assert_eq!(status, 403, "{body}");
    // Webhooks (their own verification) may come through a tunnel under another name.
    let (status, body, _) = send(
        http.post(format!("{}/api/channel/webhook/webhook", server.url))
            .header("host", &evil)
            .json(&json!({"message": "x"})),
    )
    .await;
    assert_ne!(status, 403, "{body}");
    // Loopback names work.
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let (status, body, _) = send(
            http.get(format!("{}/api/sessions", server.url))
                .header("host", &host),
        )
        .await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let (mut ws, _) = ws_connect(&server.url, &[]).await.unwrap();
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await.unwrap()["type"], "pong");
}

/// A channel whose every task gets the catalog entry `calc` as a default MCP server.
struct CatalogDefaults;

#[async_trait::async_trait]
impl anywork_core::Channel for CatalogDefaults {
    fn channel_type(&self) -> &str {
        "defaults"
    }

    async fn parse(
        &self,
        request: anywork_core::InboundRequest,
    ) -> anywork_core::Result<anywork_core::Inbound> {
        let text = String::from_utf8_lossy(&request.body).into_owned();
        Ok(anywork_core::Inbound::Task(Box::new(
            anywork_core::TaskRequest::new("defaults", text),
        )))
    }

    fn defaults(&self) -> anywork_core::ChannelDefaults {
        anywork_core::ChannelDefaults::default()
            .with_mcp_server("calc", anywork_core::McpServerConfig::catalog_ref())
    }

    async fn deliver(
        &self,
        _task: &anywork_core::Task,
        _outcome: &anywork_core::TaskOutcome,
    ) -> anywork_core::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_default_mcp_servers_come_from_the_catalog() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("done"));
    let workspace = tempfile::tempdir().unwrap();
    let worker = WorkerProcess::start_in(&fake, workspace.path()).await;
    let secret_file = workspace.path().join("calc-token");
    std::fs::write(&secret_file, "calc-file-secret\n").unwrap();
    let catalog = McpCatalog::from_json(
        &json!({"calc": {"command": anywork_test::bins::test_mcp_server(),
                         "env": {"CALC_TOKEN": {"file": secret_file}}}})
        .to_string(),
    )
    .unwrap();
    let mut config = DispatcherConfig::default();
    config.mcp = McpAccess::new(catalog, false);
    let server = TestServer::start_custom(&worker.url, move |b| {
        b.config(config).channel(Arc::new(CatalogDefaults))
    })
    .await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/channel/defaults/webhook", server.url))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    let task = server.wait_final(body["taskId"].as_str().unwrap()).await;
    assert_eq!(task["status"], "completed", "{task}");
    let session = body["sessionId"].as_str().unwrap();
    let mcp_file = std::fs::read_dir(workspace.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(".mcp.json"))
        .find(|p| p.is_file() && p.to_string_lossy().contains(session))
        .expect("the session's .mcp.json");
    let mcp: Value = serde_json::from_str(&std::fs::read_to_string(mcp_file).unwrap()).unwrap();
    assert_eq!(
        mcp["mcpServers"]["calc"]["env"]["CALC_TOKEN"],
        "calc-file-secret"
    );
}
