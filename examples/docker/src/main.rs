//! Asks a Docker engine for a session's worker through AnyWork's `DockerDriver`: a container
//! per session on a bridge network, its workspace on a named volume.
//!
//! Nothing is pulled: build the worker image first, either without a registry (a Debian
//! minimal root made by debootstrap, with bash, git, ripgrep, the worker and the Claude Code
//! CLI from `pip install claude-agent-sdk`: what the tests use), or from
//! `deploy/Dockerfile.worker` where a registry is reachable:
//!
//! ```sh
//! cargo build --release -p anywork-worker
//! deploy/build-worker-image.sh target/release/anywork-worker anywork-worker:latest
//! # or: docker build -f deploy/Dockerfile.worker -t anywork-worker:latest .
//! ```
//!
//! Then, on the Docker host (the driver reaches workers at their IP on `DOCKER_NETWORK`):
//!
//! ```sh
//! export API_KEY=sk-... API_BASE_URL=https://api.example.com/v1 MODEL=some-model
//! # (or ANTHROPIC_API_KEY=sk-ant-...)
//! export DOCKER_WORKER_IMAGE=anywork-worker:latest DOCKER_NETWORK=anywork
//! cargo run -p example-docker -- my-session          # a worker (new or reused), released
//! cargo run -p example-docker -- my-session --purge  # ... and its workspace volume deleted
//! ```
//!
//! The worker refuses to start without a model: the model variables above are passed from
//! this process to the container (`DOCKER_WORKER_ENV=KEY=VALUE,...` adds more). Every
//! `DOCKER_*` setting is read by `DockerConfig::from_env`.

use anywork_core::{ContainerDriver, SessionId};
use anywork_drivers::{DockerConfig, DockerDriver};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let session = SessionId::new(args.next().unwrap_or_else(|| "example-session".into()))?;
    let purge = args.any(|a| a == "--purge");

    let config = DockerConfig::from_env()?;
    println!(
        "image {}, network {}, name prefix {}",
        config.image, config.network, config.name_prefix
    );
    let driver = DockerDriver::connect(config).await?;
    println!(
        "container {} with volume {} for session {session}",
        driver.container_name(&session),
        driver.volume_name(&session)
    );

    let worker = driver.get_worker(&session).await?;
    let healthy = driver.is_healthy(&worker).await;
    println!("worker {:.12} at {}", worker.worker_id, worker.base_url);
    println!("healthy: {healthy}");

    if purge {
        driver.purge(&session).await?;
        println!("purged {session}: container and workspace volume removed");
    } else {
        driver.release(&session).await?;
        println!(
            "released {session}: container removed, volume {} kept for its next worker",
            driver.volume_name(&session)
        );
    }
    if !healthy {
        return Err(format!("the worker at {} did not answer /health", worker.base_url).into());
    }
    Ok(())
}
