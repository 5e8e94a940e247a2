//! [`Config`]: every setting of the reference server, from flags or the environment (the
//! original AnyWork's variable names), and [`Config::build`], which wires store, driver,
//! dispatcher and API together. Part of the binary: clap and anyhow stay out of the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use anywork_core::worker_api::WorkerSecret;
use anywork_core::{Channel, ContainerDriver, TaskStore};
use anywork_runtime::{
    Dispatcher, DispatcherConfig, FirstWords, ModelTitles, Retention, TitleGenerator,
};
use anywork_server::{ApiOptions, ApiToken, AppState};
use clap::Parser;
use clap::builder::BoolishValueParser;

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
    /// Secret of the static worker (the worker's WORKER_SECRET), sent on every call to it.
    /// Without one the worker must have none either, and accepts calls from anyone.
    #[arg(long, env = "STATIC_WORKER_SECRET", hide_env_values = true)]
    pub static_worker_secret: Option<String>,
    /// Workspace root of the local worker (default: DB_DIR/workspace).
    #[arg(long, env = "WORKSPACE_DIR")]
    pub workspace_dir: Option<PathBuf>,
    /// Folder of the skills a request may name (`"skills": ["code-review"]`): one folder per
    /// skill holding its SKILL.md (front matter `name`, `description`) and its files.
    #[arg(long, env = "SKILLS_DIR")]
    pub skills_dir: Option<PathBuf>,
    /// Anthropic key of the in-process worker (`CONTAINER_DRIVER=local`): the Claude Code
    /// executor when the `claude` CLI is found, else the native one.
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true)]
    pub anthropic_api_key: Option<String>,
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
    /// Key of the title model's API, when not API_KEY's.
    #[arg(long, env = "TITLE_API_KEY", hide_env_values = true)]
    pub title_api_key: Option<String>,
    /// Base URL of the title model's API, when not API_BASE_URL.
    #[arg(long, env = "TITLE_API_BASE_URL")]
    pub title_api_base_url: Option<String>,
    /// Tasks running at once (0: no limit). Default per driver: 1,024 for `local` and
    /// `static` (one worker takes every session's task, at most one per session; the bound
    /// keeps a burst of thousands of sessions from holding thousands of worker connections
    /// and store calls at once — the rest wait in the queue, in order), 64 for `docker`
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
    /// Seconds the reaper holds an idle session in the store while its worker is stopped (a
    /// task of that session waits meanwhile, on every replica); if the replica dies mid-stop,
    /// the hold runs out after this long. Longer than the driver's slowest stop.
    #[arg(long, env = "REAP_HOLD_SECONDS", default_value_t = 60)]
    pub reap_hold_seconds: u64,
    /// Days to keep finished tasks' logs (the task rows stay); 0 keeps them forever.
    #[arg(long, env = "RETENTION_DAYS", default_value_t = 0.0)]
    pub retention_days: f64,
    /// Size budget of the store in MiB: over it, the logs of the tasks finished longest ago
    /// are deleted (and the space compacted); 0 for no budget.
    #[arg(long, env = "RETENTION_MAX_MB", default_value_t = 0)]
    pub retention_max_mb: u64,
    /// Seconds between retention rounds (which also measure the store for the
    /// `anywork_store_bytes` metric).
    #[arg(long, env = "RETENTION_INTERVAL_SECONDS", default_value_t = 60)]
    pub retention_interval_seconds: u64,
    /// Days to keep settled outbox deliveries (sent, or dead and not retried); 0 keeps them
    /// forever.
    #[arg(long, env = "DELIVERY_RETENTION_DAYS", default_value_t = 7.0)]
    pub delivery_retention_days: f64,
    /// A worker's event stream silent this long (workers send a keep-alive every 15 s) fails
    /// its task: the worker is hung or the connection stalled.
    #[arg(long, env = "STREAM_IDLE_TIMEOUT_SECONDS", default_value_t = 60)]
    pub stream_idle_timeout_seconds: u64,
    /// Seconds to let running tasks finish on shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// The API token every REST route and the WebSocket require (Authorization: Bearer).
    #[arg(long, env = "ANYWORK_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// A file holding the API token (e.g. a mounted secret); used when ANYWORK_API_TOKEN is unset.
    #[arg(long, env = "ANYWORK_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Run without a token on a non-loopback address, on purpose.
    #[arg(long, env = "ANYWORK_INSECURE_NO_AUTH", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub insecure_no_auth: bool,
    /// /api/health and /metrics require the token too.
    #[arg(long, env = "ANYWORK_PROTECT_HEALTH", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub protect_health: bool,
    /// The MCP servers requests may name (JSON: {"name": {"command","args","env"} or {"url","headers"}}).
    #[arg(long, env = "MCP_SERVERS_FILE")]
    pub mcp_servers_file: Option<PathBuf>,
    /// Let requests start their own MCP stdio commands (they run on the worker).
    #[arg(long, env = "ALLOW_REQUEST_MCP_COMMANDS", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub allow_request_mcp_commands: bool,
    /// Allow plain http:// for request-chosen URLs (push notifications, callbacks, HTTP MCP).
    #[arg(long, env = "ALLOW_HTTP_CALLBACKS", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub allow_http_callbacks: bool,
    /// Hosts and networks request-chosen URLs may reach although internal (comma-separated:
    /// `hooks.internal`, `*.corp`, `10.1.0.0/16`, `127.0.0.1`).
    #[arg(long, env = "OUTBOUND_ALLOW", default_value = "")]
    pub outbound_allow: String,
    /// Longest `channel_key` of POST /api/tasks, in bytes.
    #[arg(long, env = "MAX_CHANNEL_KEY_BYTES", default_value_t = 256)]
    pub max_channel_key_bytes: usize,
    /// Largest `channel_meta` of POST /api/tasks, in bytes of JSON.
    #[arg(long, env = "MAX_CHANNEL_META_BYTES", default_value_t = 16384)]
    pub max_channel_meta_bytes: usize,
    /// WebSocket messages per second per connection (0: no limit).
    #[arg(long, env = "WS_MESSAGES_PER_SECOND", default_value_t = 20)]
    pub ws_messages_per_second: u32,
    /// Open WebSocket connections per client address (0: no limit).
    #[arg(long, env = "WS_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 32)]
    pub ws_max_connections_per_client: usize,
    /// Shipped channels to leave off, comma-separated (`webhook`, `github`, `slack`). The
    /// webhook is on by default; GitHub and Slack are on once their variables are set
    /// (GITHUB_*, SLACK_*; see docs/channels.md).
    #[arg(long, env = "DISABLED_CHANNELS", default_value = "")]
    pub disabled_channels: String,
    /// Largest body of a channel event, in bytes (larger ones: 413).
    #[arg(long, env = "CHANNEL_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub channel_max_body_bytes: usize,
    /// Key that push notifications (webhook `callback_url`, `push_notification`) are signed
    /// with (X-AnyWork-Signature); default: WEBHOOK_SECRET.
    #[arg(long, env = "PUSH_SIGNING_SECRET", hide_env_values = true)]
    pub push_signing_secret: Option<String>,
    /// Attempts of a delivery (a channel answer, a push) before it is dead.
    #[arg(long, env = "DELIVERY_MAX_ATTEMPTS", default_value_t = 8)]
    pub delivery_max_attempts: u32,
}

/// A built server: the API state and, with the local driver, the worker it runs.
#[derive(Debug)]
pub struct Built {
    /// The API state (holds the dispatcher).
    pub state: AppState,
    /// Where the local worker listens, when there is one.
    pub local_worker: Option<String>,
    /// The claim on DB_DIR (held while the server runs).
    pub instance: Option<crate::instance::Instance>,
    /// The store, for the start-up line (credentials left out).
    pub store: String,
    /// The executor, for the start-up line.
    pub executor: String,
    /// The model, for the start-up line.
    pub model: String,
}

/// The values of `CONTAINER_DRIVER`: every driver is compiled into the binary.
const DRIVERS: &str = "local, static, docker, k8s";

/// `MAX_CONCURRENT_TASKS` meaning no limit (the dispatcher's semaphore needs a number).
pub const UNLIMITED_TASKS: usize = 1 << 20;
/// Default `MAX_CONCURRENT_TASKS` of the container drivers (`docker`, `k8s`).
pub const CONTAINER_DRIVER_TASKS: usize = 64;
/// Default `MAX_CONCURRENT_TASKS` of the drivers with one shared worker (`local`, `static`):
/// far above what a worker answers at once, low enough that a burst of new sessions waits in
/// the queue instead of holding a worker connection and store calls each (10,000 at once
/// made PostgreSQL's pool refuse new chats after its 5 s wait, and SQLite's server grow to
/// 790 MiB).
pub const SHARED_WORKER_TASKS: usize = 1024;

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
                _ => SHARED_WORKER_TASKS,
            },
        }
    }
}

impl Config {
    /// Store, driver, dispatcher and API state, ready to serve.
    pub async fn build(&self) -> anyhow::Result<Built> {
        let api_token = self.api_token()?;
        if api_token.is_none() && !self.host.is_loopback() {
            if self.insecure_no_auth {
                tracing::warn!(
                    host = %self.host,
                    "NO API TOKEN on a non-loopback address (ANYWORK_INSECURE_NO_AUTH=1): anyone who \
                     reaches this port can run agents"
                );
            } else {
                bail!(
                    "SERVER_HOST={} is not a loopback address and no API token is set: anyone who \
                     reaches the port could run agents. Set ANYWORK_API_TOKEN (or \
                     ANYWORK_API_TOKEN_FILE), or ANYWORK_INSECURE_NO_AUTH=1 to run without one on purpose",
                    self.host
                );
            }
        }
        let mcp = self.mcp_access()?;
        let outbound = anywork_core::OutboundPolicy::strict()
            .with_http(self.allow_http_callbacks)
            .allow_list(&self.outbound_allow)
            .context("OUTBOUND_ALLOW")?;
        let store = self.store().await?;
        let mut warning = None;
        let driver_name = self.driver_name();
        let mut executor = std::env::var("EXECUTOR")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "chosen by each worker from its model variables".to_owned());
        let (driver, local_worker): (Arc<dyn ContainerDriver>, Option<String>) = match driver_name
            .as_str()
        {
            "static" => {
                let url = self
                        .static_worker_url
                        .as_deref()
                        .filter(|u| !u.trim().is_empty())
                        .context("CONTAINER_DRIVER=static needs STATIC_WORKER_URL (e.g. http://127.0.0.1:8080)")?;
                let secret = match self
                    .static_worker_secret
                    .as_deref()
                    .filter(|s| !s.trim().is_empty())
                {
                    Some(s) => Some(WorkerSecret::new(s).context("STATIC_WORKER_SECRET")?),
                    None => {
                        tracing::warn!(
                            "no STATIC_WORKER_SECRET: the worker at STATIC_WORKER_URL is called \
                             without a secret, so it must accept calls from anyone who reaches \
                             it; set the same secret here and as its WORKER_SECRET"
                        );
                        None
                    }
                };
                (
                    Arc::new(anywork_drivers::StaticDriver::new(url)?.with_secret(secret)),
                    None,
                )
            }
            "local" => {
                // A fresh secret each start: only this process knows it.
                let secret = WorkerSecret::generate();
                let (url, warn, name) = self.start_local_worker(secret.clone()).await?;
                warning = warn;
                executor = name;
                (
                    Arc::new(
                        anywork_drivers::StaticDriver::new(&url)?
                            .with_secret(Some(secret))
                            .named("local"),
                    ),
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
        config.reap_hold = Duration::from_secs(self.reap_hold_seconds.max(1));
        config.retention = self.retention()?;
        config.stream_idle_timeout = Duration::from_secs(self.stream_idle_timeout_seconds.max(1));
        let instance = crate::instance::claim(&self.db_dir, &config.owner)?;
        match &instance {
            Some(i) => config.dead_owners.extend(i.previous.clone()),
            None => tracing::warn!(
                db_dir = %self.db_dir.display(),
                "another server runs on this DB_DIR: after a crash, its tasks end only when their leases expire"
            ),
        }
        config.outbound = outbound;
        config.mcp = mcp;
        config.outbox.max_attempts = self.delivery_max_attempts.max(1);
        let env = |name: &str| std::env::var(name).ok();
        let mut builder = Dispatcher::builder(store, driver)
            .config(config)
            .titles(self.titles()?);
        if let Some(dir) = self
            .skills_dir
            .as_ref()
            .filter(|d| !d.as_os_str().is_empty())
        {
            builder = builder.skills(anywork_runtime::SkillsDir::new(dir));
        }
        for channel in self.channels(env)? {
            builder = builder.channel(channel);
        }
        let push_secret = self
            .push_signing_secret
            .clone()
            .or_else(|| env("WEBHOOK_SECRET"))
            .filter(|s| !s.trim().is_empty());
        if let Some(secret) = push_secret {
            builder = builder.push_signing_secret(secret);
        }
        let dispatcher = builder
            .start()
            .await
            .context("cannot start the dispatcher")?;
        let mut setup = dispatcher.check_setup().await;
        if driver_name == "local" {
            setup.push(match &warning {
                Some(w) => anywork_core::SetupCheck::problem("model", w.clone()),
                None => anywork_core::SetupCheck::ok("model", "the local worker has a model"),
            });
        }
        for check in &setup {
            if check.ok {
                tracing::info!(driver = %driver_name, check = %check.name, "setup: {}", check.message);
            } else {
                tracing::warn!(driver = %driver_name, check = %check.name, "setup problem: {}", check.message);
            }
        }
        let mut options = ApiOptions::default();
        options.warning = warning;
        options.shutdown_grace = Duration::from_secs(self.shutdown_grace_seconds);
        options.setup = setup;
        // Without a token, a loopback server answers only to loopback names (DNS rebinding).
        options.loopback_hosts_only = api_token.is_none() && self.host.is_loopback();
        options.api_token = api_token;
        options.protect_health = self.protect_health;
        options.max_channel_key_bytes = self.max_channel_key_bytes;
        options.max_channel_meta_bytes = self.max_channel_meta_bytes;
        options.ws_messages_per_second = self.ws_messages_per_second;
        options.max_ws_per_client = self.ws_max_connections_per_client;
        options.channel_max_body_bytes = self.channel_max_body_bytes.max(1);
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
            instance,
            store: self.store_description(),
            executor,
            model: model_description(),
        })
    }

    /// The store in force, without credentials: `postgres://host/db`, `sqlite:…`, `memory:`.
    fn store_description(&self) -> String {
        match self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            Some(url) => match url.split_once("://") {
                Some((scheme, rest)) => {
                    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                    let host = host.split('?').next().unwrap_or(host);
                    format!("{scheme}://{host}")
                }
                None => url.split('?').next().unwrap_or(url).to_owned(),
            },
            None => format!("sqlite:{}", self.db_dir.join("anywork.db").display()),
        }
    }

    /// ANYWORK_API_TOKEN, else the content of ANYWORK_API_TOKEN_FILE.
    fn api_token(&self) -> anyhow::Result<Option<ApiToken>> {
        if let Some(token) = self.api_token.as_deref().and_then(ApiToken::new) {
            return Ok(Some(token));
        }
        let Some(path) = &self.api_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read ANYWORK_API_TOKEN_FILE {}", path.display()))?;
        match ApiToken::new(&text) {
            Some(t) => Ok(Some(t)),
            None => bail!("ANYWORK_API_TOKEN_FILE {} is empty", path.display()),
        }
    }

    /// The MCP catalog of MCP_SERVERS_FILE and ALLOW_REQUEST_MCP_COMMANDS.
    fn mcp_access(&self) -> anyhow::Result<anywork_core::McpAccess> {
        let mut catalog = anywork_core::McpCatalog::new();
        if let Some(path) = &self.mcp_servers_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read MCP_SERVERS_FILE {}", path.display()))?;
            catalog = anywork_core::McpCatalog::from_json(&text)
                .with_context(|| format!("MCP_SERVERS_FILE {}", path.display()))?;
            tracing::info!(
                servers = %catalog.names().collect::<Vec<_>>().join(", "),
                "MCP catalog loaded"
            );
        }
        if self.allow_request_mcp_commands {
            tracing::warn!(
                "ALLOW_REQUEST_MCP_COMMANDS=1: API callers may start any command on the workers"
            );
        }
        Ok(anywork_core::McpAccess::new(
            catalog,
            self.allow_request_mcp_commands,
        ))
    }

    /// The shipped channels that are on: the webhook unless disabled (with a warning when it
    /// is open), GitHub and Slack when configured and not disabled. `var` reads a variable.
    pub fn channels(
        &self,
        var: impl Fn(&str) -> Option<String> + Copy,
    ) -> anyhow::Result<Vec<Arc<dyn Channel>>> {
        use anywork_channels::{github, slack, webhook};
        let mut off = Vec::new();
        for name in self.disabled_channels.split(',').map(str::trim) {
            match name.to_ascii_lowercase().as_str() {
                "" => {}
                n @ ("webhook" | "github" | "slack") => off.push(n.to_owned()),
                other => bail!(
                    "DISABLED_CHANNELS names {other:?}, which is not a channel: use webhook, \
                     github and/or slack"
                ),
            }
        }
        let on = |name: &str| !off.iter().any(|o| o == name);
        let limit = self.channel_max_body_bytes.max(1);
        let mut channels: Vec<Arc<dyn Channel>> = Vec::new();
        if on(webhook::CHANNEL_TYPE) {
            let mut config = webhook::WebhookConfig::from_lookup(var)?;
            config.max_body_bytes = limit;
            let channel = webhook::WebhookChannel::new(config);
            if channel.is_open() {
                tracing::warn!(
                    "the generic webhook (/api/channel/webhook/webhook) is open: anyone who \
                     reaches it can run tasks. Set WEBHOOK_SECRET, or DISABLED_CHANNELS=webhook"
                );
            }
            channels.push(Arc::new(channel));
        }
        if on(github::CHANNEL_TYPE)
            && let Some(mut config) = github::GithubConfig::from_lookup(var)?
        {
            config.max_body_bytes = limit;
            tracing::info!(trigger = %config.trigger, api = %config.api_url, "GitHub channel on");
            channels.push(Arc::new(github::GithubChannel::new(config)));
        }
        if on(slack::CHANNEL_TYPE)
            && let Some(mut config) = slack::SlackConfig::from_lookup(var)?
        {
            config.max_body_bytes = limit;
            tracing::info!(api = %config.api_url, "Slack channel on");
            channels.push(Arc::new(slack::SlackChannel::new(config)));
        }
        Ok(channels)
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

    fn retention(&self) -> anyhow::Result<Retention> {
        if !self.retention_days.is_finite() || self.retention_days < 0.0 {
            bail!(
                "RETENTION_DAYS={} is not a number of days: use 0 (keep forever) or more",
                self.retention_days
            );
        }
        let mut retention = Retention::default();
        retention.max_age = (self.retention_days > 0.0)
            .then(|| Duration::from_secs_f64((self.retention_days * 86_400.0).min(1e12)));
        retention.max_bytes =
            (self.retention_max_mb > 0).then(|| self.retention_max_mb.saturating_mul(1 << 20));
        retention.every = Duration::from_secs(self.retention_interval_seconds.max(1));
        if !self.delivery_retention_days.is_finite() || self.delivery_retention_days < 0.0 {
            bail!(
                "DELIVERY_RETENTION_DAYS={} is not a number of days: use 0 (keep forever) or more",
                self.delivery_retention_days
            );
        }
        retention.settled_deliveries_max_age = (self.delivery_retention_days > 0.0)
            .then(|| Duration::from_secs_f64((self.delivery_retention_days * 86_400.0).min(1e12)));
        Ok(retention)
    }

    fn titles(&self) -> anyhow::Result<Arc<dyn TitleGenerator>> {
        let model = self.title_model.as_deref().or(self.model.as_deref());
        let key = self.title_api_key.as_ref().or(self.api_key.as_ref());
        let base = self
            .title_api_base_url
            .as_ref()
            .or(self.api_base_url.as_ref());
        match (key, base, model) {
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

    /// Starts the in-process worker on a loopback port; returns its URL, the warning to
    /// show when no model is configured, and the executor's name.
    async fn start_local_worker(
        &self,
        secret: WorkerSecret,
    ) -> anyhow::Result<(String, Option<String>, String)> {
        let workspace = self
            .workspace_dir
            .clone()
            .unwrap_or_else(|| self.db_dir.join("workspace"));
        let (executor, warning) = match anywork_worker::executor_from_vars(self.worker_vars()) {
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
        let executor_name = executor.name().to_owned();
        let state = anywork_worker::WorkerState::new(
            anywork_worker::WorkerConfig::new(&workspace).with_secret(Some(secret)),
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
        Ok((url, warning, executor_name))
    }
}

impl Config {
    /// The environment of the in-process worker's executor: the process's, with the model
    /// settings as this configuration has them (flags or variables).
    fn worker_vars(&self) -> Vec<(String, String)> {
        const MODEL_VARS: [&str; 4] = ["ANTHROPIC_API_KEY", "API_KEY", "API_BASE_URL", "MODEL"];
        let mut vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !MODEL_VARS.contains(&k.as_str()))
            .collect();
        for (name, value) in MODEL_VARS.iter().zip([
            &self.anthropic_api_key,
            &self.api_key,
            &self.api_base_url,
            &self.model,
        ]) {
            if let Some(v) = value {
                vars.push(((*name).to_owned(), v.clone()));
            }
        }
        vars
    }
}

/// The model the workers are told to use (`ANTHROPIC_MODEL`, then `MODEL`), for the start-up
/// line; each executor logs the one it resolves.
fn model_description() -> String {
    ["ANTHROPIC_MODEL", "MODEL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|m| !m.trim().is_empty()))
        .unwrap_or_else(|| "the executor's default (Claude Code: sonnet)".to_owned())
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
    //! Every variable of the original AnyWork, set as its users set it, and what it does. The
    //! variables become flags through the clap definitions themselves (the flag that reads
    //! each), so that no test changes the process environment.

    use super::*;
    use anywork_test::fake_llm::{FakeLlm, Reply};
    use clap::CommandFactory;

    /// The configuration as if only `vars` were set (each through the flag that reads it).
    fn parse(vars: &[(&str, &str)]) -> Config {
        let command = Config::command();
        let mut args = vec!["anywork-server".to_owned()];
        for (name, value) in vars {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
                .unwrap_or_else(|| panic!("no setting reads {name}"));
            args.push(format!("--{}={value}", arg.get_long().unwrap()));
        }
        Config::try_parse_from(args).unwrap()
    }

    #[test]
    fn every_server_variable_of_the_original_is_read() {
        let c = parse(&[
            ("SERVER_PORT", "4321"),
            ("DB_DIR", "/srv/anywork"),
            ("CONTAINER_DRIVER", "static"),
            ("STATIC_WORKER_URL", "http://worker:8080"),
            ("WORKSPACE_DIR", "/srv/ws"),
            ("ANTHROPIC_API_KEY", "sk-ant"),
            ("API_KEY", "sk-or"),
            ("API_BASE_URL", "https://openrouter.ai/api/v1"),
            ("MODEL", "m"),
            ("TITLE_MODEL", "t"),
        ]);
        assert_eq!(c.port, 4321);
        assert_eq!(c.db_dir, PathBuf::from("/srv/anywork"));
        assert_eq!(c.container_driver.as_deref(), Some("static"));
        assert_eq!(c.static_worker_url.as_deref(), Some("http://worker:8080"));
        assert_eq!(c.workspace_dir, Some(PathBuf::from("/srv/ws")));
        assert_eq!(c.anthropic_api_key.as_deref(), Some("sk-ant"));
        assert_eq!(
            (
                c.api_key.as_deref(),
                c.api_base_url.as_deref(),
                c.model.as_deref()
            ),
            (
                Some("sk-or"),
                Some("https://openrouter.ai/api/v1"),
                Some("m")
            )
        );
        assert_eq!(c.title_model.as_deref(), Some("t"));
        // The worker's model settings follow the configuration.
        let vars = c.worker_vars();
        assert!(vars.contains(&("ANTHROPIC_API_KEY".into(), "sk-ant".into())));
        assert!(vars.contains(&("MODEL".into(), "m".into())));
    }

    #[test]
    fn the_reaper_settings_are_read() {
        let c = parse(&[("REAP_INTERVAL_SECONDS", "5"), ("REAP_HOLD_SECONDS", "120")]);
        assert_eq!((c.reap_interval_seconds, c.reap_hold_seconds), (5, 120));
        let c = parse(&[]);
        assert_eq!((c.reap_interval_seconds, c.reap_hold_seconds), (30, 60));
    }

    #[test]
    fn the_drivers_read_the_originals_k8s_and_worker_variables() {
        let vars = [
            ("K8S_NAMESPACE", "team-a"),
            ("K8S_WORKER_IMAGE", "registry/anywork-worker:1"),
            ("K8S_WORKSPACE_STORAGE", "pvc"),
            ("K8S_IDLE_TTL_SECONDS", "600"),
            ("K8S_PVC_STORAGE_CLASS", "fast"),
            ("WORKER_PORT", "9090"),
        ];
        let lookup = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let vars: &'static [(&str, &str)] = Box::leak(Box::new(vars));
        let k8s = anywork_drivers::K8sConfig::from_lookup(lookup(vars)).unwrap();
        assert_eq!(k8s.namespace, "team-a");
        assert_eq!(k8s.image, "registry/anywork-worker:1");
        assert_eq!(k8s.idle_ttl, Duration::from_secs(600));
        assert_eq!(k8s.worker_port, 9090);
        assert!(
            format!("{:?}", k8s.storage).contains("Pvc")
                && format!("{:?}", k8s.storage).contains("fast"),
            "{:?}",
            k8s.storage
        );
        // The original's WORKER_IMAGE names the image of both per-session drivers.
        let original: &'static [(&str, &str)] = &[
            ("WORKER_IMAGE", "anywork-worker:old"),
            ("WORKER_PORT", "9090"),
        ];
        let k8s = anywork_drivers::K8sConfig::from_lookup(lookup(original)).unwrap();
        assert_eq!(k8s.image, "anywork-worker:old");
        let docker = anywork_drivers::DockerConfig::from_lookup(lookup(original)).unwrap();
        assert_eq!(docker.image, "anywork-worker:old");
        assert_eq!(docker.worker_port, 9090);
        let err = anywork_drivers::K8sConfig::from_lookup(lookup(&[])).unwrap_err();
        assert!(err.message().contains("K8S_WORKER_IMAGE"), "{err}");
    }

    #[tokio::test]
    async fn webhook_secret_guards_the_generic_webhook_as_in_the_original() {
        let config = parse(&[]);
        let channels = config
            .channels(|name| (name == "WEBHOOK_SECRET").then(|| "s3cret".to_owned()))
            .unwrap();
        let webhook = channels
            .iter()
            .find(|c| c.channel_type() == "webhook")
            .expect("the webhook is on by default");
        // The original's body, with its list of MCP servers and skills by name.
        let body = serde_json::json!({"message": "review PR 7", "session_id": "wh-1",
            "skills": ["code-review"],
            "mcp_servers": [{"name": "docs", "transport": "http", "url": "https://d.example/mcp"}]})
        .to_string();
        let unsigned = anywork_core::InboundRequest::new(Vec::new(), body.clone());
        let err = webhook.parse(unsigned).await.unwrap_err();
        assert_eq!(err.kind(), anywork_core::ErrorKind::Unauthorized, "{err}");
        let wrong = anywork_core::InboundRequest::new(Vec::new(), body.clone())
            .with_header("x-webhook-secret", "nope");
        assert!(webhook.parse(wrong).await.is_err());
        let signed = anywork_core::InboundRequest::new(Vec::new(), body)
            .with_header("x-webhook-secret", "s3cret");
        let anywork_core::Inbound::Task(task) = webhook.parse(signed).await.unwrap() else {
            panic!("not a task")
        };
        assert_eq!(task.message, "review PR 7");
        assert_eq!(task.unresolved_skills(), ["code-review"]);
        assert!(task.mcp_servers.contains_key("docs"));
        // Without WEBHOOK_SECRET the webhook is open, as the original's was (with a warning).
        let open = parse(&[]).channels(|_| None).unwrap();
        let open = open.iter().find(|c| c.channel_type() == "webhook").unwrap();
        let body = serde_json::json!({"message": "hi"}).to_string();
        assert!(
            open.parse(anywork_core::InboundRequest::new(Vec::new(), body))
                .await
                .is_ok()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_originals_settings_build_the_server_they_describe() {
        let fake = FakeLlm::start().await;
        fake.set_responder(|req| {
            if req.model() == Some("title-model") {
                Reply::text("Greeting Title")
            } else {
                Reply::text("Hello back.")
            }
        });
        let data = tempfile::tempdir().unwrap();
        let workspace = data.path().join("elsewhere");
        let base = format!("{}/v1", fake.url());
        let c = parse(&[
            ("DB_DIR", data.path().to_str().unwrap()),
            ("WORKSPACE_DIR", workspace.to_str().unwrap()),
            ("API_KEY", "sk-test"),
            ("API_BASE_URL", &base),
            ("MODEL", "agent-model"),
            ("TITLE_MODEL", "title-model"),
        ]);
        let built = c.build().await.unwrap();
        let d = built.state.dispatcher().clone();
        // No CONTAINER_DRIVER nor STATIC_WORKER_URL: the worker runs in-process, named so.
        assert_eq!(d.driver_name(), "local");
        assert!(data.path().join("anywork.db").exists());
        assert!(
            workspace.is_dir(),
            "WORKSPACE_DIR is the local worker's root"
        );
        // API_KEY + API_BASE_URL + MODEL: the in-process worker's native executor on that API.
        let (submitted, events) = d
            .submit_and_follow(anywork_core::TaskRequest::new("api", "Say hello"))
            .await
            .unwrap();
        let events: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(events).await;
        assert!(events.iter().all(Result::is_ok), "{events:?}");
        let task = d.task(submitted.task.id).await.unwrap();
        assert_eq!(task.result.as_deref(), Some("Hello back."), "{task:?}");
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.model() == Some("agent-model"))
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while d.session(&task.session_id).await.unwrap().title != "Greeting Title" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no title from TITLE_MODEL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // STATIC_WORKER_URL alone means the static driver; CONTAINER_DRIVER=static needs it.
        let db = |dir: &tempfile::TempDir| dir.path().to_str().unwrap().to_owned();
        let other = tempfile::tempdir().unwrap();
        let built = parse(&[
            ("DB_DIR", &db(&other)),
            ("STATIC_WORKER_URL", "http://127.0.0.1:9"),
        ])
        .build()
        .await
        .unwrap();
        assert_eq!(built.state.dispatcher().driver_name(), "static");
        let other = tempfile::tempdir().unwrap();
        let err = parse(&[("DB_DIR", &db(&other)), ("CONTAINER_DRIVER", "static")])
            .build()
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("STATIC_WORKER_URL"), "{err:#}");
        let other = tempfile::tempdir().unwrap();
        let err = parse(&[("DB_DIR", &db(&other)), ("CONTAINER_DRIVER", "cloudrun")])
            .build()
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("local, static, docker, k8s"),
            "{err:#}"
        );
    }

    fn parse_args(args: &[&str]) -> Config {
        let mut all = vec!["anywork-server"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap()
    }

    #[test]
    fn max_concurrent_tasks_defaults_per_driver() {
        // Not set: no limit for the in-process and static workers, bounded for containers.
        let config = parse_args(&[]);
        if config.max_concurrent_tasks.is_some()
            || config.container_driver.is_some()
            || config.static_worker_url.is_some()
        {
            eprintln!("the driver or MAX_CONCURRENT_TASKS is set in the environment; skipping");
        } else {
            assert_eq!(config.driver_name(), "local");
            assert_eq!(config.max_concurrent("local"), SHARED_WORKER_TASKS);
            let static_ = parse_args(&["--static-worker-url", "http://127.0.0.1:8080"]);
            assert_eq!(static_.driver_name(), "static");
            assert_eq!(static_.max_concurrent("static"), SHARED_WORKER_TASKS);
            for driver in ["docker", "k8s"] {
                let config = parse_args(&["--container-driver", driver]);
                assert_eq!(
                    config.max_concurrent(&config.driver_name()),
                    CONTAINER_DRIVER_TASKS
                );
            }
        }
        // Set: the same for every driver; 0 is no limit.
        let set = parse_args(&[
            "--max-concurrent-tasks",
            "8",
            "--container-driver",
            "DOCKER",
        ]);
        assert_eq!(set.driver_name(), "docker");
        assert_eq!(set.max_concurrent("docker"), 8);
        assert_eq!(set.max_concurrent("local"), 8);
        let zero = parse_args(&["--max-concurrent-tasks", "0"]);
        assert_eq!(zero.max_concurrent("docker"), UNLIMITED_TASKS);
        assert_eq!(
            parse_args(&["--max-concurrent-tasks", "99999999999"]).max_concurrent("k8s"),
            UNLIMITED_TASKS
        );
        assert!(
            Config::try_parse_from(["anywork-server", "--max-concurrent-tasks", "-1"]).is_err()
        );
    }
}
