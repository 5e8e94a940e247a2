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
//!
//! Each container gets its own random [`WorkerSecret`], required on every call, and the secret
//! variables of its environment (the model keys: names with `KEY`, `TOKEN`, `SECRET`,
//! `PASSWORD`) as files copied into its volume before it starts ([`secret`]): `docker inspect`
//! shows only the files' paths, never the values.

mod config;
mod errors;
pub mod secret;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use anywork_core::worker_api::WorkerSecret;
use anywork_core::{
    ContainerDriver, Error, ErrorKind, ReapGuard, Result, SessionId, SetupCheck, Unguarded,
    WorkerEndpoint, WorkerInfo,
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
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use crate::common::{HealthCheck, IdleClock, SessionLocks, may_reap, session_slug};

pub use config::{DockerConfig, PASSED_THROUGH_ENV};
use errors::{is_missing_image, map_engine_error, status_of, unreachable_engine};

/// Label present (value `true`) on every container, volume and network this driver makes.
pub const LABEL_MANAGED: &str = "io.anywork.managed";
/// Label holding the driver's name prefix: drivers with different prefixes on one engine do
/// not adopt each other's containers.
pub const LABEL_POOL: &str = "io.anywork.pool";
/// Label holding the raw session id of a container or volume.
pub const LABEL_SESSION: &str = "io.anywork.session";

/// Where the workspace is mounted in the container (the image's `WORKSPACE_DIR`).
const WORKSPACE_MOUNT: &str = "/workspace";

/// One worker container per session on a Docker engine. See the [module docs](self).
pub struct DockerDriver {
    docker: Docker,
    config: DockerConfig,
    health: HealthCheck,
    locks: SessionLocks,
    idle: IdleClock,
    /// The network's id, once ensured (names can be ambiguous on old engines).
    network_id: OnceCell<String>,
    /// The secret of each container this driver made or read back, by container id.
    secrets: Mutex<HashMap<String, WorkerSecret>>,
}

impl std::fmt::Debug for DockerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerDriver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How often the state of a starting container is looked at while its worker is awaited.
const CONTAINER_WATCH_EVERY: Duration = Duration::from_millis(250);

/// How long a container another server created may stay unstarted without its secret (its
/// creator is copying the secret in) before it counts as left by a creator that died. The
/// copy is one request; this is far above it even on a loaded engine.
const CREATOR_GRACE: Duration = Duration::from_secs(20);

/// Why a started container did not become a worker.
enum NotReady {
    /// Its worker did not answer `/health` in time.
    Mute,
    /// The container stopped (exited, died, removed): what happened.
    Stopped(String),
}

/// What `get_worker` found under the session's name.
enum Found {
    Nothing,
    /// Running, for this long (`None`: the engine did not say).
    Running(WorkerEndpoint, Option<Duration>),
    /// Created but not started (a creator in another process, or one that died), this long
    /// ago (`None`: the engine did not say).
    Created(String, Option<Duration>),
    /// Being removed (by another process, or a removal this one asked for): wait for it to go.
    Removing,
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
            secrets: Mutex::default(),
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
        Some(WorkerEndpoint::new(
            id,
            format!("http://{ip}:{}", self.config.worker_port),
        ))
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
            Some(ContainerStateStatusEnum::CREATED) => {
                let age = c
                    .created
                    .as_deref()
                    .and_then(|t| crate::common::age_of_rfc3339(t, std::time::SystemTime::now()));
                Found::Created(id, age)
            }
            Some(ContainerStateStatusEnum::REMOVING) => Found::Removing,
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
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
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
            .filter(|(k, _)| !Self::DRIVER_ENV.contains(&k.as_str()))
            .filter(|(k, _)| !secret::is_secret_name(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("WORKER_HOST=0.0.0.0".into());
        env.push(format!("WORKER_PORT={}", c.worker_port));
        env.push(format!("WORKSPACE_DIR={WORKSPACE_MOUNT}"));
        env.push(format!(
            "{}={session_id}",
            anywork_core::worker_api::SESSION_ENV
        ));
        env.push(format!(
            "WORKER_SECRET_FILE={WORKSPACE_MOUNT}/{}",
            secret::SECRET_FILE
        ));
        if self.secret_env().next().is_some() {
            env.push(format!(
                "WORKER_ENV_FILE={WORKSPACE_MOUNT}/{}",
                secret::ENV_FILE
            ));
        }
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

    /// Variables the driver sets itself.
    const DRIVER_ENV: &'static [&'static str] = &[
        "WORKER_HOST",
        "WORKER_PORT",
        "WORKSPACE_DIR",
        "WORKER_SECRET",
        "WORKER_SECRET_FILE",
        "WORKER_ENV_FILE",
        anywork_core::worker_api::SESSION_ENV,
    ];

    /// The worker variables that hold secrets: they go to a file, not the environment.
    fn secret_env(&self) -> impl Iterator<Item = &(String, String)> {
        self.config
            .env
            .iter()
            .filter(|(k, _)| !Self::DRIVER_ENV.contains(&k.as_str()) && secret::is_secret_name(k))
    }

    fn cached_secret(&self, id: &str) -> Option<WorkerSecret> {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn remember_secret(&self, id: &str, secret: WorkerSecret) {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), secret);
    }

    /// Copies a new secret (and the secret variables) into the created container's volume.
    async fn give_secret(&self, id: &str) -> Result<()> {
        let worker_secret = WorkerSecret::generate();
        let env: serde_json::Map<String, serde_json::Value> = self
            .secret_env()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let env = serde_json::to_vec(&env)
            .map_err(|e| Error::internal(format!("cannot encode the worker's variables: {e}")))?;
        let mut files: Vec<(&str, &[u8])> =
            vec![(secret::SECRET_FILE, worker_secret.expose().as_bytes())];
        if self.secret_env().next().is_some() {
            files.push((secret::ENV_FILE, &env));
        }
        let tar = secret::archive(&files, &self.config.user);
        self.docker
            .upload_to_container(
                id,
                Some(
                    UploadToContainerOptionsBuilder::new()
                        .path(WORKSPACE_MOUNT)
                        .build(),
                ),
                bollard::body_full(tar.into()),
            )
            .await
            .map_err(|e| self.engine_err(&format!("copy the secret into container {id}"), e))?;
        self.remember_secret(id, worker_secret);
        Ok(())
    }

    /// The secret of container `id`: remembered, or read back from its volume (a container
    /// another driver instance made). `Ok(None)` when it has none (made by an older version, or
    /// its creator has not copied it in yet); an error when the engine did not answer the read
    /// (the container is then not taken for one without a secret and replaced).
    async fn secret_of(&self, id: &str) -> Result<Option<WorkerSecret>> {
        if let Some(s) = self.cached_secret(id) {
            return Ok(Some(s));
        }
        let path = format!("{WORKSPACE_MOUNT}/{}", secret::SECRET_FILE);
        let mut stream = self.docker.download_from_container(
            id,
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(&path)
                    .build(),
            ),
        );
        let mut tar = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) if tar.len() < 64 * 1024 => tar.extend_from_slice(&bytes),
                Ok(_) => return Ok(None),
                // No such file (or the container is gone meanwhile).
                Err(e) if status_of(&e) == Some(404) => {
                    tracing::debug!(container = %id, error = %e, "no worker secret to read back");
                    return Ok(None);
                }
                Err(e) => {
                    return Err(self.engine_err(&format!("read the secret of container {id}"), e));
                }
            }
        }
        let Ok(found) = secret::secret_from_archive(&tar) else {
            return Ok(None);
        };
        self.remember_secret(id, found.clone());
        Ok(Some(found))
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
            Ok(c) => match self.give_secret(&c.id).await {
                Ok(()) => Ok(Some(c.id)),
                Err(e) => {
                    let _ = self.remove_by_id(&c.id).await;
                    Err(e)
                }
            },
            // Someone else created it (or is removing a stale one) meanwhile.
            Err(e) if status_of(&e) == Some(409) => Ok(None),
            Err(e) if status_of(&e) == Some(404) && is_missing_image(&e) => {
                Err(Error::not_found(format!(
                    "the worker image {image} is not on the Docker engine: build it \
                     (deploy/build-worker-image.sh <path to anywork-worker> {image}, or docker \
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
            Some(endpoint) => Ok(endpoint.with_secret(self.secret_of(id).await?)),
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
        tracing::warn!(
            container = %id,
            image = %self.config.image,
            state = %state,
            why,
            output = %logs,
            "a worker container did not become ready"
        );
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
        // again. Waiting for another process's creator or remover to finish is not a round,
        // for up to the creator's grace in all.
        let mut round = 0;
        let waiting_since = std::time::Instant::now();
        let mut pause = Duration::from_millis(25);
        let mut wait = || {
            let this = pause;
            pause = (pause * 2).min(CONTAINER_WATCH_EVERY);
            (waiting_since.elapsed() < CREATOR_GRACE, this)
        };
        while round < 5 {
            round += 1;
            match self.find(session_id).await? {
                Found::Running(endpoint, up_for) => {
                    let Some(worker_secret) = self.secret_of(&endpoint.worker_id).await? else {
                        // Made without a secret (an older version): replace it; the workspace
                        // stays on the volume.
                        tracing::warn!(
                            session = %session_id,
                            container = %endpoint.worker_id,
                            "the worker container has no secret; replacing it"
                        );
                        self.remove_by_id(&endpoint.worker_id).await?;
                        continue;
                    };
                    let endpoint = endpoint.with_secret(Some(worker_secret));
                    // A worker still within its start-up time is waited for; one past it
                    // answers `/health` now or is wedged, and is replaced (its workspace
                    // stays on the volume).
                    let boot_left = match up_for {
                        Some(up) => self.config.ready_timeout.saturating_sub(up),
                        None => self.config.ready_timeout,
                    };
                    match self.wait_ready_watching(&endpoint, boot_left).await {
                        Ok(()) => return Ok(endpoint),
                        Err(_) if boot_left.is_zero() => {
                            tracing::warn!(
                                session = %session_id,
                                container = %endpoint.worker_id,
                                "the worker stopped answering /health; replacing its container"
                            );
                            self.remove_by_id(&endpoint.worker_id).await?;
                        }
                        Err(NotReady::Stopped(why)) => {
                            return Err(self.not_ready(&endpoint.worker_id, &why).await);
                        }
                        Err(NotReady::Mute) => {
                            return Err(self
                                .not_ready(&endpoint.worker_id, &self.mute_for(boot_left))
                                .await);
                        }
                    }
                }
                Found::Created(id, age) => {
                    if self.secret_of(&id).await?.is_none() {
                        // Its creator (another server) is copying the secret in: wait for it
                        // to start the container (then adopt it) rather than remove it under
                        // that creator's feet. Only a container left unstarted past the
                        // creator's grace is its dead creator's, and is replaced.
                        let young = age.unwrap_or_default() < CREATOR_GRACE;
                        if young && waiting_since.elapsed() < CREATOR_GRACE {
                            round -= 1;
                            tokio::time::sleep(CONTAINER_WATCH_EVERY).await;
                        } else {
                            tracing::warn!(
                                session = %session_id,
                                container = %id,
                                "a worker container was created but never given its secret \
                                 (its creator died?); replacing it"
                            );
                            self.remove_by_id(&id).await?;
                        }
                        continue;
                    }
                    let endpoint = self.start(&id).await?;
                    return self.ready(endpoint).await;
                }
                Found::Stale(id) => self.remove_by_id(&id).await?,
                Found::Removing => {
                    let (patient, pause) = wait();
                    if patient {
                        round -= 1;
                    }
                    tokio::time::sleep(pause).await;
                }
                Found::Nothing => {
                    if let Some(id) = self.create(session_id).await? {
                        let endpoint = self.start(&id).await?;
                        return self.ready(endpoint).await;
                    }
                    // The name is taken by a container that cannot be looked at yet: another
                    // creator's, whose filesystem the engine is still making (it reserves the
                    // name first and registers the container after; seconds on a busy
                    // engine), or one on its way out. Wait for it, as for a creator.
                    let (patient, pause) = wait();
                    if patient {
                        round -= 1;
                    }
                    tokio::time::sleep(pause).await;
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
        let within = self.config.ready_timeout;
        match self.wait_ready_watching(&endpoint, within).await {
            Ok(()) => Ok(endpoint),
            Err(NotReady::Stopped(why)) => Err(self.not_ready(&endpoint.worker_id, &why).await),
            Err(NotReady::Mute) => Err(self
                .not_ready(&endpoint.worker_id, &self.mute_for(within))
                .await),
        }
    }

    /// Why a worker is not ready after `within` of silence (no address: the message reaches
    /// users).
    fn mute_for(&self, within: Duration) -> String {
        format!(
            "it did not answer GET /health within {:.1} s",
            within.as_secs_f64()
        )
    }

    /// Waits for the worker to answer `/health`, for at most `within`, while watching its
    /// container: one that stops meanwhile (the worker exited, was killed or removed) ends
    /// the wait at once instead of after the whole ready timeout.
    async fn wait_ready_watching(
        &self,
        endpoint: &WorkerEndpoint,
        within: Duration,
    ) -> std::result::Result<(), NotReady> {
        let health = self.health.wait_ready(endpoint, within);
        let stopped = self.until_stopped(&endpoint.worker_id);
        tokio::select! {
            r = health => r.map(|_| ()).map_err(|_| NotReady::Mute),
            why = stopped => Err(NotReady::Stopped(why)),
        }
    }

    /// Returns once the container is no longer running, with what happened to it; never
    /// returns while it runs (errors of the engine are looked past: the health wait bounds
    /// the whole).
    async fn until_stopped(&self, id: &str) -> String {
        loop {
            tokio::time::sleep(CONTAINER_WATCH_EVERY).await;
            match self.docker.inspect_container(id, None).await {
                Ok(c) => match c.state.as_ref().and_then(|s| s.status) {
                    Some(
                        ContainerStateStatusEnum::RUNNING
                        | ContainerStateStatusEnum::CREATED
                        | ContainerStateStatusEnum::RESTARTING,
                    ) => {}
                    _ => return "its container stopped before the worker answered".into(),
                },
                Err(e) if status_of(&e) == Some(404) => {
                    return "its container was removed before the worker answered".into();
                }
                Err(_) => {}
            }
        }
    }

    /// The running workers of this pool, with their session and secret, and whether the
    /// engine answered the read of the secret (unanswered: the endpoint has none, and the
    /// worker's `/health` cannot be asked).
    async fn running(&self) -> Result<Vec<(Option<SessionId>, WorkerEndpoint, bool)>> {
        let mut out = Vec::new();
        for (session, endpoint) in self.running_containers().await? {
            let (worker_secret, answered) = match self.secret_of(&endpoint.worker_id).await {
                Ok(s) => (s, true),
                Err(_) => (None, false),
            };
            out.push((session, endpoint.with_secret(worker_secret), answered));
        }
        Ok(out)
    }

    async fn running_containers(&self) -> Result<Vec<(Option<SessionId>, WorkerEndpoint)>> {
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
        self.health.check(endpoint).await.is_some()
    }

    /// The engine answers, the worker image is on it, and the workers get a model.
    async fn check_setup(&self) -> Vec<SetupCheck> {
        let mut checks = Vec::new();
        match self.docker.version().await {
            Ok(v) => checks.push(SetupCheck::ok(
                "engine",
                format!(
                    "Docker engine {} at {}",
                    v.version.unwrap_or_default(),
                    errors::engine_location(&self.config)
                ),
            )),
            Err(e) => {
                checks.push(SetupCheck::problem(
                    "engine",
                    unreachable_engine(&self.config, &e).message(),
                ));
                return checks;
            }
        }
        let image = &self.config.image;
        checks.push(match self.docker.inspect_image(image).await {
            Ok(_) => SetupCheck::ok("image", format!("worker image {image} is on the engine")),
            Err(e) if status_of(&e) == Some(404) => SetupCheck::problem(
                "image",
                format!(
                    "the worker image {image} is not on the Docker engine: build it \
                     (deploy/build-worker-image.sh <path to anywork-worker> {image}) or set \
                     DOCKER_WORKER_IMAGE"
                ),
            ),
            Err(e) => SetupCheck::problem(
                "image",
                self.engine_err(&format!("inspect image {image}"), e)
                    .message(),
            ),
        });
        checks.push(crate::common::model_setup(
            self.config.env.iter().map(|(k, _)| k.as_str()),
            "on the server (they are passed on to the containers) or in DOCKER_WORKER_ENV",
        ));
        checks
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let running = self.running().await?;
        let checks = running
            .into_iter()
            .map(|(session_id, endpoint, _)| async move {
                let healthy = self.health.check(&endpoint).await.is_some();
                WorkerInfo {
                    endpoint,
                    session_id,
                    healthy,
                }
            });
        Ok(futures_util::future::join_all(checks).await)
    }

    async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
        self.reap_idle_guarded(busy, &Unguarded).await
    }

    async fn reap_idle_guarded(
        &self,
        busy: &[SessionId],
        guard: &dyn ReapGuard,
    ) -> Result<Vec<SessionId>> {
        let ttl = self.config.idle_ttl;
        let candidates: Vec<(SessionId, WorkerEndpoint)> = self
            .running()
            .await?
            .into_iter()
            // A worker whose secret could not be read cannot tell whether it is busy: looked
            // at again next round.
            .filter(|(_, _, answered)| *answered)
            .filter_map(|(s, e, _)| Some((s?, e)))
            .filter(|(s, _)| self.idle.idle_for(s) >= ttl && !busy.contains(s))
            .collect();
        let mut reaped = Vec::new();
        for (session_id, endpoint) in candidates {
            let health = self.health.check(&endpoint).await;
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
            // Last: a task of the session that arrives from here on waits for the release.
            if !guard.hold(&session_id).await {
                continue;
            }
            let removed = self.remove_container(&session_id).await;
            guard.release(&session_id).await;
            removed?;
            reaped.push(session_id);
        }
        self.locks.prune();
        Ok(reaped)
    }
}
