//! `anywork-server`: the reference server. Wiring only: flags and environment ([`config`]) →
//! store, driver, dispatcher and API; the library crates do the work.

mod config;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use config::Config;

/// With the `mimalloc` feature, mimalloc replaces the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    tracing::info!(
        url = %format!("http://{addr}"),
        driver = dispatcher.driver_name(),
        local_worker = built.local_worker.as_deref().unwrap_or("-"),
        "AnyWork server listening; open the URL in a browser"
    );
    anywork_server::serve(listener, built.state, anywork_http::shutdown_signal()).await?;
    dispatcher
        .shutdown(Duration::from_secs(config.shutdown_grace_seconds))
        .await;
    Ok(())
}
