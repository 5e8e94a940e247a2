//! Claude Code warm sessions: a session's CLI kept up between its tasks, against a new CLI per
//! task, through the worker's HTTP API, with the fake model answering at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use anywork_core::{TaskEvent, TaskId, TaskOutcome, TaskStatus};
use anywork_test::fake_llm::{FakeLlm, Reply};
use anywork_worker::{ClaudeCodeConfig, ClaudeCodeExecutor};
use futures_util::StreamExt;
use serde_json::json;

use crate::stats::summarize;
use crate::worker::start_worker;

/// Options of `anywork-bench claude`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Tasks measured per mode.
    #[arg(long, default_value_t = 20)]
    tasks: usize,
    /// Sessions run one task each for the memory figure.
    #[arg(long, default_value_t = 6)]
    sessions: usize,
    /// `CLAUDE_WARM_MAX` of the memory figure.
    #[arg(long, default_value_t = 4)]
    warm_max: usize,
    /// Seconds between a one-session worker's start and its first task (the spare's head
    /// start).
    #[arg(long, default_value_t = 3.0)]
    spare_settle_seconds: f64,
    /// The `claude` CLI (default: CLAUDE_BIN, else the claude-agent-sdk wheel's binary).
    #[arg(long, env = "CLAUDE_BIN")]
    claude_bin: Option<PathBuf>,
}

/// One `/chat`: time to the first event (`init`), time to `done`, and the outcome.
struct Chat {
    first_event: Duration,
    done: Duration,
    outcome: TaskOutcome,
}

async fn chat(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    message: &str,
) -> anyhow::Result<Chat> {
    let started = Instant::now();
    let response = client
        .post(format!("{url}/chat"))
        .json(&json!({"task_id": TaskId::generate(), "session_id": session, "message": message}))
        .send()
        .await?
        .error_for_status()?;
    let mut body = response.bytes_stream();
    let mut first_event = None;
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            for line in frame.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let Ok(event) = serde_json::from_str::<TaskEvent>(data.trim()) else {
                    continue;
                };
                first_event.get_or_insert_with(|| started.elapsed());
                if let TaskEvent::Done(outcome) = event {
                    if outcome.status != TaskStatus::Completed {
                        bail!("a task ended {}: {:?}", outcome.status, outcome.error);
                    }
                    return Ok(Chat {
                        first_event: first_event.unwrap_or_default(),
                        done: started.elapsed(),
                        outcome,
                    });
                }
            }
        }
    }
    bail!("the stream ended without done")
}

fn executor(fake: &FakeLlm, bin: &Path, warm_max: usize) -> Arc<ClaudeCodeExecutor> {
    executor_with(fake, bin, warm_max, true)
}

fn executor_with(
    fake: &FakeLlm,
    bin: &Path,
    warm_max: usize,
    spare: bool,
) -> Arc<ClaudeCodeExecutor> {
    let config = ClaudeCodeConfig::new(bin.to_path_buf())
        .with_spare(spare)
        .with_api_key("bench")
        .with_base_url(fake.url())
        .with_env("CLAUDE_CODE_MAX_RETRIES", "0")
        .with_max_turns(3)
        .with_warm_max(warm_max);
    Arc::new(ClaudeCodeExecutor::new(config))
}

/// `tasks` tasks of one session (after one unmeasured first task), with warm processes on or
/// off.
async fn one_session(
    name: &str,
    fake: &FakeLlm,
    bin: &Path,
    warm_max: usize,
    tasks: usize,
) -> anyhow::Result<()> {
    let executor = executor(fake, bin, warm_max);
    let worker = start_worker(executor.clone()).await?;
    let client = reqwest::Client::new();
    chat(&client, &worker.url, "bench-session", "hi").await?;
    let (mut firsts, mut dones, mut overheads) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..tasks {
        let c = chat(&client, &worker.url, "bench-session", "hi").await?;
        firsts.push(c.first_event);
        dones.push(c.done);
        // The CLI's own time for the turn (its `result`'s `duration_ms`) taken off.
        overheads.push(
            c.done
                .saturating_sub(Duration::from_millis(c.outcome.duration_ms)),
        );
    }
    let stats = executor.warm_stats();
    println!(
        "{name:16} /chat -> first event (init): {}",
        summarize(&mut firsts).context("no samples")?
    );
    println!(
        "{name:16} /chat -> done:               {}",
        summarize(&mut dones).context("no samples")?
    );
    println!(
        "{name:16} done minus the CLI's own turn time: {}",
        summarize(&mut overheads).context("no samples")?
    );
    println!(
        "{name:16} processes started {} for {} tasks (reused {})",
        stats.started,
        tasks + 1,
        stats.reused
    );
    Ok(())
}

/// A new session per task: the first event waits for a new CLI.
async fn new_sessions(fake: &FakeLlm, bin: &Path, tasks: usize) -> anyhow::Result<()> {
    let executor = executor(fake, bin, ClaudeCodeConfig::DEFAULT_WARM_MAX);
    let worker = start_worker(executor).await?;
    let client = reqwest::Client::new();
    chat(&client, &worker.url, "warm-up", "hi").await?;
    let mut firsts = Vec::new();
    for i in 0..tasks {
        firsts.push(
            chat(&client, &worker.url, &format!("new-{i}"), "hi")
                .await?
                .first_event,
        );
    }
    println!(
        "new session      /chat -> first event (init): {}",
        summarize(&mut firsts).context("no samples")?
    );
    Ok(())
}

/// A worker per session, as with Docker or Kubernetes (`WORKER_SESSION_ID`): the worker
/// starts, gets ready for its session (`WorkerState::prestart`, a spare CLI when `spare`), and
/// after `settle` (the container's other start-up work, the server's health polls) gets the
/// session's `/prepare` and first `/chat`. Measures `/chat` → first event.
async fn worker_per_session(
    fake: &FakeLlm,
    bin: &Path,
    tasks: usize,
    spare: bool,
    settle: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut firsts = Vec::new();
    let mut used = 0;
    for i in 0..tasks {
        let executor = executor_with(fake, bin, ClaudeCodeConfig::DEFAULT_WARM_MAX, spare);
        let dir = tempfile::tempdir()?;
        let state = anywork_worker::WorkerState::new(
            anywork_worker::WorkerConfig::new(dir.path()),
            executor.clone(),
        )?;
        let session = format!("one-{i}");
        state
            .prestart(&anywork_core::SessionId::new(&session)?)
            .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(anywork_worker::serve(
            listener,
            state,
            std::future::pending(),
        ));
        tokio::time::sleep(settle).await;
        client
            .post(format!("{url}/prepare"))
            .json(&json!({"session_id": session}))
            .send()
            .await?
            .error_for_status()?;
        firsts.push(chat(&client, &url, &session, "hi").await?.first_event);
        used += executor.warm_stats().spares_used;
        server.abort();
        drop(executor);
    }
    let name = if spare {
        "one-session worker, spare"
    } else {
        "one-session worker, no spare"
    };
    println!(
        "{name:30} /chat -> first event (init): {} (spares used: {used} of {tasks})",
        summarize(&mut firsts).context("no samples")?
    );
    Ok(())
}

/// Resident set of every process whose working directory is under `root`, in KiB.
fn resident_under(root: &Path) -> (usize, u64) {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut count = 0;
    let mut kib = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if !cwd.starts_with(&root) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if let Some(rss) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            count += 1;
            kib += rss;
        }
    }
    (count, kib)
}

/// `sessions` sessions, one task each, with at most `warm_max` resident: the CLIs' memory.
async fn memory(
    fake: &FakeLlm,
    bin: &Path,
    sessions: usize,
    warm_max: usize,
) -> anyhow::Result<()> {
    let executor = executor(fake, bin, warm_max);
    let dir = tempfile::tempdir()?;
    let state = anywork_worker::WorkerState::new(
        anywork_worker::WorkerConfig::new(dir.path()),
        executor.clone(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(anywork_worker::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let client = reqwest::Client::new();
    let mut peak = (0, 0);
    for i in 0..sessions {
        chat(&client, &url, &format!("mem-{i}"), "hi").await?;
        // Released processes take a few milliseconds to exit.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = resident_under(dir.path());
        if now.1 > peak.1 {
            peak = now;
        }
    }
    let (count, kib) = resident_under(dir.path());
    println!(
        "memory           {sessions} sessions, CLAUDE_WARM_MAX={warm_max}: {count} resident \
         processes, {:.1} MiB in all ({:.1} MiB each), peak {:.1} MiB; warm stats {:?}",
        kib as f64 / 1024.0,
        kib as f64 / 1024.0 / count.max(1) as f64,
        peak.1 as f64 / 1024.0,
        executor.warm_stats()
    );
    drop(executor);
    Ok(())
}

/// Runs the Claude Code benchmarks and prints one line per figure.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let Some(bin) = options.claude_bin.or_else(anywork_test::bins::find_claude) else {
        bail!("no claude CLI: set CLAUDE_BIN");
    };
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    println!("claude           {}", bin.display());
    one_session("cold (warm off)", &fake, &bin, 0, options.tasks).await?;
    one_session(
        "warm",
        &fake,
        &bin,
        ClaudeCodeConfig::DEFAULT_WARM_MAX,
        options.tasks,
    )
    .await?;
    new_sessions(&fake, &bin, options.tasks).await?;
    let settle = Duration::from_secs_f64(options.spare_settle_seconds);
    worker_per_session(&fake, &bin, options.tasks, false, settle).await?;
    worker_per_session(&fake, &bin, options.tasks, true, settle).await?;
    memory(&fake, &bin, options.sessions, options.warm_max).await?;
    Ok(())
}
