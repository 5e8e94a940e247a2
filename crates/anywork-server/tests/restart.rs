//! Restart recovery with the real `anywork-server` binary: killed mid-task, started again on
//! the same database, it fails the orphaned task with the reason and runs the queued one.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anywork_test::fake_llm::{FakeLlm, Reply};
use common::{WAIT, WorkerProcess, free_port, wait_healthy};
use serde_json::{Value, json};

fn start_server(db_dir: &std::path::Path, worker_url: &str) -> (tokio::process::Child, String) {
    start_server_with(db_dir, worker_url, "1")
}

fn start_server_with(
    db_dir: &std::path::Path,
    worker_url: &str,
    lease_ttl_seconds: &str,
) -> (tokio::process::Child, String) {
    start_server_env(
        db_dir,
        worker_url,
        &[("LEASE_TTL_SECONDS", lease_ttl_seconds)],
    )
}

fn start_server_env(
    db_dir: &std::path::Path,
    worker_url: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    let port = free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_anywork-server"))
        .env_clear()
        .envs(env.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SERVER_PORT", port.to_string())
        .env("DB_DIR", db_dir)
        .env("CONTAINER_DRIVER", "static")
        .env("STATIC_WORKER_URL", worker_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start anywork-server");
    (child, format!("http://127.0.0.1:{port}"))
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

async fn wait_status(url: &str, task: &str, want: &[&str]) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = get(&format!("{url}/api/tasks/{task}")).await;
        if want.contains(&t["status"].as_str().unwrap_or_default()) {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "task {task}: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_no_task_running_forever() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::hang());
    // A worker that stops a run as soon as its server is gone: nothing to re-attach to.
    let ws = tempfile::tempdir().unwrap();
    let worker =
        WorkerProcess::start_with_env(&fake, ws.path(), &[("DETACH_GRACE_SECONDS", "0")]).await;
    let db = tempfile::tempdir().unwrap();
    let (mut server, url) = start_server(db.path(), &worker.url);
    wait_healthy(&format!("{url}/api/health")).await;

    let http = reqwest::Client::new();
    let first: Value = http
        .post(format!("{url}/api/tasks"))
        .json(&json!({"message": "this hangs"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t1 = first["taskId"].as_str().unwrap().to_owned();
    let session = first["sessionId"].as_str().unwrap().to_owned();
    let second: Value = http
        .post(format!("{url}/api/tasks"))
        .json(&json!({"message": "queued behind", "session_id": session}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t2 = second["taskId"].as_str().unwrap().to_owned();
    wait_status(&url, &t1, &["running"]).await;
    assert!(fake.wait_for_requests(1, WAIT).await);

    // Crash: no graceful shutdown, the lease is left behind.
    server.kill().await.unwrap();
    fake.set_responder(|_| Reply::text("recovered"));
    let (_server, url) = start_server(db.path(), &worker.url);
    wait_healthy(&format!("{url}/api/health")).await;

    let t1 = wait_status(&url, &t1, &["failed", "completed", "canceled"]).await;
    assert_eq!(t1["status"], "failed", "{t1}");
    let error = t1["error"].as_str().unwrap();
    assert!(error.contains("stopped before it finished"), "{error}");
    let logs = get(&format!(
        "{url}/api/tasks/{}/logs",
        t1["id"].as_str().unwrap()
    ))
    .await;
    let last = logs["logs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["type"], "done", "followers learn the end");

    let t2 = wait_status(&url, &t2, &["failed", "completed", "canceled"]).await;
    assert_eq!(
        t2["status"], "completed",
        "the queued task ran after the restart: {t2}"
    );
    assert_eq!(t2["result"], "recovered");
}

async fn post(url: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}/api/tasks"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

/// Issue 15, defects 4 and 5: after kill -9, the restarted server knows its previous run's
/// leases are dead (its name is kept in DB_DIR), so the 30 tasks it was running end as
/// interrupted at once — with the default 30 s lease, long before it expires — and each
/// session's queued task starts only after its interrupted one ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_interrupted_tasks_end_first_and_sessions_keep_their_order() {
    const SESSIONS: usize = 30;
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::hang());
    // A worker that stops a run as soon as its server is gone: nothing to re-attach to.
    let ws = tempfile::tempdir().unwrap();
    let worker =
        WorkerProcess::start_with_env(&fake, ws.path(), &[("DETACH_GRACE_SECONDS", "0")]).await;
    let db = tempfile::tempdir().unwrap();
    let (mut server, url) = start_server_with(db.path(), &worker.url, "30");
    wait_healthy(&format!("{url}/api/health")).await;

    let mut pairs = Vec::new();
    for i in 0..SESSIONS {
        let first = post(&url, json!({"message": format!("long job {i}")})).await;
        let session = first["sessionId"].as_str().unwrap().to_owned();
        let queued = post(
            &url,
            json!({"message": format!("next {i}"), "session_id": session}),
        )
        .await;
        pairs.push((
            first["taskId"].as_str().unwrap().to_owned(),
            queued["taskId"].as_str().unwrap().to_owned(),
        ));
    }
    for (first, _) in &pairs {
        wait_status(&url, first, &["running"]).await;
    }
    assert!(fake.wait_for_requests(SESSIONS, WAIT).await);

    server.kill().await.unwrap();
    fake.set_responder(|_| Reply::text("next done"));
    let (_server, url) = start_server_with(db.path(), &worker.url, "30");
    wait_healthy(&format!("{url}/api/health")).await;

    for (first, queued) in &pairs {
        // Within WAIT (20 s), shorter than the lease: settled by the restart, not by expiry.
        let first = wait_status(&url, first, &["failed", "completed", "canceled"]).await;
        assert_eq!(first["status"], "failed", "{first}");
        let error = first["error"].as_str().unwrap();
        assert!(error.starts_with("interrupted"), "{error}");
        let queued = wait_status(&url, queued, &["failed", "completed", "canceled"]).await;
        assert_eq!(queued["status"], "completed", "{queued}");
        let ended = first["finishedAt"].as_i64().unwrap();
        let started = queued["startedAt"].as_i64().unwrap();
        assert!(
            started >= ended,
            "the queued task started ({started}) before the interrupted one ended ({ended})"
        );
        let logs = get(&format!(
            "{url}/api/tasks/{}/logs?limit=500",
            first["id"].as_str().unwrap()
        ))
        .await;
        let logs = logs["logs"].as_array().unwrap();
        assert_eq!(logs.iter().filter(|l| l["type"] == "done").count(), 1);
        assert_eq!(logs.last().unwrap()["type"], "done");
    }
}

/// Issue 15, defect 6: SIGTERM shuts down in order. New tasks are refused (503), the queued
/// task is not started (it runs after the restart), the running task that can finish does,
/// and its WebSocket follower sees its `done` before the socket closes with 1001; the task
/// that cannot finish within SHUTDOWN_GRACE_SECONDS is recorded as interrupted by the
/// shutdown; an open long-poll answers instead of holding the exit up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_work_finish_and_closes_cleanly() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let fake = FakeLlm::start().await;
    fake.set_responder(|r| {
        if r.contains_text("finishes soon") {
            Reply::text("finished in the grace").with_event_delay(Duration::from_millis(700))
        } else if r.contains_text("queued behind") {
            Reply::text("ran after the restart")
        } else {
            Reply::hang()
        }
    });
    let worker = WorkerProcess::start(&fake).await;
    let db = tempfile::tempdir().unwrap();
    let env = [("LEASE_TTL_SECONDS", "30"), ("SHUTDOWN_GRACE_SECONDS", "4")];
    let (mut server, url) = start_server_env(db.path(), &worker.url, &env);
    wait_healthy(&format!("{url}/api/health")).await;

    // A hanging task with a task queued behind it, and a long-poll on the queued one.
    let hang = post(&url, json!({"message": "never ends"})).await;
    let hang_id = hang["taskId"].as_str().unwrap().to_owned();
    let queued = post(
        &url,
        json!({"message": "queued behind", "session_id": hang["sessionId"]}),
    )
    .await;
    let queued_id = queued["taskId"].as_str().unwrap().to_owned();
    wait_status(&url, &hang_id, &["running"]).await;
    let poll = tokio::spawn({
        let url = format!("{url}/api/tasks/{queued_id}/logs?after=0&wait=30");
        async move { reqwest::get(url).await.map(|r| r.status().as_u16()) }
    });

    // A task that finishes within the grace, followed over the WebSocket.
    let ws_url = format!("{}/ws", url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "chat", "message": "finishes soon"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut soon_id = None;
    while soon_id.is_none() {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "text" {
                soon_id = v["task_id"].as_str().map(str::to_owned);
            }
        }
    }

    let pid = server.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    // Intake is closed during the grace.
    let mut refused = false;
    for _ in 0..100 {
        let r = reqwest::Client::new()
            .post(format!("{url}/api/tasks"))
            .json(&json!({"message": "too late"}))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 503 => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                refused = true;
                break;
            }
            Ok(r) => assert_eq!(r.status(), 202, "before the signal landed"),
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new tasks are refused while shutting down");

    // The follower gets the whole task, then a 1001 close.
    let mut done = None;
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "done" {
                    done = Some(v);
                }
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    let done = done.expect("the done before the close");
    assert_eq!(done["metadata"]["status"], "completed", "{done}");
    assert_eq!(close.expect("a close code").code, CloseCode::Away);

    assert_eq!(poll.await.unwrap().expect("the long-poll answered"), 200);
    let status = tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("the server exits")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.contains_text("queued behind")),
        "the queued task was not started during the shutdown"
    );

    let (_server, url) = start_server_env(db.path(), &worker.url, &env);
    wait_healthy(&format!("{url}/api/health")).await;
    let hang = wait_status(&url, &hang_id, &["failed", "completed", "canceled"]).await;
    assert_eq!(hang["status"], "failed", "{hang}");
    let error = hang["error"].as_str().unwrap();
    assert!(
        error.contains("interrupted") && error.contains("shut down"),
        "{error}"
    );
    let soon = wait_status(&url, soon_id.as_deref().unwrap(), &["completed"]).await;
    assert_eq!(soon["result"], "finished in the grace");
    let queued = wait_status(&url, &queued_id, &["failed", "completed", "canceled"]).await;
    assert_eq!(queued["status"], "completed", "{queued}");
    assert_eq!(queued["result"], "ran after the restart");
}

/// Issue 15, item 5: resume instead of fail. kill -9 of the server mid-stream, 30 sessions at
/// once; the worker (a static one) keeps running them; the restarted server takes them back
/// and re-attaches (`/chat/attach`) from the first event its log lacks: every task completes,
/// its log gap-free with one `done` and every streamed piece of text exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_running_tasks_resume_and_complete_without_gaps_or_repeats() {
    const SESSIONS: usize = 30;
    let answer = "alpha beta gamma delta epsilon zeta";
    let fake = FakeLlm::start().await;
    fake.set_responder(move |_| Reply::text(answer).with_event_delay(Duration::from_millis(700)));
    let worker = WorkerProcess::start(&fake).await;
    let db = tempfile::tempdir().unwrap();
    let (mut server, url) = start_server_with(db.path(), &worker.url, "30");
    wait_healthy(&format!("{url}/api/health")).await;

    let mut ids = Vec::new();
    for i in 0..SESSIONS {
        let t = post(&url, json!({"message": format!("speak {i}")})).await;
        ids.push(t["taskId"].as_str().unwrap().to_owned());
    }
    // Kill once every task has stored some of its text, and none has ended.
    let deadline = tokio::time::Instant::now() + WAIT;
    'wait: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks never streamed"
        );
        for id in &ids {
            let logs = get(&format!("{url}/api/tasks/{id}/logs?limit=500")).await;
            if !logs["logs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["type"] == "text")
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue 'wait;
            }
        }
        break;
    }
    server.kill().await.unwrap();
    let (_server, url) = start_server_with(db.path(), &worker.url, "30");
    wait_healthy(&format!("{url}/api/health")).await;

    let mut resumed = 0;
    for id in &ids {
        let t = wait_status(&url, id, &["failed", "completed", "canceled"]).await;
        assert_eq!(t["status"], "completed", "{t}");
        let logs = get(&format!("{url}/api/tasks/{id}/logs?limit=500")).await;
        let logs = logs["logs"].as_array().unwrap();
        for (i, l) in logs.iter().enumerate() {
            assert_eq!(l["seq"], json!(i as u64 + 1), "{logs:?}");
        }
        assert_eq!(logs.iter().filter(|l| l["type"] == "done").count(), 1);
        assert_eq!(logs.last().unwrap()["type"], "done");
        let text: String = logs
            .iter()
            .filter(|l| l["type"] == "text")
            .map(|l| l["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, answer, "every piece once, in order: {logs:?}");
        let runs = logs
            .iter()
            .filter(|l| l["type"] == "status" && l["content"] == "running")
            .count();
        resumed += usize::from(runs == 2);
    }
    assert!(resumed > 0, "tasks were taken back and re-attached");
}
