//! DockerDriver against this machine's Docker engine: the conformance suite, a real chat
//! through a worker container, the workspace volume across reaping, the container's limits
//! and hardening, and the errors. Without an engine the tests print a loud skip (and fail when
//! `CI` is set). Every test uses its own name prefix and network and removes them at the end.

#![cfg(feature = "docker")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anywork_core::worker_api::ChatRequest;
use anywork_core::{ContainerDriver, ErrorKind, SessionId, TaskId, WorkerEndpoint};
use anywork_drivers::{DockerConfig, DockerDriver};
use anywork_test::docker_image::{TEST_IMAGE, docker_engine, ensure_worker_image, remove_pool};
use anywork_test::driver_conformance::{self, DriverSuite};
use anywork_test::fake_llm::{FakeLlm, Reply};
use serde_json::{Value, json};

/// A test's own corner of the engine: a name prefix (the label pool) and a network, removed
/// on drop even when the test panics.
struct Pool {
    prefix: String,
    network: String,
}

impl Pool {
    fn new(tag: &str) -> Pool {
        let run = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("awt-{tag}-{}-", &run[run.len() - 8..]);
        Pool {
            network: format!("{prefix}net"),
            prefix,
        }
    }

    /// A configuration for this pool: the test image, a small TTL, the native executor
    /// pointed at `model_url` (an OpenAI-compatible base URL).
    fn config(&self, model_url: &str) -> DockerConfig {
        let mut c = DockerConfig::new(TEST_IMAGE);
        c.network = self.network.clone();
        c.name_prefix = self.prefix.clone();
        c.idle_ttl = Duration::from_secs(1);
        c.ready_timeout = Duration::from_secs(30);
        c.health_timeout = Duration::from_secs(2);
        c.stop_grace = Duration::from_secs(2);
        c.memory_bytes = Some(256 * 1024 * 1024);
        c.cpus = Some(1.0);
        c.pids_limit = Some(128);
        c.env = vec![
            ("EXECUTOR".into(), "native".into()),
            ("API_KEY".into(), "test-key".into()),
            ("API_BASE_URL".into(), model_url.into()),
            ("MODEL".into(), "fake-model".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        c
    }
}

impl Pool {
    /// A fake model on the network's gateway (the host, as the containers see it) and a
    /// driver whose workers call it.
    async fn driver_with_fake_model(&self) -> (FakeLlm, DockerDriver) {
        let probe = DockerDriver::connect(self.config("http://unused/v1"))
            .await
            .unwrap();
        let gateway = probe
            .network_gateway()
            .await
            .unwrap()
            .expect("the network has a gateway");
        let fake = FakeLlm::start_on(gateway).await;
        let driver = DockerDriver::connect(self.config(&format!("{}/v1", fake.url())))
            .await
            .unwrap();
        (fake, driver)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        remove_pool(&self.prefix, &self.network);
    }
}

/// The engine and the image, or `None` (skip).
fn setup(test: &str) -> Option<()> {
    if !docker_engine(test) {
        return None;
    }
    ensure_worker_image(TEST_IMAGE);
    Some(())
}

fn sid(tag: &str) -> SessionId {
    SessionId::new(format!("dk-{tag}-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

fn docker_json(args: &[&str]) -> Value {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Containers of the pool, by name filter.
fn containers_named(name: &str) -> Vec<String> {
    docker(&["ps", "-aq", "--filter", &format!("name=^/{name}$")])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_driver_conformance_suite() {
    if setup("passes_the_driver_conformance_suite").is_none() {
        return;
    }
    let pool = Pool::new("conf");
    // Nothing calls the model here; the worker only needs a model configured to start.
    let mut config = pool.config("http://127.0.0.1:9/v1");
    // Long enough that a reuse and the reaper's look fit in it on a loaded engine.
    config.idle_ttl = Duration::from_secs(3);
    driver_conformance::run(DriverSuite::per_session().idle_ttl(config.idle_ttl), || {
        let config = config.clone();
        async move {
            Arc::new(DockerDriver::connect(config).await.expect("connect"))
                as Arc<dyn ContainerDriver>
        }
    })
    .await;
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.anywork.pool={}", pool.prefix),
    ]);
    assert!(
        left.trim().is_empty(),
        "containers left after purge: {left}"
    );
    let volumes = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=io.anywork.pool={}", pool.prefix),
    ]);
    assert!(
        volumes.trim().is_empty(),
        "the suite purges its sessions, workspace volumes included: {volumes}"
    );
}

/// A client that calls `worker` with its secret (the worker refuses calls without it).
fn authed(worker: &WorkerEndpoint) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(secret) = &worker.secret {
        headers.insert(
            anywork_core::worker_api::SECRET_HEADER,
            secret.expose().parse().expect("a secret is a header value"),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("HTTP client")
}

/// Sends `message` to the worker's `/chat` and returns the SSE body.
async fn chat(http: &reqwest::Client, base: &str, session: &SessionId, message: &str) -> String {
    let request = ChatRequest {
        task_id: TaskId::generate(),
        session_id: session.clone(),
        message: message.into(),
    };
    let response = http
        .post(format!("{base}/chat"))
        .json(&request)
        .send()
        .await
        .expect("POST /chat");
    assert!(response.status().is_success(), "{}", response.status());
    response.text().await.expect("SSE body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_through_a_container_and_keeps_the_workspace_across_reaping() {
    if setup("chats_through_a_container_and_keeps_the_workspace_across_reaping").is_none() {
        return;
    }
    let pool = Pool::new("chat");
    let (fake, driver) = pool.driver_with_fake_model().await;
    fake.push(Reply::text("Hello from inside the container"));
    let s = sid("chat");

    let w1 = driver.get_worker(&s).await.unwrap();
    let soul = "You are the container test's agent.";
    let put = authed(&w1)
        .put(format!("{}/workspace/soul?session_id={s}", w1.base_url))
        .json(&json!({ "content": soul }))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let sse = chat(&authed(&w1), &w1.base_url, &s, "Say hello").await;
    assert!(
        sse.contains("Hello from inside the container"),
        "the model's answer is streamed back: {sse}"
    );
    assert!(sse.contains("event: done"), "{sse}");
    assert!(
        fake.requests().iter().any(|r| r.contains_text("Say hello")),
        "the worker in the container called the fake model"
    );

    // Idle past the TTL: reaped; the volume stays.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let reaped = driver.reap_idle(&[]).await.unwrap();
    assert_eq!(reaped, vec![s.clone()]);
    assert!(!driver.is_healthy(&w1).await, "the reaped worker is gone");
    assert!(containers_named(&driver.container_name(&s)).is_empty());
    let volume = driver.volume_name(&s);
    assert!(
        docker(&["volume", "ls", "-q"]).lines().any(|v| v == volume),
        "the workspace volume {volume} survives reaping"
    );

    // The next request gets a new container on the same workspace.
    let w2 = driver.get_worker(&s).await.unwrap();
    assert_ne!(w2.worker_id, w1.worker_id, "a new container");
    let doc: Value = authed(&w2)
        .get(format!("{}/workspace/soul?session_id={s}", w2.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["content"], soul, "SOUL.md survived: {doc}");
    let history: Value = authed(&w2)
        .get(format!("{}/sessions/{s}/messages", w2.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = history.to_string();
    assert!(
        text.contains("Say hello") && text.contains("Hello from inside the container"),
        "the conversation survived: {text}"
    );

    // Deleting the session: the trait's purge removes the container and the volume.
    ContainerDriver::purge(&driver, &s).await.unwrap();
    assert!(!driver.is_healthy(&w2).await, "the purged worker is gone");
    assert!(containers_named(&driver.container_name(&s)).is_empty());
    assert!(
        !docker(&["volume", "ls", "-q"]).lines().any(|v| v == volume),
        "purge deletes the volume"
    );
    ContainerDriver::purge(&driver, &s)
        .await
        .expect("purging again is not an error");

    // The session could start over, on an empty workspace.
    let w3 = driver.get_worker(&s).await.unwrap();
    let doc: Value = authed(&w3)
        .get(format!("{}/workspace/soul?session_id={s}", w3.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(doc["content"], soul, "a purged workspace is gone: {doc}");
    ContainerDriver::purge(&driver, &s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_limited_labelled_and_unprivileged() {
    if setup("workers_are_limited_labelled_and_unprivileged").is_none() {
        return;
    }
    let pool = Pool::new("sec");
    let driver = DockerDriver::connect(pool.config("http://127.0.0.1:9/v1"))
        .await
        .unwrap();
    let s = SessionId::new(format!("Owner/Repo#7-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let w = driver.get_worker(&s).await.unwrap();
    let inspect = docker_json(&["inspect", &w.worker_id]);
    let c = &inspect[0];
    let host = &c["HostConfig"];
    assert_eq!(host["Memory"], 256 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 1_000_000_000_i64);
    assert_eq!(host["PidsLimit"], 128);
    assert_eq!(host["Privileged"], false);
    assert_eq!(host["ReadonlyRootfs"], true);
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(
        host["SecurityOpt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.as_str().unwrap().starts_with("no-new-privileges")),
        "{host}"
    );
    assert!(host["Tmpfs"]["/tmp"].is_string(), "{host}");
    assert_eq!(c["Config"]["User"], "10001:10001");
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["io.anywork.session"], s.as_str(), "the raw id");
    assert_eq!(labels["io.anywork.managed"], "true");
    assert_eq!(
        c["Name"],
        format!("/{}", driver.container_name(&s)),
        "named from the session slug"
    );
    let mounts = c["Mounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["Destination"] == "/workspace"
            && m["Type"] == "volume"
            && m["Name"] == driver.volume_name(&s)),
        "{mounts:?}"
    );
    let networks = c["NetworkSettings"]["Networks"].as_object().unwrap();
    assert_eq!(
        networks.keys().collect::<Vec<_>>(),
        vec![&pool.network],
        "only on its network"
    );

    // From inside: not root, no capabilities, root read-only, /tmp and /workspace writable.
    let script = "while read k v rest; do case $k in Uid:|CapEff:|NoNewPrivs:) echo $k $v;; esac; done < /proc/self/status; \
                  (echo x > /probe) 2>/dev/null && echo root-writable || echo root-readonly; \
                  echo x > /tmp/probe && echo tmp-writable; \
                  echo x > /workspace/probe && echo workspace-writable";
    let out = docker(&["exec", &w.worker_id, "/bin/sh", "-c", script]);
    assert!(out.contains("Uid: 10001"), "{out}");
    assert!(out.contains("CapEff: 0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs: 1"), "{out}");
    assert!(out.contains("root-readonly"), "{out}");
    assert!(out.contains("tmp-writable"), "{out}");
    assert!(out.contains("workspace-writable"), "{out}");
    driver.purge(&s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_container_is_replaced_and_racing_drivers_share_one() {
    if setup("a_dead_container_is_replaced_and_racing_drivers_share_one").is_none() {
        return;
    }
    let pool = Pool::new("dead");
    let config = pool.config("http://127.0.0.1:9/v1");
    // Two instances: two processes' worth of locks, racing on the engine's name.
    let a = DockerDriver::connect(config.clone()).await.unwrap();
    let b = DockerDriver::connect(config).await.unwrap();
    let s = sid("race");
    let (wa, wb) = tokio::join!(a.get_worker(&s), b.get_worker(&s));
    let (wa, wb) = (wa.unwrap(), wb.unwrap());
    assert_eq!(wa, wb, "one container for both");
    assert_eq!(containers_named(&a.container_name(&s)).len(), 1);

    docker(&["kill", &wa.worker_id]);
    assert!(!a.is_healthy(&wa).await);
    let back = a.get_worker(&s).await.unwrap();
    assert_ne!(
        back.worker_id, wa.worker_id,
        "the exited container is replaced"
    );
    assert!(a.is_healthy(&back).await);
    assert_eq!(
        containers_named(&a.container_name(&s)).len(),
        1,
        "the old one was removed"
    );
    // The other instance, whose cached endpoint is dead, finds the replacement.
    assert_eq!(b.get_worker(&s).await.unwrap(), back);
    a.purge(&s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_not_found_with_how_to_build_it() {
    if !docker_engine("a_missing_image_is_not_found_with_how_to_build_it") {
        return;
    }
    let pool = Pool::new("img");
    let mut config = pool.config("http://127.0.0.1:9/v1");
    config.image = format!(
        "anywork-worker:missing-{}",
        &pool.prefix[4..pool.prefix.len() - 1]
    );
    let driver = DockerDriver::connect(config.clone()).await.unwrap();
    let e = driver.get_worker(&sid("img")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&config.image), "{e}");
    assert!(e.to_string().contains("build-worker-image.sh"), "{e}");

    // The set-up check finds it before any task: the engine answers, the image is missing.
    let checks = driver.check_setup().await;
    let by_name = |n: &str| checks.iter().find(|c| c.name == n).cloned().unwrap();
    assert!(by_name("engine").ok, "{checks:?}");
    let image = by_name("image");
    assert!(!image.ok, "{checks:?}");
    assert!(image.message.contains(&config.image), "{image:?}");
    assert!(image.message.contains("build-worker-image.sh"), "{image:?}");
    assert!(
        by_name("model").ok,
        "the pool's workers get API_KEY: {checks:?}"
    );

    // With the image there and no model for the workers, the model is what is missing. (Built
    // here: on a fresh machine no other test may have built it yet.)
    ensure_worker_image(TEST_IMAGE);
    let mut config = pool.config("http://127.0.0.1:9/v1");
    config.env.clear();
    let checks = DockerDriver::connect(config)
        .await
        .unwrap()
        .check_setup()
        .await;
    assert!(
        checks.iter().find(|c| c.name == "image").unwrap().ok,
        "{checks:?}"
    );
    let model = checks.iter().find(|c| c.name == "model").unwrap();
    assert!(
        !model.ok && model.message.contains("ANTHROPIC_API_KEY"),
        "{model:?}"
    );
}

#[tokio::test]
async fn an_unreachable_engine_is_unavailable() {
    let mut config = DockerConfig::new(TEST_IMAGE);
    config.docker_host = Some("unix:///nonexistent/docker.sock".into());
    let e = DockerDriver::connect(config).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("/nonexistent/docker.sock"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_is_reported_with_its_output() {
    if setup("a_worker_that_cannot_start_is_reported_with_its_output").is_none() {
        return;
    }
    let pool = Pool::new("bad");
    let mut config = pool.config("http://127.0.0.1:9/v1");
    // No model configured: the worker exits at once, saying which variable to set.
    config.env.clear();
    // A long start-up allowance: the dead container is noticed, not waited out (the call
    // below would otherwise take ten minutes and the message would be about /health).
    config.ready_timeout = Duration::from_secs(600);
    let driver = DockerDriver::connect(config).await.unwrap();
    let s = sid("bad");
    let asked = std::time::Instant::now();
    let e = driver.get_worker(&s).await.unwrap_err();
    // Printed for the record (not asserted): the time to tell a dead worker.
    eprintln!(
        "a worker that cannot start was reported after {:?}",
        asked.elapsed()
    );
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let message = e.to_string();
    assert!(message.contains("API_KEY"), "the worker's own message: {e}");
    assert!(
        // Depending on how fast it dies: seen by the start-up watch, or already gone from
        // the network when the driver looked for its address.
        (message.contains("stopped before the worker answered")
            || message.contains("no address on the network"))
            && message.contains("exited"),
        "the container's end is told: {e}"
    );
    assert!(
        !message.contains("/health") && !message.contains("http://"),
        "no health wait, no internal address: {e}"
    );
    assert!(
        containers_named(&driver.container_name(&s)).is_empty(),
        "the broken container is removed"
    );
}

/// A worker that runs but stopped answering (here: its process frozen with SIGSTOP) is
/// replaced once it is past its start-up time, instead of failing every `get_worker` after
/// the ready timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_worker_past_its_start_up_time_is_replaced() {
    if setup("a_wedged_worker_past_its_start_up_time_is_replaced").is_none() {
        return;
    }
    let pool = Pool::new("wedged");
    let mut config = pool.config("http://127.0.0.1:9/v1");
    config.ready_timeout = Duration::from_secs(3);
    config.health_timeout = Duration::from_secs(1);
    let driver = DockerDriver::connect(config).await.unwrap();
    let s = sid("wedged");
    let first = driver.get_worker(&s).await.unwrap();
    docker(&["kill", "--signal=SIGSTOP", &first.worker_id]);
    assert!(
        !driver.is_healthy(&first).await,
        "the frozen worker is mute"
    );
    let state = docker_json(&["inspect", &first.worker_id]);
    assert_eq!(state[0]["State"]["Status"], "running", "and still running");
    // Past its start-up time (3 s here), the next call replaces it rather than failing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = driver.get_worker(&s).await.unwrap();
    assert_ne!(back.worker_id, first.worker_id, "a new container");
    assert!(driver.is_healthy(&back).await);
    assert_eq!(containers_named(&driver.container_name(&s)).len(), 1);
    driver.purge(&s).await.unwrap();
}

/// The image is the real one (`deploy/build-worker-image.sh`): the native agent's `bash` tool
/// runs in it, with git and the Claude Code CLI on its PATH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gets_a_real_shell_with_git_and_claude_in_the_image() {
    if setup("the_agent_gets_a_real_shell_with_git_and_claude_in_the_image").is_none() {
        return;
    }
    let pool = Pool::new("shell");
    let (fake, driver) = pool.driver_with_fake_model().await;
    let command = "echo sum=$((6*7)); set -o pipefail; git --version; \
                   (claude --version || echo no-claude) | head -n1; echo shell=$BASH_VERSION";
    fake.push_all([
        Reply::tool_use("t1", "bash", json!({ "command": command })),
        Reply::text("ran it"),
    ]);
    let s = sid("shell");
    let worker = driver.get_worker(&s).await.unwrap();
    let sse = chat(&authed(&worker), &worker.base_url, &s, "Run the checks").await;
    assert!(sse.contains("ran it"), "{sse}");
    let results: Vec<String> = fake
        .requests()
        .iter()
        .flat_map(|r| r.tool_results().into_iter().map(|v| v.to_string()))
        .collect();
    let out = results.join("\n");
    assert!(out.contains("sum=42"), "bash ran the command: {out}");
    assert!(out.contains("git version"), "git is in the image: {out}");
    assert!(out.contains("shell=5."), "bash is the shell: {out}");
    if anywork_test::bins::find_claude().is_some() {
        assert!(
            out.contains("(Claude Code)"),
            "the claude CLI is in the image: {out}"
        );
    }
    ContainerDriver::purge(&driver, &s).await.unwrap();
}
