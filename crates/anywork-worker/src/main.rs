//! `anywork-worker`: serves the worker HTTP API for the sessions of one container (or many,
//! behind the static driver). Wiring only: the library does the work.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use anywork_worker::{Sandbox, SandboxConfig, WorkerConfig, WorkerState, serve};
use clap::Parser;

/// The AnyWork worker: runs agent tasks for the server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (0.0.0.0 inside a container).
    #[arg(long, env = "WORKER_HOST", default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on.
    #[arg(long, env = "WORKER_PORT", default_value_t = 8080)]
    port: u16,
    /// Root of the session workspaces.
    #[arg(long, env = "WORKSPACE_DIR", default_value = "./workspace")]
    workspace_dir: PathBuf,
    /// `claude-code` or `native`; by default chosen from the model settings.
    #[arg(long, env = "EXECUTOR")]
    executor: Option<String>,
    /// Seconds between SSE keep-alive comments on a running task's stream: they tell the
    /// server the worker is alive when the agent is quiet (its STREAM_IDLE_TIMEOUT_SECONDS
    /// must be longer).
    #[arg(long, env = "SSE_KEEP_ALIVE_SECONDS", default_value_t = 15.0)]
    keep_alive_seconds: f64,
    /// Seconds a running task goes on after its server's connection is gone, so that the
    /// server, restarted, re-attaches to it (`GET /chat/attach`); 0 stops it at once.
    #[arg(long, env = "DETACH_GRACE_SECONDS", default_value_t = 120)]
    detach_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anywork_http::init_tracing().map_err(anyhow::Error::msg)?;
    let args = Args::parse();
    // SANDBOX, SANDBOX_NETWORK, SANDBOX_HIDE (+ the workspace root: other sessions), CHILD_ENV.
    let sandbox = Sandbox::detect(SandboxConfig::from_env()?.with_hidden(&args.workspace_dir))
        .context("cannot start without the sandbox SANDBOX asks for")?;
    let file_vars = anywork_worker::select::env_file_vars(|name| std::env::var(name).ok())
        .context("cannot read the worker's variables")?;
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .chain(file_vars)
        .chain(
            args.executor
                .clone()
                .map(|name| ("EXECUTOR".to_owned(), name)),
        );
    let executor = anywork_worker::executor_with_sandbox(vars, &sandbox)
        .context("cannot choose an executor")?;
    let secret = WorkerConfig::secret_from_lookup(|name| std::env::var(name).ok())
        .context("cannot read the worker secret")?;
    if secret.is_none() {
        tracing::warn!(
            "no WORKER_SECRET (or WORKER_SECRET_FILE): this worker accepts calls from anyone \
             who reaches its port; set one, and the same on the server (STATIC_WORKER_SECRET)"
        );
    }
    if !args.keep_alive_seconds.is_finite() || args.keep_alive_seconds <= 0.0 {
        anyhow::bail!(
            "SSE_KEEP_ALIVE_SECONDS={} is not a positive number of seconds",
            args.keep_alive_seconds
        );
    }
    let keep_alive = std::time::Duration::from_secs_f64(args.keep_alive_seconds.min(3600.0));
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set WORKER_HOST / WORKER_PORT)"))?;
    // Where the agent's CLI reaches this worker (the pull-request tool's MCP endpoint).
    let local = listener.local_addr().unwrap_or(addr);
    let self_ip = match local.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let self_url = format!("http://{}", SocketAddr::new(self_ip, local.port()));
    let config = WorkerConfig::new(&args.workspace_dir)
        .with_sandbox(sandbox)
        .with_secret(secret)
        .with_keep_alive(keep_alive)
        .with_detach_grace(std::time::Duration::from_secs(args.detach_grace_seconds))
        .with_self_url(Some(self_url));
    let state = WorkerState::new(config, executor)
        .with_context(|| format!("cannot use WORKSPACE_DIR {}", args.workspace_dir.display()))?;
    tracing::info!(%addr, executor = state.executor().name(), "worker listening");
    serve(listener, state, anywork_http::shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The original AnyWork worker's variables, set as its users set them. They become flags
    //! through the clap definitions themselves, so that no test changes the environment.

    use super::*;
    use clap::CommandFactory;

    fn parse(vars: &[(&str, &str)]) -> Args {
        let command = Args::command();
        let mut args = vec!["anywork-worker".to_owned()];
        for (name, value) in vars {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
                .unwrap_or_else(|| panic!("no setting reads {name}"));
            args.push(format!("--{}={value}", arg.get_long().unwrap()));
        }
        Args::try_parse_from(args).unwrap()
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_original_workers_variables_keep_their_meaning() {
        let args = parse(&[("WORKER_PORT", "8181"), ("WORKSPACE_DIR", "/workspace")]);
        assert_eq!(args.port, 8181);
        assert_eq!(args.workspace_dir, PathBuf::from("/workspace"));

        // API_KEY + API_BASE_URL + MODEL: a third-party provider, through the native executor.
        let native = anywork_worker::executor_from_vars(vars(&[
            ("API_KEY", "sk-or"),
            ("API_BASE_URL", "https://openrouter.ai/api/v1"),
            ("MODEL", "anthropic/claude-sonnet-4"),
        ]))
        .unwrap();
        assert_eq!(native.name(), "native");
        // ANTHROPIC_API_KEY: Claude Code when its CLI is there (CLAUDE_BIN), else native.
        let mut anthropic = vars(&[("ANTHROPIC_API_KEY", "sk-ant")]);
        let cli = std::env::var("CLAUDE_BIN")
            .ok()
            .filter(|p| std::path::Path::new(p).is_file());
        if let Some(cli) = &cli {
            anthropic.push(("CLAUDE_BIN".into(), cli.clone()));
        }
        let executor = anywork_worker::executor_from_vars(anthropic).unwrap();
        if cli.is_some() {
            assert_eq!(executor.name(), "claude-code");
        } else {
            assert!(matches!(executor.name(), "claude-code" | "native"));
        }
        // Neither: refused, naming the variables.
        let err = anywork_worker::executor_from_vars(vars(&[]))
            .err()
            .expect("no model, no executor");
        assert!(
            err.message().contains("ANTHROPIC_API_KEY") && err.message().contains("API_KEY"),
            "{err}"
        );
    }
}
