//! Faults injected around a real worker process and a real SQLite store (issue 15): a store
//! that cannot write (readiness), retention, a frozen worker (SIGSTOP), store outages during
//! a run (retried, requeued, or failed with the real reason), and a follower whose run ended
//! without its `done`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anywork_core::TaskStore;
use anywork_runtime::{Backoff, DispatcherConfig, FirstWords, Retention};
use anywork_store::SqliteStore;
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_test::faulty_store::FaultyStore;
use common::{TestServer, WAIT, WorkerProcess, free_port};
use serde_json::{Value, json};

/// A server over a [`FaultyStore`] around a real SQLite store.
async fn server_over_faults(
    worker_url: &str,
    config: DispatcherConfig,
) -> (TestServer, Arc<FaultyStore>) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn TaskStore> = Arc::new(SqliteStore::open_in_dir(dir.path()).await.unwrap());
    let faulty = FaultyStore::new(sqlite);
    let server = TestServer::start_on(dir, faulty.clone(), worker_url, config, FirstWords).await;
    (server, faulty)
}

async fn wait_status(server: &TestServer, task: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, t) = server.get(&format!("/api/tasks/{task}")).await;
        if t["status"] == want {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task} never became {want}: {t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every log of a task is numbered 1.. without a gap and ends with exactly one `done`.
fn assert_gap_free_with_one_done(logs: &[Value]) {
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(l["seq"], json!(i as u64 + 1), "{logs:?}");
    }
    let dones = logs.iter().filter(|l| l["type"] == "done").count();
    assert_eq!(dones, 1, "{logs:?}");
    assert_eq!(logs.last().unwrap()["type"], "done", "{logs:?}");
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("the worker runs").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_store_cannot_write_and_200_once_it_can() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let (server, faults) = server_over_faults(&url, DispatcherConfig::default()).await;
    let (s, b) = server.get("/api/health").await;
    assert_eq!(s, 200, "{b}");
    faults.down();
    let (s, b) = server.get("/api/health").await;
    assert_eq!(s, 503, "{b}");
    assert_eq!(b["status"], "unavailable");
    assert_eq!(b["error"]["code"], "unavailable", "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("locked"),
        "the reason: {b}"
    );
    // Intake says the same.
    let (s, b) = server.post("/api/tasks", json!({"message": "hi"})).await;
    assert_eq!(s, 503, "{b}");
    faults.up();
    let (s, b) = server.get("/api/health").await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_finished_logs_keeps_the_tasks_and_measures_the_store() {
    let fake = FakeLlm::start().await;
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.retention.max_age = Some(Duration::ZERO);
    // Rounds are run by hand below.
    config.retention.every = Duration::from_secs(3600);
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;
    fake.push(Reply::text("kept for a while"));
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let id = created["taskId"].as_str().unwrap().to_owned();
    let task = server.wait_final(&id).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert!(!server.logs(&id).await.is_empty());

    let round = server.dispatcher().run_retention().await.unwrap();
    assert_eq!(round.tasks, 1, "{round:?}");
    assert!(round.events >= 2, "{round:?}");
    assert!(round.store_bytes.unwrap() > 0, "{round:?}");
    assert!(server.logs(&id).await.is_empty(), "the log is gone");
    let (s, kept) = server.get(&format!("/api/tasks/{id}")).await;
    assert_eq!((s, &kept["result"]), (200, &json!("kept for a while")));

    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bytes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("anywork_store_bytes "))
        .expect("the store size metric")
        .parse()
        .unwrap();
    assert!(bytes > 0.0, "{metrics}");
    assert!(
        metrics.contains("anywork_retention_deleted_total{what=\"tasks\"} 1"),
        "{metrics}"
    );
}

/// A size budget deletes the logs of the tasks finished longest ago until the store fits (or
/// nothing finished is left), and leaves unfinished tasks alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_budget_deletes_the_oldest_finished_logs() {
    let fake = FakeLlm::start().await;
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.retention = Retention::default();
    config.retention.max_bytes = Some(1);
    config.retention.every = Duration::from_secs(3600);
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        fake.push(Reply::text(format!("answer {i}")));
        let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
        let id = created["taskId"].as_str().unwrap().to_owned();
        server.wait_final(&id).await;
        ids.push(id);
    }
    let round = server.dispatcher().run_retention().await.unwrap();
    assert_eq!(round.tasks, 3, "{round:?}");
    for id in &ids {
        assert!(server.logs(id).await.is_empty());
    }
}

/// Issue 15, defect 2: a frozen worker (SIGSTOP) no longer holds its task for half an hour.
/// While it is alive but quiet its keep-alives hold the stream open; frozen, the stream goes
/// silent and the task fails after the idle timeout with the reason; a cancel answers at once
/// (202 `canceling`) and the task ends canceled after the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_noticed_and_cancel_answers_at_once() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::hang());
    let dir = tempfile::tempdir().unwrap();
    let worker =
        WorkerProcess::start_with_env(&fake, dir.path(), &[("SSE_KEEP_ALIVE_SECONDS", "0.2")])
            .await;
    let mut config = DispatcherConfig::default();
    // Both longer than the cancel's answer (2 s at most): the answer comes before the end.
    config.stream_idle_timeout = Duration::from_secs(3);
    config.cancel_grace = Duration::from_secs(4);
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;

    // Alive but quiet (the model hangs): keep-alives hold it past the idle timeout.
    let (_, created) = server.post("/api/tasks", json!({"message": "think"})).await;
    let quiet = created["taskId"].as_str().unwrap().to_owned();
    wait_status(&server, &quiet, "running").await;
    assert!(fake.wait_for_requests(1, WAIT).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, t) = server.get(&format!("/api/tasks/{quiet}")).await;
    assert_eq!(t["status"], "running", "keep-alives hold the stream: {t}");

    // Frozen: the stream goes silent and the task fails with the reason.
    signal(&worker.child, "-STOP");
    let failed = server.wait_final(&quiet).await;
    signal(&worker.child, "-CONT");
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("sent nothing for 3 s"), "{error}");
    assert_gap_free_with_one_done(&server.logs(&quiet).await);

    // Cancel of a task on a frozen worker: answered at once, ended after the grace. A server
    // whose idle timeout is longer than the grace, so that it is the cancel that ends it.
    let mut config = DispatcherConfig::default();
    config.stream_idle_timeout = Duration::from_secs(60);
    config.cancel_grace = Duration::from_secs(4);
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;
    let (_, created) = server.post("/api/tasks", json!({"message": "again"})).await;
    let stuck = created["taskId"].as_str().unwrap().to_owned();
    wait_status(&server, &stuck, "running").await;
    assert!(fake.wait_for_requests(2, WAIT).await);
    signal(&worker.child, "-STOP");
    let (s, b) = server
        .post(&format!("/api/tasks/{stuck}/cancel"), json!({}))
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "canceling", "{b}");
    let canceled = server.wait_final(&stuck).await;
    signal(&worker.child, "-CONT");
    assert_eq!(canceled["status"], "canceled", "{canceled}");
    assert_gap_free_with_one_done(&server.logs(&stuck).await);
}

/// Issue 15, defect 3: a store outage in the middle of a run is ridden out by retries: the
/// task completes, its log is gap-free with one `done`, and the WebSocket client sees it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_mid_run_is_retried_and_the_task_completes() {
    let fake = FakeLlm::start().await;
    fake.push(
        Reply::text("one two three four five six seven eight nine")
            .with_event_delay(Duration::from_millis(300)),
    );
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.store_retry = Backoff::new(40, Duration::from_millis(100), Duration::from_millis(200));
    let (server, faults) = server_over_faults(&worker.url, config).await;
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "count").await;
    // The first text event is stored; then the store goes away for a while.
    ws.recv_until(|v| v["type"] == "text").await;
    faults.down_for(Duration::from_millis(1500));
    let events = ws.events_until_done(&task).await;
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "completed", "{events:?}");
    assert!(faults.injected() > 0, "the outage was hit");
    let logs = server.logs(&task).await;
    assert_gap_free_with_one_done(&logs);
    let t = server.wait_final(&task).await;
    assert_eq!(t["status"], "completed", "{t}");
}

/// A task whose claim (`pending → running`) the store refused (after the run's retries) is
/// queued again and runs once the store is back, instead of staying pending until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_start_failed_is_queued_again() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("started in the end"));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.store_retry = Backoff::new(2, Duration::from_millis(50), Duration::from_millis(100));
    let (server, faults) = server_over_faults(&worker.url, config).await;
    faults.down_for_ops(&["claim_task"], Duration::from_millis(1500));
    let (s, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    assert_eq!(s, 202, "{created}");
    let id = created["taskId"].as_str().unwrap().to_owned();
    let task = server.wait_final(&id).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], "started in the end");
    assert!(
        faults.injected() > 2,
        "the start was refused more than once"
    );
    let logs = server.logs(&id).await;
    assert_gap_free_with_one_done(&logs);
    let running = logs
        .iter()
        .filter(|l| l["type"] == "status" && l["content"] == "running")
        .count();
    assert_eq!(running, 1, "{logs:?}");
}

/// A run whose events the store keeps refusing stops with that reason (not "the server
/// stopped"), and its follower gets the `done` saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_store_its_events_fails_with_the_real_reason() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("lost words").with_event_delay(Duration::from_millis(100)));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.store_retry = Backoff::new(3, Duration::from_millis(50), Duration::from_millis(50));
    let (server, faults) = server_over_faults(&worker.url, config).await;
    faults.down_for_ops(&["append_logs"], Duration::from_secs(3600));
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "speak").await;
    let events = ws.events_until_done(&task).await;
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "failed", "{events:?}");
    let error = done["metadata"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("could not be stored"), "{done}");
    assert!(error.contains("locked"), "the store's own words: {done}");
    let t = server.wait_final(&task).await;
    assert_eq!(t["status"], "failed");
    faults.up();
    assert_gap_free_with_one_done(&server.logs(&task).await);
}

/// A run that could store neither its events nor its outcome ends without a `done`; its
/// follower keeps reading the log, where lease recovery writes the `done` — with the run's
/// real reason — once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_run_ended_without_done_reads_it_from_the_log() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("a b c d e f").with_event_delay(Duration::from_millis(300)));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.store_retry = Backoff::new(3, Duration::from_millis(50), Duration::from_millis(50));
    config.lease_ttl = Duration::from_secs(1);
    let (server, faults) = server_over_faults(&worker.url, config).await;
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "speak").await;
    ws.recv_until(|v| v["type"] == "text").await;
    faults.down_for(Duration::from_secs(3));
    let events = ws.events_until_done(&task).await;
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "failed", "{events:?}");
    let error = done["metadata"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("could not be stored"), "{done}");
    assert!(!error.contains("stopped before it finished"), "{done}");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_gap_free_with_one_done(&server.logs(&task).await);
}

/// A follower whose reads of the task and its log fail for a while (a database pool timing
/// out under load) reads again, as the run's writes do, and its client gets every event and
/// the `done`, instead of an error while the task goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_store_reads_fail_for_a_while_still_gets_every_event() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("one two three"));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.store_retry = Backoff::new(6, Duration::from_millis(20), Duration::from_millis(50));
    let (server, faults) = server_over_faults(&worker.url, config).await;
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "speak").await;
    ws.events_until_done(&task).await;
    let logs = server.logs(&task).await;
    assert_gap_free_with_one_done(&logs);

    // A client coming back for the whole task while the store fails its next log reads.
    let before = faults.injected();
    faults.fail_next_log_reads(4);
    let mut again = server.ws().await;
    again
        .send(json!({"type": "resume", "task_id": task, "after_seq": 0}))
        .await;
    let events = again.events_until_done(&task).await;
    assert_eq!(
        faults.injected() - before,
        4,
        "the reads failed as injected"
    );
    assert!(
        events.iter().all(|e| e["type"] != "error"),
        "no error reached the client: {events:?}"
    );
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let want: Vec<u64> = (1..=logs.len() as u64).collect();
    assert_eq!(seqs, want, "every event once, in order: {events:?}");
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");

    // Log reads that keep failing past the retries end the follow with the error: the client is
    // told, not left waiting.
    faults.fail_next_log_reads(1_000);
    let mut third = server.ws().await;
    third
        .send(json!({"type": "resume", "task_id": task, "after_seq": 0}))
        .await;
    let error = third.recv_until(|v| v["type"] == "error").await;
    let error = error.last().unwrap();
    assert!(
        error["content"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{error}"
    );
    faults.fail_next_log_reads(0);
}

/// Issue 15, item 8: a WebSocket message over the limit closes the socket with 1009 ("too
/// big") and a reason, not a bare disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_closes_with_1009() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let url = format!("http://127.0.0.1:{}", free_port());
    let server = TestServer::start_with(&url, DispatcherConfig::default(), FirstWords).await;
    let ws_url = format!("{}/ws", server.url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let huge = format!(
        "{{\"type\":\"chat\",\"message\":\"{}\"}}",
        "x".repeat(3 * 1024 * 1024)
    );
    // The server may close before the whole message is written.
    let _ = ws.send(Message::Text(huge.into())).await;
    let close = tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => continue,
                Err(e) => panic!("no close frame, but {e}"),
            }
        }
        None
    })
    .await
    .expect("a close frame in time")
    .expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    assert!(close.reason.contains("limit"), "{close:?}");
}

/// The server reads the socket 1 KiB at a time (an idle connection keeps only that much): a
/// message a thousand times larger still arrives whole, and the connection goes on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_far_larger_than_the_read_buffer_arrives_whole() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let server = TestServer::start_with(&url, DispatcherConfig::default(), FirstWords).await;
    let mut ws = server.ws().await;
    // Not one repeated byte: a misplaced or lost chunk would show in the comparison.
    let message: String = (0..1024 * 1024)
        .map(|i: u32| char::from(b'a' + (i % 23) as u8))
        .collect();
    let (_, task, _) = ws.chat(None, &message).await;
    let (status, stored) = server.get(&format!("/api/tasks/{task}")).await;
    assert_eq!(status, 200, "{stored}");
    assert!(
        stored["message"].as_str() == Some(message.as_str()),
        "the message came in altered"
    );
    ws.send(json!({"type": "ping"})).await;
    let pong = ws.recv_until(|v| v["type"] == "pong").await;
    assert_eq!(pong.last().unwrap()["type"], "pong");
}

/// A TCP proxy on loopback in front of the worker that can stall (stop forwarding, keep the
/// connections open) or cut (close every connection) what passes through it.
struct Proxy {
    url: String,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (flag, cuts) = (stalled.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pump(cr, sw, flag.clone(), cuts.subscribe()));
                tokio::spawn(pump(sr, cw, flag.clone(), cuts.subscribe()));
            }
        });
        Proxy { url, stalled, cut }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Copies `from` to `to`, holding the bytes while `stalled`, until either side closes or a cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            _ = cut.changed() => return,
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        while stalled.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::select! {
                _ = cut.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The connection between server and worker stalled (bytes stop, sockets stay open) is the
/// same silence as a frozen worker: the task fails after the idle timeout with the reason. Cut
/// (the connections closed), the task fails at once saying the connection broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_cut_connection_to_the_worker_fails_the_task_with_the_reason() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::hang());
    let dir = tempfile::tempdir().unwrap();
    let worker =
        WorkerProcess::start_with_env(&fake, dir.path(), &[("SSE_KEEP_ALIVE_SECONDS", "0.2")])
            .await;
    let proxy = Proxy::start(&worker.url).await;
    let mut config = DispatcherConfig::default();
    config.stream_idle_timeout = Duration::from_secs(2);
    let server = TestServer::start_with(&proxy.url, config, FirstWords).await;

    let (_, created) = server.post("/api/tasks", json!({"message": "one"})).await;
    let stalled = created["taskId"].as_str().unwrap().to_owned();
    wait_status(&server, &stalled, "running").await;
    assert!(fake.wait_for_requests(1, WAIT).await);
    proxy.stall(true);
    let failed = server.wait_final(&stalled).await;
    proxy.stall(false);
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("sent nothing for 2 s"), "{error}");
    assert_gap_free_with_one_done(&server.logs(&stalled).await);

    let (_, created) = server.post("/api/tasks", json!({"message": "two"})).await;
    let cut = created["taskId"].as_str().unwrap().to_owned();
    wait_status(&server, &cut, "running").await;
    assert!(fake.wait_for_requests(2, WAIT).await);
    proxy.cut_all();
    let failed = server.wait_final(&cut).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("connection to the worker broke"), "{error}");
    assert_gap_free_with_one_done(&server.logs(&cut).await);
}
