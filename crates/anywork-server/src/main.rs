//! `anywork-server`: the reference server. Wiring only: see [`anywork_server::config`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use anywork_server::config::Config;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = Config::parse();
    let built = config.build().await?;
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set SERVER_HOST / SERVER_PORT)"))?;
    let dispatcher = built.state.dispatcher().clone();
    tracing::info!(
        url = %format!("http://{addr}"),
        driver = dispatcher.driver().name(),
        local_worker = built.local_worker.as_deref().unwrap_or("-"),
        "AnyWork server listening; open the URL in a browser"
    );
    anywork_server::serve(listener, built.state, shutdown_signal()).await?;
    dispatcher
        .shutdown(Duration::from_secs(config.shutdown_grace_seconds))
        .await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
