//! Channel intake: signed generic-webhook requests at a fixed rate against the in-process
//! server (SQLite, the webhook channel with a secret, an in-process worker on the fake model,
//! so the tasks really run meanwhile, `--max-concurrent` at a time), timing each request to
//! its `202`. After the run: where the time went (the handler's own time, the SQLite
//! writer's queue and group commits, its WAL checkpoints, and which slow requests overlapped
//! a checkpoint); `--phases` adds every store call's times.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use anywork_channels::verify::hmac_sha256;
use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_core::TaskStore;
use anywork_runtime::{Dispatcher, DispatcherConfig};
use anywork_server::{ApiOptions, AppState};
use anywork_store::WriterStats;
use anywork_test::fake_llm::{FakeLlm, Reply};

use crate::server::{Instrumented, Timings, lock};
use crate::stats::{ms, summarize};
use crate::worker::{native, start_worker};

/// Options of `anywork-bench channels`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Requests offered per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of the measured run (after a 1 s warm-up at the same rate).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sign with X-AnyWork-Signature (HMAC of timestamp + body) instead of X-Webhook-Secret.
    #[arg(long)]
    hmac: bool,
    /// Tasks running at once meanwhile (the rest wait in their queues): low, so that what is
    /// measured is the intake, not the agent runs competing for the CPU.
    #[arg(long, default_value_t = 1)]
    max_concurrent: usize,
    /// Also time every store call (p50/p99 per method).
    #[arg(long)]
    phases: bool,
    /// Send the requests from a process of its own (one thread), so that the client does not
    /// share the server's runtime; its times are CLOCK_MONOTONIC, the same clock as here.
    #[arg(long)]
    client_process: bool,
    /// An `Idempotency-Key` header on each request (a delivery id, as GitHub's and Slack's
    /// events carry): none, one of its own per request, or one of its own except every 10th
    /// request, which repeats the key of the request 5 before it (a redelivered event: its
    /// 202 names the first copy's task).
    #[arg(long, value_enum, default_value_t = Keys::None)]
    keys: Keys,
}

/// What `Idempotency-Key` each request carries (`--keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Keys {
    /// No key.
    None,
    /// A key of its own per request.
    Unique,
    /// A key of its own, but every 10th request repeats the key of the request 5 before it.
    Repeat,
}

impl Keys {
    /// The key of request `i` of the run tagged `run` (`None`: no header).
    fn key(self, run: &str, i: u64) -> Option<String> {
        let of = match self {
            Self::None => return None,
            Self::Repeat if i % 10 == 9 => i - 5,
            Self::Unique | Self::Repeat => i,
        };
        Some(format!("bench-{run}-{of}"))
    }

    fn as_arg(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Unique => "unique",
            Self::Repeat => "repeat",
        }
    }
}

/// A run's requests: the rate, how long, and what they carry.
#[derive(Debug, Clone, Copy)]
struct Offer<'a> {
    rate: u64,
    seconds: u64,
    hmac: bool,
    keys: Keys,
    /// Makes the run's keys its own (the warm-up's are not the measured run's).
    run: &'a str,
}

/// Options of the hidden `anywork-bench channels-client` (what `--client-process` runs).
#[derive(Debug, clap::Args)]
pub struct ClientOptions {
    /// The webhook's URL.
    #[arg(long)]
    url: String,
    /// Requests per second.
    #[arg(long)]
    rate: u64,
    /// Seconds.
    #[arg(long)]
    seconds: u64,
    /// Sign with X-AnyWork-Signature instead of sending X-Webhook-Secret.
    #[arg(long)]
    hmac: bool,
    /// The `Idempotency-Key` of each request.
    #[arg(long, value_enum, default_value_t = Keys::None)]
    keys: Keys,
    /// Makes the keys of this run its own.
    #[arg(long, default_value = "")]
    run: String,
}

/// A request's start and how long it took.
type Sample = (Instant, Duration);

/// Requests at least this slow are looked at one by one (the target's p99 bound).
const SLOW: Duration = Duration::from_millis(5);

const SECRET: &str = "bench-webhook-secret";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let worker = start_worker(native(&fake)).await?;
    let dir = tempfile::tempdir()?;
    let sqlite = anywork_store::SqliteStore::open_in_dir(dir.path()).await?;
    let timings = Arc::new(Timings::default());
    let store: Arc<dyn TaskStore> = if options.phases {
        Arc::new(Instrumented::timed(
            Arc::new(sqlite.clone()),
            timings.clone(),
        ))
    } else {
        Arc::new(sqlite.clone())
    };
    let driver = Arc::new(anywork_drivers::StaticDriver::new(&worker.url)?);
    let mut config = DispatcherConfig::default();
    config.max_concurrent = options.max_concurrent.max(1);
    config.reap_every = None;
    let channel = WebhookChannel::new(WebhookConfig::new().with_secret(SECRET));
    let dispatcher = Dispatcher::builder(store, driver)
        .config(config)
        .channel(Arc::new(channel))
        .start()
        .await?;
    let state = AppState::new(dispatcher, ApiOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}/api/channel/webhook/webhook",
        listener.local_addr()?
    );
    // The server's own router and listener, with each request's time in the handler noted.
    let handled: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let noted = handled.clone();
    let app = anywork_server::router(state).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let noted = noted.clone();
            async move {
                let t = Instant::now();
                let answer = next.run(req).await;
                lock(&noted).push((t, t.elapsed()));
                answer
            }
        },
    ));
    tokio::spawn(async move {
        axum::serve(
            anywork_http::listener(listener),
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    println!(
        "channels  webhook intake → 202, {} verification, {} req/s offered for {} s (SQLite; {} task(s) run at a time meanwhile; client {}; Idempotency-Key: {})",
        if options.hmac {
            "HMAC signature"
        } else {
            "X-Webhook-Secret"
        },
        options.rate,
        options.seconds,
        options.max_concurrent,
        if options.client_process {
            "in a process of its own"
        } else {
            "in this process"
        },
        match options.keys {
            Keys::None => "none",
            Keys::Unique => "one per request",
            Keys::Repeat => "one per request, every 10th repeats an earlier one",
        }
    );
    let send = |seconds, run| {
        let (http, url) = (&http, &url);
        let offer = Offer {
            rate: options.rate,
            seconds,
            hmac: options.hmac,
            keys: options.keys,
            run,
        };
        async move {
            if options.client_process {
                offer_from_process(url, offer).await
            } else {
                self::offer(http, url, offer).await
            }
        }
    };
    send(1, "warm-up").await?;
    timings.clear();
    lock(&handled).clear();
    let writer_before = sqlite.writer_stats().unwrap_or_default();
    let started = Instant::now();
    let (samples, errors) = send(options.seconds, "measured")
        .await
        .context("measured run")?;
    let wall = started.elapsed();
    let writer = sqlite
        .writer_stats()
        .unwrap_or_default()
        .since(&writer_before);
    let n = samples.len();
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    let summary = summarize(&mut latencies).context("no samples")?;
    println!(
        "  202s: {summary}; {:.0} req/s answered over {:.1} s; {errors} errors",
        n as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    let mut in_handler: Vec<Duration> = lock(&handled).iter().map(|s| s.1).collect();
    if let Some(h) = summarize(&mut in_handler) {
        println!("  in the handler (router in, response out): {h}");
    }
    print_writer(&writer);
    print_slow(&samples, &writer);
    if options.phases {
        timings.print("  store");
    }
    ensure!(errors == 0, "{errors} requests did not get 202");
    Ok(())
}

/// `p50 / p99` of a histogram (bucket ends: powers of two of µs).
fn quantiles(h: &anywork_store::sqlite_stats::Histogram) -> String {
    format!(
        "n={} p50≤{} p99≤{} max≤{}",
        h.count(),
        ms(h.quantile(0.5)),
        ms(h.quantile(0.99)),
        ms(h.quantile(1.0))
    )
}

/// What the SQLite writer and the checkpoints did during the run.
fn print_writer(w: &WriterStats) {
    let at_least = Duration::from_micros(4096);
    println!(
        "  writer: {} writes in {} groups; queued → group start: {}, {} writes waited ≥ 4.1 ms",
        w.writes,
        w.batches,
        quantiles(&w.queue_wait),
        w.queue_wait.at_least(at_least)
    );
    println!(
        "  group commit, no checkpoint meanwhile: {} ({} ≥ 4.1 ms); during a background checkpoint: {} ({} ≥ 4.1 ms)",
        quantiles(&w.batch_time),
        w.batch_time.at_least(at_least),
        quantiles(&w.batch_time_during_checkpoint),
        w.batch_time_during_checkpoint.at_least(at_least)
    );
    println!(
        "  checkpoints by the writer: {} ({}), {} writes waited behind them; in the background: {} ({})",
        w.writer_checkpoints,
        quantiles(&w.writer_checkpoint_time),
        w.writes_behind_checkpoint,
        w.background_checkpoints,
        quantiles(&w.background_checkpoint_time)
    );
    let longest = w
        .checkpoints
        .iter()
        .map(|c| c.wal_frames)
        .max()
        .unwrap_or(0);
    let by_writer: Vec<String> = w
        .checkpoints
        .iter()
        .filter(|c| c.by_writer)
        .take(12)
        .map(|c| format!("{} ({} frames)", ms(c.took), c.wal_frames))
        .collect();
    println!(
        "  longest WAL at a checkpoint: {longest} frames; the writer's checkpoints: [{}]",
        by_writer.join(", ")
    );
}

/// The requests that took at least [`SLOW`], by what overlapped them: a checkpoint by the
/// writer (every write waits), a background checkpoint only, or neither.
fn print_slow(samples: &[Sample], w: &WriterStats) {
    let overlaps = |s: &Sample, by_writer: bool| {
        w.checkpoints
            .iter()
            .filter(|c| c.by_writer == by_writer)
            .any(|c| c.at < s.0 + s.1 && s.0 < c.at + c.took)
    };
    let slow: Vec<&Sample> = samples.iter().filter(|s| s.1 >= SLOW).collect();
    let writer = slow.iter().filter(|s| overlaps(s, true)).count();
    let background = slow
        .iter()
        .filter(|s| !overlaps(s, true) && overlaps(s, false))
        .count();
    println!(
        "  requests ≥ {}: {} of {}; overlapping a checkpoint by the writer: {writer}, a background checkpoint only: {background}, neither: {}",
        ms(SLOW),
        slow.len(),
        samples.len(),
        slow.len() - writer - background
    );
}

/// `anywork-bench channels-client`: [`offer`] from this process, then one line per request on
/// stdout: its CLOCK_MONOTONIC start in ns, its latency in ns and its status (0: no answer).
pub async fn client(options: ClientOptions) -> anyhow::Result<()> {
    use std::io::Write as _;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let (now, mono) = (Instant::now(), crate::standin::mono_ns());
    let offer = Offer {
        rate: options.rate,
        seconds: options.seconds,
        hmac: options.hmac,
        keys: options.keys,
        run: &options.run,
    };
    let answers = offer_all(&http, &options.url, offer).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for Answer {
        status,
        sample: (at, took),
        ..
    } in answers
    {
        let at = mono + u64::try_from(at.saturating_duration_since(now).as_nanos())?;
        writeln!(out, "{at} {} {status}", took.as_nanos())?;
    }
    out.flush()?;
    Ok(())
}

/// [`offer`] from a child process (`channels-client`): the same requests and answers, timed
/// there.
async fn offer_from_process(url: &str, offer: Offer<'_>) -> anyhow::Result<(Vec<Sample>, usize)> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.args([
        "channels-client",
        "--url",
        url,
        "--rate",
        &offer.rate.to_string(),
        "--seconds",
        &offer.seconds.to_string(),
        "--keys",
        offer.keys.as_arg(),
        "--run",
        offer.run,
    ]);
    if offer.hmac {
        command.arg("--hmac");
    }
    let out = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("run the client process")?;
    ensure!(
        out.status.success(),
        "the client process failed: {}",
        out.status
    );
    let (now, mono) = (Instant::now(), crate::standin::mono_ns());
    let mut samples = Vec::new();
    let mut errors = 0;
    for line in String::from_utf8(out.stdout)?.lines() {
        let f: Vec<u64> = line
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad line from the client process: {line:?}"))?;
        let [at, took, status] = f[..] else {
            anyhow::bail!("bad line from the client process: {line:?}");
        };
        let at = now
            .checked_sub(Duration::from_nanos(mono.saturating_sub(at)))
            .context("a start before this process's clock")?;
        if status == 202 {
            samples.push((at, Duration::from_nanos(took)));
        } else {
            errors += 1;
        }
    }
    Ok((samples, errors))
}

/// Prints a request's failure on stderr, for the first 10 of a process.
fn tell_failure(i: u64, what: &str) {
    static TOLD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if TOLD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10 {
        eprintln!("  request {i} did not get 202: {what}");
    }
}

/// Sends `rate` requests a second for `seconds`, each on its own task at its slot; returns
/// the start and latency of each 202 and the number of other answers.
async fn offer(
    http: &reqwest::Client,
    url: &str,
    offer: Offer<'_>,
) -> anyhow::Result<(Vec<Sample>, usize)> {
    let answers = offer_all(http, url, offer).await?;
    if offer.keys != Keys::None {
        check_keys(&answers, offer.run);
    }
    let errors = answers.iter().filter(|a| a.status != 202).count();
    let samples = answers
        .into_iter()
        .filter(|a| a.status == 202)
        .map(|a| a.sample)
        .collect();
    Ok((samples, errors))
}

/// Prints how many tasks the run's 202s named for how many keys: with `--keys repeat`,
/// every repeated key must name its first copy's task (and no two keys one task).
fn check_keys(answers: &[Answer], run: &str) {
    use std::collections::{HashMap, HashSet};
    let mut by_key: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut answered = 0;
    for a in answers {
        if let (Some(key), Some(task)) = (&a.key, &a.task) {
            by_key.entry(key).or_default().insert(task);
            answered += 1;
        }
    }
    let split = by_key.values().filter(|tasks| tasks.len() > 1).count();
    let tasks: HashSet<&str> = by_key.values().flatten().copied().collect();
    println!(
        "  keys ({run}): {answered} 202s named a task for {} keys: {} tasks, {split} keys answered with more than one task{}",
        by_key.len(),
        tasks.len(),
        if split == 0 && tasks.len() == by_key.len() {
            " (every repeat named its first copy's task)"
        } else {
            " — WRONG: a repeated key must name the first copy's task"
        }
    );
}

/// What a request of [`offer_all`] got.
struct Answer {
    /// Its status (0 when no answer came).
    status: u16,
    sample: Sample,
    /// The `Idempotency-Key` it sent.
    key: Option<String>,
    /// The task its 202 named.
    task: Option<String>,
}

/// Every request of [`offer`] with its status (0 when no answer came) and its time.
async fn offer_all(
    http: &reqwest::Client,
    url: &str,
    offer: Offer<'_>,
) -> anyhow::Result<Vec<Answer>> {
    let Offer {
        rate,
        seconds,
        hmac,
        keys,
        run,
    } = offer;
    let total = rate * seconds;
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let (http, url, key) = (http.clone(), url.to_owned(), keys.key(run, i));
        handles.push(tokio::spawn(async move {
            let body =
                format!(r#"{{"message":"bench request {i}","source":"bench","meta":{{"i":{i}}}}}"#);
            let mut req = http.post(&url).header("content-type", "application/json");
            if let Some(key) = &key {
                req = req.header("idempotency-key", key);
            }
            let key_sent = key;
            if hmac {
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default()
                    .to_string();
                let sig: String =
                    hmac_sha256(SECRET.as_bytes(), &[ts.as_bytes(), b".", body.as_bytes()])
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                req = req
                    .header("x-anywork-timestamp", ts)
                    .header("x-anywork-signature", format!("sha256={sig}"));
            } else {
                req = req.header("x-webhook-secret", SECRET);
            }
            let t = Instant::now();
            let answer = req.body(body).send().await;
            let took = t.elapsed();
            let status = match answer {
                // With a key, the task it names, read after the time is taken (`--keys`
                // checks that a repeated key names the first copy's task); without one, the
                // answer is dropped unread, as before `--keys`.
                Ok(r) if r.status() == 202 => {
                    let task = match &key_sent {
                        Some(_) => r
                            .json::<serde_json::Value>()
                            .await
                            .ok()
                            .and_then(|v| Some(v.get("taskId")?.as_str()?.to_owned())),
                        None => None,
                    };
                    return Answer {
                        status: 202,
                        sample: (t, took),
                        key: key_sent,
                        task,
                    };
                }
                // What any other answer was, so that a failed run says why (the first few).
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    tell_failure(i, &format!("{status} {body}"));
                    status
                }
                Err(e) => {
                    tell_failure(i, &format!("no answer: {e:#}"));
                    0
                }
            };
            Answer {
                status,
                sample: (t, took),
                key: key_sent,
                task: None,
            }
        }));
    }
    let mut answers = Vec::with_capacity(handles.len());
    for h in handles {
        answers.push(h.await?);
    }
    Ok(answers)
}
