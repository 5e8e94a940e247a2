//! Tests of the fake model APIs, including a smoke test against the real Claude Code CLI.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anywork_test::fake_llm::{Api, FakeLlm, Reply};
use serde_json::{Value, json};

/// One parsed SSE event: `event:` name (if any) and the `data:` text.
#[derive(Debug)]
struct Sse {
    event: Option<String>,
    data: String,
}

fn parse_sse(body: &str) -> Vec<Sse> {
    body.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let mut event = None;
            let mut data = Vec::new();
            for line in frame.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = Some(name.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            Sse {
                event,
                data: data.join("\n"),
            }
        })
        .collect()
}

async fn post(url: String, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("x-api-key", "test")
        .header("Anthropic-Version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request to the fake")
}

/// The blocks of an Anthropic stream, reassembled like a client would.
fn reassemble_anthropic(events: &[Sse]) -> (Vec<Value>, Value, Value) {
    let mut blocks: Vec<Value> = Vec::new();
    let mut partial_json: Vec<String> = Vec::new();
    let mut start = Value::Null;
    let mut delta = Value::Null;
    for sse in events {
        let data: Value = serde_json::from_str(&sse.data).expect("SSE data is JSON");
        assert_eq!(
            sse.event.as_deref(),
            data["type"].as_str(),
            "event name matches data.type"
        );
        match data["type"].as_str().unwrap() {
            "message_start" => start = data["message"].clone(),
            "content_block_start" => {
                assert_eq!(data["index"], blocks.len());
                blocks.push(data["content_block"].clone());
                partial_json.push(String::new());
            }
            "content_block_delta" => {
                let i = data["index"].as_u64().unwrap() as usize;
                match data["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        let text = blocks[i]["text"].as_str().unwrap().to_owned()
                            + data["delta"]["text"].as_str().unwrap();
                        blocks[i]["text"] = json!(text);
                    }
                    "input_json_delta" => {
                        partial_json[i].push_str(data["delta"]["partial_json"].as_str().unwrap())
                    }
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" => {
                let i = data["index"].as_u64().unwrap() as usize;
                if blocks[i]["type"] == "tool_use" {
                    blocks[i]["input"] = serde_json::from_str(&partial_json[i]).unwrap();
                }
            }
            "message_delta" => delta = data,
            "ping" | "message_stop" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    (blocks, start, delta)
}

#[tokio::test]
async fn anthropic_stream_text_and_tool_use() {
    let fake = FakeLlm::start().await;
    fake.push(
        Reply::text("Let me write that.")
            .with_tool_use(
                "toolu_1",
                "Write",
                json!({"file_path": "/w/out.txt", "content": "hé\nllo"}),
            )
            .with_usage(42, 7),
    );
    let response = post(
        format!("{}/v1/messages?beta=true", fake.url()),
        json!({"model": "claude-test-1", "stream": true, "max_tokens": 10,
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = response.text().await.unwrap();
    let events = parse_sse(&body);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    let text_deltas = names[3..]
        .iter()
        .take_while(|n| **n == "content_block_delta")
        .count();
    assert!(text_deltas >= 2, "text split into pieces: {names:?}");
    let json_deltas = names
        .iter()
        .skip(3 + text_deltas + 2)
        .take_while(|n| **n == "content_block_delta")
        .count();
    assert!(
        json_deltas >= 2,
        "partial_json split into pieces: {names:?}"
    );
    let mut expected = vec!["message_start", "ping", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", text_deltas));
    expected.extend(["content_block_stop", "content_block_start"]);
    expected.extend(std::iter::repeat_n("content_block_delta", json_deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);

    let (blocks, start, delta) = reassemble_anthropic(&events);
    assert_eq!(
        blocks,
        vec![
            json!({"type": "text", "text": "Let me write that."}),
            json!({"type": "tool_use", "id": "toolu_1", "name": "Write",
                   "input": {"file_path": "/w/out.txt", "content": "hé\nllo"}}),
        ]
    );
    assert_eq!(start["model"], "claude-test-1");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], 42);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    assert_eq!(delta["usage"]["output_tokens"], 7);
}

#[tokio::test]
async fn anthropic_non_streaming_and_default_reply() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("one"));
    let url = format!("{}/v1/messages", fake.url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let first: Value = post(url.clone(), body.clone()).await.json().await.unwrap();
    assert_eq!(first["type"], "message");
    assert_eq!(first["model"], "m");
    assert_eq!(first["content"], json!([{"type": "text", "text": "one"}]));
    assert_eq!(first["stop_reason"], "end_turn");
    assert_eq!(first["usage"]["input_tokens"], 100);
    assert_eq!(first["usage"]["output_tokens"], 20);

    // Queue empty, no responder: "ok". Then a responder takes over.
    let second: Value = post(url.clone(), body.clone()).await.json().await.unwrap();
    assert_eq!(second["content"][0]["text"], "ok");
    fake.set_responder(|req| Reply::text(format!("seen {} messages", req.messages().len())));
    fake.push(Reply::text("queued wins"));
    let third: Value = post(url.clone(), body.clone()).await.json().await.unwrap();
    assert_eq!(third["content"][0]["text"], "queued wins");
    let fourth: Value = post(url.clone(), body.clone()).await.json().await.unwrap();
    assert_eq!(fourth["content"][0]["text"], "seen 1 messages");
    fake.clear_responder();
    let fifth: Value = post(url, body).await.json().await.unwrap();
    assert_eq!(fifth["content"][0]["text"], "ok");
    assert_eq!(fake.pending_replies(), 0);
    assert_eq!(fake.request_count(), 5);
}

#[tokio::test]
async fn openai_stream_tool_call_reassembles() {
    let fake = FakeLlm::start().await;
    fake.push(
        Reply::text("Calling.")
            .with_tool_use("call_a", "read_file", json!({"path": "a.txt"}))
            .with_tool_use("", "list_dir", json!({"path": ".", "depth": 2}))
            .with_usage(11, 5),
    );
    let response = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "gpt-test", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let events = parse_sse(&body);
    assert!(events.iter().all(|e| e.event.is_none()));
    assert_eq!(events.last().unwrap().data, "[DONE]");

    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    let mut usage = None;
    let mut argument_pieces = 0;
    for sse in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(&sse.data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-test");
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
        let delta = &choice["delta"];
        if let Some(c) = delta["content"].as_str() {
            content.push_str(c);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert_eq!(call["type"], "function");
                calls.push((
                    call["id"].as_str().unwrap().to_owned(),
                    call["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            }
            if let Some(args) = call["function"]["arguments"].as_str()
                && !args.is_empty()
            {
                argument_pieces += 1;
                calls[index].2.push_str(args);
            }
        }
    }
    assert_eq!(content, "Calling.");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].0, "call_a");
    assert_eq!(calls[0].1, "read_file");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"path": "a.txt"})
    );
    assert!(!calls[1].0.is_empty(), "a generated id");
    assert_eq!(calls[1].1, "list_dir");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[1].2).unwrap(),
        json!({"path": ".", "depth": 2})
    );
    assert!(argument_pieces >= 4, "arguments split into pieces");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(
        usage,
        Some(json!({"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}))
    );
}

#[tokio::test]
async fn openai_non_streaming_and_no_usage_chunk() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("plain"));
    fake.push(Reply::tool_use("call_1", "f", json!({"x": 1})));
    fake.push(Reply::text("streamed"));
    let url = format!("{}/v1/chat/completions", fake.url());
    let body = json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]});
    let first: Value = post(url.clone(), body.clone()).await.json().await.unwrap();
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["choices"][0]["message"]["content"], "plain");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    assert!(first["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(first["usage"]["total_tokens"], 120);

    let second: Value = post(url.clone(), body).await.json().await.unwrap();
    let message = &second["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(message["tool_calls"][0]["id"], "call_1");
    assert_eq!(message["tool_calls"][0]["function"]["name"], "f");
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"],
        "{\"x\":1}"
    );
    assert_eq!(second["choices"][0]["finish_reason"], "tool_calls");

    let streamed = post(url, json!({"model": "gpt", "stream": true, "messages": []}))
        .await
        .text()
        .await
        .unwrap();
    let events = parse_sse(&streamed);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let last_chunk: Value = serde_json::from_str(&events[events.len() - 2].data).unwrap();
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "stop");
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| !e.data.contains("usage")),
        "no usage without stream_options.include_usage"
    );
}

#[tokio::test]
async fn error_replies_carry_the_status() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::error(529, "overloaded_error", "Overloaded").with_header("retry-after", "3"));
    fake.push(Reply::error(
        401,
        "authentication_error",
        "invalid x-api-key",
    ));
    fake.push(Reply::error(429, "rate_limit_exceeded", "slow down"));

    let anthropic = format!("{}/v1/messages?beta=true", fake.url());
    let stream_body = json!({"model": "m", "stream": true, "messages": []});
    let r = post(anthropic.clone(), stream_body.clone()).await;
    assert_eq!(r.status(), 529);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    let r = post(anthropic, json!({"model": "m", "messages": []})).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );

    let r = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "gpt", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "slow down");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn stream_error_mid_stream() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("partial").with_stream_error("overloaded_error", "Overloaded"));
    let body = post(
        format!("{}/v1/messages", fake.url()),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await
    .text()
    .await
    .unwrap();
    let events = parse_sse(&body);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    let data: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert!(!body.contains("message_stop"));
}

#[tokio::test]
async fn requests_are_recorded() {
    let fake = FakeLlm::start().await;
    let messages = json!([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "X", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]},
    ]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages?beta=true", fake.url()))
        .header("X-Api-Key", "secret")
        .header("X-Claude-Code-Session-Id", "sess-1")
        .json(&json!({"model": "m", "messages": messages, "tools": [{"name": "X"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/nothing", fake.url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "not_found_error"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages", fake.url()))
        .body("{broken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/v1/messages?beta=true");
    assert_eq!(first.path_only(), "/v1/messages");
    assert_eq!(first.query(), Some("beta=true"));
    assert_eq!(first.api(), Some(Api::Anthropic));
    assert_eq!(
        first.headers.get("x-api-key").map(String::as_str),
        Some("secret")
    );
    assert_eq!(first.header("X-CLAUDE-CODE-SESSION-ID"), Some("sess-1"));
    assert!(first.headers.keys().all(|k| *k == k.to_lowercase()));
    assert_eq!(first.model(), Some("m"));
    assert!(!first.is_stream());
    assert_eq!(first.messages(), messages.as_array().unwrap().as_slice());
    assert_eq!(first.tool_names(), vec!["X"]);
    assert_eq!(first.tool_results().len(), 1);
    assert_eq!(first.tool_results()[0]["content"], "42");
    assert!(first.contains_text("hello"));
    assert_eq!(requests[1].path, "/v1/nothing");
    assert_eq!(requests[1].api(), None);
    assert_eq!(requests[1].body, Value::Null);
    assert_eq!(requests[1].raw_body, "not json");
    assert_eq!(fake.last_request().unwrap().raw_body, "{broken");
    assert!(fake.last_messages().is_empty());
    assert!(fake.wait_for_requests(3, Duration::from_millis(10)).await);
    assert!(!fake.wait_for_requests(4, Duration::from_millis(10)).await);
    fake.clear_requests();
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn cwd_placeholder_is_substituted() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("writing in {cwd}").with_tool_use(
        "toolu_9",
        "Write",
        json!({"file_path": "{cwd}/files/out.txt", "nested": [{"a": "{cwd}"}], "n": 1}),
    ));
    // No cwd in the request: the placeholder stays.
    fake.push(Reply::text("no {cwd}"));
    let messages = json!([
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                     {"type": "text", "text": "write the file"}]},
        {"role": "system", "content": [{"type": "text",
            "text": "# Environment\n - Primary working directory: /tmp/ws one\n - Is a git repository: false\n"}]},
    ]);
    let url = format!("{}/v1/messages", fake.url());
    let body: Value = post(url.clone(), json!({"model": "m", "messages": messages}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["content"][0]["text"], "writing in /tmp/ws one");
    assert_eq!(
        body["content"][1]["input"],
        json!({"file_path": "/tmp/ws one/files/out.txt", "nested": [{"a": "/tmp/ws one"}], "n": 1})
    );
    assert_eq!(
        fake.last_request().unwrap().cwd().as_deref(),
        Some("/tmp/ws one")
    );

    let body: Value = post(url, json!({"model": "m", "messages": []}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["content"][0]["text"], "no {cwd}");
}

#[tokio::test]
async fn slow_stream_waits_between_events() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("abc").with_event_delay(Duration::from_millis(40)));
    let started = Instant::now();
    let body = post(
        format!("{}/v1/messages", fake.url()),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await
    .text()
    .await
    .unwrap();
    let events = parse_sse(&body).len();
    // message_start ping start delta×3 stop message_delta message_stop
    assert_eq!(events, 9);
    assert!(started.elapsed() >= Duration::from_millis(40 * (events as u64 - 1)));
}

#[tokio::test]
async fn hang_sends_message_start_then_nothing() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("partial answer").hanging());
    let mut response = post(
        format!("{}/v1/messages", fake.url()),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut received = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while parse_sse(&received).len() < 6 && Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("first events arrive")
            .unwrap()
            .expect("stream still open");
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let names: Vec<String> = parse_sse(&received)
        .into_iter()
        .map(|e| e.event.unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta"
        ]
    );
    let more = tokio::time::timeout(Duration::from_millis(300), response.chunk()).await;
    assert!(more.is_err(), "nothing after the partial content: {more:?}");

    // The client goes away: the fake notices.
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.aborted_streams() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.aborted_streams(), 1);
}

#[tokio::test]
async fn shutdown_ends_hanging_streams_and_closes_the_port() {
    let fake = FakeLlm::start().await;
    fake.push(Reply::hang());
    let addr = fake.addr();
    let mut response = post(
        format!("{}/v1/chat/completions", fake.url()),
        json!({"model": "m", "stream": true, "messages": []}),
    )
    .await;
    let first = response.chunk().await.unwrap().unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("\"role\":\"assistant\"")
    );
    let started = Instant::now();
    fake.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The hanging body ends (cleanly or with an error), it does not hang.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = response.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "stream ended on shutdown");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drop_stops_the_server() {
    let fake = FakeLlm::start().await;
    let addr = fake.addr();
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "port still open after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Smoke test against the real Claude Code CLI.

/// Runs `cmd` with a deadline; returns (exit success, stdout, stderr).
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start claude");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for claude") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "claude did not finish within {timeout:?}; stdout: {}",
                out.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// The outcome of one `claude -p` run.
struct ClaudeRun {
    ok: bool,
    stdout: String,
    stderr: String,
    lines: Vec<Value>,
}

impl ClaudeRun {
    fn result(&self) -> &Value {
        self.lines
            .iter()
            .rfind(|l| l["type"] == "result")
            .unwrap_or_else(|| {
                panic!(
                    "no result line; stdout: {}\nstderr: {}",
                    self.stdout, self.stderr
                )
            })
    }
}

/// `claude -p "write the file"` set up to run offline against `fake` in `workspace`.
fn claude_command(
    claude: &PathBuf,
    fake: &FakeLlm,
    workspace: &std::path::Path,
    home: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(claude);
    cmd.current_dir(workspace)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("ANTHROPIC_BASE_URL", fake.url())
        .env("ANTHROPIC_API_KEY", "test")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("IS_SANDBOX", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .args([
            "-p",
            "write the file",
            "--output-format",
            "stream-json",
            "--verbose",
            "--dangerously-skip-permissions",
            "--max-turns",
            "3",
        ]);
    cmd
}

/// Runs `claude -p PROMPT` offline against `fake` in `workspace`, with a fresh HOME.
async fn run_claude(claude: &PathBuf, fake: &FakeLlm, workspace: &std::path::Path) -> ClaudeRun {
    let home = tempfile::tempdir().unwrap();
    let cmd = claude_command(claude, fake, workspace, home.path());
    let started = Instant::now();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_with_timeout(cmd, Duration::from_secs(120)))
            .await
            .unwrap();
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect();
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| match l["subtype"].as_str() {
            Some(sub) => format!("{}/{sub}", l["type"].as_str().unwrap_or("?")),
            None => l["type"].as_str().unwrap_or("?").to_owned(),
        })
        .collect();
    eprintln!(
        "claude finished in {:?} (exit ok: {ok}); stdout lines: {kinds:?}",
        started.elapsed()
    );
    drop(home);
    ClaudeRun {
        ok,
        stdout,
        stderr,
        lines,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_cli_writes_a_file_through_the_fake() {
    let Some(claude) =
        anywork_test::bins::claude_cli("real_claude_cli_writes_a_file_through_the_fake")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::tool_use(
        "toolu_smoke_1",
        "Write",
        json!({"file_path": "{cwd}/files/out.txt", "content": "hello"}),
    ));
    fake.push(Reply::text("done"));
    let workspace = tempfile::tempdir().unwrap();

    let run = run_claude(&claude, &fake, workspace.path()).await;
    let result = run.result();
    eprintln!(
        "result: num_turns={} duration_ms={} total_cost_usd={} usage.input_tokens={} usage.output_tokens={}",
        result["num_turns"],
        result["duration_ms"],
        result["total_cost_usd"],
        result["usage"]["input_tokens"],
        result["usage"]["output_tokens"]
    );
    assert_eq!(
        result["is_error"], false,
        "result: {result}\nstderr: {}",
        run.stderr
    );
    assert_eq!(result["result"], "done");
    assert!(run.ok, "exit code 0");

    let written = workspace.path().join("files").join("out.txt");
    assert_eq!(
        std::fs::read_to_string(&written).expect("the Write tool created the file"),
        "hello"
    );

    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        2,
        "paths: {:?}",
        requests.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    for request in &requests {
        assert_eq!(request.api(), Some(Api::Anthropic));
        assert!(request.is_stream());
        assert_eq!(request.header("x-api-key"), Some("test"));
    }
    let cwd = requests[0]
        .cwd()
        .expect("the request names the working directory");
    assert_eq!(
        std::fs::canonicalize(&cwd).unwrap(),
        std::fs::canonicalize(workspace.path()).unwrap()
    );
    let results = requests[1].tool_results();
    assert_eq!(results.len(), 1, "second request carries the tool result");
    assert_eq!(results[0]["tool_use_id"], "toolu_smoke_1");
    assert_ne!(results[0]["is_error"], true, "tool result: {}", results[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_cli_reports_an_api_error() {
    let Some(claude) = anywork_test::bins::claude_cli("real_claude_cli_reports_an_api_error")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::error(529, "overloaded_error", "Overloaded"));
    let workspace = tempfile::tempdir().unwrap();

    let run = run_claude(&claude, &fake, workspace.path()).await;
    let result = run.result();
    eprintln!(
        "result: subtype={} terminal_reason={} api_error_status={} api_error_type={} result={}",
        result["subtype"],
        result["terminal_reason"],
        result["api_error_status"],
        result["api_error_type"],
        result["result"]
    );
    assert_eq!(result["is_error"], true, "result: {result}");
    assert_eq!(result["api_error_status"], 529);
    assert!(!run.ok, "exit code 1");
    assert_eq!(
        fake.request_count(),
        1,
        "no retry with CLAUDE_CODE_MAX_RETRIES=0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_cli_killed_during_hang_is_noticed() {
    let Some(claude) =
        anywork_test::bins::claude_cli("real_claude_cli_killed_during_hang_is_noticed")
    else {
        return;
    };
    let fake = FakeLlm::start().await;
    fake.push(Reply::text("partial answer").hanging());
    let workspace = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut child = claude_command(&claude, &fake, workspace.path(), home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start claude");
    let arrived = fake.wait_for_requests(1, Duration::from_secs(60)).await;
    if !arrived {
        let _ = child.kill();
        let _ = child.wait();
        panic!("claude sent no request");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.aborted_streams(), 0, "still streaming");
    assert!(
        child.try_wait().unwrap().is_none(),
        "claude waits on the hanging stream"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while fake.aborted_streams() == 0 && killed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "fake noticed the killed client after {:?}",
        killed.elapsed()
    );
    assert_eq!(fake.aborted_streams(), 1);
}
