//! Worker benchmarks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use anywork_core::{Executor, TaskEvent, TaskId, TaskStatus};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::{
    ClaudeCodeConfig, ClaudeCodeExecutor, NativeConfig, NativeExecutor, Provider, WorkerConfig,
    WorkerState,
};
use futures_util::StreamExt;
use serde_json::json;

use crate::procfs::mib;
use crate::stats::{ms, summarize};

/// Options of `anywork-bench worker`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Tasks per executor for the `/chat` latencies (Claude Code runs a tenth of this).
    #[arg(long, default_value_t = 300)]
    tasks: usize,
    /// Model turns in the per-turn overhead task.
    #[arg(long, default_value_t = 50)]
    turns: usize,
    /// The `claude` CLI (default: CLAUDE_BIN, else the claude-agent-sdk wheel's binary).
    #[arg(long, env = "CLAUDE_BIN")]
    claude_bin: Option<PathBuf>,
    /// The release worker binary for the RSS figures (default: next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Sessions for the per-session memory of the worker binary (native executor, each
    /// session chats `--session-turns` times, then all sit idle); 0 skips it.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Chats per session in the per-session memory figure.
    #[arg(long, default_value_t = 2)]
    session_turns: usize,
    /// Only the worker binary's memory figures (idle RSS, per idle session): no latencies.
    #[arg(long)]
    memory_only: bool,
}

/// An in-process worker; its workspace lives as long as this.
pub struct Worker {
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// The worker at `url` with its workspace `dir`.
    pub fn new(url: String, dir: tempfile::TempDir) -> Self {
        Self { url, _dir: dir }
    }
}

pub async fn start_worker(executor: Arc<dyn Executor>) -> anyhow::Result<Worker> {
    let dir = tempfile::tempdir()?;
    let state = WorkerState::new(WorkerConfig::new(dir.path()), executor)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(anywork_worker::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Ok(Worker { url, _dir: dir })
}

/// One `/chat`: (time to the first body byte, time to `done`, the outcome status, turns).
async fn chat(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    message: &str,
) -> anyhow::Result<(Duration, Duration, TaskStatus, u32)> {
    let started = Instant::now();
    let response = client
        .post(format!("{url}/chat"))
        .json(&json!({"task_id": TaskId::generate(), "session_id": session, "message": message}))
        .send()
        .await?
        .error_for_status()?;
    let mut body = response.bytes_stream();
    let mut first = None;
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        first.get_or_insert_with(|| started.elapsed());
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            for line in frame.lines() {
                if let Some(data) = line.strip_prefix("data:")
                    && let Ok(TaskEvent::Done(outcome)) = serde_json::from_str(data.trim())
                {
                    let first = first.unwrap_or_default();
                    return Ok((first, started.elapsed(), outcome.status, outcome.num_turns));
                }
            }
        }
    }
    bail!("the stream ended without done")
}

async fn chat_latency(
    name: &str,
    executor: Arc<dyn Executor>,
    fake: &FakeLlm,
    tasks: usize,
) -> anyhow::Result<()> {
    let worker = start_worker(executor).await?;
    let client = reqwest::Client::new();
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    // Warm up (first process start, connection pool).
    chat(&client, &worker.url, "warm", "hi").await?;
    let (mut firsts, mut dones) = (Vec::new(), Vec::new());
    for i in 0..tasks {
        let (first, done, status, _) = chat(&client, &worker.url, &format!("s{i}"), "hi").await?;
        if status != TaskStatus::Completed {
            bail!("{name}: task {i} ended {status}");
        }
        firsts.push(first);
        dones.push(done);
    }
    println!(
        "{name:12} /chat -> first SSE byte: {}",
        summarize(&mut firsts).context("no samples")?
    );
    println!(
        "{name:12} /chat -> done:           {}",
        summarize(&mut dones).context("no samples")?
    );
    Ok(())
}

/// A task of `turns` model calls (each but the last asks for a cheap tool), against a fake that
/// answers at once. Overhead per turn = (run time − the fake's own round trips) / turns.
async fn native_turn_overhead(fake: &FakeLlm, turns: usize) -> anyhow::Result<()> {
    let executor = native(fake);
    let worker = start_worker(executor).await?;
    let client = reqwest::Client::new();
    let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = remaining.clone();
    fake.set_responder(move |_| {
        if counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 1 {
            Reply::tool_use("", "list_files", json!({"pattern": "*"}))
        } else {
            Reply::text("done")
        }
    });
    let mut per_turn = Vec::new();
    for i in 0..20 {
        remaining.store(turns, std::sync::atomic::Ordering::SeqCst);
        let (_, done, status, num_turns) =
            chat(&client, &worker.url, &format!("turns{i}"), "go").await?;
        if status != TaskStatus::Completed || num_turns as usize != turns {
            bail!("turn task ended {status} after {num_turns} turns");
        }
        per_turn.push(done / turns as u32);
    }
    // The fake's own cost of one streamed reply, measured the same way the executor calls it.
    let mut raw = Vec::new();
    fake.set_responder(|_| Reply::tool_use("", "list_files", json!({"pattern": "*"})));
    for _ in 0..500 {
        let started = Instant::now();
        let body = client
            .post(format!("{}/v1/messages", fake.url()))
            .json(&json!({"model": "m", "max_tokens": 10, "stream": true,
                          "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await?
            .bytes()
            .await?;
        anyhow::ensure!(!body.is_empty());
        raw.push(started.elapsed());
    }
    let turn = summarize(&mut per_turn).context("no samples")?;
    let fake_rt = summarize(&mut raw).context("no samples")?;
    println!("native       one model turn, all in:    {turn}");
    println!("native       the fake's round trip:     {fake_rt}");
    println!(
        "native       overhead per turn (p50):   {}",
        ms(turn.p50.saturating_sub(fake_rt.p50))
    );
    Ok(())
}

pub fn native(fake: &FakeLlm) -> Arc<dyn Executor> {
    let config = NativeConfig::new(
        Provider::Anthropic {
            api_key: "bench".into(),
            base_url: fake.url(),
        },
        "claude-bench",
    );
    Arc::new(NativeExecutor::new(config).expect("native config"))
}

fn claude(fake: &FakeLlm, bin: &Path) -> Arc<dyn Executor> {
    let config = ClaudeCodeConfig::new(bin.to_path_buf())
        .with_api_key("bench")
        .with_base_url(fake.url())
        .with_env("CLAUDE_CODE_MAX_RETRIES", "0")
        .with_max_turns(3);
    Arc::new(ClaudeCodeExecutor::new(config))
}

/// The release worker binary in a process of its own, on a loopback port, with its own
/// workspace, the native executor configured against `model_url` (an OpenAI-compatible API).
struct WorkerProcess {
    child: tokio::process::Child,
    url: String,
    pid: u32,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    async fn start(bin: &Path, model_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let child = tokio::process::Command::new(bin)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("API_KEY", "bench")
            .env("API_BASE_URL", model_url)
            .env("MODEL", "bench")
            .env("WORKER_PORT", port.to_string())
            .env("WORKSPACE_DIR", dir.path())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("no pid")?;
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if client
                .get(format!("{url}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the worker did not come up");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            url,
            pid,
            _dir: dir,
        })
    }

    /// (VmRSS, RssAnon) in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        Ok((
            crate::procfs::rss_kib(self.pid)?,
            crate::procfs::rss_anon_kib(self.pid)?,
        ))
    }
}

/// RSS of the worker binary after it has started and served `/health`, idle for a second.
async fn idle_rss(bin: &Path) -> anyhow::Result<()> {
    let mut worker = WorkerProcess::start(bin, "http://127.0.0.1:9/v1").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, anon) = worker.memory()?;
    println!(
        "worker       idle RSS (release binary): {}, RssAnon {}",
        mib(rss),
        mib(anon)
    );
    worker.child.kill().await?;
    Ok(())
}

/// Memory of the worker binary per idle session: `sessions` sessions of the native executor
/// against the fake model, `turns` chats each (16 sessions at a time), then all idle; the
/// growth of VmRSS and RssAnon over the warmed-up base, divided by the sessions, after 1 s
/// and after 15 s of rest.
async fn session_memory(
    bin: &Path,
    fake: &FakeLlm,
    sessions: usize,
    turns: usize,
) -> anyhow::Result<()> {
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    let mut worker = WorkerProcess::start(bin, &format!("{}/v1", fake.url())).await?;
    let client = reqwest::Client::new();
    for i in 0..5 {
        chat(&client, &worker.url, &format!("warm{i}"), "hi").await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = worker.memory()?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut runners = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (client, url, next) = (client.clone(), worker.url.clone(), next.clone());
        runners.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= sessions {
                    return anyhow::Ok(());
                }
                for turn in 0..turns {
                    let message = format!("turn {turn} of session {i}");
                    let (_, _, status, _) = chat(&client, &url, &format!("s{i}"), &message).await?;
                    if status != TaskStatus::Completed {
                        bail!("session {i}, turn {turn} ended {status}");
                    }
                }
            }
        });
    }
    while let Some(done) = runners.join_next().await {
        done??;
    }
    let per_session = |(rss, anon): (u64, u64)| {
        let each = |now: u64, then: u64| now.saturating_sub(then) as f64 / sessions as f64;
        format!(
            "VmRSS {} → {} ({:.1} KiB per session), RssAnon {} → {} ({:.1} KiB per session)",
            mib(base.0),
            mib(rss),
            each(rss, base.0),
            mib(base.1),
            mib(anon),
            each(anon, base.1)
        )
    };
    let mut rested = 0;
    for rest in [1, 15] {
        tokio::time::sleep(Duration::from_secs(rest - rested)).await;
        rested = rest;
        println!(
            "worker       {sessions} idle sessions × {turns} chats, +{rest} s: {}",
            per_session(worker.memory()?)
        );
    }
    worker.child.kill().await?;
    Ok(())
}

/// Runs the worker benchmarks and prints one line per figure.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let fake = FakeLlm::start().await;
    if !options.memory_only {
        chat_latency("native", native(&fake), &fake, options.tasks).await?;
        native_turn_overhead(&fake, options.turns).await?;
        match options.claude_bin.or_else(anywork_test::bins::find_claude) {
            Some(bin) => {
                let tasks = (options.tasks / 10).max(5);
                chat_latency("claude-code", claude(&fake, &bin), &fake, tasks).await?;
            }
            None => println!("claude-code  skipped: no claude CLI (set CLAUDE_BIN)"),
        }
    }
    let worker_bin = match options.worker_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("anywork-worker"),
    };
    idle_rss(&worker_bin).await?;
    if options.sessions > 0 {
        session_memory(&worker_bin, &fake, options.sessions, options.session_turns).await?;
    }
    Ok(())
}
