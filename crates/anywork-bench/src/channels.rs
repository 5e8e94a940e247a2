//! Channel intake: signed generic-webhook requests at a fixed rate against the in-process
//! server (SQLite, the webhook channel with a secret, an in-process worker on the fake model,
//! so the tasks really run meanwhile), timing each request to its `202`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use anywork_channels::verify::hmac_sha256;
use anywork_channels::webhook::{WebhookChannel, WebhookConfig};
use anywork_runtime::{Dispatcher, DispatcherConfig};
use anywork_server::{ApiOptions, AppState};
use anywork_test::fake_llm::{FakeLlm, Reply};

use crate::stats::summarize;
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
}

const SECRET: &str = "bench-webhook-secret";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let fake = FakeLlm::start().await;
    fake.set_responder(|_| Reply::text("ok"));
    let worker = start_worker(native(&fake)).await?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(anywork_store::SqliteStore::open_in_dir(dir.path()).await?);
    let driver = Arc::new(anywork_drivers::StaticDriver::new(&worker.url)?);
    let mut config = DispatcherConfig::default();
    config.max_concurrent = 256;
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
    tokio::spawn(anywork_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    println!(
        "channels  webhook intake → 202, {} verification, {} req/s offered for {} s (SQLite, tasks run meanwhile)",
        if options.hmac {
            "HMAC signature"
        } else {
            "X-Webhook-Secret"
        },
        options.rate,
        options.seconds
    );
    offer(&http, &url, options.rate, 1, options.hmac).await?;
    let started = Instant::now();
    let (mut samples, errors) = offer(&http, &url, options.rate, options.seconds, options.hmac)
        .await
        .context("measured run")?;
    let wall = started.elapsed();
    let n = samples.len();
    let summary = summarize(&mut samples).context("no samples")?;
    println!(
        "  202s: {summary}; {:.0} req/s answered over {:.1} s; {errors} errors",
        n as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    ensure!(errors == 0, "{errors} requests did not get 202");
    Ok(())
}

/// Sends `rate` requests a second for `seconds`, each on its own task at its slot; returns
/// the latencies of the 202s and the number of other answers.
async fn offer(
    http: &reqwest::Client,
    url: &str,
    rate: u64,
    seconds: u64,
    hmac: bool,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let total = rate * seconds;
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let (http, url) = (http.clone(), url.to_owned());
        handles.push(tokio::spawn(async move {
            let body =
                format!(r#"{{"message":"bench request {i}","source":"bench","meta":{{"i":{i}}}}}"#);
            let mut req = http.post(&url).header("content-type", "application/json");
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
            let status = req.body(body).send().await.map(|r| r.status().as_u16());
            (status, t.elapsed())
        }));
    }
    let mut samples = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        match h.await? {
            (Ok(202), d) => samples.push(d),
            _ => errors += 1,
        }
    }
    Ok((samples, errors))
}
