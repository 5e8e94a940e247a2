//! `anywork-server`: the reference server. Wiring only: flags and environment ([`config`]) →
//! store, driver, dispatcher and API; the library crates do the work.

mod config;
mod instance;

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use config::Config;

/// With the `mimalloc` feature, mimalloc replaces the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `jemalloc` feature (part of `cli`, the default) and not `mimalloc`, jemalloc
/// replaces the system allocator: it returns freed memory to the system (glibc keeps it).
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anywork_http::init_tracing().map_err(anyhow::Error::msg)?;
    let config = Config::parse();
    let built = config.build().await?;
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set SERVER_HOST / SERVER_PORT)"))?;
    let dispatcher = built.state.dispatcher().clone();
    if let Some(previous) = built.instance.as_ref().and_then(|i| i.previous.as_deref()) {
        tracing::info!(
            previous,
            "this server's previous run ended; its tasks were settled"
        );
    }
    tracing::info!(
        url = %format!("http://{addr}"),
        driver = dispatcher.driver_name(),
        executor = %built.executor,
        model = %built.model,
        store = %built.store,
        local_worker = built.local_worker.as_deref().unwrap_or("-"),
        "AnyWork server listening; open the URL in a browser"
    );
    // On SIGTERM: intake stops, running tasks get SHUTDOWN_GRACE_SECONDS, then connections
    // close (see `anywork_server::serve`).
    anywork_server::serve(listener, built.state, anywork_http::shutdown_signal()).await?;
    Ok(())
}
