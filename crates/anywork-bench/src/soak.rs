//! Soak: the release server binary in its own process holds many WebSocket sessions that chat
//! at a steady rate for a long time (a stand-in worker in this process answers at once, from
//! the fake model); every few seconds the server's RSS, open file descriptors and store size,
//! the tasks done, the errors and the latency of the interval are sampled. The samples go to a
//! CSV file and a PNG plot. Any error, a `done` missing, or a task the server lost (submitted
//! but not completed by the end) fails the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use anywork_test::fake_llm::{FakeLlm, Reply};
use futures_util::StreamExt;
use plotters::prelude::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::server::{ServerProcess, Ws, chat, connect, rss_kib, server_bin};
use crate::stats::{ms, summarize};
use crate::worker::{native, start_worker};

/// Options of `anywork-bench soak`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// The server's store.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// PostgreSQL URL for `--store postgres` (best a database of its own: the store size is
    /// that of AnyWork's tables in it).
    #[arg(long, env = "ANYWORK_TEST_DATABASE_URL")]
    database_url: Option<String>,
    /// WebSocket sessions held open for the whole run.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Each session sends a chat every this many seconds (the sessions' chats are spread
    /// evenly over the interval, so `sessions / chat_every_s` tasks/s are offered).
    #[arg(long, default_value_t = 10.0)]
    chat_every_s: f64,
    /// How long the sessions chat, in seconds.
    #[arg(long, default_value_t = 600)]
    duration_s: u64,
    /// Seconds between samples (also the server's retention round, which measures the store).
    #[arg(long, default_value_t = 5)]
    sample_s: u64,
    /// The server's global limit of running tasks.
    #[arg(long, default_value_t = 256)]
    max_concurrent: usize,
    /// Output path without extension: `.csv` and `.png` are written (default
    /// `docs/soak-<store>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A TrueType font for the plot's text (default: DejaVu Sans or Liberation Sans from
    /// /usr/share/fonts).
    #[arg(long)]
    font: Option<PathBuf>,
    /// The release server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
}

/// The server's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// SQLite in a temporary DB_DIR.
    Sqlite,
    /// PostgreSQL at `--database-url`.
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }
}

/// What the sessions did, shared with the sampler.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    /// Chat sent → its `done`, of the chats done since the last sample.
    latencies: Mutex<Vec<Duration>>,
    /// The first errors, for the report.
    first_errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if n < 20 {
            eprintln!("soak: ERROR {what}");
            lock(&self.first_errors).push(what);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One sample of the server and of the interval since the previous one.
struct Sample {
    elapsed_s: f64,
    rss_kib: u64,
    fds: u64,
    /// The server's `anywork_store_bytes` (its `TaskStore::store_size`).
    store_bytes: u64,
    /// SQLite: the database files in DB_DIR (with `-wal` and `-shm`).
    files_bytes: Option<u64>,
    websockets: u64,
    done: u64,
    tasks_per_s: f64,
    errors: u64,
    p50: Option<Duration>,
    p99: Option<Duration>,
}

/// The series of the server's `/metrics` the soak reads.
#[derive(Debug, Default, Clone, Copy)]
struct Metrics {
    submitted: u64,
    completed: u64,
    failed: u64,
    canceled: u64,
    running: u64,
    queued: u64,
    store_bytes: u64,
    websockets: u64,
}

impl Metrics {
    async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let text = client
            .get(format!("{url}/metrics"))
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        // `name{labels} value`, one series a line; a series not shown yet counts 0.
        let value = |series: &str| -> anyhow::Result<u64> {
            let Some(v) = text.lines().find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            }) else {
                return Ok(0);
            };
            let v: f64 = v
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("metric {series}: {v}"))?;
            Ok(v as u64)
        };
        Ok(Self {
            submitted: value("anywork_tasks_submitted_total")?,
            completed: value("anywork_tasks_finished_total{status=\"completed\"}")?,
            failed: value("anywork_tasks_finished_total{status=\"failed\"}")?,
            canceled: value("anywork_tasks_finished_total{status=\"canceled\"}")?,
            running: value("anywork_tasks_running")?,
            queued: value("anywork_queue_depth")?,
            store_bytes: value("anywork_store_bytes")?,
            websockets: value("anywork_websocket_connections")?,
        })
    }
}

fn open_fds(pid: u32) -> anyhow::Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Bytes of the SQLite database files (`anywork.db`, `-wal`, `-shm`) in `dir`.
fn sqlite_files(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(anywork_store::SqliteStore::FILE_NAME)
        {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Reads what the server sends until `at` (nothing is expected between chats; reading keeps
/// the socket from backing up). An `error` message or a closed socket is an error.
async fn idle_until(ws: &mut Ws, at: Instant) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout_at(at, ws.next()).await {
            Err(_) => return Ok(()),
            Ok(None) => bail!("the server closed the WebSocket"),
            Ok(Some(message)) => {
                if let Message::Text(t) = message?
                    && serde_json::from_str::<serde_json::Value>(&t)
                        .map_or(true, |v| v["type"] == "error")
                {
                    bail!("server message between chats: {t}");
                }
            }
        }
    }
}

/// When one session chats: its `k`-th chat at `start + phase + k * every`, while before `end`
/// (or as soon as the previous one is done, if that is later).
struct Schedule {
    start: Instant,
    phase: Duration,
    every: Duration,
    end: Instant,
}

/// One session: chats on schedule on its connection; an error is counted and the next chat
/// goes on a new connection (to the same session).
async fn session(url: String, i: usize, ws: Ws, plan: Schedule, tally: Arc<Tally>) -> Option<Ws> {
    let mut ws = Some(ws);
    let mut session_id: Option<String> = None;
    for k in 0u32.. {
        let at = plan.start + plan.phase + plan.every * k;
        if at >= plan.end {
            break;
        }
        if let Some(conn) = ws.as_mut()
            && let Err(e) = idle_until(conn, at).await
        {
            tally.error(format!("session {i} before chat {k}: {e:#}"));
            ws = None;
        }
        tokio::time::sleep_until(at).await;
        let conn = match ws.as_mut() {
            Some(conn) => conn,
            None => match connect(&url).await {
                Ok(conn) => ws.insert(conn),
                Err(e) => {
                    tally.error(format!("session {i} reconnect: {e:#}"));
                    continue;
                }
            },
        };
        tally.sent.fetch_add(1, Ordering::Relaxed);
        match chat(conn, session_id.as_deref(), &format!("soak {i}.{k}")).await {
            Ok((times, id)) => {
                session_id = Some(id);
                tally.done.fetch_add(1, Ordering::Relaxed);
                lock(&tally.latencies).push(times.done.saturating_duration_since(times.sent));
            }
            Err(e) => {
                tally.error(format!("session {i} chat {k}: {e:#}"));
                ws = None;
            }
        }
    }
    ws
}

/// Loads the plot's font (plotters draws no text without one).
fn load_font(given: Option<&Path>) -> anyhow::Result<()> {
    const CANDIDATES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("no TrueType font found for the plot: pass --font FILE.ttf")?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
        .map_err(|_| anyhow::anyhow!("{} is not a font plotters can read", path.display()))
}

/// Runs the soak; `Err` (a non-zero exit) on any error or lost task, after writing the files.
pub async fn run(options: Options) -> anyhow::Result<()> {
    load_font(options.font.as_deref())?;
    let bin = server_bin(options.server_bin.as_deref())?;
    let out = options.out.clone().unwrap_or_else(|| {
        PathBuf::from(match options.store {
            StoreKind::Sqlite => "docs/soak-sqlite",
            StoreKind::Postgres => "docs/soak-postgres",
        })
    });
    let (csv_path, png_path) = (out.with_extension("csv"), out.with_extension("png"));
    let every = Duration::from_secs_f64(options.chat_every_s);
    if every.is_zero() || options.sessions == 0 || options.sample_s == 0 {
        bail!("--sessions, --chat-every-s and --sample-s must be above 0");
    }

    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("Hello from the fake model."));
    let worker = start_worker(native(&fake)).await?;
    let db = tempfile::tempdir()?;
    let mut env = vec![
        ("MAX_CONCURRENT_TASKS", options.max_concurrent.to_string()),
        ("RETENTION_INTERVAL_SECONDS", options.sample_s.to_string()),
    ];
    if options.store == StoreKind::Postgres {
        let url = options
            .database_url
            .clone()
            .context("--store postgres needs --database-url (or ANYWORK_TEST_DATABASE_URL)")?;
        env.push(("DATABASE_URL", url));
    }
    let mut server = ServerProcess::start(&bin, db.path(), &worker.url, &env).await?;
    let (pid, url) = (server.pid, server.url.clone());
    let client = reqwest::Client::new();
    let files = |dir: &Path| match options.store {
        StoreKind::Sqlite => sqlite_files(dir).map(Some),
        StoreKind::Postgres => Ok(None),
    };

    // Warm-up: a few chats, then the counters are read as the baseline.
    for i in 0..5 {
        let mut ws = connect(&url).await?;
        chat(&mut ws, None, &format!("warm-up {i}")).await?;
        let _ = futures_util::SinkExt::close(&mut ws).await;
    }
    let rss_before = rss_kib(pid)?;
    let n = options.sessions;
    let connected = futures_util::stream::iter((0..n).map(|_| connect(&url)))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut conns = Vec::with_capacity(n);
    for c in connected {
        conns.push(c.context("open the sessions' WebSockets")?);
    }
    let baseline = Metrics::scrape(&client, &url).await?;
    println!(
        "soak  store={} sessions={n} chat every {:?} each ({:.0} tasks/s offered) for {} s, \
         sample every {} s; server RSS {} KiB before the sessions, {} KiB with them",
        options.store.name(),
        every,
        n as f64 / every.as_secs_f64(),
        options.duration_s,
        options.sample_s,
        rss_before,
        rss_kib(pid)?,
    );
    println!(
        "soak  elapsed_s rss_kib fds store_bytes files_bytes websockets done tasks_per_s errors p50 p99"
    );

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(options.duration_s);
    let sessions: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let plan = Schedule {
                start,
                phase: every * i as u32 / n as u32,
                every,
                end,
            };
            tokio::spawn(session(url.clone(), i, ws, plan, tally.clone()))
        })
        .collect();

    let sample_every = Duration::from_secs(options.sample_s);
    let mut samples: Vec<Sample> = Vec::new();
    let mut all_latencies: Vec<Duration> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut next = start;
    let mut previous = (start, 0u64);
    loop {
        tokio::time::sleep_until(next).await;
        next += sample_every;
        let finished = sessions.iter().all(|s| s.is_finished());
        if let Err(e) = server.check_running() {
            failures.push(format!("{e:#}"));
            break;
        }
        let now = Instant::now();
        let metrics = match Metrics::scrape(&client, &url).await {
            Ok(m) => m,
            Err(e) => {
                tally.error(format!("GET /metrics: {e:#}"));
                Metrics::default()
            }
        };
        let mut interval = std::mem::take(&mut *lock(&tally.latencies));
        let done = tally.done.load(Ordering::Relaxed);
        let secs = now.duration_since(previous.0).as_secs_f64();
        let tasks_per_s = if secs > 0.0 {
            (done - previous.1) as f64 / secs
        } else {
            0.0
        };
        previous = (now, done);
        all_latencies.extend_from_slice(&interval);
        let summary = summarize(&mut interval);
        let sample = Sample {
            elapsed_s: now.duration_since(start).as_secs_f64(),
            rss_kib: rss_kib(pid)?,
            fds: open_fds(pid)?,
            store_bytes: metrics.store_bytes,
            files_bytes: files(db.path())?,
            websockets: metrics.websockets,
            done,
            tasks_per_s,
            errors: tally.errors.load(Ordering::Relaxed),
            p50: summary.as_ref().map(|s| s.p50),
            p99: summary.as_ref().map(|s| s.p99),
        };
        println!("soak  {}", csv_row(&sample));
        samples.push(sample);
        if finished {
            break;
        }
    }

    // Every chat sent must have been completed, by the client's count and by the server's.
    let mut kept = Vec::with_capacity(n);
    for s in sessions {
        if let Some(ws) = s.await? {
            kept.push(ws);
        }
    }
    let (sent, done) = (
        tally.sent.load(Ordering::Relaxed),
        tally.done.load(Ordering::Relaxed),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let m = Metrics::scrape(&client, &url).await?;
        let settled = m.running == 0
            && m.queued == 0
            && m.submitted.saturating_sub(baseline.submitted)
                == (m.completed + m.failed + m.canceled)
                    .saturating_sub(baseline.completed + baseline.failed + baseline.canceled);
        if settled || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let submitted = metrics.submitted.saturating_sub(baseline.submitted);
    let completed = metrics.completed.saturating_sub(baseline.completed);
    let failed = metrics.failed.saturating_sub(baseline.failed);
    let canceled = metrics.canceled.saturating_sub(baseline.canceled);
    if done != sent {
        failures.push(format!("{sent} chats sent, {done} done at the client"));
    }
    if submitted != sent || completed != sent {
        failures.push(format!(
            "{sent} chats sent; the server counts {submitted} submitted, {completed} completed"
        ));
    }
    if failed + canceled > 0 {
        failures.push(format!(
            "the server failed {failed} and canceled {canceled} tasks"
        ));
    }
    if metrics.running + metrics.queued > 0 {
        failures.push(format!(
            "after the run the server still has {} tasks running and {} queued",
            metrics.running, metrics.queued
        ));
    }
    let errors = tally.errors.load(Ordering::Relaxed);
    if errors > 0 {
        failures.push(format!(
            "{errors} errors; the first: {}",
            lock(&tally.first_errors).join(" | ")
        ));
    }
    drop(kept);
    server.stop().await?;

    let title = format!(
        "AnyWork soak, {}: {n} WebSocket sessions, a chat every {} s each, {} s; {done} tasks, \
         {errors} errors (shared 2-core machine, under load)",
        options.store.name(),
        options.chat_every_s,
        options.duration_s,
    );
    write_csv(&csv_path, &samples)?;
    plot(&png_path, &title, options.store, &samples)?;
    print_summary(&samples, &mut all_latencies, sent, done, errors);
    println!(
        "soak  wrote {} and {}",
        csv_path.display(),
        png_path.display()
    );
    if !failures.is_empty() {
        bail!("the soak FAILED: {}", failures.join("; "));
    }
    Ok(())
}

const CSV_HEADER: &str = "elapsed_s,rss_kib,fds,store_bytes,sqlite_files_bytes,websockets,\
                          tasks_done,tasks_per_s,errors,p50_ms,p99_ms";

fn csv_row(s: &Sample) -> String {
    let opt_ms = |d: Option<Duration>| {
        d.map(|d| format!("{:.2}", d.as_secs_f64() * 1000.0))
            .unwrap_or_default()
    };
    format!(
        "{:.1},{},{},{},{},{},{},{:.1},{},{},{}",
        s.elapsed_s,
        s.rss_kib,
        s.fds,
        s.store_bytes,
        s.files_bytes.map(|b| b.to_string()).unwrap_or_default(),
        s.websockets,
        s.done,
        s.tasks_per_s,
        s.errors,
        opt_ms(s.p50),
        opt_ms(s.p99),
    )
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for s in samples {
        let _ = writeln!(text, "{}", csv_row(s));
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn print_summary(
    samples: &[Sample],
    latencies: &mut [Duration],
    sent: u64,
    done: u64,
    errors: u64,
) {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    println!("soak  tasks: {sent} sent, {done} done, {errors} errors");
    println!(
        "soak  RSS: start {}, end {}, max {}",
        mib(first.rss_kib),
        mib(last.rss_kib),
        mib(max_rss)
    );
    println!(
        "soak  fds: start {}, end {}, max {max_fds}",
        first.fds, last.fds
    );
    println!(
        "soak  store (server's store_size): start {}, end {}",
        mib(first.store_bytes / 1024),
        mib(last.store_bytes / 1024)
    );
    if let (Some(a), Some(b)) = (first.files_bytes, last.files_bytes) {
        println!(
            "soak  SQLite files (db, -wal, -shm): start {}, end {}",
            mib(a / 1024),
            mib(b / 1024)
        );
    }
    if let Some(s) = summarize(latencies) {
        println!(
            "soak  chat sent -> done, whole run: {s} (mean {})",
            ms(latencies.iter().sum::<Duration>() / latencies.len() as u32)
        );
    }
    let worst = samples
        .iter()
        .filter_map(|s| s.p99)
        .max()
        .unwrap_or_default();
    println!("soak  worst interval p99: {}", ms(worst));
}

/// Six panels over time: RSS, fds, store size, tasks/s, latency, WebSockets.
fn plot(path: &Path, title: &str, store: StoreKind, samples: &[Sample]) -> anyhow::Result<()> {
    const W: u32 = 1500;
    const H: u32 = 900;
    let mut pixels = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(plot_error)?;
        let panels = root.split_evenly((2, 3));
        let x_max = samples.last().map_or(1.0, |s| s.elapsed_s).max(1.0);
        let series = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
            samples
                .iter()
                .filter_map(|s| Some((s.elapsed_s, f(s)?)))
                .collect()
        };
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(230, 120, 20);
        panel(
            &panels[0],
            "server RSS (MiB)",
            &[("RSS", blue, series(&|s| Some(s.rss_kib as f64 / 1024.0)))],
            x_max,
        )?;
        panel(
            &panels[1],
            "server open file descriptors",
            &[("fds", blue, series(&|s| Some(s.fds as f64)))],
            x_max,
        )?;
        let mut store_lines = vec![(
            "store_size (server metric)",
            blue,
            series(&|s| Some(mib(s.store_bytes))),
        )];
        if store == StoreKind::Sqlite {
            store_lines.push((
                "SQLite files incl. WAL",
                orange,
                series(&|s| s.files_bytes.map(mib)),
            ));
        }
        panel(&panels[2], "store size (MiB)", &store_lines, x_max)?;
        panel(
            &panels[3],
            "tasks done per second",
            &[("tasks/s", blue, series(&|s| Some(s.tasks_per_s)))],
            x_max,
        )?;
        let millis = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        panel(
            &panels[4],
            "chat sent -> done (ms), per interval",
            &[
                ("p50", blue, series(&|s| millis(s.p50))),
                ("p99", orange, series(&|s| millis(s.p99))),
            ],
            x_max,
        )?;
        panel(
            &panels[5],
            "open WebSockets (server metric) and errors",
            &[
                ("WebSockets", blue, series(&|s| Some(s.websockets as f64))),
                ("errors", orange, series(&|s| Some(s.errors as f64))),
            ],
            x_max,
        )?;
        root.present().map_err(plot_error)?;
    }
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), W, H);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A line of a chart: its name, its colour, its points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One chart of `lines` against seconds, y from 0.
fn panel(area: &Area<'_>, caption: &str, lines: &[Line<'_>], x_max: f64) -> anyhow::Result<()> {
    let y_max = lines
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_error)?;
    for (name, color, points) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}
