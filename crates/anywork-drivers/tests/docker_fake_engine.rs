//! DockerDriver against a fake Docker engine on a Unix socket, for the engine's timing that a
//! real engine shows only under load: a container name taken before the container can be
//! looked at (the engine reserves the name, then makes the container's filesystem, then
//! registers it), and a read of a worker's secret the engine does not answer. Runs without
//! Docker.

#![cfg(all(feature = "docker", unix))]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::{ContainerDriver, SessionId};
use anywork_drivers::{DockerConfig, DockerDriver};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

const NETWORK: &str = "awt-fake-net";

struct Container {
    id: String,
    name: String,
    running: bool,
    labels: Value,
    archive: Option<Bytes>,
}

#[derive(Default)]
struct Engine {
    /// Names whose container is being made: taken, not yet to be looked at.
    reserved: HashSet<String>,
    containers: Vec<Container>,
    /// `METHOD /path` of each request (the API version left out), and the status answered.
    log: Vec<(String, u16)>,
    /// How long making a container's filesystem takes.
    create_takes: Duration,
    /// Reads of a container's files to answer with a 500.
    failing_reads: usize,
    made: usize,
}

type Shared = Arc<Mutex<Engine>>;

struct Fake {
    engine: Shared,
    socket: std::path::PathBuf,
    health_port: u16,
}

impl Fake {
    async fn start(create_takes: Duration) -> Fake {
        let engine = Shared::default();
        engine.lock().unwrap().create_takes = create_takes;
        let socket = std::env::temp_dir().join(format!(
            "awt-fake-engine-{}.sock",
            uuid::Uuid::now_v7().simple()
        ));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let app = Router::new().fallback(handle).with_state(engine.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        // The workers' `/health`, on loopback (every container's address here).
        let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_port = health.local_addr().unwrap().port();
        let app = Router::new().route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok", "executor": "fake"})) }),
        );
        tokio::spawn(async move { axum::serve(health, app).await.unwrap() });
        Fake {
            engine,
            socket,
            health_port,
        }
    }

    async fn driver(&self) -> DockerDriver {
        self.driver_reaping_after(Duration::from_secs(1800)).await
    }

    async fn driver_reaping_after(&self, idle_ttl: Duration) -> DockerDriver {
        let mut c = DockerConfig::new("anywork-worker:fake");
        c.docker_host = Some(format!("unix://{}", self.socket.display()));
        c.network = NETWORK.into();
        c.name_prefix = "awt-fake-".into();
        c.worker_port = self.health_port;
        c.ready_timeout = Duration::from_secs(10);
        c.health_timeout = Duration::from_secs(2);
        c.stop_grace = Duration::from_secs(1);
        c.idle_ttl = idle_ttl;
        DockerDriver::connect(c).await.unwrap()
    }

    fn requests(&self, what: &str) -> Vec<u16> {
        let e = self.engine.lock().unwrap();
        e.log
            .iter()
            .filter(|(r, _)| r.starts_with(what))
            .map(|(_, s)| *s)
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn message(status: StatusCode, message: String) -> Response {
    answer(status, json!({ "message": message }))
}

async fn handle(State(engine): State<Shared>, method: Method, uri: Uri, body: Bytes) -> Response {
    // `/v1.44/containers/…` → `/containers/…`
    let path = uri.path();
    let path = match path.strip_prefix("/v1.") {
        Some(rest) => rest.find('/').map_or(path, |at| &rest[at..]),
        None => path,
    };
    let query: HashMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let response = route(&engine, &method, path, &query, body).await;
    engine
        .lock()
        .unwrap()
        .log
        .push((format!("{method} {path}"), response.status().as_u16()));
    response
}

async fn route(
    engine: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    body: Bytes,
) -> Response {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["version"]) => answer(
            StatusCode::OK,
            json!({"ApiVersion": "1.44", "MinAPIVersion": "1.24", "Version": "fake"}),
        ),
        ("GET", ["networks"]) => answer(
            StatusCode::OK,
            json!([{"Name": NETWORK, "Id": "fake-net-id", "Created": "2026-12-01T00:00:00Z"}]),
        ),
        ("POST", ["volumes", "create"]) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            answer(
                StatusCode::CREATED,
                json!({"Name": v["Name"], "Driver": "local", "Mountpoint": "/fake",
                       "Labels": {}, "Options": {}, "Scope": "local"}),
            )
        }
        ("POST", ["containers", "create"]) => {
            let name = query.get("name").cloned().unwrap_or_default();
            let takes = {
                let mut e = engine.lock().unwrap();
                if e.reserved.contains(&name) || e.containers.iter().any(|c| c.name == name) {
                    return message(
                        StatusCode::CONFLICT,
                        format!("Conflict. The container name \"/{name}\" is already in use"),
                    );
                }
                e.reserved.insert(name.clone());
                e.create_takes
            };
            tokio::time::sleep(takes).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut e = engine.lock().unwrap();
            e.reserved.remove(&name);
            e.made += 1;
            let id = format!("{:064x}", e.made);
            e.containers.push(Container {
                id: id.clone(),
                name,
                running: false,
                labels: v["Labels"].clone(),
                archive: None,
            });
            answer(StatusCode::CREATED, json!({"Id": id, "Warnings": []}))
        }
        // The pool's running containers (the filters are the pool's: all here are).
        ("GET", ["containers", "json"]) => {
            let e = engine.lock().unwrap();
            let running: Vec<Value> = e
                .containers
                .iter()
                .filter(|c| c.running)
                .map(|c| {
                    json!({
                        "Id": c.id,
                        "Names": [format!("/{}", c.name)],
                        "State": "running",
                        "Labels": c.labels,
                        "NetworkSettings": {"Networks": { NETWORK: {"IPAddress": "127.0.0.1"} }},
                    })
                })
                .collect();
            answer(StatusCode::OK, Value::Array(running))
        }
        (m, ["containers", reference, rest @ ..]) => {
            let mut e = engine.lock().unwrap();
            let failing_read = m == "GET" && rest == ["archive"] && e.failing_reads > 0;
            if failing_read {
                e.failing_reads -= 1;
            }
            let Some(at) = e
                .containers
                .iter()
                .position(|c| c.id == *reference || c.name == *reference)
            else {
                return message(
                    StatusCode::NOT_FOUND,
                    format!("No such container: {reference}"),
                );
            };
            let c = &mut e.containers[at];
            match (m, rest) {
                ("GET", ["json"]) => answer(
                    StatusCode::OK,
                    json!({
                        "Id": c.id,
                        "Name": format!("/{}", c.name),
                        "State": {"Status": if c.running { "running" } else { "created" }},
                        "Config": {"Labels": c.labels},
                        "NetworkSettings": {"Networks": if c.running {
                            json!({ NETWORK: {"IPAddress": "127.0.0.1"} })
                        } else {
                            json!({})
                        }},
                    }),
                ),
                ("PUT", ["archive"]) => {
                    c.archive = Some(body);
                    StatusCode::OK.into_response()
                }
                ("GET", ["archive"]) if failing_read => message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "fake engine: the read was not answered".into(),
                ),
                ("GET", ["archive"]) => match &c.archive {
                    Some(tar) => (StatusCode::OK, tar.clone()).into_response(),
                    None => message(
                        StatusCode::NOT_FOUND,
                        "Could not find the file in container".into(),
                    ),
                },
                ("POST", ["start"]) if c.running => StatusCode::NOT_MODIFIED.into_response(),
                ("POST", ["start"]) => {
                    c.running = true;
                    StatusCode::NO_CONTENT.into_response()
                }
                ("POST", ["stop"]) if !c.running => StatusCode::NOT_MODIFIED.into_response(),
                ("POST", ["stop"]) => {
                    c.running = false;
                    StatusCode::NO_CONTENT.into_response()
                }
                ("DELETE", []) => {
                    e.containers.remove(at);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => message(StatusCode::NOT_FOUND, format!("fake engine: no {m} {path}")),
            }
        }
        _ => message(
            StatusCode::NOT_FOUND,
            format!("fake engine: no {method} {path}"),
        ),
    }
}

fn sid(tag: &str) -> SessionId {
    SessionId::new(format!("{tag}-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

/// Two servers ask for one session's worker while the engine takes its time making the
/// container: the second one's create is refused (the name is taken) and the name cannot be
/// looked at yet. It waits for the first one's container instead of giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creators_wait_for_a_container_the_engine_is_still_making() {
    let fake = Fake::start(Duration::from_millis(1500)).await;
    let (a, b) = (fake.driver().await, fake.driver().await);
    let s = sid("race");
    let (wa, wb) = tokio::join!(a.get_worker(&s), b.get_worker(&s));
    let (wa, wb) = (wa.unwrap(), wb.unwrap());
    assert_eq!(wa, wb, "one container for both");
    let creates = fake.requests("POST /containers/create");
    assert_eq!(
        creates.iter().filter(|s| **s == 201).count(),
        1,
        "{creates:?}"
    );
    assert!(creates.contains(&409), "the race happened: {creates:?}");
    let lookups = fake.requests(&format!("GET /containers/{}/json", a.container_name(&s)));
    assert!(
        lookups.contains(&404),
        "the name could not be looked at meanwhile: {lookups:?}"
    );
    assert!(
        fake.requests("DELETE").is_empty(),
        "nothing removed: {:?}",
        fake.engine.lock().unwrap().log
    );
    assert!(a.is_healthy(&wa).await);
}

/// A server that adopts a running worker reads its secret back from the volume. When the
/// engine does not answer that read, the worker is not taken for one without a secret (and
/// removed under the server using it): the caller gets an error and the next call adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_secret_read_does_not_replace_a_running_worker() {
    let fake = Fake::start(Duration::ZERO).await;
    let a = fake.driver().await;
    let s = sid("adopt");
    let first = a.get_worker(&s).await.unwrap();

    let b = fake.driver().await;
    fake.engine.lock().unwrap().failing_reads = 1;
    let e = b.get_worker(&s).await.unwrap_err();
    assert!(e.to_string().contains("read the secret"), "{e}");
    assert!(
        fake.requests("DELETE").is_empty(),
        "the running worker was kept: {:?}",
        fake.engine.lock().unwrap().log
    );
    let adopted = b.get_worker(&s).await.unwrap();
    assert_eq!(adopted, first, "the same container, with its secret");
    assert_eq!(fake.requests("POST /containers/create").len(), 1);
}

/// The idle reaper of a server that did not make the worker reads its secret to ask it whether
/// it is busy. When the engine does not answer that read, the worker is left for the next
/// round instead of being stopped unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_leaves_a_worker_whose_secret_it_could_not_read() {
    let fake = Fake::start(Duration::ZERO).await;
    let s = sid("reap");
    let user = fake.driver().await;
    user.get_worker(&s).await.unwrap();

    let reaper = fake.driver_reaping_after(Duration::from_millis(100)).await;
    // The first look starts the reaper's clock for the session.
    assert!(reaper.reap_idle(&[]).await.unwrap().is_empty());
    // The other server replaces the worker: a container whose secret the reaper has not read.
    user.release(&s).await.unwrap();
    let second = user.get_worker(&s).await.unwrap();
    let deletes = fake.requests("DELETE").len();
    tokio::time::sleep(Duration::from_millis(200)).await;

    fake.engine.lock().unwrap().failing_reads = 1;
    assert_eq!(
        reaper.reap_idle(&[]).await.unwrap(),
        Vec::<SessionId>::new()
    );
    assert_eq!(
        fake.requests("DELETE").len(),
        deletes,
        "not stopped unasked"
    );
    assert!(user.is_healthy(&second).await);
    // Answered: idle past its time, and reaped.
    assert_eq!(reaper.reap_idle(&[]).await.unwrap(), vec![s]);
    assert_eq!(fake.requests("DELETE").len(), deletes + 1);
}
