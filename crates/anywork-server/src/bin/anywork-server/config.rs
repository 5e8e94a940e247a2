//! [`Config`]: every setting of the reference server, from flags or the environment (the
//! original AnyWork's variable names), and [`Config::build`], which wires store, driver,
//! dispatcher and API together. Part of the binary: clap and anyhow stay out of the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use anywork_core::{ContainerDriver, TaskStore};
use anywork_runtime::{Dispatcher, DispatcherConfig, FirstWords, ModelTitles, TitleGenerator};
use anywork_server::{ApiOptions, AppState};
use clap::Parser;

/// The AnyWork server: dispatcher, REST + WebSocket API and web UI.
#[derive(Debug, Clone, Parser)]
#[command(name = "anywork-server", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SERVER_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "SERVER_PORT", default_value_t = 3001)]
    pub port: u16,
    /// Folder of the SQLite database (anywork.db) and, for the local worker, its workspace.
    #[arg(long, env = "DB_DIR", default_value = "./data")]
    pub db_dir: PathBuf,
    /// PostgreSQL (`postgres://…`) or SQLite (`sqlite:…`) URL; overrides DB_DIR's database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// `local` (a worker inside this process), `static` (the worker at STATIC_WORKER_URL),
    /// `docker` (a container per session, DOCKER_* variables) or `k8s` (a pod per session,
    /// K8S_* variables), as compiled in. Default: `static` when STATIC_WORKER_URL is set,
    /// else `local`.
    #[arg(long, env = "CONTAINER_DRIVER")]
    pub container_driver: Option<String>,
    /// URL of the worker for the static driver (`http://127.0.0.1:8080`).
    #[arg(long, env = "STATIC_WORKER_URL")]
    pub static_worker_url: Option<String>,
    /// Workspace root of the local worker (default: DB_DIR/workspace).
    #[arg(long, env = "WORKSPACE_DIR")]
    pub workspace_dir: Option<PathBuf>,
    /// Key of an OpenAI-compatible API (titles; also the native executor's).
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Base URL of that API (`https://api.openai.com/v1`).
    #[arg(long, env = "API_BASE_URL")]
    pub api_base_url: Option<String>,
    /// Model of the native executor (used for titles when TITLE_MODEL is unset).
    #[arg(long, env = "MODEL")]
    pub model: Option<String>,
    /// Model that writes session titles.
    #[arg(long, env = "TITLE_MODEL")]
    pub title_model: Option<String>,
    /// Tasks running at once (0: no limit). Default per driver: no limit for `local` and
    /// `static` (one worker takes every session's task, at most one per session, so the
    /// sessions bound it; set a limit if that worker cannot take them all), 64 for `docker`
    /// and `k8s` (each running task holds a container or pod).
    #[arg(long, env = "MAX_CONCURRENT_TASKS")]
    pub max_concurrent_tasks: Option<usize>,
    /// A task running longer fails with the reason.
    #[arg(long, env = "TASK_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub task_timeout_seconds: u64,
    /// Lease of a running task; after a crash its tasks fail once it expires.
    #[arg(long, env = "LEASE_TTL_SECONDS", default_value_t = 30)]
    pub lease_ttl_seconds: u64,
    /// Origins allowed by CORS, comma-separated (`*` for any; empty for none).
    #[arg(long, env = "CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// Seconds between asks to the driver to stop idle workers (0: never). The idle TTL itself
    /// is the driver's (DOCKER_IDLE_TTL_SECONDS, K8S_IDLE_TTL_SECONDS).
    #[arg(long, env = "REAP_INTERVAL_SECONDS", default_value_t = 30)]
    pub reap_interval_seconds: u64,
    /// Seconds to let running tasks finish on shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
}

/// A built server: the API state and, with the local driver, the worker it runs.
#[derive(Debug)]
pub struct Built {
    /// The API state (holds the dispatcher).
    pub state: AppState,
    /// Where the local worker listens, when there is one.
    pub local_worker: Option<String>,
}

/// The values of `CONTAINER_DRIVER`: every driver is compiled into the binary.
const DRIVERS: &str = "local, static, docker, k8s";

/// `MAX_CONCURRENT_TASKS` meaning no limit (the dispatcher's semaphore needs a number).
pub const UNLIMITED_TASKS: usize = 1 << 20;
/// Default `MAX_CONCURRENT_TASKS` of the container drivers (`docker`, `k8s`).
pub const CONTAINER_DRIVER_TASKS: usize = 64;

impl Config {
    /// The driver named by `CONTAINER_DRIVER`, else `static` when `STATIC_WORKER_URL` is set,
    /// else `local` (lowercase, as given: not checked here).
    pub fn driver_name(&self) -> String {
        match (&self.container_driver, &self.static_worker_url) {
            (Some(d), _) => d.trim().to_ascii_lowercase(),
            (None, Some(url)) if !url.trim().is_empty() => "static".to_owned(),
            (None, _) => "local".to_owned(),
        }
    }

    /// Tasks running at once with `driver`: `MAX_CONCURRENT_TASKS` when set (0: no limit),
    /// else the driver's default (see the flag's help).
    pub fn max_concurrent(&self, driver: &str) -> usize {
        match self.max_concurrent_tasks {
            Some(0) => UNLIMITED_TASKS,
            Some(n) => n.min(UNLIMITED_TASKS),
            None => match driver {
                "docker" | "k8s" | "kubernetes" => CONTAINER_DRIVER_TASKS,
                _ => UNLIMITED_TASKS,
            },
        }
    }
}

impl Config {
    /// Store, driver, dispatcher and API state, ready to serve.
    pub async fn build(&self) -> anyhow::Result<Built> {
        let store = self.store().await?;
        let mut warning = None;
        let driver_name = self.driver_name();
        let (driver, local_worker): (Arc<dyn ContainerDriver>, Option<String>) = match driver_name
            .as_str()
        {
            "static" => {
                let url = self
                        .static_worker_url
                        .as_deref()
                        .filter(|u| !u.trim().is_empty())
                        .context("CONTAINER_DRIVER=static needs STATIC_WORKER_URL (e.g. http://127.0.0.1:8080)")?;
                (Arc::new(anywork_drivers::StaticDriver::new(url)?), None)
            }
            "local" => {
                let (url, warn) = self.start_local_worker().await?;
                warning = warn;
                (
                    Arc::new(anywork_drivers::StaticDriver::new(&url)?),
                    Some(url),
                )
            }
            "docker" => {
                let config = anywork_drivers::DockerConfig::from_env()?;
                (
                    Arc::new(anywork_drivers::DockerDriver::connect(config).await?),
                    None,
                )
            }
            "k8s" | "kubernetes" => {
                let config = anywork_drivers::K8sConfig::from_env()?;
                (
                    Arc::new(anywork_drivers::K8sDriver::connect(config).await?),
                    None,
                )
            }
            other => bail!("CONTAINER_DRIVER={other:?} is not a driver: use one of {DRIVERS}"),
        };
        let mut config = DispatcherConfig::default();
        config.max_concurrent = self.max_concurrent(&driver_name);
        tracing::info!(
            driver = %driver_name,
            max_concurrent_tasks = config.max_concurrent,
            "task concurrency"
        );
        config.task_timeout = Duration::from_secs(self.task_timeout_seconds.max(1));
        config.lease_ttl = Duration::from_secs(self.lease_ttl_seconds.max(1));
        config.reap_every = (self.reap_interval_seconds > 0)
            .then(|| Duration::from_secs(self.reap_interval_seconds));
        let dispatcher = Dispatcher::builder(store, driver)
            .config(config)
            .titles(self.titles()?)
            .start()
            .await
            .context("cannot start the dispatcher")?;
        let mut options = ApiOptions::default();
        options.warning = warning;
        options.cors_origins = self
            .cors_origins
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Built {
            state: AppState::new(dispatcher, options),
            local_worker,
        })
    }

    async fn store(&self) -> anyhow::Result<Arc<dyn TaskStore>> {
        if let Some(url) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            return anywork_store::connect(url)
                .await
                .context("cannot open DATABASE_URL");
        }
        let store = anywork_store::SqliteStore::open_in_dir(&self.db_dir)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database in DB_DIR {}",
                    self.db_dir.display()
                )
            })?;
        Ok(Arc::new(store))
    }

    fn titles(&self) -> anyhow::Result<Arc<dyn TitleGenerator>> {
        let model = self.title_model.as_deref().or(self.model.as_deref());
        match (&self.api_key, &self.api_base_url, model) {
            (Some(key), Some(base), Some(model))
                if !key.trim().is_empty()
                    && !base.trim().is_empty()
                    && !model.trim().is_empty() =>
            {
                Ok(Arc::new(ModelTitles::new(base, key, model)?))
            }
            _ => Ok(Arc::new(FirstWords)),
        }
    }

    /// Starts the in-process worker on a loopback port; returns its URL, and the warning to
    /// show when no model is configured.
    async fn start_local_worker(&self) -> anyhow::Result<(String, Option<String>)> {
        let workspace = self
            .workspace_dir
            .clone()
            .unwrap_or_else(|| self.db_dir.join("workspace"));
        let (executor, warning) = match anywork_worker::executor_from_env() {
            Ok(e) => (e, None),
            Err(e) => {
                tracing::warn!("{}", e.message());
                let message = e.message().to_owned();
                (
                    Arc::new(Unconfigured(message.clone())) as Arc<dyn anywork_core::Executor>,
                    Some(message),
                )
            }
        };
        let state = anywork_worker::WorkerState::new(
            anywork_worker::WorkerConfig::new(&workspace),
            executor,
        )
        .with_context(|| format!("cannot use WORKSPACE_DIR {}", workspace.display()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot start the local worker")?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(anywork_worker::serve(
            listener,
            state,
            std::future::pending(),
        ));
        tracing::info!(%url, workspace = %workspace.display(), "local worker started");
        Ok((url, warning))
    }
}

/// The executor of a local worker with no model: every task fails saying what to set.
struct Unconfigured(String);

#[async_trait::async_trait]
impl anywork_core::Executor for Unconfigured {
    fn name(&self) -> &str {
        "unconfigured"
    }

    async fn start(
        &self,
        _request: anywork_core::ExecutionRequest,
    ) -> anywork_core::Result<anywork_core::Execution> {
        Err(anywork_core::Error::invalid_input(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["anywork-server"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap()
    }

    #[test]
    fn max_concurrent_tasks_defaults_per_driver() {
        // Not set: no limit for the in-process and static workers, bounded for containers.
        let config = parse(&[]);
        if config.max_concurrent_tasks.is_some()
            || config.container_driver.is_some()
            || config.static_worker_url.is_some()
        {
            eprintln!("the driver or MAX_CONCURRENT_TASKS is set in the environment; skipping");
        } else {
            assert_eq!(config.driver_name(), "local");
            assert_eq!(config.max_concurrent("local"), UNLIMITED_TASKS);
            let static_ = parse(&["--static-worker-url", "http://127.0.0.1:8080"]);
            assert_eq!(static_.driver_name(), "static");
            assert_eq!(static_.max_concurrent("static"), UNLIMITED_TASKS);
            for driver in ["docker", "k8s"] {
                let config = parse(&["--container-driver", driver]);
                assert_eq!(
                    config.max_concurrent(&config.driver_name()),
                    CONTAINER_DRIVER_TASKS
                );
            }
        }
        // Set: the same for every driver; 0 is no limit.
        let set = parse(&[
            "--max-concurrent-tasks",
            "8",
            "--container-driver",
            "DOCKER",
        ]);
        assert_eq!(set.driver_name(), "docker");
        assert_eq!(set.max_concurrent("docker"), 8);
        assert_eq!(set.max_concurrent("local"), 8);
        let zero = parse(&["--max-concurrent-tasks", "0"]);
        assert_eq!(zero.max_concurrent("docker"), UNLIMITED_TASKS);
        assert_eq!(
            parse(&["--max-concurrent-tasks", "99999999999"]).max_concurrent("k8s"),
            UNLIMITED_TASKS
        );
        assert!(
            Config::try_parse_from(["anywork-server", "--max-concurrent-tasks", "-1"]).is_err()
        );
    }
}
