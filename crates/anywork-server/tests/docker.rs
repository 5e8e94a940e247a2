//! The dispatcher on the Docker driver, against this machine's Docker engine: a worker
//! container killed mid-task fails its task with a reason, and a restarted dispatcher (a new
//! driver instance) adopts the running container instead of starting another. Without an
//! engine the tests print a loud skip (and fail when `CI` is set).

#![cfg(feature = "docker")]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anywork_core::{ContainerDriver, SessionId, TaskId, TaskRequest, TaskStatus, TaskStore};
use anywork_drivers::{DockerConfig, DockerDriver};
use anywork_runtime::{Dispatcher, DispatcherConfig};
use anywork_store::MemoryStore;
use anywork_test::docker_image::{TEST_IMAGE, docker_engine, ensure_worker_image, remove_pool};
use anywork_test::fake_llm::{FakeLlm, Reply};

const WAIT: Duration = Duration::from_secs(30);

/// This test's name prefix and network, removed on drop (also after a panic).
struct Pool {
    prefix: String,
    network: String,
}

impl Pool {
    fn new(tag: &str) -> Pool {
        let run = TaskId::generate().to_string().replace('-', "");
        let prefix = format!("aws-{tag}-{}-", &run[run.len() - 8..]);
        Pool {
            network: format!("{prefix}net"),
            prefix,
        }
    }

    fn config(&self, model_url: &str) -> DockerConfig {
        let mut c = DockerConfig::new(TEST_IMAGE);
        c.network = self.network.clone();
        c.name_prefix = self.prefix.clone();
        c.ready_timeout = Duration::from_secs(30);
        c.stop_grace = Duration::from_secs(2);
        c.memory_bytes = Some(256 * 1024 * 1024);
        c.env = vec![
            ("EXECUTOR".into(), "native".into()),
            ("API_KEY".into(), "test-key".into()),
            ("API_BASE_URL".into(), model_url.into()),
            ("MODEL".into(), "fake-model".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        c
    }

    /// A fake model on the network's gateway (reachable from the containers) and a driver
    /// whose workers use it.
    async fn start(&self) -> (FakeLlm, DockerConfig) {
        let probe = DockerDriver::connect(self.config("http://unused/v1"))
            .await
            .expect("connect to the Docker engine");
        let gateway = probe
            .network_gateway()
            .await
            .unwrap()
            .expect("the network has a gateway");
        let fake = FakeLlm::start_on(gateway).await;
        let config = self.config(&format!("{}/v1", fake.url()));
        (fake, config)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        remove_pool(&self.prefix, &self.network);
    }
}

fn setup(test: &str) -> bool {
    if !docker_engine(test) {
        return false;
    }
    ensure_worker_image(TEST_IMAGE);
    true
}

async fn dispatcher(store: Arc<MemoryStore>, driver: Arc<DockerDriver>) -> Dispatcher {
    let mut config = DispatcherConfig::default();
    config.reap_every = None;
    Dispatcher::builder(store, driver)
        .config(config)
        .start()
        .await
        .expect("start the dispatcher")
}

async fn wait_for(store: &MemoryStore, task: TaskId, want: &[TaskStatus]) -> anywork_core::Task {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = store.get_task(task).await.unwrap();
        if want.contains(&t.status) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task} is still {:?} (error {:?})",
            t.status,
            t.error
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn containers_of(pool: &Pool) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-q", "--no-trunc", "--filter"])
        .arg(format!("label=io.anywork.pool={}", pool.prefix))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_mid_task_fails_the_task_with_a_reason() {
    if !setup("a_container_killed_mid_task_fails_the_task_with_a_reason") {
        return;
    }
    let pool = Pool::new("kill");
    let (fake, config) = pool.start().await;
    // The model never finishes its answer: the task is mid-run when the container dies.
    fake.set_responder(|_| Reply::hang());
    let store = Arc::new(MemoryStore::new());
    let driver = Arc::new(DockerDriver::connect(config).await.unwrap());
    let d = dispatcher(store.clone(), driver.clone()).await;

    let submitted = d
        .submit(TaskRequest::new("webchat", "a long job"))
        .await
        .unwrap();
    let task = submitted.task.id;
    assert!(
        fake.wait_for_requests(1, WAIT).await,
        "the worker in the container called the model"
    );
    let running = wait_for(&store, task, &[TaskStatus::Running]).await;
    let worker = running
        .worker_id
        .clone()
        .expect("a running task names its worker");
    assert_eq!(containers_of(&pool), vec![worker.clone()]);

    let killed = Command::new("docker")
        .args(["kill", &worker])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");

    let failed = wait_for(
        &store,
        task,
        &[
            TaskStatus::Failed,
            TaskStatus::Completed,
            TaskStatus::Canceled,
        ],
    )
    .await;
    assert_eq!(failed.status, TaskStatus::Failed, "{failed:?}");
    let reason = failed.error.clone().unwrap_or_default();
    assert!(
        !reason.trim().is_empty(),
        "a failed task says why: {failed:?}"
    );
    eprintln!("the killed container's task failed with: {reason}");

    // The session goes on: its next task gets a new container.
    fake.set_responder(|_| Reply::text("back again"));
    let mut next = TaskRequest::new("webchat", "are you there?");
    next.session_id = Some(running.session_id.clone());
    let next = d.submit(next).await.unwrap().task.id;
    let done = wait_for(&store, next, &[TaskStatus::Completed, TaskStatus::Failed]).await;
    assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
    assert_eq!(done.result.as_deref(), Some("back again"));
    assert_ne!(done.worker_id.as_deref(), Some(worker.as_str()));

    d.shutdown(Duration::from_secs(5)).await;
    driver.purge(&running.session_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dispatcher_adopts_the_running_container() {
    if !setup("a_restarted_dispatcher_adopts_the_running_container") {
        return;
    }
    let pool = Pool::new("adopt");
    let (fake, config) = pool.start().await;
    fake.set_responder(|_| Reply::text("done"));
    let store = Arc::new(MemoryStore::new());

    let first = dispatcher(
        store.clone(),
        Arc::new(DockerDriver::connect(config.clone()).await.unwrap()),
    )
    .await;
    let submitted = first
        .submit(TaskRequest::new("webchat", "first"))
        .await
        .unwrap();
    let session: SessionId = submitted.task.session_id.clone();
    let t1 = wait_for(
        &store,
        submitted.task.id,
        &[TaskStatus::Completed, TaskStatus::Failed],
    )
    .await;
    assert_eq!(t1.status, TaskStatus::Completed, "{t1:?}");
    let worker = t1.worker_id.clone().expect("worker id recorded");
    first.shutdown(Duration::from_secs(5)).await;
    drop(first);

    // A new process's worth: a new driver instance and dispatcher over the same store.
    let driver = Arc::new(DockerDriver::connect(config).await.unwrap());
    let listed = driver.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|w| w.endpoint.worker_id == worker && w.session_id.as_ref() == Some(&session)),
        "the new driver lists the running container: {listed:?}"
    );
    let second = dispatcher(store.clone(), driver.clone()).await;
    let mut again = TaskRequest::new("webchat", "second");
    again.session_id = Some(session.clone());
    let t2 = second.submit(again).await.unwrap().task.id;
    let t2 = wait_for(&store, t2, &[TaskStatus::Completed, TaskStatus::Failed]).await;
    assert_eq!(t2.status, TaskStatus::Completed, "{t2:?}");
    assert_eq!(
        t2.worker_id.as_deref(),
        Some(worker.as_str()),
        "the same container, adopted"
    );
    assert_eq!(containers_of(&pool), vec![worker], "no second container");
    second.shutdown(Duration::from_secs(5)).await;
    driver.purge(&session).await.unwrap();
}
