//! StaticDriver against a real HTTP server on loopback.

use anywork_core::{ContainerDriver, ErrorKind, SessionId};
use anywork_drivers::StaticDriver;
use axum::{Router, http::StatusCode, routing::get};

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
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
