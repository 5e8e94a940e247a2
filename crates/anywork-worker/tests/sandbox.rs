//! The sandbox of the agent's processes, attacked as an agent would: real bubblewrap, real
//! `bash` tool calls and MCP servers of the native executor (against the fake model API), and
//! the real worker binary with model keys in its environment. Every attack fails with a clear
//! error while the legitimate path beside it works.
//!
//! The server's data dir of these tests lives below the target dir, not in `/tmp` (which the
//! sandbox replaces anyway), so that hiding it is what the tests prove. Without bwrap on the
//! machine the tests print a loud skip banner (and fail when `CI` is set).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anywork_core::{ExecutionRequest, Executor, SessionId, TaskEvent, TaskId};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::native::{NativeConfig, NativeExecutor, Provider};
use anywork_worker::sandbox::{SANDBOX_UID, Sandbox, SandboxConfig, SandboxMode};
use anywork_worker::{Workspace, encode_session_id};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Longest a run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// What the "database" holds; never seen by a sandboxed process.
const DB_MARKER: &str = "DB-SECRET-MARKER-51c2";
/// A file of another session; never seen either.
const OTHER_MARKER: &str = "OTHER-SESSION-MARKER-9e07";
/// The model keys in the worker's environment (binary tests).
const KEY_MARKER: &str = "sk-KEY-MARKER-3b8d";

/// Whether bwrap is installed; a loud skip otherwise (a failure when `CI` is set).
fn bwrap_or_skip(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("bwrap").is_file()));
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: bwrap not found (apt install bubblewrap); required when CI is set");
        }
        let bar = "!".repeat(88);
        eprintln!("\n{bar}\n!! SKIPPED {test}: bwrap not found (apt install bubblewrap).\n{bar}");
    }
    found
}

/// A server data dir: the database, and the workspace root with two sessions.
struct DataDir {
    _dir: tempfile::TempDir,
    path: PathBuf,
    db: PathBuf,
    root: PathBuf,
    ws: PathBuf,
    other: PathBuf,
}

fn data_dir() -> DataDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().canonicalize().unwrap();
    let db = path.join("anywork.db");
    std::fs::write(&db, DB_MARKER).unwrap();
    let root = path.join("workspace");
    let workspace = Workspace::new(&root);
    workspace.init().unwrap();
    let ws = workspace
        .ensure_session(&SessionId::new("s-mine").unwrap())
        .unwrap();
    std::fs::write(ws.join("files/own.txt"), "my own file").unwrap();
    let other = workspace
        .ensure_session(&SessionId::new("s-other").unwrap())
        .unwrap();
    std::fs::write(other.join("files/secret.txt"), OTHER_MARKER).unwrap();
    DataDir {
        _dir: dir,
        path,
        db,
        root,
        ws,
        other,
    }
}

fn sandbox(hide: &[&Path], network: bool) -> Sandbox {
    let mut config = SandboxConfig::default()
        .with_mode(SandboxMode::Bwrap)
        .with_network(network);
    for dir in hide {
        config = config.with_hidden(dir);
    }
    let sandbox = Sandbox::detect(config).expect("bwrap works on this machine");
    assert!(sandbox.is_confined());
    assert_eq!(sandbox.status(), "bwrap");
    sandbox
}

fn executor(fake: &FakeLlm, sandbox: Sandbox) -> NativeExecutor {
    let mut config = NativeConfig::new(
        Provider::Anthropic {
            api_key: "test-key".into(),
            base_url: fake.url(),
        },
        "claude-sonnet-4-5",
    )
    .with_sandbox(sandbox);
    config.retry.max_attempts = 1;
    config.bash_timeout = Duration::from_secs(20);
    NativeExecutor::new(config).unwrap()
}

/// Runs one task in `ws` whose model calls `tools` in turn, then says "done"; returns the
/// tool results (content, is_error) in order, and all events.
async fn run_tools(
    exec: &NativeExecutor,
    fake: &FakeLlm,
    ws: &Path,
    tools: &[(&str, Value)],
) -> (Vec<(String, bool)>, Vec<TaskEvent>) {
    for (i, (name, input)) in tools.iter().enumerate() {
        fake.push(Reply::tool_use(format!("toolu_{i}"), *name, input.clone()));
    }
    fake.push(Reply::text("done"));
    let mut execution = exec
        .start(ExecutionRequest::new(
            TaskId::generate(),
            SessionId::new("s-mine").unwrap(),
            "go",
            ws,
        ))
        .await
        .unwrap();
    let mut events = Vec::new();
    tokio::time::timeout(RUN_LIMIT, async {
        while let Some(event) = execution.events.next().await {
            events.push(event);
        }
    })
    .await
    .expect("the run ended in time");
    let mut results = Vec::new();
    for i in 0..tools.len() {
        let id = format!("toolu_{i}");
        let result = events
            .iter()
            .find_map(|e| match e {
                TaskEvent::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } if *tool_use_id == id => Some((content.clone(), *is_error)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no result for {id}: {events:#?}"));
        results.push(result);
    }
    (results, events)
}

fn bash(command: impl Into<String>) -> (&'static str, Value) {
    ("bash", json!({ "command": command.into() }))
}

fn assert_refused(result: &(String, bool), why: &str) {
    assert!(result.1, "should have failed: {result:?}");
    assert!(result.0.contains(why), "expected {why:?} in {:?}", result.0);
}

#[tokio::test]
async fn the_database_and_other_sessions_are_invisible() {
    if !bwrap_or_skip("the_database_and_other_sessions_are_invisible") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    let exec = executor(&fake, sandbox(&[&data.path], true));
    let other_file = data.other.join("files/secret.txt");
    let (results, _) = run_tools(
        &exec,
        &fake,
        &data.ws,
        &[
            bash(format!("cat {}", data.db.display())),
            bash(format!("cat {}", other_file.display())),
            bash(format!(
                "cat ../{}/files/secret.txt",
                encode_session_id(&SessionId::new("s-other").unwrap())
            )),
            bash(format!("ls -A {}", data.path.display())),
            bash("cat files/own.txt"),
        ],
    )
    .await;
    assert_refused(&results[0], "No such file or directory");
    assert_refused(&results[1], "No such file or directory");
    assert_refused(&results[2], "No such file or directory");
    // The data dir is an empty folder but for the way to this workspace.
    assert_eq!(results[3].0.trim(), "workspace", "{:?}", results[3]);
    assert_eq!(results[4], ("my own file".to_owned(), false));
    for (content, _) in &results {
        assert!(!content.contains(DB_MARKER) && !content.contains(OTHER_MARKER));
    }

    // Control: confined but without hiding the data dir, the same read works (read-only), so
    // hiding is what stops it.
    let exec = executor(&fake, sandbox(&[], true));
    let (results, _) = run_tools(
        &exec,
        &fake,
        &data.ws,
        &[bash(format!("cat {}", data.db.display()))],
    )
    .await;
    assert_eq!(results[0], (DB_MARKER.to_owned(), false));
}

#[tokio::test]
async fn only_the_workspace_is_writable() {
    if !bwrap_or_skip("only_the_workspace_is_writable") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    let exec = executor(&fake, sandbox(&[&data.root], true));
    let planted = data.path.join("planted.txt");
    let scratch = format!("/tmp/anywork-sandbox-scratch-{}", std::process::id());
    let (results, _) = run_tools(
        &exec,
        &fake,
        &data.ws,
        &[
            bash(format!("echo evil > {}", data.db.display())),
            bash(format!("echo evil > {}", planted.display())),
            bash(format!("echo evil > {}/SOUL.md", data.root.display())),
            bash("echo evil > /usr/local/anywork-planted"),
            bash("echo mine > files/out.txt && cat files/out.txt"),
            bash(format!("echo scratch > {scratch} && cat {scratch}")),
            bash("id -u; grep CapEff /proc/self/status"),
        ],
    )
    .await;
    assert_refused(&results[0], "Read-only file system");
    assert_refused(&results[1], "Read-only file system");
    // The workspace root is hidden: an empty, read-only folder.
    assert_refused(&results[2], "Read-only file system");
    assert_refused(&results[3], "Read-only file system");
    assert_eq!(results[4], ("mine\n".to_owned(), false));
    assert_eq!(
        std::fs::read_to_string(data.ws.join("files/out.txt")).unwrap(),
        "mine\n"
    );
    // A private /tmp: usable inside, nothing of it outside.
    assert_eq!(results[5], ("scratch\n".to_owned(), false));
    assert!(!Path::new(&scratch).exists());
    assert_eq!(std::fs::read_to_string(&data.db).unwrap(), DB_MARKER);
    assert!(!planted.exists());
    assert!(!Path::new("/usr/local/anywork-planted").exists());
    // No capabilities; not root even when the worker is.
    let (ids, _) = &results[6];
    assert!(ids.contains("CapEff:\t0000000000000000"), "{ids}");
    let uid: u32 = ids.lines().next().unwrap().trim().parse().unwrap();
    assert_ne!(uid, 0, "{ids}");
    if is_root() {
        assert_eq!(uid, SANDBOX_UID);
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[tokio::test]
async fn the_network_follows_sandbox_network() {
    if !bwrap_or_skip("the_network_follows_sandbox_network") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = bash(format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
    ));

    let exec = executor(&fake, sandbox(&[&data.path], false));
    let (off, _) = run_tools(&exec, &fake, &data.ws, std::slice::from_ref(&connect)).await;
    let (output, failed) = &off[0];
    assert!(*failed, "{off:?}");
    assert!(!output.contains("connected\n"), "{off:?}");
    assert!(
        output.contains("Connection refused") || output.contains("Network is unreachable"),
        "{off:?}"
    );

    // With the network on, the same connection is made.
    let exec = executor(&fake, sandbox(&[&data.path], true));
    let (on, _) = run_tools(&exec, &fake, &data.ws, &[connect]).await;
    assert_eq!(on[0], ("connected\n".to_owned(), false));
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_ok(), "the connection arrived");
}

#[tokio::test]
async fn mcp_stdio_servers_run_in_the_sandbox() {
    if !bwrap_or_skip("mcp_stdio_servers_run_in_the_sandbox") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    // A real MCP server, and a "server" that only reports what it can see and then exits.
    let probe = format!(
        "env > mcp-env.txt; cat {} > mcp-db.txt 2>&1; (echo x > {}/mcp-planted) 2>> mcp-db.txt",
        data.db.display(),
        data.path.display()
    );
    std::fs::write(
        data.ws.join(".mcp.json"),
        json!({"mcpServers": {
            "calc": {"command": anywork_test::bins::test_mcp_server()},
            "probe": {"command": "sh", "args": ["-c", probe], "env": {"PROBE_OWN": "named"}},
        }})
        .to_string(),
    )
    .unwrap();
    let exec = executor(&fake, sandbox(&[&data.path], false));
    let (results, events) = run_tools(
        &exec,
        &fake,
        &data.ws,
        &[("mcp__calc__add", json!({"a": 2, "b": 3}))],
    )
    .await;
    assert_eq!(
        results[0],
        (r#"{"result":5}"#.to_owned(), false),
        "{events:#?}"
    );
    let init = events
        .iter()
        .find_map(|e| match e {
            TaskEvent::Init(init) => Some(init),
            _ => None,
        })
        .unwrap();
    let status = |name: &str| {
        init.mcp_servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.status.clone())
    };
    assert_eq!(status("calc").as_deref(), Some("connected"));
    assert_eq!(status("probe").as_deref(), Some("failed"));

    let env = std::fs::read_to_string(data.ws.join("mcp-env.txt")).unwrap();
    assert!(env.contains("PROBE_OWN=named"), "{env}");
    assert!(
        env.contains(&format!("HOME={}", data.ws.display())),
        "{env}"
    );
    let seen = std::fs::read_to_string(data.ws.join("mcp-db.txt")).unwrap();
    assert!(seen.contains("No such file or directory"), "{seen}");
    assert!(seen.contains("Read-only file system"), "{seen}");
    assert!(!seen.contains(DB_MARKER), "{seen}");
    assert!(!data.path.join("mcp-planted").exists());
}

// ---------------------------------------------------------------------------------------------
// The worker binary, with the model keys in its environment

struct WorkerBin {
    url: String,
    child: tokio::process::Child,
    http: reqwest::Client,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The worker binary's command: native executor on `fake`, keys set to [`KEY_MARKER`].
fn worker_command(fake: &FakeLlm, data: &DataDir, port: u16) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(anywork_test::bins::worker_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WORKER_HOST", "127.0.0.1")
        .env("WORKER_PORT", port.to_string())
        .env("WORKSPACE_DIR", &data.root)
        .env("EXECUTOR", "native")
        .env("ANTHROPIC_API_KEY", KEY_MARKER)
        .env("ANTHROPIC_BASE_URL", fake.url())
        .env("API_KEY", KEY_MARKER)
        .env("OPENAI_API_KEY", KEY_MARKER)
        .env("GH_TOKEN", "gh-named-value")
        .env("CHILD_ENV", "GH_TOKEN")
        .env("NATIVE_MAX_RETRIES", "0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn start_worker(mut cmd: tokio::process::Command, port: u16) -> WorkerBin {
    let child = cmd.spawn().expect("start anywork-worker");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = http.get(format!("{url}/health")).send().await
            && r.status().is_success()
        {
            return WorkerBin { url, child, http };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker did not become healthy");
}

impl WorkerBin {
    async fn health(&self) -> Value {
        self.http
            .get(format!("{}/health", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Runs a chat and returns the raw SSE text.
    async fn chat(&self, session: &str, message: &str) -> String {
        let response = self
            .http
            .post(format!("{}/chat", self.url))
            .json(&json!({
                "task_id": TaskId::generate(),
                "session_id": session,
                "message": message,
            }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
        tokio::time::timeout(RUN_LIMIT, response.text())
            .await
            .expect("chat ended in time")
            .unwrap()
    }

    /// Stops the worker and returns its log.
    async fn stop(mut self) -> String {
        let _ = self.child.start_kill();
        let output = self.child.wait_with_output().await.unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }
}

#[tokio::test]
async fn the_worker_binary_sandboxes_and_strips_the_keys() {
    if !bwrap_or_skip("the_worker_binary_sandboxes_and_strips_the_keys") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    let port = free_port();
    let mut cmd = worker_command(&fake, &data, port);
    cmd.env("SANDBOX", "bwrap").env("SANDBOX_HIDE", &data.path);
    let worker = start_worker(cmd, port).await;
    assert_eq!(worker.health().await["sandbox"], "bwrap");

    fake.push(Reply::tool_use(
        "toolu_env",
        "bash",
        json!({"command": "env"}),
    ));
    fake.push(Reply::tool_use(
        "toolu_db",
        "bash",
        json!({"command": format!("cat {}", data.db.display())}),
    ));
    fake.push(Reply::text("done"));
    let sse = worker.chat("s-binary", "show the environment").await;
    assert!(sse.contains("done"), "{sse}");
    assert!(!sse.contains(KEY_MARKER), "a key reached the tool: {sse}");
    assert!(!sse.contains(DB_MARKER), "{sse}");
    assert!(sse.contains("GH_TOKEN=gh-named-value"), "{sse}");
    assert!(sse.contains("No such file or directory"), "{sse}");
    // What the model got back: the same.
    let results: Vec<String> = fake
        .requests()
        .iter()
        .flat_map(|r| r.tool_results().into_iter().map(|v| v.to_string()))
        .collect();
    assert!(results.iter().any(|r| r.contains("PATH=")), "{results:?}");
    assert!(!results.iter().any(|r| r.contains(KEY_MARKER)));

    // The workspace root and the session folder are private, the history owner-only.
    let session = data
        .root
        .join(encode_session_id(&SessionId::new("s-binary").unwrap()));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.root), 0o700);
    assert_eq!(mode(&session), 0o700);
    assert_eq!(mode(&session.join("sessions/history.jsonl")), 0o600);
    assert_eq!(
        mode(&session.join("sessions/native-transcript.jsonl")),
        0o600
    );
    let log = worker.stop().await;
    assert!(!log.contains(KEY_MARKER), "{log}");
}

#[tokio::test]
async fn without_a_sandbox_health_and_log_say_so() {
    let data = data_dir();
    let fake = FakeLlm::start().await;

    // SANDBOX=off: unconfined on purpose, flagged in /health; children still lose the keys.
    let port = free_port();
    let mut cmd = worker_command(&fake, &data, port);
    cmd.env("SANDBOX", "off");
    let worker = start_worker(cmd, port).await;
    assert_eq!(worker.health().await["sandbox"], "none: SANDBOX=off");
    fake.push(Reply::tool_use(
        "toolu_env",
        "bash",
        json!({"command": "env"}),
    ));
    fake.push(Reply::text("done"));
    let sse = worker.chat("s-off", "env").await;
    assert!(sse.contains("PATH="), "{sse}");
    assert!(!sse.contains(KEY_MARKER), "a key reached the tool: {sse}");
    worker.stop().await;

    // SANDBOX=auto without a usable bwrap: starts, with a loud warning and the reason.
    let port = free_port();
    let mut cmd = worker_command(&fake, &data, port);
    cmd.env("SANDBOX_BWRAP", "/nonexistent/bwrap");
    let worker = start_worker(cmd, port).await;
    let health = worker.health().await;
    let status = health["sandbox"].as_str().unwrap();
    assert!(status.starts_with("none: "), "{health}");
    assert!(status.contains("/nonexistent/bwrap"), "{health}");
    let log = worker.stop().await;
    assert!(log.contains("NO SANDBOX"), "{log}");
    assert!(log.contains("apt install bubblewrap"), "{log}");

    // SANDBOX=bwrap without a usable bwrap: refuses to start, saying why.
    let mut cmd = worker_command(&fake, &data, free_port());
    cmd.env("SANDBOX", "bwrap")
        .env("SANDBOX_BWRAP", "/nonexistent/bwrap");
    let output = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SANDBOX=bwrap"), "{stderr}");
    assert!(stderr.contains("/nonexistent/bwrap"), "{stderr}");

    // A bad value is refused, naming the variable.
    let mut cmd = worker_command(&fake, &data, free_port());
    cmd.env("SANDBOX", "sometimes");
    let output = cmd.output().await.unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SANDBOX"));
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(cmdline);
        }
    }
    found
}

#[tokio::test]
async fn nothing_outlives_a_sandboxed_command() {
    if !bwrap_or_skip("nothing_outlives_a_sandboxed_command") {
        return;
    }
    let data = data_dir();
    let fake = FakeLlm::start().await;
    let exec = executor(&fake, sandbox(&[&data.path], true));
    // Distinct sleep lengths mark the processes of this test.
    let (results, _) = run_tools(
        &exec,
        &fake,
        &data.ws,
        &[
            bash("sleep 3171 & echo started"),
            ("bash", json!({"command": "sleep 3172", "timeout": 1})),
        ],
    )
    .await;
    assert_eq!(results[0], ("started\n".to_owned(), false));
    assert!(results[1].1, "{:?}", results[1]);
    assert!(results[1].0.contains("timed out"), "{:?}", results[1]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with("sleep 317");
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
