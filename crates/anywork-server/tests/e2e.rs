//! End to end: the server in-process, a real `anywork-worker` process, the fake model.

mod common;

use std::time::Duration;

use anywork_runtime::{Backoff, DispatcherConfig, FirstWords, ModelTitles};
use anywork_test::fake_llm::{FakeLlm, Reply};
use common::{TestServer, WorkerProcess, Ws};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_chat_streams_events_and_the_log_has_the_same_gap_free() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;

    let (session, task, before) = ws.chat(None, "Please say hello to me").await;
    assert_eq!(before[0]["type"], "session_created");
    assert_eq!(before[0]["session_id"], session.as_str());
    let all = ws
        .recv_until(|v| v["type"] == "done" && v["task_id"] == task.as_str())
        .await;
    let events: Vec<Value> = all
        .iter()
        .filter(|v| v["task_id"] == task.as_str())
        .cloned()
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"status"), "{kinds:?}");
    assert!(kinds.contains(&"text"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"));
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "text")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello from the fake model.");
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "completed");
    assert_eq!(done["session_id"], session.as_str());
    // Seqs are 1..=n with no gap, and the log endpoint returns the very same events.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let logs = server.logs(&task).await;
    assert_eq!(logs.len(), events.len());
    for (log, ev) in logs.iter().zip(&events) {
        assert_eq!(log["seq"], ev["seq"]);
        assert_eq!(log["type"], ev["type"]);
        assert_eq!(log["content"], ev["content"]);
        assert_eq!(log["metadata"], ev["metadata"]);
    }
    // The title arrives, before or after done (first words: no title model here).
    let title = match all.iter().find(|v| v["type"] == "session_title") {
        Some(t) => t.clone(),
        None => ws
            .recv_until(|v| v["type"] == "session_title")
            .await
            .pop()
            .unwrap(),
    };
    assert_eq!(title["content"], "Please say hello to me");
    assert_eq!(title["session_id"], session.as_str());

    let stored = server.wait_final(&task).await;
    assert_eq!(stored["status"], "completed");
    assert_eq!(stored["result"], "Hello from the fake model.");
    assert_eq!(stored["numTurns"], 1);
    assert_eq!(stored["workerId"], "static-worker");
    let (_, sessions) = server.get("/api/sessions").await;
    assert_eq!(sessions["sessions"][0]["id"], session.as_str());
    assert_eq!(sessions["sessions"][0]["title"], "Please say hello to me");
    assert_eq!(sessions["sessions"][0]["task_count"], 1);

    // A second chat in the same session continues the conversation on the worker.
    let (s2, task2, before) = ws.chat(Some(&session), "And again").await;
    assert_eq!(s2, session);
    assert!(before.iter().all(|m| m["type"] != "session_created"));
    ws.events_until_done(&task2).await;
    let last = fake.last_request().unwrap();
    assert!(
        last.contains_text("Please say hello to me"),
        "history sent again"
    );
    let (_, history) = server
        .get(&format!("/api/sessions/{session}/messages"))
        .await;
    assert!(
        history["messages"].as_array().unwrap().len() >= 4,
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_reconnect_replays_from_the_seq_the_client_saw() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| {
        Reply::text("one two three four five").with_event_delay(Duration::from_millis(30))
    });
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "count").await;
    // See the first two events, then drop the connection mid-task.
    let seen = ws.recv_until(|v| v["seq"] == 2).await;
    assert!(seen.iter().any(|v| v["seq"] == 1));
    drop(ws);
    let mut ws = server.ws().await;
    ws.send(json!({"type": "resume", "task_id": task, "after_seq": 2}))
        .await;
    let rest = ws.events_until_done(&task).await;
    assert_eq!(
        rest[0]["seq"], 3,
        "replay starts right after the last seq seen"
    );
    let seqs: Vec<u64> = rest.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (3..3 + rest.len() as u64).collect::<Vec<_>>());
    // Resuming a finished task replays it whole, ending with done.
    ws.send(json!({"type": "resume", "task_id": task, "after_seq": 0}))
        .await;
    let all = ws.events_until_done(&task).await;
    assert_eq!(all.len() as u64, 2 + rest.len() as u64);
    assert_eq!(
        server.dispatcher().live_tasks(),
        0,
        "no channel left behind"
    );
}

/// One connection follows several running tasks at once (its own task polls their streams):
/// each task's events arrive in order, gap-free, with one `done`; a resume of a task it
/// follows replaces that follow (a replay from the start, and still one `done`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_follows_several_tasks_and_a_resume_replaces_a_follow() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| {
        Reply::text("one two three four five six").with_event_delay(Duration::from_millis(30))
    });
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;
    let (_, a, _) = ws.chat(None, "first").await;
    let (_, b, mut seen) = ws.chat(None, "second").await;
    let (_, c, more) = ws.chat(None, "third").await;
    seen.extend(more);
    // Resumed while it runs (its first event seen, the rest to come).
    let first_of_a = |v: &Value| v["task_id"] == a.as_str() && v["seq"] == 1;
    if !seen.iter().any(first_of_a) {
        seen.extend(ws.recv_until(first_of_a).await);
    }
    ws.send(json!({"type": "resume", "task_id": a, "after_seq": 0}))
        .await;
    let mut dones = std::collections::BTreeMap::<String, u32>::new();
    for v in &seen {
        if v["type"] == "done" {
            *dones
                .entry(v["task_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    while dones.len() < 3 {
        let v = ws.recv().await;
        if v["type"] == "done" {
            *dones
                .entry(v["task_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        seen.push(v);
    }
    // Anything a second follow of `a` would still send comes before the pong.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(json!({"type": "ping"})).await;
    seen.extend(ws.recv_until(|v| v["type"] == "pong").await);
    let count_done = |task: &str| {
        seen.iter()
            .filter(|v| v["type"] == "done" && v["task_id"] == task)
            .count()
    };
    for task in [&a, &b, &c] {
        assert_eq!(count_done(task), 1, "one done for {task}: {seen:?}");
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|v| v["task_id"] == task.as_str() && v["seq"].is_u64())
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        // The follow's seqs after its last start (the resume replays `a` from seq 1).
        let from = seqs.iter().rposition(|&s| s == 1).expect("seq 1");
        assert_eq!(
            seqs[from..].to_vec(),
            (1..=(seqs.len() - from) as u64).collect::<Vec<_>>(),
            "{task}: {seqs:?}"
        );
        assert!(seqs.len() - from >= 3, "{task}: {seqs:?}");
    }
    let logs = server.logs(&a).await;
    let a_seqs = seen
        .iter()
        .filter(|v| v["task_id"] == a.as_str() && v["seq"].is_u64())
        .count();
    assert!(
        a_seqs >= logs.len(),
        "the resume replayed the whole log of a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_task_and_a_queued_one() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::hang());
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;
    let (session, running, _) = ws.chat(None, "take forever").await;
    // A second task of the same session waits behind the first.
    let (_, queued, _) = ws.chat(Some(&session), "me too").await;
    assert!(fake.wait_for_requests(1, Duration::from_secs(10)).await);
    let (_, t) = server.get(&format!("/api/tasks/{queued}")).await;
    assert_eq!(t["status"], "pending");

    let started = std::time::Instant::now();
    let (status, task) = server
        .post(&format!("/api/tasks/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], "canceled");
    assert!(started.elapsed() < Duration::from_secs(5));
    let events = ws.events_until_done(&running).await;
    assert_eq!(events.last().unwrap()["metadata"]["status"], "canceled");
    let dones = server
        .logs(&running)
        .await
        .iter()
        .filter(|l| l["type"] == "done")
        .count();
    assert_eq!(dones, 1, "exactly one done in the log");

    // The queued task now runs (and hangs); cancel it over the WebSocket.
    assert!(fake.wait_for_requests(2, Duration::from_secs(10)).await);
    ws.send(json!({"type": "cancel", "task_id": queued})).await;
    let events = ws.events_until_done(&queued).await;
    assert_eq!(events.last().unwrap()["metadata"]["status"], "canceled");

    // A pending task is canceled without a worker: stop the worker first.
    let (status, again) = server
        .post(&format!("/api/tasks/{running}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        again["error"]["message"],
        "Cannot cancel task in status: canceled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_task_is_canceled_without_touching_a_worker() {
    // No worker at all: the task stays pending while the dispatcher retries the driver.
    let server = TestServer::without_worker(Backoff::new(
        50,
        Duration::from_millis(100),
        Duration::from_millis(200),
    ))
    .await;
    let (status, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    assert_eq!(status, 202, "{created}");
    let id = created["taskId"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, task) = server
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], "canceled");
    assert!(task["startedAt"].is_null(), "it never ran");
    let logs = server.logs(id).await;
    let (progress, rest): (Vec<_>, Vec<_>) = logs.iter().partition(|l| l["type"] == "progress");
    assert!(
        progress.iter().all(|p| p["metadata"]["stage"] == "worker"),
        "only the wait for a worker was told: {progress:?}"
    );
    assert_eq!(rest.len(), 1, "{logs:?}");
    assert_eq!(rest[0]["type"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_worker_fails_the_task_with_the_reason() {
    let server = TestServer::without_worker(Backoff::new(
        3,
        Duration::from_millis(20),
        Duration::from_millis(50),
    ))
    .await;
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let id = created["taskId"].as_str().unwrap();
    let task = server.wait_final(id).await;
    assert_eq!(task["status"], "failed");
    let error = task["error"].as_str().unwrap();
    assert!(error.contains("STATIC_WORKER_URL"), "{error}");
    // While it waited, each failed attempt was told: why, which attempt comes, and when.
    let progress: Vec<Value> = server
        .logs(id)
        .await
        .into_iter()
        .filter(|l| l["type"] == "progress" && l["metadata"]["reason"].is_string())
        .collect();
    assert_eq!(
        progress.len(),
        2,
        "attempts 2 and 3 announced: {progress:?}"
    );
    for (p, attempt) in progress.iter().zip([2, 3]) {
        let md = &p["metadata"];
        assert_eq!(md["stage"], "worker", "{p}");
        assert_eq!(md["attempt"], attempt, "{p}");
        assert_eq!(md["max_attempts"], 3, "{p}");
        assert!(md["retry_in_ms"].as_u64().unwrap() > 0, "{p}");
        assert!(
            md["reason"].as_str().unwrap().contains("STATIC_WORKER_URL"),
            "{p}"
        );
        let text = p["content"].as_str().unwrap();
        assert!(text.contains(&format!("attempt {attempt} of 3")), "{text}");
        assert!(text.contains("(static)"), "the driver is named: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_start_is_announced() {
    // `progress_after` zero: the wait for a worker is always told, before the driver answers.
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let worker = WorkerProcess::start(&fake).await;
    let mut config = DispatcherConfig::default();
    config.progress_after = Duration::ZERO;
    let server = TestServer::start_with(&worker.url, config, FirstWords).await;
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let id = created["taskId"].as_str().unwrap();
    assert_eq!(server.wait_final(id).await["status"], "completed");
    let logs = server.logs(id).await;
    assert_eq!(logs[0]["type"], "progress", "{logs:?}");
    assert_eq!(logs[0]["metadata"]["stage"], "worker");
    assert_eq!(logs[0]["metadata"]["attempt"], 1);
    assert!(
        logs[0]["content"].as_str().unwrap().contains("static"),
        "{logs:?}"
    );
    assert_eq!(logs[1]["type"], "status", "then it runs: {logs:?}");

    // The metrics: the worker start, the model's tokens, the request by route pattern.
    let text = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "anywork_worker_starts_total{driver=\"static\"} 1",
        "anywork_worker_failures_total{driver=\"static\"} 0",
        "anywork_worker_start_seconds_count{driver=\"static\"} 1",
        "anywork_model_tokens_total{model=\"fake-model\",kind=\"input\"}",
        "anywork_http_requests_total{method=\"POST\",route=\"/api/tasks\",status=\"202\"} 1",
        "anywork_http_requests_total{method=\"GET\",route=\"/api/tasks/{id}\",status=\"200\"}",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sessions_and_fifo_within_a_session() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|req| {
        let n = req.messages().len();
        Reply::text(format!("answer {n}")).with_event_delay(Duration::from_millis(2))
    });
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut clients = Vec::new();
    for i in 0..24 {
        let url = server.url.clone();
        clients.push(tokio::spawn(async move {
            let mut ws = Ws::connect(&url).await;
            let (session, t1, _) = ws.chat(None, &format!("first {i}")).await;
            // Two more right away in the same session: they queue behind the first.
            let (_, t2, before2) = ws.chat(Some(&session), &format!("second {i}")).await;
            let (_, t3, before3) = ws.chat(Some(&session), &format!("third {i}")).await;
            // A task may end before the next chat's `task_created` comes back: its `done` is
            // then among the messages that came before.
            fn take(done: &mut Vec<String>, v: &Value) {
                if v["type"] == "done" {
                    assert_eq!(v["metadata"]["status"], "completed", "{v}");
                    done.push(v["task_id"].as_str().unwrap().to_owned());
                }
            }
            let mut done = Vec::new();
            for v in before2.iter().chain(&before3) {
                take(&mut done, v);
            }
            while done.len() < 3 {
                let v = ws.recv().await;
                take(&mut done, &v);
            }
            assert_eq!(
                done,
                vec![t1.clone(), t2.clone(), t3.clone()],
                "FIFO per session"
            );
            (t1, t2, t3)
        }));
    }
    for c in clients {
        let (t1, t2, t3) = c.await.unwrap();
        let a = server.wait_final(&t1).await;
        let b = server.wait_final(&t2).await;
        let c = server.wait_final(&t3).await;
        // One task at a time per session, and the worker saw the earlier turns.
        assert!(b["startedAt"].as_i64() >= a["finishedAt"].as_i64());
        assert!(c["startedAt"].as_i64() >= b["finishedAt"].as_i64());
        let n = |t: &Value| -> usize {
            t["result"]
                .as_str()
                .unwrap()
                .trim_start_matches("answer ")
                .parse()
                .unwrap()
        };
        assert_eq!(
            n(&c) - n(&a),
            4,
            "the third turn sees the two earlier exchanges"
        );
    }
    assert_eq!(server.dispatcher().running(), 0);
    assert_eq!(server.dispatcher().queue_depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_required_pauses_the_task_and_the_answer_resumes_it() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "call_1",
        "ask_user",
        json!({"question": "Which colour?", "options": ["red", "blue"]}),
    ));
    fake.push(Reply::text("You chose blue."));
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut ws = server.ws().await;
    let (_, task, _) = ws.chat(None, "pick a colour").await;
    let got = ws.recv_until(|v| v["type"] == "input_required").await;
    let ask = got.last().unwrap();
    assert_eq!(ask["content"], "Which colour?");
    let request_id = ask["metadata"]["request_id"].as_str().unwrap().to_owned();
    // The stored status follows.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (_, t) = server.get(&format!("/api/tasks/{task}")).await;
        if t["status"] == "input_required" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A wrong request id is refused by the worker; the task keeps waiting.
    ws.send(
        json!({"type": "input_response", "task_id": task, "request_id": "nope", "answer": "x"}),
    )
    .await;
    let err = ws.recv_until(|v| v["type"] == "error").await;
    assert!(
        err.last().unwrap()["content"]
            .as_str()
            .unwrap()
            .contains("nope")
            || err.last().unwrap()["metadata"]["code"].is_string()
    );
    ws.send(json!({"type": "input_response", "task_id": task, "request_id": request_id, "answer": "blue"}))
        .await;
    let events = ws.events_until_done(&task).await;
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "completed", "{events:?}");
    assert_eq!(done["content"], "You chose blue.");
    let tool_result = fake.last_request().unwrap();
    assert!(tool_result.contains_text("blue"));
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "status" && e["content"] == "running")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn title_comes_from_the_title_model_when_configured() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|req| {
        if req.model() == Some("title-model") {
            Reply::text("\"Sea Poem Request\"")
        } else {
            Reply::text("Waves.")
        }
    });
    let worker = WorkerProcess::start(&fake).await;
    let titles = ModelTitles::new(&format!("{}/v1", fake.url()), "key", "title-model").unwrap();
    let server = TestServer::start_with(&worker.url, DispatcherConfig::default(), titles).await;
    let mut ws = server.ws().await;
    let (session, _, _) = ws.chat(None, "write me a poem about the sea").await;
    let t = ws.recv_until(|v| v["type"] == "session_title").await;
    let t = t.last().unwrap();
    assert_eq!(t["content"], "Sea Poem Request");
    assert_eq!(t["session_id"], session.as_str());
    let (_, s) = server.get(&format!("/api/sessions/{session}")).await;
    assert_eq!(s["title"], "Sea Poem Request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_long_poll_returns_when_the_first_new_event_arrives() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("slow").with_event_delay(Duration::from_millis(300)));
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let id = created["taskId"].as_str().unwrap().to_owned();
    let mut after = 0;
    let mut seen: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !seen.iter().any(|l| l["type"] == "done") {
        assert!(tokio::time::Instant::now() < deadline);
        let (status, page) = server
            .get(&format!("/api/tasks/{id}/logs?after={after}&wait=10"))
            .await;
        assert_eq!(status, 200);
        let logs = page["logs"].as_array().unwrap();
        assert!(
            !logs.is_empty(),
            "a long-poll returns with events, not empty"
        );
        after = page["next"].as_u64().unwrap();
        seen.extend(logs.iter().cloned());
    }
    let seqs: Vec<u64> = seen.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>());
    // On a finished task, wait does not wait.
    let started = std::time::Instant::now();
    let (_, page) = server
        .get(&format!("/api/tasks/{id}/logs?after={after}&wait=10"))
        .await;
    assert!(page["logs"].as_array().unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_notification_is_posted_when_the_task_ends() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("pushed"));
    let worker = WorkerProcess::start(&fake).await;
    // The receiver is on loopback over http: the operator allows it.
    let mut config = anywork_runtime::DispatcherConfig::default();
    config.outbound = anywork_core::OutboundPolicy::strict()
        .with_http(true)
        .allow_list("127.0.0.1")
        .unwrap();
    let server = TestServer::start_with(&worker.url, config, anywork_runtime::FirstWords).await;
    // A receiver that fails once (503), then records.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Option<String>, Value)>(4);
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let (tx, calls) = (tx.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let _ = tx.send((auth, body)).await;
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (status, created) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "push_notification": {"url": hook, "authorization": "Bearer s3cret"}}),
        )
        .await;
    assert_eq!(status, 202, "{created}");
    let (auth, body) = tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("the push arrives after a retry")
        .unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer s3cret"));
    assert_eq!(body["id"], created["taskId"]);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["result"], "pushed");
}

/// A session's title goes to the connections that chat in it, not to every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_reach_only_the_connections_of_their_session() {
    let fake = FakeLlm::start().await;
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let mut other = server.ws().await;
    let mut ws = server.ws().await;
    let (session, _, _) = ws.chat(None, "titles are private").await;
    let t = ws.recv_until(|v| v["type"] == "session_title").await;
    assert_eq!(t.last().unwrap()["session_id"], session.as_str());
    // The notice was sent before these pings: had `other` been sent it, it would come
    // before the second pong.
    other.send(serde_json::json!({"type": "ping"})).await;
    let mut seen = other.recv_until(|v| v["type"] == "pong").await;
    other.send(serde_json::json!({"type": "ping"})).await;
    seen.extend(other.recv_until(|v| v["type"] == "pong").await);
    assert!(
        seen.iter().all(|v| v["type"] == "pong"),
        "another client got: {seen:?}"
    );
    assert_eq!(server.state.dispatcher().watched_sessions(), 1);
    // A session renamed later (here: one whose title is still the default when its next task
    // comes) reaches a connection that only resumed a task of it.
    let (_, created) = server
        .post("/api/tasks", json!({"message": "untitled"}))
        .await;
    let (untitled, task) = (
        created["sessionId"].as_str().unwrap().to_owned(),
        created["taskId"].as_str().unwrap().to_owned(),
    );
    let renamed = server
        .http
        .patch(format!("{}/api/sessions/{untitled}", server.url))
        .json(&json!({"title": "New Chat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200);
    other
        .send(json!({"type": "resume", "task_id": task, "after_seq": 0}))
        .await;
    other.recv_until(|v| v["type"] == "done").await;
    assert_eq!(server.state.dispatcher().watched_sessions(), 2);
    server
        .post(
            "/api/tasks",
            json!({"message": "renamed at last", "session_id": untitled}),
        )
        .await;
    let t = other.recv_until(|v| v["type"] == "session_title").await;
    assert_eq!(t.last().unwrap()["session_id"], untitled.as_str());
    assert_eq!(t.last().unwrap()["content"], "renamed at last");
    drop((ws, other));
    for _ in 0..100 {
        if server.state.dispatcher().watched_sessions() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("closed connections still watch sessions");
}

/// SOUL.md / AGENTS.md: the defaults live in the server's store (reading or saving them needs
/// no worker), every new session's workspace starts with them through `/prepare`, a session
/// keeps its own copy, and a session's files are edited through its running worker only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soul_defaults_live_in_the_store_and_seed_new_sessions() {
    // No worker at all: the defaults are still read and saved.
    let offline = TestServer::without_worker(Backoff::none()).await;
    let (status, soul) = offline.get("/api/workspace/soul").await;
    assert_eq!(status, 200, "{soul}");
    assert_eq!(soul["scope"], "defaults");
    assert!(
        soul["content"].as_str().unwrap().contains("# Soul"),
        "{soul}"
    );
    let r = offline
        .http
        .put(format!("{}/api/workspace/agents", offline.url))
        .json(&json!({"content": "Offline rules"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, agents) = offline.get("/api/workspace/agents").await;
    assert_eq!(agents["content"], "Offline rules");

    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let put = |path: String, content: &'static str| {
        let http = server.http.clone();
        let url = format!("{}{path}", server.url);
        async move {
            let r = http
                .put(url)
                .json(&json!({ "content": content }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // A session made before the defaults change keeps what it started with.
    let (_, first) = server.post("/api/tasks", json!({"message": "one"})).await;
    server.wait_final(first["taskId"].as_str().unwrap()).await;
    let old = first["sessionId"].as_str().unwrap().to_owned();
    let (_, before) = server
        .get(&format!("/api/sessions/{old}/workspace/soul"))
        .await;
    assert!(
        before["content"].as_str().unwrap().contains("# Soul"),
        "{before}"
    );

    let (status, saved) = put("/api/workspace/soul".into(), "You are a pirate.").await;
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["scope"], "defaults");
    put("/api/workspace/agents".into(), "Always answer in rhyme.").await;

    let (_, second) = server.post("/api/tasks", json!({"message": "two"})).await;
    server.wait_final(second["taskId"].as_str().unwrap()).await;
    let new = second["sessionId"].as_str().unwrap().to_owned();
    let (status, soul) = server
        .get(&format!("/api/sessions/{new}/workspace/soul"))
        .await;
    assert_eq!(status, 200, "{soul}");
    assert_eq!(
        soul["content"], "You are a pirate.",
        "the new session starts with the default"
    );
    assert_eq!(soul["scope"], "session");
    let (_, agents) = server
        .get(&format!("/api/sessions/{new}/workspace/agents"))
        .await;
    assert_eq!(agents["content"], "Always answer in rhyme.");
    let (_, kept) = server
        .get(&format!("/api/sessions/{old}/workspace/soul"))
        .await;
    assert_eq!(
        kept["content"], before["content"],
        "the older session keeps its own"
    );

    // A session's own edit stays in that session, and survives its next task.
    let (status, edited) = put(format!("/api/sessions/{new}/workspace/soul"), "Only here.").await;
    assert_eq!(status, 200, "{edited}");
    let (_, third) = server
        .post("/api/tasks", json!({"message": "three", "sessionId": new}))
        .await;
    server.wait_final(third["taskId"].as_str().unwrap()).await;
    let (_, soul) = server
        .get(&format!("/api/sessions/{new}/workspace/soul"))
        .await;
    assert_eq!(soul["content"], "Only here.");
    let (_, defaults) = server.get("/api/workspace/soul").await;
    assert_eq!(defaults["content"], "You are a pirate.");

    // Unknown session: 404; unknown file: 404; no worker running: 409, nothing started.
    let (status, _) = server.get("/api/sessions/nope/workspace/soul").await;
    assert_eq!(status, 404);
    let (status, body) = server
        .get(&format!("/api/sessions/{new}/workspace/passwd"))
        .await;
    assert_eq!(status, 404, "{body}");
    let (_, s) = offline.post("/api/sessions", json!({})).await;
    let sid = s["id"]
        .as_str()
        .or(s["sessionId"].as_str())
        .unwrap()
        .to_owned();
    let (status, body) = offline
        .get(&format!("/api/sessions/{sid}/workspace/soul"))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no running worker"),
        "{body}"
    );
}

/// The workspace file panel's API, through the server to a real worker: upload into files/,
/// list, download, show as text, the folder as a zip; traversal and oversized uploads refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_files_are_listed_downloaded_zipped_and_uploaded() {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let worker = WorkerProcess::start(&fake).await;
    let server = TestServer::start(&worker.url).await;
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    server.wait_final(created["taskId"].as_str().unwrap()).await;
    let sid = created["sessionId"].as_str().unwrap().to_owned();
    let base = format!("{}/api/sessions/{sid}/files", server.url);
    let put = |path: &str, body: Vec<u8>| {
        let req = server.http.put(format!("{base}/{path}")).body(body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, saved) = put("notes/plan%20one.md", b"# Plan\nstep 1\n".to_vec()).await;
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["path"], "notes/plan one.md");
    let (status, _) = put("data.bin", vec![0, 159, 146, 150, 255]).await;
    assert_eq!(status, 200);

    let (status, list) = server.get(&format!("/api/sessions/{sid}/files")).await;
    assert_eq!(status, 200, "{list}");
    let paths: Vec<&str> = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["data.bin", "notes/plan one.md"]);
    assert_eq!(list["files"][1]["size"], 14);

    let r = server
        .http
        .get(format!("{base}/notes/plan%20one.md"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"# Plan\nstep 1\n");
    let r = server
        .http
        .get(format!("{base}/data.bin?inline=1"))
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), [0, 159, 146, 150, 255]);

    // The zip opens with Python's zipfile, with both files intact.
    let r = server.http.get(format!("{base}.zip")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let zip = r.bytes().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.zip"), &zip).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None; \
             print(sorted(z.namelist())); print(z.read('notes/plan one.md').decode())",
        )
        .arg(dir.path().join("f.zip"))
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("['data.bin', 'notes/plan one.md']"),
        "{stdout}"
    );
    assert!(stdout.contains("step 1"), "{stdout}");

    // Traversal, absolute paths and oversized uploads are refused with a JSON error.
    // (Dot segments are resolved by HTTP clients; encoded slashes reach the server.)
    for bad in [
        "..%2Fescape.txt",
        "notes%2F..%2F..%2Fescape.txt",
        "%2Fetc%2Fpasswd",
        "a%5Cb",
    ] {
        let (status, body) = put(bad, b"x".to_vec()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_input", "{bad}: {body}");
    }
    let (status, body) = server
        .get(&format!("/api/sessions/{sid}/files/..%2FSOUL.md"))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = put(
        "big.bin",
        vec![7; anywork_core::worker_api::MAX_UPLOAD_BYTES + 1],
    )
    .await;
    assert_eq!(status, 413);
    let (status, body) = server
        .get(&format!("/api/sessions/{sid}/files/missing.txt"))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = server.get("/api/sessions/nope/files").await;
    assert_eq!(status, 404);
}
