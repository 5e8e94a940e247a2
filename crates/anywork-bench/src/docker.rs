//! Docker driver benchmarks: a session's first `get_worker` (create the volume and the
//! container, start it, wait for `/health`) and the next ones (find the running container,
//! check `/health`), on this machine's Docker engine with the worker image built from the
//! release worker binary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use anywork_core::{ContainerDriver, SessionId, TaskId};
use anywork_drivers::{DockerConfig, DockerDriver};
use anywork_test::docker_image::{build_image, engine_reachable, remove_pool};

use crate::stats::summarize;

/// Options of `anywork-bench docker`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Sessions, each getting a new container (the cold figure).
    #[arg(long, default_value_t = 30)]
    sessions: usize,
    /// `get_worker` calls per session once its container runs (the warm figure).
    #[arg(long, default_value_t = 50)]
    warm: usize,
    /// The worker binary the image is built from (default: next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// The image tag to build and use.
    #[arg(long, default_value = "anywork-worker:bench")]
    image: String,
}

/// Removes the run's containers, volumes and network, also on error.
struct Cleanup {
    prefix: String,
    network: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_pool(&self.prefix, &self.network);
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    if !engine_reachable() {
        bail!("no Docker engine: `docker info` failed (install docker.io, start dockerd)");
    }
    let worker_bin = match options.worker_bin {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("anywork-worker"),
    };
    if !worker_bin.is_file() {
        bail!(
            "no worker binary at {}: cargo build --release -p anywork-worker, or pass --worker-bin",
            worker_bin.display()
        );
    }
    build_image(&worker_bin, &options.image);

    let run = TaskId::generate().to_string().replace('-', "");
    let prefix = format!("awb-{}-", &run[run.len() - 8..]);
    let cleanup = Cleanup {
        network: format!("{prefix}net"),
        prefix: prefix.clone(),
    };
    let mut config = DockerConfig::new(options.image.clone());
    config.network = cleanup.network.clone();
    config.name_prefix = prefix;
    config.stop_grace = Duration::from_secs(2);
    // The worker needs a model configured to start; nothing calls it here.
    config.env = vec![
        ("EXECUTOR".into(), "native".into()),
        ("API_KEY".into(), "bench".into()),
        ("API_BASE_URL".into(), "http://127.0.0.1:9/v1".into()),
        ("MODEL".into(), "bench".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let driver = DockerDriver::connect(config)
        .await
        .context("connect to the Docker engine")?;
    // The network exists before the first measured call.
    driver.network_gateway().await?;

    let sessions: Vec<SessionId> = (0..options.sessions)
        .map(|i| SessionId::new(format!("bench-{i}-{run}")))
        .collect::<Result<_, _>>()?;
    let mut cold = Vec::with_capacity(sessions.len());
    let mut warm = Vec::with_capacity(sessions.len() * options.warm);
    let mut release = Vec::with_capacity(sessions.len());
    let mut endpoints = Vec::with_capacity(sessions.len());
    for s in &sessions {
        let start = Instant::now();
        let w = driver.get_worker(s).await?;
        cold.push(start.elapsed());
        endpoints.push(w);
    }
    for (s, w) in sessions.iter().zip(&endpoints) {
        for _ in 0..options.warm {
            let start = Instant::now();
            let again = driver.get_worker(s).await?;
            warm.push(start.elapsed());
            if &again != w {
                bail!("{s}: a warm get_worker returned another worker: {again:?} vs {w:?}");
            }
        }
    }
    for s in &sessions {
        let start = Instant::now();
        driver.release(s).await?;
        release.push(start.elapsed());
    }
    for s in &sessions {
        driver.purge(s).await?;
    }
    drop(cleanup);

    println!(
        "docker driver, image {} ({}), {} sessions, {} warm calls each",
        options.image,
        worker_bin.display(),
        options.sessions,
        options.warm
    );
    for (name, samples) in [
        (
            "cold get_worker (volume + create + start + /health)",
            &mut cold,
        ),
        ("warm get_worker (inspect + /health)", &mut warm),
        ("release (stop SIGTERM + remove)", &mut release),
    ] {
        if let Some(s) = summarize(samples) {
            println!("  {name}: {s}");
        }
    }
    Ok(())
}
