//! The agent's "open a pull request" tool, through the worker's API on a real socket: the
//! repository served over git's smart HTTP (`git http-backend`) with a token, the GitHub API
//! faked, the model faked, the native executor in between.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anywork_core::{TaskEvent, TaskId, TaskOutcome};
use anywork_test::fake_git::GitHttpServer;
use anywork_test::fake_github::{FakeGithub, GhPull};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::native::{NativeConfig, NativeExecutor, Provider};
use anywork_worker::{WorkerConfig, WorkerState};
use futures_util::StreamExt;
use serde_json::{Value, json};

const TOKEN: &str = "ghs_secret_push_token_42";
const REPO: &str = "octo/hello";

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Everything a test needs: a bare repository `octo/hello.git` (README.md on `main`) behind
/// a smart-HTTP server that wants [`TOKEN`], the fake GitHub API, the fake model, a worker.
struct World {
    tmp: tempfile::TempDir,
    bare: PathBuf,
    git: GitHttpServer,
    gh: FakeGithub,
    llm: FakeLlm,
    url: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl World {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        git(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("README.md"), "hello\n").unwrap();
        std::fs::write(src.join(".gitignore"), "*.log\n").unwrap();
        git(&src, &["add", "."]);
        git(&src, &["commit", "-q", "-m", "first"]);
        let root = tmp.path().join("served");
        std::fs::create_dir_all(root.join("octo")).unwrap();
        let bare = root.join("octo/hello.git");
        git(
            tmp.path(),
            &[
                "clone",
                "-q",
                "--bare",
                src.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
        );
        let git_server = GitHttpServer::start(&root, TOKEN).await;
        let gh = FakeGithub::start().await;
        gh.allow_token(TOKEN);
        let llm = FakeLlm::start().await;
        let mut config = NativeConfig::new(
            Provider::Anthropic {
                api_key: "test-key".into(),
                base_url: llm.url(),
            },
            "claude-sonnet-4-5",
        );
        config.request_timeout = Duration::from_secs(20);
        let exec = std::sync::Arc::new(NativeExecutor::new(config).unwrap());
        let ws = tmp.path().join("workspace");
        let state = WorkerState::new(WorkerConfig::new(&ws), exec).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(anywork_worker::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self {
            tmp,
            bare,
            git: git_server,
            gh,
            llm,
            url,
            http: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn workspace(&self) -> PathBuf {
        self.tmp.path().join("workspace")
    }

    /// The repository as `/prepare` gets it from the GitHub channel.
    fn repository(&self, token: bool, target: bool) -> Value {
        let mut r = json!({
            "url": self.git.repo_url("octo/hello.git"),
            "git_ref": "main",
            "dir": "hello",
        });
        if token {
            r["token"] = json!(TOKEN);
        }
        if target {
            r["pull_requests"] =
                json!({"api_url": self.gh.url(), "repository": REPO, "base": "main"});
        }
        r
    }

    async fn prepare(&self, session: &str, repository: Value) {
        let r = self
            .http
            .post(format!("{}/prepare", self.url))
            .json(&json!({"session_id": session, "repository": repository}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
    }

    /// Runs a task; its events, and the raw SSE text (what the server stores as task logs).
    async fn chat(&self, session: &str, message: &str) -> (Vec<TaskEvent>, String) {
        let r = self
            .http
            .post(format!("{}/chat", self.url))
            .json(
                &json!({"task_id": TaskId::generate(), "session_id": session, "message": message}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(chunk) = body.next().await {
                raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            }
        })
        .await
        .expect("the run ended in time");
        let events = raw
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| serde_json::from_str::<TaskEvent>(d.trim()).unwrap())
            .collect();
        (events, raw)
    }
}

fn done(events: &[TaskEvent]) -> &TaskOutcome {
    match events.last() {
        Some(TaskEvent::Done(o)) => o,
        other => panic!("no done at the end: {other:?}"),
    }
}

fn tool_results(events: &[TaskEvent]) -> Vec<(String, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::ToolResult {
                content, is_error, ..
            } => Some((content.clone(), *is_error)),
            _ => None,
        })
        .collect()
}

fn offered_tools(events: &[TaskEvent]) -> Vec<String> {
    events
        .iter()
        .find_map(|e| match e {
            TaskEvent::Init(init) => Some(init.tools.clone()),
            _ => None,
        })
        .expect("an init event")
}

/// Every file under `dir` (also inside `.git`) that holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file()
                && std::fs::read(&p)
                    .map(|b| String::from_utf8_lossy(&b).contains(needle))
                    .unwrap_or(false)
            {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_opens_a_pull_request_without_ever_seeing_the_token() {
    let w = World::start().await;
    w.prepare("gh-pr", w.repository(true, true)).await;
    let ws = w.workspace();
    let checkout = std::fs::read_dir(&ws)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("hello"))
        .find(|p| p.join("README.md").is_file())
        .expect("the repository is checked out in the session's workspace");
    assert_eq!(
        std::fs::read_to_string(checkout.join("README.md")).unwrap(),
        "hello\n"
    );
    // What the agent could do to its checkout's .git to run a command or steal the push: a
    // clean filter for every file, and a URL rewrite to a server of its own. Neither may act.
    let marker = w.tmp.path().join("filter-ran");
    std::fs::write(
        checkout.join(".git/config"),
        format!(
            "{}\n[filter \"evil\"]\n\tclean = touch {}\n[url \"http://127.0.0.1:9/\"]\n\tinsteadOf = {}\n",
            std::fs::read_to_string(checkout.join(".git/config")).unwrap(),
            marker.display(),
            w.git.url()
        ),
    )
    .unwrap();

    w.llm.push_all([
        Reply::tool_use("t1", "bash", json!({"command": "env; cat ~/.gitconfig .git/config 2>&1; echo done"})),
        Reply::tool_use(
            "t2",
            "write_file",
            json!({"path": "hello/README.md", "content": "hello, world\n"}),
        ),
        Reply::tool_use(
            "t3",
            "write_file",
            json!({"path": "hello/.gitattributes", "content": "* filter=evil\n"}),
        ),
        Reply::tool_use(
            "t4",
            "write_file",
            json!({"path": "hello/debug.log", "content": "ignored\n"}),
        ),
        Reply::tool_use(
            "t5",
            "open_pull_request",
            json!({"title": "Greet the world", "body": "Says hello to everyone.", "branch": "../main"}),
        ),
        Reply::tool_use(
            "t6",
            "open_pull_request",
            json!({"title": "Greet the world", "body": "Says hello to everyone.", "branch": "fix/greeting"}),
        ),
        Reply::tool_use(
            "t7",
            "open_pull_request",
            json!({"title": "Again", "branch": "fix/greeting"}),
        ),
        Reply::text("I opened the pull request."),
    ]);
    let (events, raw) = w.chat("gh-pr", "make the greeting wider").await;
    let outcome = done(&events);
    assert_eq!(outcome.status.as_str(), "completed", "{outcome:?}");
    assert!(
        offered_tools(&events).contains(&"open_pull_request".to_owned()),
        "the tool is offered with credentials"
    );

    let results = tool_results(&events);
    assert_eq!(results.len(), 7, "{results:#?}");
    // A bad branch name: refused with a clear error, nothing pushed for it.
    let (bad, bad_is_error) = &results[4];
    assert!(*bad_is_error);
    assert!(
        bad.contains("branch name \"../main\" is not allowed"),
        "{bad}"
    );
    // The good one.
    let (ok, ok_is_error) = &results[5];
    assert!(!ok_is_error, "{ok}");
    assert_eq!(
        ok,
        "Opened pull request #100: https://github.com/octo/hello/pull/100 (branch `fix/greeting` into `main`)"
    );
    // The same branch again: the tool only creates branches.
    let (again, again_is_error) = &results[6];
    assert!(*again_is_error);
    assert!(again.contains("already exists"), "{again}");

    // The outcome carries the link, reported by the worker.
    assert_eq!(outcome.pull_requests.len(), 1, "{outcome:?}");
    let link = &outcome.pull_requests[0];
    assert_eq!(
        (
            link.repository.as_str(),
            link.number,
            link.url.as_str(),
            link.branch.as_str(),
            link.base.as_str()
        ),
        (
            REPO,
            100,
            "https://github.com/octo/hello/pull/100",
            "fix/greeting",
            "main"
        )
    );

    // The API call, exactly.
    assert_eq!(
        w.gh.pulls(),
        vec![GhPull {
            repo: REPO.into(),
            number: 100,
            title: "Greet the world".into(),
            head: "fix/greeting".into(),
            base: "main".into(),
            body: Some("Says hello to everyone.".into()),
            draft: false,
        }]
    );
    let calls: Vec<_> =
        w.gh.requests()
            .into_iter()
            .filter(|r| r.line() == "POST /repos/octo/hello/pulls")
            .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        calls[0].header("accept"),
        Some("application/vnd.github+json")
    );

    // The branch is in the repository, one commit on top of main, with the change and
    // without the ignored file.
    let main = git(&w.bare, &["rev-parse", "main"]);
    assert_eq!(
        git(&w.bare, &["rev-parse", "fix/greeting^"]),
        main,
        "one commit on main"
    );
    assert_eq!(
        git(&w.bare, &["show", "fix/greeting:README.md"]),
        "hello, world"
    );
    assert_eq!(
        git(&w.bare, &["log", "-1", "--format=%s%n%b", "fix/greeting"]),
        "Greet the world\nSays hello to everyone."
    );
    let files = git(&w.bare, &["ls-tree", "--name-only", "fix/greeting"]);
    assert!(!files.contains("debug.log"), "{files}");
    assert!(files.contains(".gitattributes"), "{files}");
    assert_eq!(git(&w.bare, &["rev-parse", "main"]), main, "main untouched");
    assert!(w.git.pushed());
    assert!(!marker.exists(), "the agent's git filter never ran");
    // Fetch and push went with the token, as GitHub takes it.
    let basic = format!(
        "Basic {}",
        anywork_test_base64(format!("x-access-token:{TOKEN}").as_bytes())
    );
    assert!(
        w.git
            .requests()
            .iter()
            .filter(|(line, _)| line.contains("receive-pack"))
            .all(|(_, auth)| auth.as_deref() == Some(basic.as_str())),
        "{:?}",
        w.git.requests()
    );

    // The token is nowhere the agent (or the task's log) could see it.
    assert!(!raw.contains(TOKEN), "not in the events");
    let encoded = anywork_test_base64(format!("x-access-token:{TOKEN}").as_bytes());
    for secret in [TOKEN, encoded.as_str()] {
        assert!(!raw.contains(secret));
        assert_eq!(
            files_holding(&ws, secret),
            Vec::<PathBuf>::new(),
            "not in the workspace"
        );
        for request in w.llm.requests() {
            assert!(!request.contains_text(secret), "not sent to the model");
        }
    }
    // The bash output the model saw is the environment the agent has.
    let env_seen = &results[0].0;
    assert!(env_seen.contains("done"), "{env_seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_or_a_target_the_tool_is_not_offered() {
    let w = World::start().await;
    for (session, token, target) in [("no-token", false, true), ("no-target", true, false)] {
        // The smart-HTTP server wants the token: without it, clone from the bare path.
        let mut repository = w.repository(token, target);
        if !token {
            repository["url"] = json!(format!("file://{}", w.bare.display()));
        }
        w.prepare(session, repository).await;
        w.llm.push_all([
            Reply::tool_use("t1", "open_pull_request", json!({"title": "x"})),
            Reply::text("ok"),
        ]);
        let (events, _) = w.chat(session, "open one").await;
        assert!(
            !offered_tools(&events).contains(&"open_pull_request".to_owned()),
            "{session}"
        );
        let results = tool_results(&events);
        assert!(results[0].1, "{session}: {results:?}");
        assert!(results[0].0.contains("no tool named"), "{results:?}");
        assert!(done(&events).pull_requests.is_empty());
    }
    assert!(w.gh.pulls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_changed_is_refused_and_the_default_branch_name_is_used() {
    let w = World::start().await;
    w.prepare("gh-default", w.repository(true, true)).await;
    w.llm.push_all([
        Reply::tool_use("t1", "open_pull_request", json!({"title": "Nothing"})),
        Reply::tool_use(
            "t2",
            "write_file",
            json!({"path": "hello/NEW.md", "content": "new\n"}),
        ),
        Reply::tool_use(
            "t3",
            "open_pull_request",
            json!({"title": "Add NEW.md", "draft": true}),
        ),
        Reply::text("done"),
    ]);
    let (events, _) = w.chat("gh-default", "add a file").await;
    let results = tool_results(&events);
    assert!(results[0].1);
    assert!(
        results[0].0.contains("there are no changes in `hello`"),
        "{results:?}"
    );
    assert!(!results[2].1, "{results:?}");
    let pulls = w.gh.pulls();
    assert_eq!(pulls.len(), 1);
    assert!(pulls[0].draft);
    assert_eq!(pulls[0].body.as_deref(), Some(""));
    let branch = &pulls[0].head;
    assert!(branch.starts_with("anywork/gh-default-"), "{branch}");
    anywork_core::executor::validate_branch(branch).unwrap();
    assert_eq!(git(&w.bare, &["show", &format!("{branch}:NEW.md")]), "new");
    assert_eq!(done(&events).pull_requests[0].branch, *branch);
}

fn anywork_test_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
