//! [`DockerDriver`]: one worker container per session on a Docker engine.
//!
//! Each session gets a container named `<prefix><slug>` (see [`session_slug`]) on a
//! user-defined bridge network, and a named volume `<prefix><slug>-workspace` mounted at
//! `/workspace`. The volume outlives the container: releasing or reaping a worker keeps the
//! session's files and conversation, and the next [`get_worker`](ContainerDriver::get_worker)
//! starts a new container on the same volume. [`purge`](ContainerDriver::purge) (a deleted
//! session) removes the container and the volume.
//!
//! Containers carry labels ([`LABEL_MANAGED`], [`LABEL_POOL`], [`LABEL_SESSION`]) so that a
//! restarted server (a new driver instance, or another process) finds and adopts them instead
//! of creating duplicates. Workers run as a non-root user, with every capability dropped,
//! `no-new-privileges`, memory / CPU / process limits, and a read-only root filesystem with a
//! tmpfs `/tmp` (configurable).
//!
//! A container is ready when its worker answers `/health`; a new one gets `ready_timeout` to
//! get there (else `get_worker` fails with its last output). A running container past that
//! start-up time that does not answer (wedged) is replaced on the next `get_worker`; its
//! workspace stays on the volume.
//!
//! The server reaches a worker at `http://<container IP on the network>:<port>`: run it on the
//! Docker host itself, or in a container on the same network.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use anywork_core::{
    ContainerDriver, Error, ErrorKind, Result, SessionId, WorkerEndpoint, WorkerInfo,
};
use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, EndpointSettings, HostConfig, NetworkCreateRequest,
    NetworkingConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptions,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use crate::common::{HealthCheck, IdleClock, SessionLocks, may_reap, session_slug};

/// Label present (value `true`) on every container, volume and network this driver makes.
pub const LABEL_MANAGED: &str = "io.anywork.managed";
/// Label holding the driver's name prefix: drivers with different prefixes on one engine do
/// not adopt each other's containers.
pub const LABEL_POOL: &str = "io.anywork.pool";
/// Label holding the raw session id of a container or volume.
pub const LABEL_SESSION: &str = "io.anywork.session";

/// Variables passed from the server's environment to every worker when set.
pub const PASSED_THROUGH_ENV: &[&str] = &[
    "EXECUTOR",
    "MODEL",
    "API_KEY",
    "API_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
];

/// Where the workspace is mounted in the container (the image's `WORKSPACE_DIR`).
const WORKSPACE_MOUNT: &str = "/workspace";

/// How [`DockerDriver`] runs workers.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// The engine (`DOCKER_HOST`): `unix:///var/run/docker.sock`, `tcp://host:2375`; `None`
    /// uses the local socket.
    pub docker_host: Option<String>,
    /// Worker image (`DOCKER_WORKER_IMAGE`, default `anywork-worker:latest`). It is never
    /// pulled: build it (`deploy/build-test-image.sh`, or `deploy/Dockerfile.worker`).
    pub image: String,
    /// User-defined bridge network of the workers, created if missing (`DOCKER_NETWORK`,
    /// default `anywork`).
    pub network: String,
    /// Prefix of container and volume names (`DOCKER_NAME_PREFIX`, default `anywork-`):
    /// lowercase alphanumerics, `-` and `_`, starting with a letter, at most 40 characters.
    pub name_prefix: String,
    /// The worker's port inside the container (`DOCKER_WORKER_PORT`, default 8080).
    pub worker_port: u16,
    /// Environment of every worker: [`PASSED_THROUGH_ENV`] as set on the server, then
    /// `DOCKER_WORKER_ENV` (`KEY=VALUE,KEY=VALUE`). `WORKER_HOST`, `WORKER_PORT` and
    /// `WORKSPACE_DIR` are set by the driver.
    pub env: Vec<(String, String)>,
    /// Memory limit in bytes (`DOCKER_MEMORY_MB`, default 2048 MiB); `None`: no limit.
    pub memory_bytes: Option<i64>,
    /// CPU limit in CPUs (`DOCKER_CPUS`, default 2); `None`: no limit.
    pub cpus: Option<f64>,
    /// Process limit (`DOCKER_PIDS_LIMIT`, default 512); `None`: no limit.
    pub pids_limit: Option<i64>,
    /// Read-only root filesystem with a tmpfs `/tmp` (`DOCKER_READ_ONLY_ROOT`, default true);
    /// the workspace volume stays writable.
    pub read_only_root: bool,
    /// Size of the `/tmp` tmpfs in MiB (`DOCKER_TMPFS_MB`, default 256).
    pub tmpfs_mb: u32,
    /// The user the worker runs as (`DOCKER_USER`, default `10001:10001`); never root.
    pub user: String,
    /// How long a worker may go unused before [`ContainerDriver::reap_idle`] stops it
    /// (`DOCKER_IDLE_TTL_SECONDS`, default 1800).
    pub idle_ttl: Duration,
    /// How long a new container may take to answer `/health` (`DOCKER_READY_TIMEOUT_SECONDS`,
    /// default 60).
    pub ready_timeout: Duration,
    /// How long one `/health` request may take (`DOCKER_HEALTH_TIMEOUT_SECONDS`, default 3).
    pub health_timeout: Duration,
    /// How long a worker gets to exit after SIGTERM on release before it is killed
    /// (`DOCKER_STOP_GRACE_SECONDS`, default 5).
    pub stop_grace: Duration,
}

impl DockerConfig {
    /// A configuration with the defaults and the given image.
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            docker_host: None,
            image: image.into(),
            network: "anywork".into(),
            name_prefix: "anywork-".into(),
            worker_port: 8080,
            env: Vec::new(),
            memory_bytes: Some(2048 * 1024 * 1024),
            cpus: Some(2.0),
            pids_limit: Some(512),
            read_only_root: true,
            tmpfs_mb: 256,
            user: "10001:10001".into(),
            idle_ttl: Duration::from_secs(1800),
            ready_timeout: Duration::from_secs(60),
            health_timeout: Duration::from_secs(3),
            stop_grace: Duration::from_secs(5),
        }
    }

    /// Reads the configuration from the process environment (see each field).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `var` (a variable's value, or `None` when unset).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut c =
            Self::new(set("DOCKER_WORKER_IMAGE").unwrap_or_else(|| "anywork-worker:latest".into()));
        c.docker_host = set("DOCKER_HOST");
        if let Some(v) = set("DOCKER_NETWORK") {
            c.network = v;
        }
        if let Some(v) = set("DOCKER_NAME_PREFIX") {
            c.name_prefix = v;
        }
        if let Some(v) = set("DOCKER_WORKER_PORT") {
            c.worker_port = parse("DOCKER_WORKER_PORT", &v)?;
        }
        if let Some(v) = set("DOCKER_MEMORY_MB") {
            c.memory_bytes = optional("DOCKER_MEMORY_MB", &v)?.map(|mb: i64| mb * 1024 * 1024);
        }
        if let Some(v) = set("DOCKER_CPUS") {
            c.cpus = optional("DOCKER_CPUS", &v)?;
        }
        if let Some(v) = set("DOCKER_PIDS_LIMIT") {
            c.pids_limit = optional("DOCKER_PIDS_LIMIT", &v)?;
        }
        if let Some(v) = set("DOCKER_READ_ONLY_ROOT") {
            c.read_only_root = parse("DOCKER_READ_ONLY_ROOT", &v)?;
        }
        if let Some(v) = set("DOCKER_TMPFS_MB") {
            c.tmpfs_mb = parse("DOCKER_TMPFS_MB", &v)?;
        }
        if let Some(v) = set("DOCKER_USER") {
            c.user = v;
        }
        for (name, field) in [
            ("DOCKER_IDLE_TTL_SECONDS", &mut c.idle_ttl),
            ("DOCKER_READY_TIMEOUT_SECONDS", &mut c.ready_timeout),
            ("DOCKER_HEALTH_TIMEOUT_SECONDS", &mut c.health_timeout),
            ("DOCKER_STOP_GRACE_SECONDS", &mut c.stop_grace),
        ] {
            if let Some(v) = set(name) {
                *field = Duration::from_secs(parse(name, &v)?);
            }
        }
        for name in PASSED_THROUGH_ENV {
            if let Some(v) = set(name) {
                c.env.push(((*name).to_owned(), v));
            }
        }
        if let Some(list) = set("DOCKER_WORKER_ENV") {
            for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    Error::invalid_input(format!(
                        "DOCKER_WORKER_ENV: {pair:?} is not KEY=VALUE (pairs separated by commas)"
                    ))
                })?;
                c.env.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the names and limits; every message names the setting to fix.
    pub fn validate(&self) -> Result<()> {
        let p = &self.name_prefix;
        if p.is_empty()
            || p.len() > 40
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(Error::invalid_input(format!(
                "DOCKER_NAME_PREFIX {p:?}: use lowercase letters, digits, '-' and '_', starting \
                 with a letter, at most 40 characters"
            )));
        }
        if self.image.trim().is_empty() {
            return Err(Error::invalid_input(
                "DOCKER_WORKER_IMAGE is empty: name the worker image (e.g. anywork-worker:latest)",
            ));
        }
        let n = &self.network;
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::invalid_input(format!(
                "DOCKER_NETWORK {n:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        if self.worker_port == 0 {
            return Err(Error::invalid_input("DOCKER_WORKER_PORT must not be 0"));
        }
        let user = self.user.split(':').next().unwrap_or_default();
        if user.is_empty() || user == "0" || user == "root" {
            return Err(Error::invalid_input(format!(
                "DOCKER_USER {:?}: workers never run as root; use a uid such as 10001:10001",
                self.user
            )));
        }
        if self.cpus.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            return Err(Error::invalid_input(
                "DOCKER_CPUS must be a positive number",
            ));
        }
        if self.memory_bytes.is_some_and(|m| m < 6 * 1024 * 1024) {
            return Err(Error::invalid_input(
                "DOCKER_MEMORY_MB must be at least 6 (Docker's minimum)",
            ));
        }
        if self.pids_limit.is_some_and(|p| p < 1) {
            return Err(Error::invalid_input("DOCKER_PIDS_LIMIT must be at least 1"));
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') {
                return Err(Error::invalid_input(format!(
                    "DOCKER_WORKER_ENV: {k:?} is not a variable name"
                )));
            }
        }
        Ok(())
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::invalid_input(format!("{name}={value:?} is not a valid value")))
}

/// `none` / `0`... as "no limit" for the limit settings.
fn optional<T: std::str::FromStr + PartialEq + Default>(
    name: &str,
    value: &str,
) -> Result<Option<T>> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let v: T = parse(name, value)?;
    Ok((v != T::default()).then_some(v))
}

/// One worker container per session on a Docker engine. See the [module docs](self).
pub struct DockerDriver {
    docker: Docker,
    config: DockerConfig,
    health: HealthCheck,
    locks: SessionLocks,
    idle: IdleClock,
    /// The network's id, once ensured (names can be ambiguous on old engines).
    network_id: OnceCell<String>,
}

impl std::fmt::Debug for DockerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerDriver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What `get_worker` found under the session's name.
enum Found {
    Nothing,
    /// Running, for this long (`None`: the engine did not say).
    Running(WorkerEndpoint, Option<Duration>),
    /// Created but not started (a creator that died, or one in another process).
    Created(String),
    /// Exited, dead, paused, or unusable: remove it and create anew.
    Stale(String),
}

impl DockerDriver {
    /// Connects to the engine (`Unavailable` if it does not answer) and checks the
    /// configuration. The network is created on first use.
    pub async fn connect(config: DockerConfig) -> Result<Self> {
        config.validate()?;
        let docker = match &config.docker_host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
        .map_err(|e| unreachable_engine(&config, &e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable_engine(&config, &e))?;
        let health = HealthCheck::new(config.health_timeout)?;
        Ok(Self {
            docker,
            config,
            health,
            locks: SessionLocks::default(),
            idle: IdleClock::default(),
            network_id: OnceCell::new(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The container name of `session_id`'s worker.
    pub fn container_name(&self, session_id: &SessionId) -> String {
        format!("{}{}", self.config.name_prefix, session_slug(session_id))
    }

    /// The volume name of `session_id`'s workspace.
    pub fn volume_name(&self, session_id: &SessionId) -> String {
        format!("{}-workspace", self.container_name(session_id))
    }

    /// Creates the network if it is missing and returns its gateway address (the host's
    /// address on it: what a service on the host binds to be reachable from workers).
    pub async fn network_gateway(&self) -> Result<Option<IpAddr>> {
        let id = self.ensure_network().await?;
        let network =
            self.docker.inspect_network(&id, None).await.map_err(|e| {
                self.engine_err(&format!("inspect network {}", self.config.network), e)
            })?;
        Ok(network
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.gateway)
            .find_map(|g| g.parse().ok()))
    }

    fn labels(&self, session_id: &SessionId) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_POOL.to_owned(), self.config.name_prefix.clone()),
            (LABEL_SESSION.to_owned(), session_id.as_str().to_owned()),
        ])
    }

    fn pool_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_POOL}={}", self.config.name_prefix),
            ],
        )])
    }

    fn engine_err(&self, what: &str, e: DockerError) -> Error {
        map_engine_error(&self.config, what, e)
    }

    fn endpoint_of(
        &self,
        id: &str,
        networks: Option<&HashMap<String, EndpointSettings>>,
    ) -> Option<WorkerEndpoint> {
        let ip = networks?
            .get(&self.config.network)?
            .ip_address
            .as_deref()
            .filter(|ip| !ip.is_empty())?;
        Some(WorkerEndpoint {
            worker_id: id.to_owned(),
            base_url: format!("http://{ip}:{}", self.config.worker_port),
        })
    }

    /// The id of the workers' bridge network, created unless it exists. Engines before API
    /// 1.44 allow duplicate names, so two processes racing may both create one: the earliest
    /// created is the network, and whoever created a later one removes it.
    async fn ensure_network(&self) -> Result<String> {
        self.network_id
            .get_or_try_init(|| async {
                // Drivers of one process make the network one at a time, so that none of
                // them sees two for a moment: a container started then fails ("network is
                // ambiguous"). Across processes the earliest network still wins.
                static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
                let _one_at_a_time = CREATING.lock().await;
                let name = &self.config.network;
                if let Some(id) = self.canonical_network(name).await? {
                    return Ok(id);
                }
                let created = self
                    .docker
                    .create_network(NetworkCreateRequest {
                        name: name.clone(),
                        driver: Some("bridge".into()),
                        labels: Some(HashMap::from([
                            (LABEL_MANAGED.to_owned(), "true".to_owned()),
                            (LABEL_POOL.to_owned(), self.config.name_prefix.clone()),
                        ])),
                        ..Default::default()
                    })
                    .await;
                let mine = match created {
                    Ok(created) => Some(created.id),
                    Err(e) if status_of(&e) == Some(409) => None,
                    Err(e) => return Err(self.engine_err(&format!("create network {name}"), e)),
                };
                let id = self.canonical_network(name).await?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "the network {name} vanished right after it was created: try again"
                        ),
                    )
                })?;
                if let Some(mine) = mine.filter(|m| *m != id) {
                    let _ = self.docker.remove_network(&mine).await;
                }
                Ok(id)
            })
            .await
            .cloned()
    }

    /// The id of the earliest created network named exactly `name`.
    async fn canonical_network(&self, name: &str) -> Result<Option<String>> {
        let filters = HashMap::from([("name", vec![name])]);
        let networks = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| self.engine_err("list networks", e))?;
        Ok(networks
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| Some((n.created.unwrap_or_default(), n.id?)))
            .min()
            .map(|(_, id)| id))
    }

    /// What exists under the session's container name.
    async fn find(&self, session_id: &SessionId) -> Result<Found> {
        let name = self.container_name(session_id);
        let c: ContainerInspectResponse = match self.docker.inspect_container(&name, None).await {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => return Ok(Found::Nothing),
            Err(e) => return Err(self.engine_err(&format!("inspect container {name}"), e)),
        };
        let id = c.id.clone().unwrap_or_else(|| name.clone());
        let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
        let ours = labels.is_some_and(|l| {
            l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                && l.get(LABEL_SESSION).map(String::as_str) == Some(session_id.as_str())
        });
        if !ours {
            return Err(Error::conflict(format!(
                "a container named {name} exists that AnyWork did not create for session \
                 {session_id}: remove it (docker rm -f {name}) or choose another \
                 DOCKER_NAME_PREFIX"
            )));
        }
        let status = c.state.as_ref().and_then(|s| s.status);
        Ok(match status {
            Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING) => {
                let networks = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref());
                let up_for = c
                    .state
                    .as_ref()
                    .and_then(|s| s.started_at.as_deref())
                    .and_then(|t| crate::common::age_of_rfc3339(t, std::time::SystemTime::now()));
                match self.endpoint_of(&id, networks) {
                    Some(endpoint) => Found::Running(endpoint, up_for),
                    // Running but not on our network (someone disconnected it): unusable.
                    None => Found::Stale(id),
                }
            }
            Some(ContainerStateStatusEnum::CREATED) => Found::Created(id),
            _ => Found::Stale(id),
        })
    }

    /// Stops (SIGTERM, then SIGKILL after the grace) and removes the session's container.
    /// Gone already is fine. The volume stays.
    async fn remove_container(&self, session_id: &SessionId) -> Result<()> {
        self.idle.forget(session_id);
        let name = self.container_name(session_id);
        let grace = i32::try_from(self.config.stop_grace.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                &name,
                Some(StopContainerOptionsBuilder::new().t(grace).build()),
            )
            .await
        {
            // 304: not running.
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
            Err(e) => return Err(self.engine_err(&format!("stop container {name}"), e)),
        }
        self.remove_by_id(&name).await
    }

    async fn remove_by_id(&self, id: &str) -> Result<()> {
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await
        {
            Ok(()) => Ok(()),
            // 404: gone; 409: removal already in progress.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
            Err(e) => Err(self.engine_err(&format!("remove container {id}"), e)),
        }
    }

    async fn ensure_volume(&self, session_id: &SessionId) -> Result<String> {
        let name = self.volume_name(session_id);
        // Creating an existing volume returns it unchanged.
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                driver: Some("local".into()),
                labels: Some(self.labels(session_id)),
                ..Default::default()
            })
            .await
            .map_err(|e| self.engine_err(&format!("create volume {name}"), e))?;
        Ok(name)
    }

    fn container_body(
        &self,
        session_id: &SessionId,
        volume: &str,
        network_id: &str,
    ) -> ContainerCreateBody {
        let c = &self.config;
        let mut env: Vec<String> = c
            .env
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "WORKER_HOST" | "WORKER_PORT" | "WORKSPACE_DIR"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("WORKER_HOST=0.0.0.0".into());
        env.push(format!("WORKER_PORT={}", c.worker_port));
        env.push(format!("WORKSPACE_DIR={WORKSPACE_MOUNT}"));
        let host_config = HostConfig {
            binds: Some(vec![format!("{volume}:{WORKSPACE_MOUNT}")]),
            network_mode: Some(network_id.to_owned()),
            memory: c.memory_bytes,
            // No swap beyond the memory limit.
            memory_swap: c.memory_bytes,
            nano_cpus: c.cpus.map(|cpus| (cpus * 1e9) as i64),
            pids_limit: c.pids_limit,
            readonly_rootfs: Some(c.read_only_root),
            tmpfs: c.read_only_root.then(|| {
                HashMap::from([(
                    "/tmp".to_owned(),
                    format!("rw,nosuid,nodev,size={}m,mode=1777", c.tmpfs_mb),
                )])
            }),
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            init: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(c.image.clone()),
            user: Some(c.user.clone()),
            env: Some(env),
            labels: Some(self.labels(session_id)),
            exposed_ports: Some(vec![format!("{}/tcp", c.worker_port)]),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network_id.to_owned(),
                    EndpointSettings::default(),
                )])),
            }),
            stop_signal: Some("SIGTERM".into()),
            ..Default::default()
        }
    }

    /// Creates the container, or finds the one a concurrent creator (another process) made
    /// under the same name.
    async fn create(&self, session_id: &SessionId) -> Result<Option<String>> {
        let network_id = self.ensure_network().await?;
        let volume = self.ensure_volume(session_id).await?;
        let name = self.container_name(session_id);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                self.container_body(session_id, &volume, &network_id),
            )
            .await;
        match created {
            Ok(c) => Ok(Some(c.id)),
            // Someone else created it (or is removing a stale one) meanwhile.
            Err(e) if status_of(&e) == Some(409) => Ok(None),
            Err(e) if status_of(&e) == Some(404) && is_missing_image(&e) => {
                Err(Error::not_found(format!(
                    "the worker image {image} is not on the Docker engine: build it \
                     (deploy/build-test-image.sh <path to anywork-worker> {image}, or docker \
                     build -f deploy/Dockerfile.worker -t {image} .) or set DOCKER_WORKER_IMAGE",
                    image = self.config.image
                )))
            }
            Err(e) => Err(self.engine_err(&format!("create container {name}"), e)),
        }
    }

    async fn start(&self, id: &str) -> Result<WorkerEndpoint> {
        match self.docker.start_container(id, None).await {
            // 304: already started (by a concurrent adopter).
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(304) => {}
            Err(e) => return Err(self.engine_err(&format!("start container {id}"), e)),
        }
        let c = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| self.engine_err(&format!("inspect container {id}"), e))?;
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        match self.endpoint_of(id, networks) {
            Some(endpoint) => Ok(endpoint),
            None => Err(self.not_ready(id, "it has no address on the network").await),
        }
    }

    /// An `Unavailable` error for a container that did not become a worker, carrying its state
    /// and last log lines; the container is removed so the next try starts clean.
    async fn not_ready(&self, id: &str, why: &str) -> Error {
        let state = self
            .docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .map(|s| match (s.status, s.exit_code) {
                (Some(ContainerStateStatusEnum::RUNNING), _) => "running".to_owned(),
                (status, code) => format!(
                    "{} with code {}",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "gone".into()),
                    code.unwrap_or(-1)
                ),
            })
            .unwrap_or_else(|| "gone".into());
        let mut logs = String::new();
        let mut stream = self.docker.logs(
            id,
            Some(
                LogsOptionsBuilder::new()
                    .stdout(true)
                    .stderr(true)
                    .tail("20")
                    .build(),
            ),
        );
        while let Ok(Some(Ok(line))) =
            tokio::time::timeout(Duration::from_secs(2), stream.next()).await
        {
            logs.push_str(&line.to_string());
        }
        let _ = self.remove_by_id(id).await;
        let logs = logs.trim();
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "the worker container {id:.12} ({image}) did not become ready: {why}; it is \
                 {state}{sep}{logs}",
                image = self.config.image,
                sep = if logs.is_empty() {
                    ""
                } else {
                    "; its last output:\n"
                },
            ),
        )
    }

    /// Makes, adopts or repairs the session's worker; the caller holds the session lock.
    async fn obtain(&self, session_id: &SessionId) -> Result<WorkerEndpoint> {
        // A few rounds: a conflict with a concurrent creator or remover is resolved by looking
        // again.
        for _ in 0..5 {
            match self.find(session_id).await? {
                Found::Running(endpoint, up_for) => {
                    // A worker still within its start-up time is waited for; one past it
                    // answers `/health` now or is wedged, and is replaced (its workspace
                    // stays on the volume).
                    let boot_left = match up_for {
                        Some(up) => self.config.ready_timeout.saturating_sub(up),
                        None => self.config.ready_timeout,
                    };
                    match self.health.wait_ready(&endpoint.base_url, boot_left).await {
                        Ok(_) => return Ok(endpoint),
                        Err(_) if boot_left.is_zero() => {
                            tracing::warn!(
                                session = %session_id,
                                container = %endpoint.worker_id,
                                "the worker stopped answering /health; replacing its container"
                            );
                            self.remove_by_id(&endpoint.worker_id).await?;
                        }
                        Err(e) => {
                            return Err(self.not_ready(&endpoint.worker_id, &e.to_string()).await);
                        }
                    }
                }
                Found::Created(id) => {
                    let endpoint = self.start(&id).await?;
                    return self.ready(endpoint).await;
                }
                Found::Stale(id) => self.remove_by_id(&id).await?,
                Found::Nothing => {
                    if let Some(id) = self.create(session_id).await? {
                        let endpoint = self.start(&id).await?;
                        return self.ready(endpoint).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the container {} kept changing under this driver (another process creating \
                 and removing it?): try again",
                self.container_name(session_id)
            ),
        ))
    }

    async fn ready(&self, endpoint: WorkerEndpoint) -> Result<WorkerEndpoint> {
        match self
            .health
            .wait_ready(&endpoint.base_url, self.config.ready_timeout)
            .await
        {
            Ok(_) => Ok(endpoint),
            Err(e) => Err(self.not_ready(&endpoint.worker_id, &e.to_string()).await),
        }
    }

    /// The running workers of this pool, with their session.
    async fn running(&self) -> Result<Vec<(Option<SessionId>, WorkerEndpoint)>> {
        let mut filters = self.pool_filter();
        filters.insert("status".into(), vec!["running".into()]);
        let containers = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| self.engine_err("list containers", e))?;
        Ok(containers
            .into_iter()
            .filter(|c| c.state == Some(ContainerSummaryStateEnum::RUNNING))
            .filter_map(|c| {
                let id = c.id?;
                let session = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SESSION))
                    .and_then(|s| SessionId::new(s.as_str()).ok());
                let networks = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref());
                Some((session, self.endpoint_of(&id, networks)?))
            })
            .collect())
    }
}

#[async_trait]
impl ContainerDriver for DockerDriver {
    fn name(&self) -> &str {
        "docker"
    }

    async fn get_worker(&self, session_id: &SessionId) -> Result<WorkerEndpoint> {
        let _guard = self.locks.lock(session_id).await;
        // No cache: the engine is asked each time (one inspect), since another process may
        // have replaced the container, and a new one can get the old one's address.
        let endpoint = self.obtain(session_id).await?;
        self.idle.touch(session_id);
        Ok(endpoint)
    }

    async fn release(&self, session_id: &SessionId) -> Result<()> {
        let _guard = self.locks.lock(session_id).await;
        self.remove_container(session_id).await
    }

    /// Removes the container, then the workspace volume (`<prefix><slug>-workspace`): the
    /// session's files and conversation are gone. A volume already gone is fine.
    async fn purge(&self, session_id: &SessionId) -> Result<()> {
        let _guard = self.locks.lock(session_id).await;
        self.remove_container(session_id).await?;
        let volume = self.volume_name(session_id);
        match self
            .docker
            .remove_volume(&volume, Some(RemoveVolumeOptions { force: true }))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.engine_err(&format!("remove volume {volume}"), e)),
        }
    }

    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool {
        self.health.check(&endpoint.base_url).await.is_some()
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let running = self.running().await?;
        let checks = running
            .into_iter()
            .map(|(session_id, endpoint)| async move {
                let healthy = self.health.check(&endpoint.base_url).await.is_some();
                WorkerInfo {
                    endpoint,
                    session_id,
                    healthy,
                }
            });
        Ok(futures_util::future::join_all(checks).await)
    }

    async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
        let ttl = self.config.idle_ttl;
        let candidates: Vec<(SessionId, WorkerEndpoint)> = self
            .running()
            .await?
            .into_iter()
            .filter_map(|(s, e)| Some((s?, e)))
            .filter(|(s, _)| self.idle.idle_for(s) >= ttl && !busy.contains(s))
            .collect();
        let mut reaped = Vec::new();
        for (session_id, endpoint) in candidates {
            let health = self.health.check(&endpoint.base_url).await;
            let _guard = self.locks.lock(&session_id).await;
            // Looked at again under the lock: a get_worker may have come in meanwhile.
            if !may_reap(
                &session_id,
                self.idle.idle_for(&session_id),
                ttl,
                busy,
                health.as_ref(),
            ) {
                continue;
            }
            self.remove_container(&session_id).await?;
            reaped.push(session_id);
        }
        self.locks.prune();
        Ok(reaped)
    }
}

/// The HTTP status of an engine answer, if it was one.
fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_missing_image(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.to_ascii_lowercase().contains("image"))
}

fn engine_location(config: &DockerConfig) -> String {
    config
        .docker_host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

fn unreachable_engine(config: &DockerConfig, e: &DockerError) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!(
            "cannot reach the Docker engine at {}: {e} (is dockerd running, may this user use \
             its socket, is DOCKER_HOST right?)",
            engine_location(config)
        ),
    )
}

/// Maps an engine error to the error kinds of the driver contract.
fn map_engine_error(config: &DockerConfig, what: &str, e: DockerError) -> Error {
    match &e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let lower = message.to_ascii_lowercase();
            let resource = [
                "no space left",
                "cannot allocate memory",
                "out of memory",
                "quota",
                "too many",
                "resource temporarily unavailable",
                "could not find an available",
                "address pools have been fully subnetted",
            ]
            .iter()
            .any(|m| lower.contains(m));
            let kind = match status_code {
                _ if resource => ErrorKind::RateLimited,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                400 => ErrorKind::InvalidInput,
                401 | 403 => ErrorKind::Unauthorized,
                429 => ErrorKind::RateLimited,
                503 => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            };
            let hint = if resource {
                " (the Docker host is out of a resource: free some, or lower the number of \
                 sessions / DOCKER_MEMORY_MB)"
            } else {
                ""
            };
            Error::new(
                kind,
                format!("Docker engine: {what}: {message} (HTTP {status_code}){hint}"),
            )
        }
        DockerError::RequestTimeoutError => Error::new(
            ErrorKind::Timeout,
            format!(
                "Docker engine at {}: {what} timed out",
                engine_location(config)
            ),
        ),
        DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => Error::new(
            ErrorKind::Protocol,
            format!("Docker engine: {what}: unexpected answer: {e}"),
        ),
        _ => {
            let mut err = unreachable_engine(config, &e);
            err = Error::new(err.kind(), format!("{what}: {}", err.message()));
            err
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_lookup_reads_every_setting() {
        let vars = HashMap::from([
            ("DOCKER_WORKER_IMAGE", "img:1"),
            ("DOCKER_NETWORK", "net1"),
            ("DOCKER_NAME_PREFIX", "aw-"),
            ("DOCKER_WORKER_PORT", "9000"),
            ("DOCKER_MEMORY_MB", "512"),
            ("DOCKER_CPUS", "0.5"),
            ("DOCKER_PIDS_LIMIT", "none"),
            ("DOCKER_READ_ONLY_ROOT", "false"),
            ("DOCKER_IDLE_TTL_SECONDS", "60"),
            ("MODEL", "m1"),
            ("DOCKER_WORKER_ENV", "A=1, B = two "),
        ]);
        let c = DockerConfig::from_lookup(|k| vars.get(k).map(|v| (*v).to_owned())).unwrap();
        assert_eq!(c.image, "img:1");
        assert_eq!(c.network, "net1");
        assert_eq!(c.name_prefix, "aw-");
        assert_eq!(c.worker_port, 9000);
        assert_eq!(c.memory_bytes, Some(512 * 1024 * 1024));
        assert_eq!(c.cpus, Some(0.5));
        assert_eq!(c.pids_limit, None);
        assert!(!c.read_only_root);
        assert_eq!(c.idle_ttl, Duration::from_secs(60));
        assert_eq!(
            c.env,
            vec![
                ("MODEL".to_owned(), "m1".to_owned()),
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two".to_owned())
            ]
        );
    }

    #[test]
    fn bad_settings_name_the_variable() {
        for (k, v) in [
            ("DOCKER_NAME_PREFIX", "Bad Prefix"),
            ("DOCKER_USER", "0:0"),
            ("DOCKER_WORKER_PORT", "http"),
            ("DOCKER_CPUS", "-1"),
            ("DOCKER_WORKER_ENV", "novalue"),
            ("DOCKER_NETWORK", "a/b"),
        ] {
            let e =
                DockerConfig::from_lookup(|name| (name == k).then(|| v.to_owned())).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{k}");
            assert!(e.to_string().contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn engine_errors_map_to_contract_kinds() {
        let c = DockerConfig::new("img");
        let server = |status_code: u16, message: &str| DockerError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        };
        let kind = |e| map_engine_error(&c, "x", e).kind();
        assert_eq!(kind(server(404, "no such container")), ErrorKind::NotFound);
        assert_eq!(kind(server(409, "name in use")), ErrorKind::Conflict);
        assert_eq!(
            kind(server(
                500,
                "write /var/lib/docker: no space left on device"
            )),
            ErrorKind::RateLimited
        );
        assert_eq!(
            kind(server(
                500,
                "could not find an available, non-overlapping IPv4 address pool"
            )),
            ErrorKind::RateLimited
        );
        assert_eq!(kind(server(500, "boom")), ErrorKind::Internal);
        assert_eq!(kind(DockerError::RequestTimeoutError), ErrorKind::Timeout);
        assert!(is_missing_image(&server(
            404,
            "No such image: anywork-worker:x"
        )));
        assert!(!is_missing_image(&server(404, "No such container: y")));
    }
}
