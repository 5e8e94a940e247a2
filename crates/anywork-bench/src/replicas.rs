//! `anywork-bench replicas`: N `anywork-server` processes on one PostgreSQL database (a fresh
//! one per N), the static driver to one stand-in worker (`anywork_test::original_worker`).
//! Per N: tasks/s of a REST load spread round-robin, the dispatch latency of a lone task
//! (`POST /api/tasks` → the worker's `/chat`), and — with N ≥ 2 — the cross-replica event
//! latency: a chat on replica B, followed live there and (`resume`) on replica A, compared
//! event by event (what A sees later than B).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use anywork_core::{Page, TaskStatus, TaskStore};
use anywork_store::PostgresStore;
use anywork_test::original_worker::{OriginalEvent, OriginalWorker, Script};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::summarize;

/// Options of `anywork-bench replicas`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// A PostgreSQL server the benchmark may create databases on (one per replica count).
    #[arg(long, env = "ANYWORK_TEST_DATABASE_URL")]
    database_url: String,
    /// The replica counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    replicas: Vec<usize>,
    /// Sessions of the throughput load (their tasks are sent concurrently).
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Tasks per session of the throughput load, sent one after the other without waiting.
    #[arg(long, default_value_t = 6)]
    per_session: usize,
    /// Lone tasks timed for the dispatch latency.
    #[arg(long, default_value_t = 60)]
    lone: usize,
    /// Tasks followed on two replicas for the cross-replica latency.
    #[arg(long, default_value_t = 40)]
    followed: usize,
    /// The release server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

struct Replica {
    _child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

/// A database of its own, dropped at the end.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(admin: &str, n: usize) -> anyhow::Result<Database> {
        let name = format!(
            "bench_replicas_{n}_{}",
            anywork_core::TaskId::generate().0.simple()
        );
        let pool = sqlx::PgPool::connect(admin)
            .await
            .context("connect to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await?;
        pool.close().await;
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin, String::new()),
        };
        let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
        Ok(Database {
            admin: admin.to_owned(),
            url: format!("{base}/{name}{query}"),
            name,
        })
    }

    async fn drop_it(self) {
        if let Ok(pool) = sqlx::PgPool::connect(&self.admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&pool)
            .await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_replica(bin: &PathBuf, db: &Database, worker: &str) -> anyhow::Result<Replica> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = tokio::process::Command::new(bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SERVER_PORT", port.to_string())
        .env("DB_DIR", dir.path())
        .env("DATABASE_URL", &db.url)
        .env("CONTAINER_DRIVER", "static")
        .env("STATIC_WORKER_URL", worker)
        .env("MAX_CONCURRENT_TASKS", "256")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{url}/api/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        ensure!(Instant::now() < deadline, "{url} did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Replica {
        _child: child,
        url,
        _dir: dir,
    })
}

async fn post_task(
    http: &reqwest::Client,
    url: &str,
    session: Option<&str>,
    message: &str,
) -> anyhow::Result<(String, String)> {
    let mut body = json!({ "message": message });
    if let Some(s) = session {
        body["session_id"] = json!(s);
    }
    let r = http
        .post(format!("{url}/api/tasks"))
        .json(&body)
        .send()
        .await?;
    ensure!(r.status() == 202, "task refused: {}", r.status());
    let v: Value = r.json().await?;
    Ok((
        v["taskId"].as_str().unwrap_or_default().to_owned(),
        v["sessionId"].as_str().unwrap_or_default().to_owned(),
    ))
}

async fn completed(store: &PostgresStore) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut offset = 0;
    loop {
        let page = Page {
            limit: 1000,
            offset,
        };
        let got = store
            .tasks_by_status(TaskStatus::Completed, page)
            .await?
            .len();
        n += got;
        if got < 1000 {
            return Ok(n);
        }
        offset += 1000;
    }
}

/// Tasks/s of `sessions × per_session` tasks sent round-robin, and the time each waited for
/// the worker (queueing behind its session's earlier tasks included).
async fn throughput(
    options: &Options,
    urls: &[String],
    worker: &OriginalWorker,
    store: &PostgresStore,
) -> anyhow::Result<()> {
    worker.set_default(Script::of([
        OriginalEvent::text("ok"),
        OriginalEvent::done("ok", 0.0, 1, 1),
    ]));
    let before = completed(store).await?;
    let total = options.sessions * options.per_session;
    let started = Instant::now();
    let sends: Vec<_> = (0..options.sessions)
        .map(|s| {
            let urls = urls.to_vec();
            let per_session = options.per_session;
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut session: Option<String> = None;
                let mut sent = Vec::new();
                for k in 0..per_session {
                    let url = &urls[(s + k) % urls.len()];
                    let at = Instant::now();
                    let (task, sid) =
                        post_task(&http, url, session.as_deref(), &format!("s{s} k{k}")).await?;
                    session = Some(sid);
                    sent.push((task, at));
                }
                anyhow::Ok(sent)
            })
        })
        .collect();
    let mut sent_at = HashMap::new();
    for s in sends {
        sent_at.extend(s.await??);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while completed(store).await? < before + total {
        ensure!(Instant::now() < deadline, "the load did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let mut waits: Vec<Duration> = worker
        .received()
        .iter()
        .filter(|r| r.route == "POST /chat")
        .filter_map(|r| {
            let task = r.body["task_id"].as_str()?;
            let sent = sent_at.get(task)?;
            Some(r.at.saturating_duration_since(*sent))
        })
        .collect();
    println!(
        "  throughput: {total} tasks ({} sessions × {}) in {:.2} s = {:.1} tasks/s",
        options.sessions,
        options.per_session,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    if let Some(s) = summarize(&mut waits) {
        println!("  under load, POST → worker /chat (queueing included): {s}");
    }
    Ok(())
}

/// `POST /api/tasks` → the worker's `/chat` for lone tasks (one at a time, new sessions,
/// round-robin).
async fn dispatch(
    options: &Options,
    urls: &[String],
    worker: &OriginalWorker,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut samples = Vec::new();
    for i in 0..options.lone {
        let url = &urls[i % urls.len()];
        let at = Instant::now();
        let (task, _) = post_task(&http, url, None, "lone").await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            let hit = worker
                .received()
                .into_iter()
                .find(|r| r.route == "POST /chat" && r.body["task_id"] == task.as_str());
            if let Some(r) = hit {
                break r.at;
            }
            ensure!(
                Instant::now() < deadline,
                "task {task} never reached the worker"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        samples.push(got.saturating_duration_since(at));
        // Let it finish before the next.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(s) = summarize(&mut samples) {
        println!("  lone task, POST → worker /chat: {s}");
    }
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let ws = format!("{}/ws", url.replacen("http://", "ws://", 1));
    Ok(tokio_tungstenite::connect_async(ws).await?.0)
}

/// Arrival time of each seq of `task` on `ws`, until its `done`.
async fn arrivals(mut ws: Ws, task: String) -> anyhow::Result<BTreeMap<u64, Instant>> {
    let mut out = BTreeMap::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no event for 30 s")?;
        let Some(Ok(Message::Text(t))) = msg else {
            if msg.is_none() {
                bail!("the socket closed");
            }
            continue;
        };
        let v: Value = serde_json::from_str(&t)?;
        if v["task_id"] != task.as_str() {
            continue;
        }
        if let Some(seq) = v["seq"].as_u64() {
            out.entry(seq).or_insert_with(Instant::now);
        }
        if v["type"] == "done" {
            return Ok(out);
        }
    }
}

/// The change feed's and the followers' counters (`anywork_feed_*`, `anywork_follow_*`),
/// summed over the replicas' `/metrics`: series name with its labels → value.
async fn feed_counters(urls: &[String]) -> anyhow::Result<BTreeMap<String, f64>> {
    let http = reqwest::Client::new();
    let mut out = BTreeMap::new();
    for url in urls {
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        for line in text.lines() {
            if !(line.starts_with("anywork_feed_") || line.starts_with("anywork_follow_")) {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Ok(v) = value.parse::<f64>() {
                *out.entry(series.to_owned()).or_insert(0.0) += v;
            }
        }
    }
    Ok(out)
}

/// Prints what the change feed and the followers did between two [`feed_counters`].
fn print_feed_counts(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) {
    let d = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    let changes = |outcome: &str| {
        d(&format!(
            "anywork_feed_changes_total{{outcome=\"{outcome}\"}}"
        ))
    };
    let (read, covered, skipped) = (changes("read"), changes("covered"), changes("skipped"));
    let reads = d("anywork_feed_log_reads_total");
    let followed = read + covered;
    println!(
        "  change feed (all replicas): {} changes of followed remote tasks ({read} read, \
         {covered} covered by another read), {skipped} skipped; {reads} log reads = {:.2} per \
         followed change",
        followed,
        if followed > 0.0 {
            reads / followed
        } else {
            0.0
        }
    );
    let n = d("anywork_feed_wait_seconds_count");
    if n > 0.0 {
        let le = |h: &str, b: &str| d(&format!("anywork_feed_{h}_seconds_bucket{{le=\"{b}\"}}"));
        println!(
            "  change feed: wait before the read mean {:.2} ms ({:.1} % ≤ 5 ms), read mean {:.2} ms ({:.1} % ≤ 5 ms)",
            d("anywork_feed_wait_seconds_sum") / n * 1000.0,
            le("wait", "0.005") / n * 100.0,
            d("anywork_feed_read_seconds_sum") / n * 1000.0,
            le("read", "0.005") / n * 100.0,
        );
    }
    let fallback = |why: &str, found: &str| {
        d(&format!(
            "anywork_follow_fallback_reads_total{{why=\"{why}\",found=\"{found}\"}}"
        ))
    };
    println!(
        "  followers' fallback log reads: quiet {} (found events: {}), after their live channel closed {} (found events: {})",
        fallback("quiet", "events") + fallback("quiet", "nothing"),
        fallback("quiet", "events"),
        fallback("closed", "events") + fallback("closed", "nothing"),
        fallback("closed", "events"),
    );
}

/// A chat on replica B followed there and on replica A: how much later A sees each event.
async fn cross(options: &Options, urls: &[String], worker: &OriginalWorker) -> anyhow::Result<()> {
    let counters = feed_counters(urls).await?;
    let mut events = vec![OriginalEvent::text("x"); 10];
    events.push(OriginalEvent::done("x", 0.0, 1, 1));
    worker.set_default(Script {
        events,
        delay: Duration::from_millis(20),
        hang: false,
    });
    let mut later = Vec::new();
    for i in 0..options.followed {
        let (b, a) = (&urls[i % urls.len()], &urls[(i + 1) % urls.len()]);
        let mut local = connect(b).await?;
        local
            .send(Message::Text(
                json!({"type": "chat", "message": "followed"})
                    .to_string()
                    .into(),
            ))
            .await?;
        let task = loop {
            let Some(Ok(Message::Text(t))) = local.next().await else {
                bail!("the chat socket closed");
            };
            let v: Value = serde_json::from_str(&t)?;
            if v["type"] == "task_created" {
                break v["task_id"].as_str().unwrap_or_default().to_owned();
            }
        };
        let mut remote = connect(a).await?;
        remote
            .send(Message::Text(
                json!({"type": "resume", "task_id": task, "after_seq": 0})
                    .to_string()
                    .into(),
            ))
            .await?;
        let (l, r) = tokio::join!(
            arrivals(local, task.clone()),
            arrivals(remote, task.clone())
        );
        let (l, r) = (l?, r?);
        // From the fourth event on: the remote follower is live by then.
        for (seq, at_local) in l.iter().filter(|(s, _)| **s >= 4) {
            if let Some(at_remote) = r.get(seq) {
                later.push(at_remote.saturating_duration_since(*at_local));
            }
        }
    }
    if let Some(s) = summarize(&mut later) {
        println!(
            "  cross-replica: an event seen by a follower on another replica later than by one on the running replica: {s}"
        );
    }
    print_feed_counts(&counters, &feed_counters(urls).await?);
    Ok(())
}

/// Runs the benchmark for each replica count.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let bin = match &options.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("anywork-server"),
    };
    ensure!(bin.exists(), "no server binary at {}", bin.display());
    for &n in &options.replicas {
        ensure!(n >= 1, "at least one replica");
        println!("{n} replica(s):");
        let db = Database::create(&options.database_url, n).await?;
        let worker = OriginalWorker::start().await;
        let mut replicas = Vec::new();
        for _ in 0..n {
            replicas.push(start_replica(&bin, &db, &worker.url()).await?);
        }
        let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
        let store = PostgresStore::connect(&db.url, 2).await?;
        let result = async {
            dispatch(&options, &urls, &worker).await?;
            throughput(&options, &urls, &worker, &store).await?;
            if n >= 2 {
                cross(&options, &urls, &worker).await?;
            }
            anyhow::Ok(())
        }
        .await;
        drop(store);
        drop(replicas);
        tokio::time::sleep(Duration::from_millis(200)).await;
        db.drop_it().await;
        result?;
    }
    Ok(())
}
