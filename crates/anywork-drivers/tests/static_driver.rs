//! StaticDriver against a real HTTP server on loopback.

use anywork_core::{ContainerDriver, ErrorKind, SessionId};
use anywork_drivers::StaticDriver;
use axum::{Router, http::StatusCode, routing::get};

async fn serve(router: Router) -> String {
    let (addr, _) = anywork_test::fake_http::serve(router).await;
    format!("http://{addr}")
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

#[tokio::test]
async fn hands_out_the_healthy_worker_to_every_session() {
    let url = serve(Router::new().route("/health", get(|| async { "{\"status\":\"ok\"}" }))).await;
    let driver = StaticDriver::new(&format!("{url}/")).unwrap();
    let a = driver.get_worker(&sid("a")).await.unwrap();
    let b = driver.get_worker(&sid("b")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.base_url, url, "trailing slash trimmed");
    let listed = driver.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].healthy);
    driver.release(&sid("a")).await.unwrap();
}

#[tokio::test]
async fn an_unhealthy_or_absent_worker_is_unavailable() {
    let sick =
        serve(Router::new().route("/health", get(|| async { StatusCode::SERVICE_UNAVAILABLE })))
            .await;
    let err = StaticDriver::new(&sick)
        .unwrap()
        .get_worker(&sid("a"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.is_retryable());
    assert!(err.to_string().contains("STATIC_WORKER_URL"), "{err}");

    // Nothing listens on port 1.
    let gone = StaticDriver::new("http://127.0.0.1:1").unwrap();
    assert!(!gone.is_healthy(gone.endpoint()).await);
    assert!(!gone.list().await.unwrap()[0].healthy);
}

#[test]
fn bad_urls_are_refused_with_the_variable_name() {
    for bad in ["", "localhost:8080", "ftp://x", "http://"] {
        let err = StaticDriver::new(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}");
        assert!(err.to_string().contains("STATIC_WORKER_URL"), "{err}");
    }
}

#[tokio::test]
async fn passes_the_driver_conformance_suite() {
    use std::sync::Arc;

    use anywork_test::driver_conformance::{self, DriverSuite};
    let url = serve(Router::new().route("/health", get(|| async { "{\"status\":\"ok\"}" }))).await;
    driver_conformance::run(DriverSuite::shared(), || {
        let url = url.clone();
        async move { Arc::new(StaticDriver::new(&url).unwrap()) as Arc<dyn ContainerDriver> }
    })
    .await;
}

#[tokio::test]
async fn a_passed_health_check_is_trusted_briefly_and_a_failed_one_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let checks = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(AtomicBool::new(true));
    let router = {
        let (checks, up) = (checks.clone(), up.clone());
        Router::new().route(
            "/health",
            get(move || {
                let (checks, up) = (checks.clone(), up.clone());
                async move {
                    checks.fetch_add(1, Ordering::SeqCst);
                    if up.load(Ordering::SeqCst) {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
    };
    let driver = StaticDriver::new(&serve(router).await).unwrap();
    for s in ["a", "b", "c"] {
        driver.get_worker(&sid(s)).await.unwrap();
    }
    assert_eq!(
        checks.load(Ordering::SeqCst),
        1,
        "one check serves a burst of tasks"
    );
    up.store(false, Ordering::SeqCst);
    assert!(!driver.is_healthy(driver.endpoint()).await);
    let err = driver.get_worker(&sid("d")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(
        checks.load(Ordering::SeqCst),
        3,
        "a failed check is not cached"
    );
}

#[tokio::test]
async fn the_setup_check_asks_the_worker() {
    let url = serve(Router::new().route(
        "/health",
        get(|| async {
            axum::Json(serde_json::json!({
                "status": "ok", "version": "1", "executor": "native", "busy_sessions": []
            }))
        }),
    ))
    .await;
    let checks = StaticDriver::new(&url).unwrap().check_setup().await;
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(checks[0].ok, "{checks:?}");
    assert_eq!(checks[0].name, "worker");
    assert!(checks[0].message.contains("native"), "{checks:?}");

    let checks = StaticDriver::new("http://127.0.0.1:1")
        .unwrap()
        .check_setup()
        .await;
    assert!(!checks[0].ok, "{checks:?}");
    assert!(
        checks[0].message.contains("STATIC_WORKER_URL"),
        "{checks:?}"
    );
}

#[tokio::test]
async fn calls_carry_the_secret_and_purge_deletes_the_session_on_the_worker() {
    use std::sync::{Arc, Mutex};

    use anywork_core::worker_api::{SECRET_HEADER, WorkerSecret};
    use axum::extract::Path;
    use axum::http::HeaderMap;
    use axum::routing::delete;

    let secret = WorkerSecret::generate();
    // A worker that wants the secret, and is busy with the session for its first two asks.
    let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
    let asks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = {
        let (expected, deleted) = (secret.expose().to_owned(), deleted.clone());
        let ok = move |headers: &HeaderMap| {
            headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok()) == Some(expected.as_str())
        };
        let ok2 = ok.clone();
        Router::new()
            .route(
                "/health",
                get(move |headers: HeaderMap| async move {
                    if ok(&headers) {
                        r#"{"status":"ok","version":"1","executor":"x","busy_sessions":[]}"#
                    } else {
                        r#"{"status":"ok"}"#
                    }
                }),
            )
            .route(
                "/sessions/{id}",
                delete(
                    move |Path(id): Path<String>, headers: HeaderMap| async move {
                        if !ok2(&headers) {
                            return StatusCode::UNAUTHORIZED;
                        }
                        if asks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                            return StatusCode::CONFLICT;
                        }
                        deleted.lock().unwrap().push(id);
                        StatusCode::OK
                    },
                ),
            )
    };
    let url = serve(router).await;
    let driver = StaticDriver::new(&url)
        .unwrap()
        .with_secret(Some(secret.clone()));
    let w = driver.get_worker(&sid("a")).await.unwrap();
    assert_eq!(w.secret.as_ref(), Some(&secret), "the endpoint carries it");

    driver.purge(&sid("owner/repo#12")).await.unwrap();
    assert_eq!(*deleted.lock().unwrap(), vec!["owner/repo#12".to_owned()]);

    // Without the secret the worker refuses, and purge says so.
    let e = StaticDriver::new(&url)
        .unwrap()
        .purge(&sid("b"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");

    // A worker without the route (the original's) keeps its files: not an error.
    let plain =
        serve(Router::new().route("/health", get(|| async { "{\"status\":\"ok\"}" }))).await;
    StaticDriver::new(&plain)
        .unwrap()
        .purge(&sid("c"))
        .await
        .unwrap();
}

/// A worker whose `/health` answers after 200 ms on keep-alive connections; counts the
/// connections open now.
async fn slow_health_worker() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        let body = "{\"status\":\"ok\"}";
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (format!("http://{addr}"), open)
}

#[tokio::test]
async fn a_burst_of_health_checks_leaves_few_connections_open() {
    use std::sync::atomic::Ordering;
    let (url, open) = slow_health_worker().await;
    let driver = std::sync::Arc::new(StaticDriver::new(&url).unwrap());
    // Many tasks asking for the worker at once while its check is stale: a connection each.
    let mut checks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let driver = driver.clone();
        checks.spawn(async move { driver.is_healthy(driver.endpoint()).await });
    }
    while let Some(healthy) = checks.join_next().await {
        assert!(healthy.unwrap());
    }
    // Those past the few kept idle close at once (they used to stay for reqwest's 90 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while open.load(Ordering::SeqCst) > 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        open.load(Ordering::SeqCst) <= 4,
        "{} connections to the worker still open after the burst",
        open.load(Ordering::SeqCst)
    );
}
