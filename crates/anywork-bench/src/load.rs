//! `anywork-bench load`: the release `anywork-server` binary under WebSocket load, in three
//! processes: this one (the load generator, one thread), the server (its own process, static
//! driver) and the stand-in worker ([`crate::standin`], its own process, one thread).
//!
//! For each number of sessions S (a fresh server and store each time):
//! 1. a short warm-up (5 sessions, one chat each, closed), then the server's RSS (*base*);
//! 2. S WebSockets opened, each with a `ping` answered: RSS → memory per idle WebSocket;
//! 3. one chat on each (it makes the session), `--first-chats` at a time: RSS → per session;
//! 4. the measured run: all S sessions at once, T chats each back to back (each waits for the
//!    previous `done`). Dispatch = the stand-in's CLOCK_MONOTONIC stamp of its `/chat` − the
//!    client's stamp just before it sent the chat frame (same clock, same machine); chat →
//!    done at the client; tasks/s = tasks / (first chat sent → last done). The server
//!    process's CPU (`/proc/PID/stat` utime + stime) and context switches (`/proc/PID/task/*/
//!    status`) over the run, per task; optionally `strace -c -f -p` or `perf stat -p` over it;
//! 5. the connections closed: RSS and RssAnon (what is returned), again at each
//!    `--after-close-ms` delay (past jemalloc's decay: what the server keeps), then
//!    `--at-rest-cmd` if given.
//!
//! `--callgrind` runs the server under `valgrind --tool=callgrind` with instrumentation off
//! until the measured run, on over it, and dumped at its end: instructions (Ir) per task, a
//! figure that a loaded machine does not change (the run is ~50× slower: use few sessions and
//! turns, e.g. `--sessions 20 --turns 10 --min-tasks 0`). `--count-sql` counts the statements
//! the server runs over the measured run (sqlx's statement log, `sqlx::query` at debug).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::StreamExt;

use crate::plot::{self, Panel};
use crate::procfs::{self, context_switches, cpu_time, rss_anon_kib, rss_kib};
use crate::server::{Launch, ServerProcess};
use crate::standin::{self, StandIn};
use crate::stats::{Summary, summarize};
use crate::ws::{self, ChatTimes, Ws};

/// Options of `anywork-bench load`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Numbers of sessions, one level each (a fresh server and store per level).
    #[arg(long, value_delimiter = ',', default_value = "1,50,200,1000")]
    sessions: Vec<usize>,
    /// Chats per session in the measured run, one after the other.
    #[arg(long, default_value_t = 20)]
    turns: usize,
    /// At least this many tasks per measured run: fewer sessions do more turns.
    #[arg(long, default_value_t = 200)]
    min_tasks: usize,
    /// Runs of each level (the table gives the range).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// First chats (which make the sessions) in flight at once.
    #[arg(long, default_value_t = 200)]
    first_chats: usize,
    /// Stores, each level runs on each (interleaved): `sqlite` (a temporary folder per level),
    /// `postgres` (at `--database-url`; one database for every level).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sqlite")]
    stores: Vec<Store>,
    /// PostgreSQL URL for `--stores postgres` (the server's DATABASE_URL).
    #[arg(long, env = "ANYWORK_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// MAX_CONCURRENT_TASKS of the server (default: the server's own default).
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// The release server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// `NAME=VALUE` added to the server's environment (repeatable), e.g.
    /// `GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072` to compare allocator settings.
    #[arg(long, value_parser = parse_env)]
    server_env: Vec<(String, String)>,
    /// `strace -c -f -p` the server over the measured run: syscalls per task by kind (the run
    /// is slowed down; its other figures are marked).
    #[arg(long)]
    strace: bool,
    /// `perf stat -e EVENTS -p` the server over the measured run: counts per task (e.g.
    /// `task-clock,context-switches,page-faults`, and `probe_libc:malloc` once
    /// `perf probe -x <libc> --add malloc` made it: allocations per task).
    #[arg(long)]
    perf_events: Option<String>,
    /// Write the tables (markdown) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Draw dispatch, tasks/s and memory against sessions into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Wait after opening or closing connections before reading the RSS.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Read the server's RSS and RssAnon again these many milliseconds after the connections
    /// closed (comma-separated, from the close), e.g. `15000,30000`: past jemalloc's decay of
    /// freed pages (`dirty_decay_ms`, 10 s), what the server keeps rather than what it has not
    /// given back yet.
    #[arg(long, value_delimiter = ',')]
    after_close_ms: Vec<u64>,
    /// A shell command run once the readings after the close are done, before the server
    /// stops, with the server's pid in `SERVER_PID`: e.g. gdb calling the allocators' own
    /// statistics (`_rjem_malloc_stats_print`, glibc's `malloc_stats`), which the server
    /// prints on its stderr.
    #[arg(long)]
    at_rest_cmd: Option<String>,
    /// Run the server under `valgrind --tool=callgrind`, instrumented over the measured run
    /// only: instructions per task (its time figures are then meaningless).
    #[arg(long, conflicts_with_all = ["strace", "perf_events", "count_sql"])]
    callgrind: bool,
    /// Keep the callgrind profile of each run in this folder (`callgrind_annotate` reads it);
    /// by default it is deleted with the run's store.
    #[arg(long, requires = "callgrind")]
    callgrind_dir: Option<PathBuf>,
    /// Count the SQL statements the server runs over the measured run (sqlx logs each one at
    /// debug level, which costs CPU: other figures are marked).
    #[arg(long, conflicts_with_all = ["strace", "perf_events"])]
    count_sql: bool,
    /// The stand-in acknowledges `/prepare` keys as AnyWork's own worker does, so the server
    /// leaves `/prepare` out while it is unchanged; by default it answers as the original's
    /// worker (every task gets a `/prepare`).
    #[arg(long)]
    standin_prepare_keys: bool,
}

/// `NAME=VALUE` of `--server-env`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// The server's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Store {
    Sqlite,
    Postgres,
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite",
            Store::Postgres => "PostgreSQL",
        }
    }
}

/// The figures of one measured run.
struct Level {
    sessions: usize,
    turns: usize,
    tasks: usize,
    wall: Duration,
    dispatch: Summary,
    done: Summary,
    /// Server CPU (user + system) over the run.
    cpu: Duration,
    /// Server context switches over the run: (voluntary, involuntary).
    switches: (u64, u64),
    /// The stand-in's and this process's CPU over the run.
    standin_cpu: Duration,
    loadgen_cpu: Duration,
    /// Server instructions over the run (`--callgrind`).
    instructions: Option<u64>,
    /// SQL statements over the run (`--count-sql`).
    statements: Option<u64>,
    /// Worker calls over the run by route.
    worker_calls: Vec<(String, u64)>,
    threads: usize,
    rss_base: u64,
    rss_idle: u64,
    rss_sessions: u64,
    rss_loaded: u64,
    rss_closed: u64,
    /// The anonymous part (`RssAnon`: the heap, stacks; not the binary's mapped pages) at the
    /// base and after closing.
    anon_base: u64,
    anon_closed: u64,
    /// `--after-close-ms`: (ms after the close, RSS, RssAnon).
    later: Vec<(u64, u64, u64)>,
    traced: Option<String>,
}

impl Level {
    fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.wall.as_secs_f64()
    }
    fn cpu_per_task_ms(&self) -> f64 {
        self.cpu.as_secs_f64() * 1000.0 / self.tasks as f64
    }
    fn switches_per_task(&self) -> (f64, f64) {
        let t = self.tasks as f64;
        (self.switches.0 as f64 / t, self.switches.1 as f64 / t)
    }
    fn per_idle_kib(&self) -> f64 {
        self.rss_idle.saturating_sub(self.rss_base) as f64 / self.sessions as f64
    }
    fn per_session_kib(&self) -> f64 {
        self.rss_sessions.saturating_sub(self.rss_base) as f64 / self.sessions as f64
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What every level shares.
struct Bench {
    options: Options,
    server_bin: PathBuf,
    standin: StandIn,
}

impl Bench {
    /// The server binary on a fresh store: SQLite in the returned folder, or PostgreSQL.
    async fn server(
        &self,
        store: Store,
        sessions: usize,
    ) -> anyhow::Result<(ServerProcess, tempfile::TempDir, Probes)> {
        // Per second as well as per client: every connection comes from 127.0.0.1.
        let mut env = vec![("WS_MESSAGES_PER_SECOND", "0".to_owned())];
        if let Some(n) = self.options.max_concurrent {
            env.push(("MAX_CONCURRENT_TASKS", n.to_string()));
        }
        for (name, value) in &self.options.server_env {
            env.push((name.as_str(), value.clone()));
        }
        if store == Store::Postgres {
            let url = self
                .options
                .database_url
                .clone()
                .context("--stores postgres needs --database-url")?;
            env.push(("DATABASE_URL", url));
        }
        let db = tempfile::tempdir()?;
        let mut launch = Launch::default();
        let mut probes = Probes::default();
        if self.options.callgrind {
            static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = match &self.options.callgrind_dir {
                Some(d) => {
                    std::fs::create_dir_all(d)?;
                    d.clone()
                }
                None => db.path().to_owned(),
            };
            let out = dir.join(format!(
                "callgrind.{}-{sessions}-{run}.out",
                store.label().to_lowercase()
            ));
            launch.wrapper = vec![
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                "--instr-atstart=no".to_owned(),
                format!("--callgrind-out-file={}", out.display()),
            ];
            launch.stderr = Some(std::fs::File::create(dir.join(format!(
                "valgrind.{}-{sessions}-{run}.log",
                store.label().to_lowercase()
            )))?);
            launch.startup = Some(Duration::from_secs(120));
            probes.callgrind = Some(out);
        }
        if self.options.count_sql {
            env.push(("RUST_LOG", "error,sqlx::query=debug".to_owned()));
            let log = tempfile::NamedTempFile::new()?;
            launch.stderr = Some(log.reopen()?);
            probes.sql_log = Some(log);
        }
        let server = ServerProcess::start_with(
            &self.server_bin,
            db.path(),
            &self.standin.url,
            &env,
            &launch,
        )
        .await?;
        Ok((server, db, probes))
    }

    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(self.options.settle_ms)).await;
    }
}

/// What `--callgrind` and `--count-sql` read.
#[derive(Default)]
struct Probes {
    /// The callgrind output file; its first dump is `<file>.1`.
    callgrind: Option<PathBuf>,
    /// The server's stderr with sqlx's statement log.
    sql_log: Option<tempfile::NamedTempFile>,
}

impl Probes {
    /// Statements logged so far.
    fn statements(&self) -> anyhow::Result<Option<u64>> {
        let Some(log) = &self.sql_log else {
            return Ok(None);
        };
        let text = std::fs::read(log.path())?;
        let needle = b" sqlx::query:";
        Ok(Some(
            text.windows(needle.len()).filter(|w| *w == needle).count() as u64,
        ))
    }
}

/// `callgrind_control ARGS PID`.
async fn callgrind_control(pid: u32, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        // vgdb finds the server's FIFOs in the server's TMPDIR (unset: /tmp).
        .env("TMPDIR", "/tmp")
        .output()
        .await
        .context("cannot run callgrind_control (valgrind's)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("OK"),
        "callgrind_control {args:?} {pid} failed: {text}"
    );
    Ok(())
}

/// The total of the first event (Ir) of a callgrind dump.
fn callgrind_total(path: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the callgrind dump {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", path.display()))
}

/// A session's measured turns, once `go` opens.
async fn turns(
    mut ws: Ws,
    session: String,
    turns: usize,
    go: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<(Ws, Vec<ChatTimes>)> {
    go.wait().await;
    let mut out = Vec::with_capacity(turns);
    for i in 0..turns {
        let (times, _) = ws::chat(&mut ws, Some(&session), &format!("turn {i}")).await?;
        out.push(times);
    }
    Ok((ws, out))
}

/// A tool attached to the server over the measured run, stopped with SIGINT.
struct Attached {
    child: tokio::process::Child,
    out: tempfile::NamedTempFile,
}

impl Attached {
    async fn start(program: &str, args: &[&str]) -> anyhow::Result<Self> {
        let out = tempfile::NamedTempFile::new()?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .arg("-o")
            .arg(out.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        // Attaching to every thread takes a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Self { child, out })
    }

    async fn stop(mut self) -> anyhow::Result<String> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("the attached tool did not stop")??;
        Ok(std::fs::read_to_string(self.out.path())?)
    }
}

/// `strace -c` output as "per task" lines, most calls first.
fn strace_per_task(summary: &str, tasks: usize) -> String {
    let mut rows: Vec<(f64, String, f64)> = Vec::new();
    for line in summary.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
            let name = f[f.len() - 1];
            if name == "total" {
                continue;
            }
            if let Ok(calls) = f[3].parse::<f64>() {
                let seconds: f64 = f[1].parse().unwrap_or(0.0);
                rows.push((calls / tasks as f64, name.to_owned(), seconds));
            }
        }
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = rows.iter().map(|r| r.0).sum();
    let mut out = format!("{total:.1} syscalls per task:");
    for (per, name, _) in rows.iter().filter(|r| r.0 >= 0.05) {
        let _ = write!(out, " {name} {per:.2},");
    }
    out.pop();
    out
}

/// `perf stat` counters divided by the tasks.
fn perf_per_task(summary: &str, tasks: usize) -> String {
    let mut out = String::from("perf stat per task:");
    for line in summary.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 2
            && let Ok(v) = f[0].replace(',', "").parse::<f64>()
        {
            let name = if f[1] == "msec" { f[2] } else { f[1] };
            let unit = if f[1] == "msec" { " ms" } else { "" };
            let _ = write!(out, " {name} {:.3}{unit},", v / tasks as f64);
        }
    }
    out.pop();
    out
}

async fn level(bench: &Bench, store: Store, sessions: usize) -> anyhow::Result<Level> {
    let o = &bench.options;
    let turns_each = o.turns.max(o.min_tasks.div_ceil(sessions)).max(1);
    let (server, _db, probes) = bench.server(store, sessions).await?;
    let (pid, url) = (server.pid, server.url.clone());

    // 1. Warm-up.
    for i in 0..5 {
        let mut ws = ws::connect(&url).await?;
        ws::chat(&mut ws, None, &format!("warm-up {i}")).await?;
        let _ = ws.close(None).await;
    }
    bench.settle().await;
    let (rss_base, anon_base) = (rss_kib(pid)?, rss_anon_kib(pid)?);

    // 2. Idle connections.
    let opened: Vec<_> =
        futures_util::stream::iter((0..sessions).map(|_| ws::idle_connection(url.clone())))
            .buffer_unordered(64)
            .collect()
            .await;
    let conns = opened.into_iter().collect::<anyhow::Result<Vec<Ws>>>()?;
    bench.settle().await;
    let rss_idle = rss_kib(pid)?;

    // 3. One chat each: the sessions.
    let made: Vec<_> =
        futures_util::stream::iter(conns.into_iter().enumerate().map(|(i, mut ws)| async move {
            let (_, session) = ws::chat(&mut ws, None, &format!("hello {i}")).await?;
            anyhow::Ok((ws, session))
        }))
        .buffer_unordered(o.first_chats.max(1))
        .collect()
        .await;
    let made = made.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    bench.settle().await;
    let rss_sessions = rss_kib(pid)?;

    // 4. The measured run.
    let pid_s = pid.to_string();
    let standin_pid = bench.standin.pid.to_string();
    let attached = if o.strace {
        Some(Attached::start("strace", &["-c", "-f", "-p", &pid_s]).await?)
    } else if let Some(events) = &o.perf_events {
        Some(Attached::start("perf", &["stat", "-e", events, "-p", &pid_s]).await?)
    } else {
        None
    };
    let calls_before = bench.standin.stats().await?;
    let go = Arc::new(tokio::sync::Barrier::new(sessions + 1));
    let clients: Vec<_> = made
        .into_iter()
        .map(|(ws, session)| tokio::spawn(turns(ws, session, turns_each, go.clone())))
        .collect();
    let (cpu0, sw0) = (cpu_time(&pid_s)?, context_switches(pid)?);
    let (standin0, self0) = (cpu_time(&standin_pid)?, cpu_time("self")?);
    if probes.callgrind.is_some() {
        callgrind_control(pid, &["-i", "on"]).await?;
        callgrind_control(pid, &["-z"]).await?;
    }
    let statements0 = probes.statements()?;
    go.wait().await;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(sessions);
    let mut chats = Vec::with_capacity(sessions * turns_each);
    for c in clients {
        let (ws, times) = c.await??;
        conns.push(ws);
        chats.extend(times);
    }
    let wall = started.elapsed();
    if probes.callgrind.is_some() || probes.sql_log.is_some() {
        // What the last tasks do after their `done` (hooks, the outbox) is theirs too.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let instructions = match &probes.callgrind {
        Some(out) => {
            callgrind_control(pid, &["-d"]).await?;
            callgrind_control(pid, &["-i", "off"]).await?;
            let mut dump = out.clone().into_os_string();
            dump.push(".1");
            Some(callgrind_total(Path::new(&dump))?)
        }
        None => None,
    };
    let statements = match (statements0, probes.statements()?) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let cpu = cpu_time(&pid_s)? - cpu0;
    let sw1 = context_switches(pid)?;
    let (standin_cpu, loadgen_cpu) = (
        cpu_time(&standin_pid)? - standin0,
        cpu_time("self")? - self0,
    );
    let threads = procfs::threads(pid);
    let traced = match attached {
        Some(a) => {
            let text = a.stop().await?;
            Some(if o.strace {
                strace_per_task(&text, chats.len())
            } else {
                perf_per_task(&text, chats.len())
            })
        }
        None => None,
    };
    let calls_after = bench.standin.stats().await?;
    let worker_calls = calls_after
        .iter()
        .map(|(k, v)| (k.clone(), v - calls_before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let rss_loaded = rss_kib(pid)?;

    // 5. Closed.
    drop(conns);
    let closed = Instant::now();
    bench.settle().await;
    let (rss_closed, anon_closed) = (rss_kib(pid)?, rss_anon_kib(pid)?);
    let mut later = Vec::new();
    let mut delays = o.after_close_ms.clone();
    delays.sort_unstable();
    for ms in delays {
        tokio::time::sleep_until((closed + Duration::from_millis(ms)).into()).await;
        later.push((ms, rss_kib(pid)?, rss_anon_kib(pid)?));
    }
    if let Some(cmd) = &o.at_rest_cmd {
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("SERVER_PID", pid.to_string())
            .status()
            .await
            .context("cannot run --at-rest-cmd")?;
        ensure!(status.success(), "--at-rest-cmd failed: {status}");
    }
    server.stop().await?;

    let tasks = chats.len();
    let mut dispatch: Vec<Duration> = chats.iter().filter_map(ChatTimes::dispatch).collect();
    ensure!(
        dispatch.len() == tasks,
        "{} of {tasks} tasks carried no stand-in stamp: is the worker the stand-in?",
        tasks - dispatch.len()
    );
    let mut done: Vec<Duration> = chats
        .iter()
        .map(|c| c.done.saturating_duration_since(c.sent))
        .collect();
    Ok(Level {
        sessions,
        turns: turns_each,
        tasks,
        wall,
        dispatch: summarize(&mut dispatch).context("no tasks")?,
        done: summarize(&mut done).context("no tasks")?,
        cpu,
        switches: (sw1.0.saturating_sub(sw0.0), sw1.1.saturating_sub(sw0.1)),
        standin_cpu,
        loadgen_cpu,
        instructions,
        statements,
        worker_calls,
        threads,
        rss_base,
        rss_idle,
        rss_sessions,
        rss_loaded,
        rss_closed,
        anon_base,
        anon_closed,
        later,
        traced,
    })
}

fn print(label: &str, l: &Level) {
    let (v, i) = l.switches_per_task();
    let per_task = |d: Duration| d.as_secs_f64() * 1000.0 / l.tasks as f64;
    println!(
        "load  {label} {}x{}: {} tasks in {:.2} s = {:.0} tasks/s; dispatch p50 {:.2} p99 {:.2} \
         ms; chat->done p50 {:.2} p99 {:.2} ms",
        l.sessions,
        l.turns,
        l.tasks,
        l.wall.as_secs_f64(),
        l.tasks_per_s(),
        ms(l.dispatch.p50),
        ms(l.dispatch.p99),
        ms(l.done.p50),
        ms(l.done.p99),
    );
    println!(
        "load  {label} {}x{}: server CPU {:.3} ms/task ({:.0}% of one core), context switches \
         {:.1} voluntary + {:.1} involuntary per task, {} threads; stand-in {:.3} ms/task, \
         load generator {:.3} ms/task",
        l.sessions,
        l.turns,
        l.cpu_per_task_ms(),
        l.cpu.as_secs_f64() / l.wall.as_secs_f64() * 100.0,
        v,
        i,
        l.threads,
        per_task(l.standin_cpu),
        per_task(l.loadgen_cpu),
    );
    let calls: Vec<String> = l
        .worker_calls
        .iter()
        .map(|(k, n)| format!("{k} {:.2}", *n as f64 / l.tasks as f64))
        .collect();
    println!(
        "load  {label} {}x{}: worker calls per task: {}",
        l.sessions,
        l.turns,
        calls.join(", ")
    );
    println!(
        "load  {label} {}x{}: server RSS base {}, {} idle WebSockets {} ({:.1} KiB each), after \
         one chat each {} ({:.1} KiB per session), after the run {}, after closing {}; \
         anonymous (RssAnon) base {}, after closing {}",
        l.sessions,
        l.turns,
        procfs::mib(l.rss_base),
        l.sessions,
        procfs::mib(l.rss_idle),
        l.per_idle_kib(),
        procfs::mib(l.rss_sessions),
        l.per_session_kib(),
        procfs::mib(l.rss_loaded),
        procfs::mib(l.rss_closed),
        procfs::mib(l.anon_base),
        procfs::mib(l.anon_closed),
    );
    if !l.later.is_empty() {
        let later: Vec<String> = l
            .later
            .iter()
            .map(|&(ms, rss, anon)| {
                format!(
                    "{:.1} s: {} (RssAnon {})",
                    ms as f64 / 1000.0,
                    procfs::mib(rss),
                    procfs::mib(anon)
                )
            })
            .collect();
        println!(
            "load  {label} {}x{}: server RSS after closing + {}",
            l.sessions,
            l.turns,
            later.join(", + ")
        );
    }
    if let Some(t) = &l.traced {
        println!("load  {label} {}x{}: {t}", l.sessions, l.turns);
    }
    if let Some(ir) = l.instructions {
        println!(
            "load  {label} {}x{}: callgrind: {ir} instructions (Ir) in the server over the run, \
             {:.3}M per task",
            l.sessions,
            l.turns,
            ir as f64 / l.tasks as f64 / 1e6
        );
    }
    if let Some(n) = l.statements {
        println!(
            "load  {label} {}x{}: {n} SQL statements over the run, {:.2} per task",
            l.sessions,
            l.turns,
            n as f64 / l.tasks as f64
        );
    }
}

/// `a` or `a–b` over the runs.
fn span(values: &[f64], digits: usize) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if (hi - lo).abs() < 0.5 * 10f64.powi(-(digits as i32)) {
        format!("{lo:.digits$}")
    } else {
        format!("{lo:.digits$}–{hi:.digits$}")
    }
}

fn table(label: &str, levels: &[Vec<Level>], note: &str) -> String {
    let mut out = String::new();
    // `--after-close-ms`: the same delays in every run.
    let delays: Vec<u64> = levels
        .iter()
        .find_map(|runs| runs.first())
        .map(|l| l.later.iter().map(|r| r.0).collect())
        .unwrap_or_default();
    let later_head: String = delays
        .iter()
        .map(|&ms| format!(" → +{} s", ms as f64 / 1000.0))
        .collect();
    let _ = writeln!(
        out,
        "| {label}: sessions × turns | tasks/s | dispatch p50 / p99 ms | chat→done p50 / p99 ms \
         | server CPU ms/task | ctx switches/task (vol + invol) | RSS base → idle WS → sessions → \
         closed MiB | RssAnon base → closed{later_head} MiB | KiB per idle WS | KiB per session |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for runs in levels {
        let Some(first) = runs.first() else { continue };
        let f =
            |g: &dyn Fn(&Level) -> f64, d: usize| span(&runs.iter().map(g).collect::<Vec<_>>(), d);
        let mib = |g: &dyn Fn(&Level) -> u64| f(&|l| g(l) as f64 / 1024.0, 1);
        let later: String = (0..delays.len())
            .map(|i| format!(" → {}", mib(&|l| l.later.get(i).map_or(0, |r| r.2))))
            .collect();
        let _ = writeln!(
            out,
            "| {} × {}{} | {} | {} / {} | {} / {} | {} | {} + {} | {} → {} → {} → {} | {} → {}{} | \
             {} | {} |",
            first.sessions,
            first.turns,
            note,
            f(&Level::tasks_per_s, 0),
            f(&|l| ms(l.dispatch.p50), 2),
            f(&|l| ms(l.dispatch.p99), 1),
            f(&|l| ms(l.done.p50), 2),
            f(&|l| ms(l.done.p99), 1),
            f(&Level::cpu_per_task_ms, 3),
            f(&|l| l.switches_per_task().0, 1),
            f(&|l| l.switches_per_task().1, 1),
            mib(&|l| l.rss_base),
            mib(&|l| l.rss_idle),
            mib(&|l| l.rss_sessions),
            mib(&|l| l.rss_closed),
            mib(&|l| l.anon_base),
            mib(&|l| l.anon_closed),
            later,
            f(&Level::per_idle_kib, 1),
            f(&Level::per_session_kib, 1),
        );
    }
    out
}

/// The median run of each level, by tasks/s.
fn medians(levels: &[Vec<Level>]) -> Vec<&Level> {
    levels
        .iter()
        .filter_map(|runs| {
            let mut sorted: Vec<&Level> = runs.iter().collect();
            sorted.sort_by(|a, b| a.tasks_per_s().total_cmp(&b.tasks_per_s()));
            sorted.get(sorted.len() / 2).copied()
        })
        .collect()
}

fn draw(path: &Path, results: &[(Store, Vec<Vec<Level>>)]) -> anyhow::Result<()> {
    let mut dispatch = Panel::new("dispatch (chat sent -> worker got /chat)", "sessions", "ms")
        .log_x()
        .log_y();
    let mut rate = Panel::new(
        "tasks/s (all sessions chatting at once)",
        "sessions",
        "tasks/s",
    )
    .log_x();
    let mut rss = Panel::new("server RSS", "sessions", "MiB").log_x().log_y();
    let mut per = Panel::new("server memory per session", "sessions", "KiB").log_x();
    for (store, levels) in results {
        let mid = medians(levels);
        let x = |g: &dyn Fn(&Level) -> f64| -> Vec<(f64, f64)> {
            mid.iter().map(|l| (l.sessions as f64, g(l))).collect()
        };
        let name = store.label();
        dispatch = dispatch
            .series(&format!("{name} p50"), x(&|l| ms(l.dispatch.p50)))
            .series(&format!("{name} p99"), x(&|l| ms(l.dispatch.p99)));
        rate = rate.series(name, x(&Level::tasks_per_s));
        rss = rss
            .series(
                &format!("{name}, idle WebSockets"),
                x(&|l| l.rss_idle as f64 / 1024.0),
            )
            .series(
                &format!("{name}, after one chat each"),
                x(&|l| l.rss_sessions as f64 / 1024.0),
            )
            .series(
                &format!("{name}, after closing"),
                x(&|l| l.rss_closed as f64 / 1024.0),
            );
        per = per
            .series(
                &format!("{name}, per idle WebSocket"),
                x(&Level::per_idle_kib),
            )
            .series(
                &format!("{name}, per session (one chat)"),
                x(&Level::per_session_kib),
            );
    }
    plot::png(path, &[dispatch, rate, rss, per], 2)
}

/// Runs every level and prints, writes and draws the figures.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let nofile = procfs::raise_nofile();
    let most = options.sessions.iter().copied().max().unwrap_or(0);
    ensure!(
        nofile as usize > most + 100,
        "{most} sessions need {} open files in this process and in the server; the limit is \
         {nofile}",
        most + 100
    );
    let exe = std::env::current_exe()?;
    let server_bin = match &options.server_bin {
        Some(b) => b.clone(),
        None => exe.with_file_name("anywork-server"),
    };
    let standin = standin::spawn(&exe, options.standin_prepare_keys).await?;
    println!(
        "load  server {} (MAX_CONCURRENT_TASKS {}), stand-in worker {} (pid {}), open-file \
         limit {nofile}",
        server_bin.display(),
        options
            .max_concurrent
            .map_or("default".to_owned(), |n| n.to_string()),
        standin.url,
        standin.pid
    );
    let bench = Bench {
        options,
        server_bin,
        standin,
    };
    let o = &bench.options;
    let mut results: Vec<(Store, Vec<Vec<Level>>)> = o
        .stores
        .iter()
        .map(|&s| (s, o.sessions.iter().map(|_| Vec::new()).collect()))
        .collect();
    // Interleaved over the repeats and the stores, so that a busy spell of the machine does
    // not fall on one level only.
    for _ in 0..o.repeat.max(1) {
        for (i, &sessions) in o.sessions.iter().enumerate() {
            for (store, levels) in &mut results {
                let l = level(&bench, *store, sessions.max(1)).await?;
                print(store.label(), &l);
                levels[i].push(l);
            }
        }
    }
    let note = if o.strace {
        " (under strace)"
    } else if o.callgrind {
        " (under callgrind)"
    } else if o.count_sql {
        " (logging SQL)"
    } else if o.perf_events.is_some() {
        " (under perf stat)"
    } else {
        ""
    };
    let mut tables = String::new();
    for (store, levels) in &results {
        tables.push_str(&table(store.label(), levels, note));
        tables.push('\n');
    }
    println!("\n{tables}");
    if let Some(path) = &o.markdown {
        std::fs::write(path, &tables)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &o.plot {
        draw(path, &results)?;
        println!("load  plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_env_is_name_equals_value() {
        assert_eq!(
            parse_env("GLIBC_TUNABLES=glibc.malloc.arena_max=2").unwrap(),
            (
                "GLIBC_TUNABLES".to_owned(),
                "glibc.malloc.arena_max=2".to_owned()
            )
        );
        assert_eq!(
            parse_env("EMPTY=").unwrap(),
            ("EMPTY".to_owned(), String::new())
        );
        assert!(parse_env("NO_VALUE").is_err());
        assert!(parse_env("=value").is_err());
    }

    fn level(later: Vec<(u64, u64, u64)>) -> Level {
        let d = Duration::from_millis(10);
        let summary = || Summary {
            n: 1,
            p50: d,
            p99: d,
            max: d,
        };
        Level {
            sessions: 1000,
            turns: 2,
            tasks: 2000,
            wall: Duration::from_secs(1),
            dispatch: summary(),
            done: summary(),
            cpu: Duration::from_secs(1),
            switches: (0, 0),
            standin_cpu: Duration::ZERO,
            loadgen_cpu: Duration::ZERO,
            instructions: None,
            statements: None,
            worker_calls: Vec::new(),
            threads: 1,
            rss_base: 20 * 1024,
            rss_idle: 23 * 1024,
            rss_sessions: 40 * 1024,
            rss_loaded: 80 * 1024,
            rss_closed: 80 * 1024,
            anon_base: 4 * 1024,
            anon_closed: 60 * 1024,
            later,
            traced: None,
        }
    }

    #[test]
    fn the_readings_after_the_close_get_their_columns() {
        let runs = vec![vec![
            level(vec![
                (15_000, 40 * 1024, 20 * 1024),
                (30_000, 30 * 1024, 10 * 1024),
            ]),
            level(vec![
                (15_000, 40 * 1024, 22 * 1024),
                (30_000, 30 * 1024, 10 * 1024),
            ]),
        ]];
        let out = table("SQLite", &runs, "");
        assert!(
            out.contains("RssAnon base → closed → +15 s → +30 s MiB"),
            "{out}"
        );
        assert!(out.contains("| 4.0 → 60.0 → 20.0–22.0 → 10.0 |"), "{out}");
        // Without them, the table is as it was.
        let plain = table("SQLite", &[vec![level(Vec::new())]], "");
        assert!(plain.contains("RssAnon base → closed MiB"), "{plain}");
        assert!(plain.contains("| 4.0 → 60.0 |"), "{plain}");
    }
}
