//! Asks a Kubernetes cluster for a session's worker through AnyWork's `K8sDriver`.
//!
//! ```sh
//! export K8S_NAMESPACE=anywork K8S_WORKER_IMAGE=ghcr.io/anywork/anywork-worker:0.1.0
//! export K8S_WORKER_ADDRESS=pod-ip   # outside the cluster, on a network that reaches pod IPs
//! cargo run -p example-k8s -- my-session          # creates (or reuses) the worker
//! cargo run -p example-k8s -- my-session --release # then deletes it again
//! ```
//!
//! Credentials come from the in-cluster service account or the kubeconfig (`KUBECONFIG`).

use anywork_core::{ContainerDriver, SessionId};
use anywork_drivers::k8s::{K8sConfig, K8sDriver};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let session = SessionId::new(args.next().unwrap_or_else(|| "example-session".into()))?;
    let release = args.any(|a| a == "--release");

    let config = K8sConfig::from_env()?;
    println!(
        "namespace {}, image {}, addressing {:?}",
        config.namespace, config.image, config.addressing
    );
    let driver = K8sDriver::connect(config).await?;
    println!("pod {} for session {session}", driver.pod_name(&session));

    let worker = driver.get_worker(&session).await?;
    println!("worker {} at {}", worker.worker_id, worker.base_url);
    println!("healthy: {}", driver.is_healthy(&worker).await);

    for info in driver.list().await? {
        println!(
            "  listed: {} {} healthy={} session={:?}",
            info.endpoint.worker_id,
            info.endpoint.base_url,
            info.healthy,
            info.session_id.map(|s| s.to_string())
        );
    }
    if release {
        driver.release(&session).await?;
        println!("released {session}");
    }
    Ok(())
}
