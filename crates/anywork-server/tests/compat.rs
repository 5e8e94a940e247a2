//! A drop-in for the original AnyWork: the server in-process on SQLite, against a stand-in of
//! the original's Python worker (`anywork_test::original_worker`), sent exactly what the
//! original's web client and API users send.

mod common;

use std::path::Path;
use std::time::Duration;

use anywork_runtime::{Backoff, DispatcherConfig, SkillsDir};
use anywork_test::original_worker::{OriginalEvent, OriginalWorker, Script};
use common::{TestServer, Ws};
use serde_json::{Value, json};

/// A skills folder with `code-review` (a SKILL.md and a script beside it).
fn skills_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let skill = dir.path().join("code-review");
    std::fs::create_dir_all(skill.join("scripts")).unwrap();
    std::fs::write(
        skill.join("SKILL.md"),
        "---\nname: code-review\ndescription: Reviews a diff for bugs.\n---\nRead the diff.\n",
    )
    .unwrap();
    std::fs::write(skill.join("scripts/lint.sh"), "#!/bin/sh\necho lint\n").unwrap();
    dir
}

/// The server as a drop-in operator runs it: the original's clients send their own MCP
/// commands, which only `ALLOW_REQUEST_MCP_COMMANDS=1` lets through (see docs/security.md).
async fn server_with_skills(worker: &str, skills: &Path) -> TestServer {
    let skills = SkillsDir::new(skills);
    let mut config = DispatcherConfig::default();
    config.mcp = anywork_core::McpAccess::new(anywork_core::McpCatalog::new(), true);
    // The original's clients name HTTP servers this offline machine cannot resolve: the
    // worker connects to them, so the server lets an unresolvable name through.
    TestServer::start_custom(worker, move |b| b.skills(skills).config(config)).await
}

/// Messages up to the `done` of the chat just sent (after its `task_created`).
async fn chat_to_done(ws: &mut Ws, chat: Value) -> Vec<Value> {
    ws.send(chat).await;
    let mut all = ws
        .recv_until(|v| v["type"] == "task_created" || v["type"] == "error")
        .await;
    let last = all.last().unwrap().clone();
    assert_eq!(last["type"], "task_created", "chat refused: {all:?}");
    let task = last["task_id"].as_str().unwrap().to_owned();
    all.extend(
        ws.recv_until(|v| v["type"] == "done" && v["task_id"] == task.as_str())
            .await,
    );
    // Titles of earlier chats may come in between.
    all.retain(|v| v["type"] != "session_title");
    all
}

/// The next message, skipping titles.
async fn next_not_title(ws: &mut Ws) -> Value {
    loop {
        let v = ws.recv().await;
        if v["type"] != "session_title" {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_web_clients_chats_are_accepted_and_skills_resolved_by_name() {
    let worker = OriginalWorker::start().await;
    let skills = skills_dir();
    let server = server_with_skills(&worker.url(), skills.path()).await;
    let mut ws = server.ws().await;

    // Exactly what the original's clients send.
    let all = chat_to_done(
        &mut ws,
        json!({"type":"chat","message":"hi","skills":[],"mcp_servers":[]}),
    )
    .await;
    let kinds: Vec<&str> = all.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(kinds[..2], ["session_created", "task_created"], "{kinds:?}");
    assert!(kinds.contains(&"text"), "{kinds:?}");
    let session = all[0]["session_id"].as_str().unwrap().to_owned();
    let all = chat_to_done(
        &mut ws,
        json!({"type": "chat", "session_id": session, "message": "review it",
               "skills": ["code-review"],
               "mcp_servers": [
                   {"name": "github", "transport": "stdio", "command": "npx",
                    "args": ["-y", "@modelcontextprotocol/server-github"], "env": {"GITHUB_TOKEN": "t"}},
                   {"name": "docs", "transport": "http", "url": "https://docs.example/mcp",
                    "headers": {"Authorization": "Bearer x"}}]}),
    )
    .await;
    assert_eq!(all.last().unwrap()["metadata"]["status"], "completed");
    let null_session = chat_to_done(
        &mut ws,
        json!({"type":"chat","session_id":null,"message":"again","mcp_servers":{},"skills":null}),
    )
    .await;
    assert_eq!(null_session[0]["type"], "session_created");

    // The worker got the skill's files and the servers in its own /prepare form (map by
    // name), and took every /prepare (it validates like FastAPI: 422 otherwise).
    let prepares: Vec<_> = worker
        .received()
        .into_iter()
        .filter(|r| r.route == "POST /prepare")
        .collect();
    assert_eq!(prepares.len(), 3);
    assert!(prepares.iter().all(|r| r.status == 200), "{prepares:?}");
    let second = &prepares[1].body;
    assert_eq!(second["skills"][0]["name"], "code-review");
    let files = &second["skills"][0]["files"];
    assert!(
        files["SKILL.md"]
            .as_str()
            .unwrap()
            .contains("description: Reviews a diff for bugs.")
    );
    assert_eq!(files["scripts/lint.sh"], "#!/bin/sh\necho lint\n");
    assert_eq!(
        second["mcp_servers"],
        json!({
            "docs": {"type": "http", "url": "https://docs.example/mcp",
                     "headers": {"Authorization": "Bearer x"}},
            "github": {"type": "stdio", "command": "npx",
                       "args": ["-y", "@modelcontextprotocol/server-github"],
                       "env": {"GITHUB_TOKEN": "t"}},
        })
    );
    let chats = worker.bodies("POST /chat");
    assert_eq!(chats[1]["session_id"], session.as_str());
    assert_eq!(chats[1]["message"], "review it");

    // GET /api/skills lists what can be named.
    let (status, listed) = server.get("/api/skills").await;
    assert_eq!(status, 200);
    assert_eq!(
        listed["skills"],
        json!([{"name": "code-review", "description": "Reviews a diff for bugs."}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_chat_answers_with_an_error_that_echoes_the_request_and_creates_nothing() {
    let worker = OriginalWorker::start().await;
    let skills = skills_dir();
    let server = server_with_skills(&worker.url(), skills.path()).await;
    let mut ws = server.ws().await;
    let root = skills.path().display().to_string();

    // An unknown skill: the error names it and the folder looked in.
    ws.send(
        json!({"type":"chat","message":"x","skills":["nope"],"mcp_servers":[],"request_id":"r-1"}),
    )
    .await;
    let refused = next_not_title(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["request_id"], "r-1");
    assert_eq!(refused["metadata"]["created"], false);
    assert_eq!(refused["metadata"]["code"], "invalid_input");
    let content = refused["content"].as_str().unwrap();
    assert!(
        content.contains("\"nope\"") && content.contains(&root),
        "{content}"
    );
    assert!(content.contains("nothing was created"), "{content}");

    // Invalid front matter: named likewise.
    let bad = skills.path().join("broken");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("SKILL.md"), "no front matter").unwrap();
    ws.send(json!({"type":"chat","message":"x","skills":["broken"],"request_id":7}))
        .await;
    let refused = next_not_title(&mut ws).await;
    assert_eq!(refused["request_id"], 7);
    let content = refused["content"].as_str().unwrap();
    assert!(
        content.contains("broken") && content.contains("front matter"),
        "{content}"
    );

    // A session that does not exist: its id is echoed.
    ws.send(json!({"type":"chat","session_id":"ghost","message":"x"}))
        .await;
    let refused = next_not_title(&mut ws).await;
    assert_eq!(refused["session_id"], "ghost");
    assert_eq!(refused["metadata"]["code"], "not_found");
    assert_eq!(refused["metadata"]["created"], false);

    // A message that does not parse (no `message`), and bad MCP servers.
    ws.send(json!({"type":"chat","request_id":"r-2"})).await;
    let refused = next_not_title(&mut ws).await;
    assert_eq!(
        (
            refused["request_id"].as_str(),
            refused["metadata"]["code"].as_str()
        ),
        (Some("r-2"), Some("invalid_message"))
    );
    ws.send(json!({"type":"chat","message":"x","mcp_servers":[{"name":"a","transport":"stdio"}]}))
        .await;
    let refused = next_not_title(&mut ws).await;
    assert!(
        refused["content"].as_str().unwrap().contains("command"),
        "{refused}"
    );

    // Nothing was stored and the worker never heard of any of it; the connection still works.
    let (_, sessions) = server.get("/api/sessions").await;
    assert_eq!(sessions["sessions"], json!([]));
    assert!(worker.bodies("POST /chat").is_empty());
    ws.send(json!({"type":"ping"})).await;
    assert_eq!(next_not_title(&mut ws).await["type"], "pong");
}

/// A connection chats again in the session of its last chat without the server reading the
/// session first; when that session was deleted meanwhile (by another client), the chat is
/// refused as one in a session that never was, nothing is created, and the connection goes
/// on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_in_a_session_deleted_meanwhile_is_refused_and_creates_nothing() {
    let worker = OriginalWorker::start().await;
    let skills = skills_dir();
    let server = server_with_skills(&worker.url(), skills.path()).await;
    let mut ws = server.ws().await;
    let all = chat_to_done(&mut ws, json!({"type":"chat","message":"first"})).await;
    let session = all[0]["session_id"].as_str().unwrap().to_owned();
    let all = chat_to_done(
        &mut ws,
        json!({"type":"chat","session_id":session,"message":"second"}),
    )
    .await;
    assert_eq!(all.last().unwrap()["metadata"]["status"], "completed");

    let deleted = server
        .http
        .delete(format!("{}/api/sessions/{session}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 200);
    for _ in 0..2 {
        ws.send(json!({"type":"chat","session_id":session,"message":"third","request_id":"r-3"}))
            .await;
        let refused = next_not_title(&mut ws).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["session_id"], session.as_str());
        assert_eq!(refused["request_id"], "r-3");
        assert_eq!(refused["metadata"]["code"], "not_found");
        assert_eq!(refused["metadata"]["created"], false);
        let content = refused["content"].as_str().unwrap();
        assert!(
            content.contains("does not exist") && content.contains("nothing was created"),
            "{content}"
        );
    }
    let (status, _) = server.get(&format!("/api/sessions/{session}")).await;
    assert_eq!(status, 404, "the session was not made again");
    assert_eq!(worker.bodies("POST /chat").len(), 2);

    // A new session on the same connection works as before.
    let all = chat_to_done(&mut ws, json!({"type":"chat","message":"fresh"})).await;
    assert_eq!(all[0]["type"], "session_created");
    assert_ne!(all[0]["session_id"], session.as_str());
    let (_, sessions) = server.get("/api/sessions").await;
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_api_tasks_takes_every_form_of_mcp_servers_and_skills() {
    let worker = OriginalWorker::start().await;
    let skills = skills_dir();
    let server = server_with_skills(&worker.url(), skills.path()).await;
    for mcp in [
        json!([]),
        json!({}),
        json!(null),
        json!([{"name": "calc", "transport": "stdio", "command": "python3", "args": ["calc.py"]}]),
        json!({"calc": {"command": "python3", "args": ["calc.py"]}}),
    ] {
        let (status, body) = server
            .post(
                "/api/tasks",
                json!({"message": "hi", "mcp_servers": mcp, "skills": ["code-review"]}),
            )
            .await;
        assert_eq!(status, 202, "{mcp}: {body}");
        let task = server.wait_final(body["taskId"].as_str().unwrap()).await;
        assert_eq!(task["status"], "completed", "{task}");
    }
    let (status, body) = server
        .post(
            "/api/tasks",
            json!({"message": "hi", "skills": [{"name": "inline", "content": "---\nname: inline\ndescription: d\n---\n"}]}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = server
        .post("/api/tasks", json!({"message": "hi", "skills": ["nope"]}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_input");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("nope") && message.contains(&skills.path().display().to_string()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_worker_runs_tasks_with_their_cost_turns_and_duration() {
    let worker = OriginalWorker::start().await;
    let server = TestServer::start(&worker.url()).await;
    worker.push(Script::of([
        OriginalEvent::text("Hello"),
        OriginalEvent::tool_call("tu1", "Bash", json!({"command": "ls"})),
        OriginalEvent::done("Hello", 0.25, 2, 1500),
    ]));
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let id = created["taskId"].as_str().unwrap().to_owned();
    let task = server.wait_final(&id).await;
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], "Hello");
    assert_eq!(task["costUsd"], 0.25);
    assert_eq!(task["numTurns"], 2);
    assert_eq!(task["durationMs"], 1500);
    let kinds: Vec<String> = server
        .logs(&id)
        .await
        .iter()
        .map(|l| l["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["status", "text", "tool_call", "done"]);
    let logs = server.logs(&id).await;
    assert_eq!(logs[2]["content"], "Bash");
    assert_eq!(logs[2]["metadata"]["input"], json!({"command": "ls"}));

    // The history comes from the original's GET /sessions/:id.
    let session = created["sessionId"].as_str().unwrap();
    let (_, history) = server
        .get(&format!("/api/sessions/{session}/messages"))
        .await;
    assert_eq!(history["messages"][1]["content"], "Hello", "{history}");

    // A failed run: the original sends an `error` and no `done`.
    worker.push(Script::of([
        OriginalEvent::text("trying"),
        OriginalEvent::error("max turns reached"),
    ]));
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let task = server.wait_final(created["taskId"].as_str().unwrap()).await;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"], "max turns reached");
    // An exception: `error`, then a `done` with empty metadata.
    worker.push(Script::of([
        OriginalEvent::error("boom"),
        OriginalEvent::empty_done(),
    ]));
    let (_, created) = server.post("/api/tasks", json!({"message": "hi"})).await;
    let task = server.wait_final(created["taskId"].as_str().unwrap()).await;
    assert_eq!(
        (task["status"].as_str(), task["error"].as_str()),
        (Some("failed"), Some("boom"))
    );

    // Cancel reaches the original worker in its form (by session) and ends the run canceled.
    worker.push(Script {
        hang: true,
        ..Script::of([OriginalEvent::text("working")])
    });
    let (_, created) = server.post("/api/tasks", json!({"message": "long"})).await;
    let id = created["taskId"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !server.logs(&id).await.iter().any(|l| l["type"] == "text") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, canceled) = server
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{canceled}");
    let task = server.wait_final(&id).await;
    assert_eq!(task["status"], "canceled", "{task}");
    let cancels: Vec<_> = worker
        .received()
        .into_iter()
        .filter(|r| r.route == "POST /cancel")
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].status, 200);
    assert_eq!(cancels[0].body["session_id"], created["sessionId"]);
}

/// The `error` and `done` of a task followed over the WebSocket.
async fn error_then_done(ws: &mut Ws, message: &str) -> (String, Value, Value) {
    let (_, task, _) = ws.chat(None, message).await;
    let events = ws.events_until_done(&task).await;
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(events[n - 2]["type"], "error", "{events:?}");
    (task, events[n - 2].clone(), events[n - 1].clone())
}

fn assert_no_address(text: &str, worker_url: &str) {
    let port = worker_url.rsplit(':').next().unwrap();
    assert!(
        !text.contains("127.0.0.1") && !text.contains(port) && !text.contains("http://"),
        "an internal address reached the client: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_failures_reach_clients_as_an_error_before_done_without_addresses() {
    let worker = OriginalWorker::start().await;
    let url = worker.url();
    let server = TestServer::start(&url).await;
    let mut ws = server.ws().await;

    // A protocol error: data that is not JSON.
    worker.push(Script::of([
        OriginalEvent::text("a"),
        OriginalEvent::raw("text", "not json"),
    ]));
    let (task, error, done) = error_then_done(&mut ws, "one").await;
    assert_eq!(error["metadata"]["code"], "worker_protocol");
    let message = error["content"].as_str().unwrap();
    assert!(
        message.contains(&task) && message.contains("version"),
        "{message}"
    );
    assert_no_address(message, &url);
    assert_eq!(done["metadata"]["status"], "failed");
    assert_eq!(done["metadata"]["error"], message);

    // The worker ends the stream with no result (and no error).
    worker.push(Script::of([OriginalEvent::text("half")]));
    let (task, error, _) = error_then_done(&mut ws, "two").await;
    assert_eq!(error["metadata"]["code"], "worker_lost");
    let message = error["content"].as_str().unwrap();
    assert!(message.contains(&task), "{message}");
    assert_no_address(message, &url);
    let stored = server.wait_final(&task).await;
    assert_eq!(stored["error"], message);

    // A route the original worker lacks (a session's files): 502 to the client, not 404,
    // and no address.
    let session = stored["sessionId"].as_str().unwrap();
    let r = server
        .http
        .get(format!("{}/api/sessions/{session}/files", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "protocol");
    assert_no_address(&body.to_string(), &url);

    // The driver is named, and the worker id is not the address.
    let (_, health) = server.get("/api/health").await;
    assert_eq!(health["driver"], "static");
    let (_, workers) = server.get("/api/admin/workers").await;
    assert_eq!(workers["driver"], "static");
    assert_eq!(
        workers["workers"][0]["endpoint"]["worker_id"],
        "static-worker"
    );
    assert_eq!(stored_worker(&server, &task).await, "static-worker");
}

async fn stored_worker(server: &TestServer, task: &str) -> String {
    let (_, t) = server.get(&format!("/api/tasks/{task}")).await;
    t["workerId"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_and_a_timeout_fail_with_an_error_event_that_says_what_to_do() {
    let server = TestServer::without_worker(Backoff::new(
        2,
        Duration::from_millis(10),
        Duration::from_millis(20),
    ))
    .await;
    let url = server.dispatcher().driver_name().to_owned();
    assert_eq!(url, "static");
    let mut ws = server.ws().await;
    let (task, error, done) = error_then_done(&mut ws, "hi").await;
    assert_eq!(error["metadata"]["code"], "worker_unavailable");
    let message = error["content"].as_str().unwrap();
    assert!(
        message.contains("STATIC_WORKER_URL") && message.contains(&task),
        "{message}"
    );
    assert!(!message.contains("127.0.0.1"), "{message}");
    assert_eq!(done["metadata"]["error"], message);
    drop(ws);
    drop(server);

    // The per-task timeout, on a worker that hangs.
    let worker = OriginalWorker::start().await;
    worker.push(Script {
        hang: true,
        ..Script::of([OriginalEvent::text("thinking")])
    });
    let mut config = DispatcherConfig::default();
    config.task_timeout = Duration::from_millis(300);
    config.cancel_grace = Duration::from_millis(100);
    let server = TestServer::start_with(&worker.url(), config, anywork_runtime::FirstWords).await;
    let mut ws = server.ws().await;
    let (task, error, done) = error_then_done(&mut ws, "slow").await;
    assert_eq!(error["metadata"]["code"], "timeout");
    let message = error["content"].as_str().unwrap();
    assert!(
        message.contains("TASK_TIMEOUT_SECONDS") && message.contains(&task),
        "{message}"
    );
    assert_eq!(done["metadata"]["status"], "failed");
}

/// A channel whose every task gets the skills `defaults` names.
struct DefaultsChannel {
    kind: &'static str,
    defaults: Vec<&'static str>,
}

#[async_trait::async_trait]
impl anywork_core::Channel for DefaultsChannel {
    fn channel_type(&self) -> &str {
        self.kind
    }

    async fn parse(
        &self,
        _request: anywork_core::InboundRequest,
    ) -> anywork_core::Result<anywork_core::Inbound> {
        Ok(anywork_core::Inbound::Skip {
            reason: "not used".into(),
        })
    }

    fn defaults(&self) -> anywork_core::ChannelDefaults {
        let skills = self
            .defaults
            .iter()
            .map(|n| anywork_core::SkillSpec::named(*n))
            .collect();
        anywork_core::ChannelDefaults::new(skills, Default::default())
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
async fn channel_default_skills_are_resolved_by_name_the_same_way() {
    let worker = OriginalWorker::start().await;
    let skills = skills_dir();
    let dir = SkillsDir::new(skills.path());
    let server = TestServer::start_custom(&worker.url(), move |b| {
        b.skills(dir)
            .channel(std::sync::Arc::new(DefaultsChannel {
                kind: "reviews",
                defaults: vec!["code-review"],
            }))
            .channel(std::sync::Arc::new(DefaultsChannel {
                kind: "broken",
                defaults: vec!["missing-skill"],
            }))
    })
    .await;
    let d = server.dispatcher();
    let submitted = d
        .submit(anywork_core::TaskRequest::new("reviews", "look at this"))
        .await
        .unwrap();
    let task = server.wait_final(&submitted.task.id.to_string()).await;
    assert_eq!(task["status"], "completed", "{task}");
    let prepare = worker.bodies("POST /prepare").pop().unwrap();
    assert_eq!(prepare["skills"][0]["name"], "code-review");
    assert_eq!(
        prepare["skills"][0]["files"]["scripts/lint.sh"],
        "#!/bin/sh\necho lint\n"
    );
    // A default that does not resolve refuses the channel's requests, saying which and where.
    let err = d
        .submit(anywork_core::TaskRequest::new("broken", "hi"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("missing-skill")
            && err.message().contains(&skills.path().display().to_string()),
        "{err}"
    );
    let (_, sessions) = server.get("/api/sessions").await;
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 1);
}
