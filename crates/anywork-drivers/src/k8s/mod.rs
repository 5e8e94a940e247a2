//! [`K8sDriver`]: one Pod and one Service per session on Kubernetes (feature `k8s`).
//!
//! For session `s` the driver owns, in one namespace, objects named `<prefix><slug>` where
//! `slug` is [`session_slug`]:
//!
//! - a **Pod** running the worker image, labelled `app.kubernetes.io/managed-by=anywork` and
//!   `anywork.dev/session=<slug>`, annotated with the raw session id (so a restarted server
//!   adopts it), locked down (non-root, no privilege escalation, read-only root filesystem with
//!   an emptyDir `/tmp`, all capabilities dropped, seccomp `RuntimeDefault`) and probed on
//!   `/health`;
//! - a **Service** selecting it, owned by the Pod (deleting the Pod garbage-collects it);
//! - with `K8S_WORKSPACE_STORAGE=pvc`, a **PersistentVolumeClaim** `<prefix><slug>-ws` for the
//!   workspace. It is not owned by the Pod: it survives release and reaping, so the session's
//!   next worker finds its files. [`purge`](ContainerDriver::purge) (a deleted session) deletes
//!   it with the Pod and Service.
//!
//! `get_worker` (under a per-session lock) reuses a Running+Ready pod whose `/health` answers,
//! waits for one still starting (another server's creation is adopted, a 409 on create
//! included), replaces a Failed/Succeeded one, waits out a terminating one, and otherwise
//! creates one, then waits until it is Ready and answers `/health`. `list` finds pods by label
//! selector (so a restarted server adopts them); terminating pods, and with `pod-ip`
//! addressing pods without an IP yet, are not listed. `release` and `reap_idle` delete the pod
//! and its Service, `purge` also the claim (a 404 is fine everywhere).
//!
//! The API calls it makes, and so the RBAC it needs (`deploy/k8s/rbac.yaml`): pods `get`,
//! `list`, `create`, `delete`; services `get`, `create`, `delete`; persistentvolumeclaims
//! `create`, `delete`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anywork_core::worker_api::HEALTH_PATH;
use anywork_core::{
    ContainerDriver, Error, ErrorKind, Result, SessionId, WorkerEndpoint, WorkerInfo,
};
use async_trait::async_trait;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::common::{HealthCheck, IdleClock, SessionLocks, may_reap, session_slug};

/// The `kube` crate this driver is built on, so callers can make a [`kube::Client`] of the
/// same version for [`K8sDriver::with_client`].
pub use kube;

/// Label every object the driver creates carries.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "anywork";
/// Label that marks worker objects (as opposed to the server's own).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Value of [`COMPONENT_LABEL`].
pub const COMPONENT: &str = "worker";
/// Label holding the session's slug ([`session_slug`]).
pub const SESSION_LABEL: &str = "anywork.dev/session";
/// Annotation holding the raw session id.
pub const SESSION_ANNOTATION: &str = "anywork.dev/session-id";
/// Where the workspace is mounted in the worker container (`WORKSPACE_DIR`).
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// The worker container's name.
pub const CONTAINER_NAME: &str = "worker";

/// Environment variables copied from the server's environment into every worker, when set.
/// Keys (`API_KEY`, `ANTHROPIC_API_KEY`) are deliberately not among them: they would be
/// readable in the Pod spec by anyone who may `get pods`. Put them in the Secret named by
/// `K8S_WORKER_SECRET` instead.
pub const PASSED_THROUGH_ENV: &[&str] =
    &["EXECUTOR", "MODEL", "API_BASE_URL", "ANTHROPIC_BASE_URL"];

/// Where a session's workspace lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkspaceStorage {
    /// An emptyDir: gone with the pod (release or reaping loses the workspace).
    EmptyDir {
        /// `sizeLimit` of the emptyDir (`10Gi`), if any.
        size_limit: Option<String>,
    },
    /// A PersistentVolumeClaim per session that outlives its pods.
    Pvc {
        /// `storageClassName`; the cluster's default class when `None`.
        storage_class: Option<String>,
        /// Requested size (`5Gi`).
        size: String,
    },
}

/// How the server reaches a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `http://<service>.<namespace>.svc:<port>`: the server runs in the cluster.
    Service,
    /// `http://<podIP>:<port>`: the server reaches pod IPs directly (flat network, tests).
    PodIp,
}

/// CPU and memory for each worker container; `None` leaves a value out of the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// `requests.cpu` (`250m`).
    pub cpu_request: Option<String>,
    /// `requests.memory` (`512Mi`).
    pub memory_request: Option<String>,
    /// `limits.cpu` (`2`).
    pub cpu_limit: Option<String>,
    /// `limits.memory` (`2Gi`).
    pub memory_limit: Option<String>,
}

/// Everything the driver needs to know; [`K8sConfig::from_env`] reads it from `K8S_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    /// Namespace of the workers (`K8S_NAMESPACE`, default `anywork`).
    pub namespace: String,
    /// Worker image (`K8S_WORKER_IMAGE`, required).
    pub image: String,
    /// `imagePullPolicy` (`K8S_IMAGE_PULL_POLICY`: `Always`, `IfNotPresent`, `Never`).
    pub image_pull_policy: Option<String>,
    /// Prefix of object names (`K8S_NAME_PREFIX`, default `anywork-`): lowercase
    /// alphanumerics and dashes, starting with a letter, at most 26 characters.
    pub name_prefix: String,
    /// The workspace volume (`K8S_WORKSPACE_STORAGE`, `K8S_STORAGE_CLASS`,
    /// `K8S_STORAGE_SIZE`, `K8S_EMPTYDIR_SIZE_LIMIT`).
    pub storage: WorkspaceStorage,
    /// How long a worker may go unused before [`ContainerDriver::reap_idle`] stops it
    /// (`K8S_IDLE_TTL_SECONDS`, default 1800).
    pub idle_ttl: Duration,
    /// Requests and limits (`K8S_CPU_REQUEST`, `K8S_MEMORY_REQUEST`, `K8S_CPU_LIMIT`,
    /// `K8S_MEMORY_LIMIT`; an empty value leaves it out).
    pub resources: Resources,
    /// The worker's port (`K8S_WORKER_PORT`, default 8080).
    pub worker_port: u16,
    /// A Secret whose keys become the worker's environment (`K8S_WORKER_SECRET`), e.g.
    /// `API_KEY`, `ANTHROPIC_API_KEY`.
    pub worker_secret: Option<String>,
    /// Plain environment for every worker: [`PASSED_THROUGH_ENV`] as set on the server, then
    /// `K8S_WORKER_ENV` (`KEY=VALUE,KEY=VALUE`).
    pub worker_env: Vec<(String, String)>,
    /// How the server reaches workers (`K8S_WORKER_ADDRESS`: `service` (default) or `pod-ip`).
    pub addressing: Addressing,
    /// How long a new worker may take to become Ready and answer `/health`
    /// (`K8S_READY_TIMEOUT_SECONDS`, default 180).
    pub ready_timeout: Duration,
    /// How long one `/health` request may take (`K8S_HEALTH_TIMEOUT_SECONDS`, default 3).
    pub health_timeout: Duration,
    /// The workers' ServiceAccount (`K8S_WORKER_SERVICE_ACCOUNT`); its token is never
    /// mounted, since workers do not talk to the API.
    pub service_account: Option<String>,
    /// `runAsUser`, `runAsGroup` and `fsGroup` of the worker (`K8S_RUN_AS_USER`, default
    /// 10001): non-root, and the owner of the workspace volume.
    pub run_as_user: i64,
    /// `readOnlyRootFilesystem` (`K8S_READ_ONLY_ROOT_FS`, default true; `/tmp` and the
    /// workspace stay writable).
    pub read_only_root_fs: bool,
}

impl K8sConfig {
    /// A configuration with the defaults and the given namespace and image.
    pub fn new(namespace: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            image: image.into(),
            image_pull_policy: None,
            name_prefix: "anywork-".into(),
            storage: WorkspaceStorage::EmptyDir { size_limit: None },
            idle_ttl: Duration::from_secs(1800),
            resources: Resources {
                cpu_request: Some("250m".into()),
                memory_request: Some("512Mi".into()),
                cpu_limit: Some("2".into()),
                memory_limit: Some("2Gi".into()),
            },
            worker_port: 8080,
            worker_secret: None,
            worker_env: Vec::new(),
            addressing: Addressing::Service,
            ready_timeout: Duration::from_secs(180),
            health_timeout: Duration::from_secs(3),
            service_account: None,
            run_as_user: 10001,
            read_only_root_fs: true,
        }
    }

    /// Reads the `K8S_*` variables (see the fields) from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `var` (a variable's value, or `None` when unset).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| var(name).map(|v| v.trim().to_owned());
        let set = |name: &str| get(name).filter(|v| !v.is_empty());
        let image = set("K8S_WORKER_IMAGE").ok_or_else(|| {
            Error::invalid_input(
                "CONTAINER_DRIVER=k8s needs K8S_WORKER_IMAGE, the worker image \
                 (e.g. ghcr.io/anywork/anywork-worker:0.1.0)",
            )
        })?;
        let mut config = Self::new(
            set("K8S_NAMESPACE").unwrap_or_else(|| "anywork".into()),
            image,
        );
        config.image_pull_policy = set("K8S_IMAGE_PULL_POLICY");
        if let Some(prefix) = get("K8S_NAME_PREFIX") {
            config.name_prefix = prefix;
        }
        config.storage = match set("K8S_WORKSPACE_STORAGE").as_deref() {
            None | Some("emptydir") => WorkspaceStorage::EmptyDir {
                size_limit: set("K8S_EMPTYDIR_SIZE_LIMIT"),
            },
            Some("pvc") => WorkspaceStorage::Pvc {
                storage_class: set("K8S_STORAGE_CLASS"),
                size: set("K8S_STORAGE_SIZE").unwrap_or_else(|| "5Gi".into()),
            },
            Some(other) => {
                return Err(Error::invalid_input(format!(
                    "K8S_WORKSPACE_STORAGE={other:?}: use `emptydir` or `pvc`"
                )));
            }
        };
        if let Some(s) = set("K8S_IDLE_TTL_SECONDS") {
            config.idle_ttl = Duration::from_secs(parse_num("K8S_IDLE_TTL_SECONDS", &s)?);
        }
        if let Some(s) = set("K8S_READY_TIMEOUT_SECONDS") {
            config.ready_timeout = Duration::from_secs(parse_num("K8S_READY_TIMEOUT_SECONDS", &s)?);
        }
        if let Some(s) = set("K8S_HEALTH_TIMEOUT_SECONDS") {
            config.health_timeout =
                Duration::from_secs(parse_num("K8S_HEALTH_TIMEOUT_SECONDS", &s)?);
        }
        for (name, slot) in [
            ("K8S_CPU_REQUEST", &mut config.resources.cpu_request),
            ("K8S_MEMORY_REQUEST", &mut config.resources.memory_request),
            ("K8S_CPU_LIMIT", &mut config.resources.cpu_limit),
            ("K8S_MEMORY_LIMIT", &mut config.resources.memory_limit),
        ] {
            if let Some(v) = get(name) {
                *slot = Some(v).filter(|v| !v.is_empty());
            }
        }
        if let Some(s) = set("K8S_WORKER_PORT") {
            config.worker_port = parse_num("K8S_WORKER_PORT", &s)?;
        }
        config.worker_secret = set("K8S_WORKER_SECRET");
        for name in PASSED_THROUGH_ENV {
            if let Some(v) = set(name) {
                config.worker_env.push(((*name).to_owned(), v));
            }
        }
        if let Some(list) = set("K8S_WORKER_ENV") {
            for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    Error::invalid_input(format!(
                        "K8S_WORKER_ENV: {pair:?} is not KEY=VALUE (pairs separated by commas)"
                    ))
                })?;
                config
                    .worker_env
                    .push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        config.addressing = match set("K8S_WORKER_ADDRESS").as_deref() {
            None | Some("service") => Addressing::Service,
            Some("pod-ip") => Addressing::PodIp,
            Some(other) => {
                return Err(Error::invalid_input(format!(
                    "K8S_WORKER_ADDRESS={other:?}: use `service` (in-cluster DNS) or `pod-ip`"
                )));
            }
        };
        config.service_account = set("K8S_WORKER_SERVICE_ACCOUNT");
        if let Some(s) = set("K8S_RUN_AS_USER") {
            config.run_as_user = parse_num("K8S_RUN_AS_USER", &s)?;
        }
        if let Some(s) = set("K8S_READ_ONLY_ROOT_FS") {
            config.read_only_root_fs = match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(Error::invalid_input(format!(
                        "K8S_READ_ONLY_ROOT_FS={s:?}: use true or false"
                    )));
                }
            };
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what the API server would reject late, with the variable to fix.
    pub fn validate(&self) -> Result<()> {
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(&self.namespace) {
            return Err(Error::invalid_input(format!(
                "K8S_NAMESPACE {:?} is not a valid namespace name (lowercase letters, digits, \
                 dashes; at most 63)",
                self.namespace
            )));
        }
        let p = &self.name_prefix;
        if p.len() > 26
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(Error::invalid_input(format!(
                "K8S_NAME_PREFIX {p:?} must start with a lowercase letter, hold only lowercase \
                 letters, digits and dashes, and be at most 26 characters (e.g. `anywork-`)"
            )));
        }
        if self.image.is_empty() {
            return Err(Error::invalid_input("K8S_WORKER_IMAGE is empty"));
        }
        if self.worker_port == 0 {
            return Err(Error::invalid_input("K8S_WORKER_PORT must not be 0"));
        }
        if self.run_as_user <= 0 {
            return Err(Error::invalid_input(
                "K8S_RUN_AS_USER must be a non-root uid (above 0): workers run as non-root",
            ));
        }
        for (k, _) in &self.worker_env {
            let valid = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(Error::invalid_input(format!(
                    "K8S_WORKER_ENV: {k:?} is not a valid environment variable name"
                )));
            }
        }
        if let Some(secret) = &self.worker_secret
            && !dns_label(secret)
            && !secret.contains('.')
        {
            return Err(Error::invalid_input(format!(
                "K8S_WORKER_SECRET {secret:?} is not a valid Secret name"
            )));
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::invalid_input(format!("{name}={value:?} is not a valid number")))
}

/// One Pod and one Service per session; see the [module docs](self).
pub struct K8sDriver {
    config: K8sConfig,
    pods: Api<Pod>,
    services: Api<Service>,
    pvcs: Api<PersistentVolumeClaim>,
    health: HealthCheck,
    locks: SessionLocks,
    clock: IdleClock,
}

impl std::fmt::Debug for K8sDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sDriver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the driver found under a session's pod name.
enum Found {
    Missing,
    Terminating,
    Finished(String),
    Live(Box<Pod>),
}

/// A Kubernetes client for `config`. TLS uses rustls with the ring provider, installed as the
/// process default when none is (a build that also enables aws-lc-rs cannot pick one itself).
pub fn client_for(config: kube::Config) -> Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_from(config).map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot build a Kubernetes client: {e}"),
        )
    })
}

impl K8sDriver {
    /// Connects with the in-cluster service account, or else the kubeconfig
    /// (`KUBECONFIG`, `~/.kube/config`), as `kube::Config::infer` does.
    pub async fn connect(config: K8sConfig) -> Result<Self> {
        config.validate()?;
        let kube_config = kube::Config::infer().await.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "no Kubernetes configuration found ({e}): run the server in a pod with a \
                     service account, or set KUBECONFIG"
                ),
            )
        })?;
        Self::with_client(client_for(kube_config)?, config)
    }

    /// A driver over an existing client (tests point one at a fake API server; build it with
    /// [`client_for`]).
    pub fn with_client(client: kube::Client, config: K8sConfig) -> Result<Self> {
        config.validate()?;
        let ns = config.namespace.as_str();
        Ok(Self {
            pods: Api::namespaced(client.clone(), ns),
            services: Api::namespaced(client.clone(), ns),
            pvcs: Api::namespaced(client, ns),
            health: HealthCheck::new(config.health_timeout)?,
            locks: SessionLocks::default(),
            clock: IdleClock::default(),
            config,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &K8sConfig {
        &self.config
    }

    /// The name of `session_id`'s Pod and Service.
    pub fn pod_name(&self, session_id: &SessionId) -> String {
        format!("{}{}", self.config.name_prefix, session_slug(session_id))
    }

    /// The name of `session_id`'s workspace claim (with `pvc` storage).
    pub fn pvc_name(&self, session_id: &SessionId) -> String {
        format!("{}-ws", self.pod_name(session_id))
    }

    /// The label selector that finds this driver's worker pods.
    pub fn selector() -> String {
        format!("{MANAGED_BY_LABEL}={MANAGED_BY},{COMPONENT_LABEL}={COMPONENT}")
    }

    fn labels(&self, session_id: &SessionId) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
            (SESSION_LABEL.to_owned(), session_slug(session_id)),
        ])
    }

    fn meta(&self, name: String, session_id: &SessionId) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.config.namespace.clone()),
            labels: Some(self.labels(session_id)),
            annotations: Some(BTreeMap::from([(
                SESSION_ANNOTATION.to_owned(),
                session_id.as_str().to_owned(),
            )])),
            ..ObjectMeta::default()
        }
    }

    /// The Pod the driver creates for `session_id`.
    pub fn pod_manifest(&self, session_id: &SessionId) -> Pod {
        let c = &self.config;
        let port = i32::from(c.worker_port);
        let quantities = |cpu: &Option<String>, memory: &Option<String>| {
            let map: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
                .into_iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), Quantity(v))))
                .collect();
            (!map.is_empty()).then_some(map)
        };
        let mut env = vec![
            env_var("WORKER_HOST", "0.0.0.0"),
            env_var("WORKER_PORT", &c.worker_port.to_string()),
            env_var("WORKSPACE_DIR", WORKSPACE_MOUNT),
            env_var("TMPDIR", "/tmp"),
            // The image's home is on the read-only root filesystem.
            env_var("HOME", "/tmp"),
        ];
        env.extend(c.worker_env.iter().map(|(k, v)| env_var(k, v)));
        let workspace_volume = match &c.storage {
            WorkspaceStorage::EmptyDir { size_limit } => Volume {
                name: "workspace".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: size_limit.clone().map(Quantity),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
            WorkspaceStorage::Pvc { .. } => Volume {
                name: "workspace".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: self.pvc_name(session_id),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
        };
        let container = Container {
            name: CONTAINER_NAME.into(),
            image: Some(c.image.clone()),
            image_pull_policy: c.image_pull_policy.clone(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            env: Some(env),
            env_from: c.worker_secret.as_ref().map(|name| {
                vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: name.clone(),
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                }]
            }),
            resources: Some(ResourceRequirements {
                requests: quantities(&c.resources.cpu_request, &c.resources.memory_request),
                limits: quantities(&c.resources.cpu_limit, &c.resources.memory_limit),
                ..ResourceRequirements::default()
            }),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(HEALTH_PATH.into()),
                    port: IntOrString::String("http".into()),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(2),
                timeout_seconds: Some(2),
                failure_threshold: Some(3),
                ..Probe::default()
            }),
            // A worker whose /health stays silent for a minute is hung: restart it.
            liveness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(HEALTH_PATH.into()),
                    port: IntOrString::String("http".into()),
                    ..HTTPGetAction::default()
                }),
                initial_delay_seconds: Some(10),
                period_seconds: Some(10),
                timeout_seconds: Some(5),
                failure_threshold: Some(6),
                ..Probe::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(c.read_only_root_fs),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "workspace".into(),
                    mount_path: WORKSPACE_MOUNT.into(),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "tmp".into(),
                    mount_path: "/tmp".into(),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        };
        Pod {
            metadata: self.meta(self.pod_name(session_id), session_id),
            spec: Some(PodSpec {
                containers: vec![container],
                restart_policy: Some("Always".into()),
                termination_grace_period_seconds: Some(10),
                automount_service_account_token: Some(false),
                service_account_name: c.service_account.clone(),
                enable_service_links: Some(false),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(c.run_as_user),
                    run_as_group: Some(c.run_as_user),
                    fs_group: Some(c.run_as_user),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..SeccompProfile::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                volumes: Some(vec![
                    workspace_volume,
                    Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    },
                ]),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    /// The Service the driver creates for `session_id`, owned by the pod with `pod_uid`.
    pub fn service_manifest(&self, session_id: &SessionId, pod_uid: &str) -> Service {
        let mut metadata = self.meta(self.pod_name(session_id), session_id);
        metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: self.pod_name(session_id),
            uid: pod_uid.to_owned(),
            block_owner_deletion: Some(false),
            controller: Some(false),
        }]);
        Service {
            metadata,
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                    (SESSION_LABEL.to_owned(), session_slug(session_id)),
                ])),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: i32::from(self.config.worker_port),
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// The workspace claim the driver creates for `session_id` with `pvc` storage.
    pub fn pvc_manifest(&self, session_id: &SessionId) -> Option<PersistentVolumeClaim> {
        let WorkspaceStorage::Pvc {
            storage_class,
            size,
        } = &self.config.storage
        else {
            return None;
        };
        Some(PersistentVolumeClaim {
            metadata: self.meta(self.pvc_name(session_id), session_id),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        })
    }

    /// Where the server reaches `pod`, if it can be reached yet.
    fn endpoint_of(&self, pod: &Pod) -> Option<WorkerEndpoint> {
        let name = pod.metadata.name.clone()?;
        let port = self.config.worker_port;
        let base_url = match self.config.addressing {
            Addressing::Service => {
                format!("http://{name}.{}.svc:{port}", self.config.namespace)
            }
            Addressing::PodIp => {
                let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
                if ip.contains(':') {
                    format!("http://[{ip}]:{port}")
                } else {
                    format!("http://{ip}:{port}")
                }
            }
        };
        Some(WorkerEndpoint {
            worker_id: name,
            base_url,
        })
    }

    async fn find(&self, name: &str) -> Result<Found> {
        let pod = self
            .pods
            .get_opt(name)
            .await
            .map_err(|e| self.api_error(e, "get", "pods", name))?;
        Ok(match pod {
            None => Found::Missing,
            Some(p) if p.metadata.deletion_timestamp.is_some() => Found::Terminating,
            Some(p) => match phase(&p) {
                "Failed" | "Succeeded" => Found::Finished(describe_pod(&p)),
                _ => Found::Live(Box::new(p)),
            },
        })
    }

    /// Waits until nothing is left under `name` (a terminating or deleted pod).
    async fn wait_gone(&self, name: &str, deadline: Instant) -> Result<()> {
        let mut pause = Duration::from_millis(50);
        loop {
            if matches!(self.find(name).await?, Found::Missing) {
                return Ok(());
            }
            if Instant::now() + pause > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "pod {name} in namespace {} is still terminating; try again, or check \
                         `kubectl -n {} describe pod {name}` (finalizers?)",
                        self.config.namespace, self.config.namespace
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Polls the pod until it is Running and Ready with an address.
    async fn wait_pod_ready(&self, name: &str, deadline: Instant) -> Result<Pod> {
        let mut pause = Duration::from_millis(25);
        let ns = &self.config.namespace;
        loop {
            let pod = match self.find(name).await? {
                Found::Live(p) => *p,
                Found::Missing | Found::Terminating => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("pod {name} in namespace {ns} was deleted while it was starting"),
                    ));
                }
                Found::Finished(why) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("pod {name} in namespace {ns} stopped while starting: {why}"),
                    ));
                }
            };
            if is_ready(&pod) && self.endpoint_of(&pod).is_some() {
                return Ok(pod);
            }
            if let Some(e) = self.start_failure(&pod) {
                return Err(e);
            }
            if Instant::now() + pause > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "pod {name} in namespace {ns} was not Ready within {:.0} s ({}); see \
                         `kubectl -n {ns} describe pod {name}`, or raise \
                         K8S_READY_TIMEOUT_SECONDS",
                        self.config.ready_timeout.as_secs_f64(),
                        describe_pod(&pod)
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// A container state that will not fix itself: a missing image, a missing secret.
    fn start_failure(&self, pod: &Pod) -> Option<Error> {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let ns = &self.config.namespace;
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        for s in statuses {
            let Some(waiting) = s.state.as_ref().and_then(|st| st.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.as_deref().unwrap_or("");
            let message = waiting.message.as_deref().unwrap_or("");
            match reason {
                "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                    return Some(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "the worker image {} cannot be pulled for pod {name} ({reason}: \
                             {message}): fix K8S_WORKER_IMAGE or the cluster's access to the \
                             registry (imagePullSecrets)",
                            self.config.image
                        ),
                    ));
                }
                "CreateContainerConfigError" => {
                    return Some(Error::invalid_input(format!(
                        "pod {name} in namespace {ns} cannot start its container ({reason}: \
                         {message}): does the Secret K8S_WORKER_SECRET={} exist in {ns}?",
                        self.config.worker_secret.as_deref().unwrap_or("(none)")
                    )));
                }
                _ => {}
            }
        }
        None
    }

    /// Keeps the Service of `pod` if it exists and belongs to it, or (re)creates it.
    async fn ensure_service(&self, session_id: &SessionId, pod: &Pod) -> Result<()> {
        let name = self.pod_name(session_id);
        let uid = pod.metadata.uid.clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!("the API server returned pod {name} without a uid"),
            )
        })?;
        for _ in 0..3 {
            let existing = self
                .services
                .get_opt(&name)
                .await
                .map_err(|e| self.api_error(e, "get", "services", &name))?;
            if let Some(existing) = existing {
                let owned = existing
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == uid);
                if owned {
                    return Ok(());
                }
                // Left over from an earlier pod of this session, not yet collected.
                self.delete_service(&name).await?;
            }
            let manifest = self.service_manifest(session_id, &uid);
            match self
                .services
                .create(&PostParams::default(), &manifest)
                .await
            {
                Ok(_) => return Ok(()),
                // Created meanwhile by another server: look at it again.
                Err(e) if api_code(&e) == Some(409) => {}
                Err(e) => return Err(self.api_error(e, "create", "services", &name)),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("service {name} keeps being replaced by someone else; try again"),
        ))
    }

    async fn ensure_pvc(&self, session_id: &SessionId) -> Result<()> {
        let Some(pvc) = self.pvc_manifest(session_id) else {
            return Ok(());
        };
        let name = self.pvc_name(session_id);
        match self.pvcs.create(&PostParams::default(), &pvc).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(self.api_error(e, "create", "persistentvolumeclaims", &name)),
        }
    }

    async fn delete_pod(&self, name: &str) -> Result<()> {
        match self.pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.api_error(e, "delete", "pods", name)),
        }
    }

    async fn delete_service(&self, name: &str) -> Result<()> {
        match self.services.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.api_error(e, "delete", "services", name)),
        }
    }

    async fn delete_pvc(&self, name: &str) -> Result<()> {
        match self.pvcs.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.api_error(e, "delete", "persistentvolumeclaims", name)),
        }
    }

    /// Deletes the session's pod and service (the PVC stays).
    async fn remove(&self, session_id: &SessionId) -> Result<()> {
        let name = self.pod_name(session_id);
        self.delete_pod(&name).await?;
        self.delete_service(&name).await?;
        self.clock.forget(session_id);
        Ok(())
    }

    /// Finds, adopts or creates the session's pod and waits until it is Ready; `true` with
    /// it when it was Ready already (a reuse).
    async fn ready_pod(&self, session_id: &SessionId, deadline: Instant) -> Result<(Pod, bool)> {
        let name = self.pod_name(session_id);
        let ns = &self.config.namespace;
        for _ in 0..4 {
            match self.find(&name).await? {
                Found::Live(pod) => {
                    return if is_ready(&pod) && self.endpoint_of(&pod).is_some() {
                        Ok((*pod, true))
                    } else {
                        // Still starting (perhaps created by another server): adopt it.
                        Ok((self.wait_pod_ready(&name, deadline).await?, false))
                    };
                }
                Found::Terminating => self.wait_gone(&name, deadline).await?,
                Found::Finished(_) => {
                    self.delete_pod(&name).await?;
                    self.wait_gone(&name, deadline).await?;
                }
                Found::Missing => {
                    self.ensure_pvc(session_id).await?;
                    let manifest = self.pod_manifest(session_id);
                    match self.pods.create(&PostParams::default(), &manifest).await {
                        Ok(_) => return Ok((self.wait_pod_ready(&name, deadline).await?, false)),
                        // Another server created it between our get and create: adopt it.
                        Err(e) if api_code(&e) == Some(409) => {}
                        Err(e) => return Err(self.api_error(e, "create", "pods", &name)),
                    }
                }
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "pod {name} in namespace {ns} keeps changing under the driver (created and \
                 deleted by someone else?); try again"
            ),
        ))
    }

    /// Turns an API error into AnyWork's, saying what to fix.
    fn api_error(&self, e: kube::Error, verb: &str, resource: &str, name: &str) -> Error {
        let ns = &self.config.namespace;
        let what = format!("{verb} {resource} {name:?} in namespace {ns}");
        match e {
            kube::Error::Api(status) => {
                let msg = status.message.clone();
                let err = match status.code {
                    403 if msg.contains("exceeded quota") => Error::new(
                        ErrorKind::RateLimited,
                        format!(
                            "namespace {ns} is over its ResourceQuota, so the driver cannot \
                             {verb} {resource} {name:?}: {msg}. Release idle sessions, lower \
                             K8S_CPU_*/K8S_MEMORY_* or raise the quota"
                        ),
                    ),
                    403 => Error::new(
                        ErrorKind::Unauthorized,
                        format!(
                            "the server's service account may not {what}: {msg}. Apply \
                             deploy/k8s/rbac.yaml (a Role granting pods get/list/create/delete, \
                             services get/create/delete, persistentvolumeclaims create/delete \
                             in {ns}) and bind it to the server's ServiceAccount"
                        ),
                    ),
                    401 => Error::new(
                        ErrorKind::Unauthorized,
                        format!(
                            "the Kubernetes API rejected the credentials to {what}: {msg}. \
                             Check the kubeconfig or the service account token"
                        ),
                    ),
                    404 if verb == "create" || verb == "list" => Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "cannot {what}: {msg}. Does namespace {ns} exist? Create it \
                             (deploy/k8s/namespace.yaml) or set K8S_NAMESPACE"
                        ),
                    ),
                    404 => Error::new(ErrorKind::NotFound, format!("cannot {what}: {msg}")),
                    409 => Error::new(ErrorKind::Conflict, format!("cannot {what}: {msg}")),
                    422 | 400 => Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the API server rejected the request to {what}: {msg}. Check the \
                             K8S_* settings (image, resources, storage, names)"
                        ),
                    ),
                    429 => Error::new(
                        ErrorKind::RateLimited,
                        format!("the API server is throttling requests ({what}): {msg}"),
                    ),
                    code if code >= 500 => Error::new(
                        ErrorKind::Unavailable,
                        format!("the API server failed to {what} (HTTP {code}): {msg}"),
                    ),
                    code => Error::new(
                        ErrorKind::Protocol,
                        format!("unexpected answer to {what} (HTTP {code}): {msg}"),
                    ),
                };
                err.with_source(kube::Error::Api(status))
            }
            kube::Error::SerdeError(e) => Error::new(
                ErrorKind::Protocol,
                format!("the API server's answer to {what} could not be read: {e}"),
            )
            .with_source(e),
            other => Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot reach the Kubernetes API server to {what}: {other}. Check that it \
                     is up and that the kubeconfig or in-cluster configuration points at it"
                ),
            )
            .with_source(other),
        }
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn is_ready(pod: &Pod) -> bool {
    phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Phase, reason and the first unhappy condition or container state, for error messages.
fn describe_pod(pod: &Pod) -> String {
    let mut out = format!("phase {}", phase(pod));
    let Some(status) = pod.status.as_ref() else {
        return out;
    };
    if let Some(reason) = &status.reason {
        out.push_str(&format!(", reason {reason}"));
    }
    if let Some(message) = &status.message {
        out.push_str(&format!(": {message}"));
    }
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            out.push_str(&format!(
                "; {} is {}{}",
                c.type_,
                c.status,
                c.message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ));
            break;
        }
    }
    for s in status.container_statuses.iter().flatten() {
        if let Some(w) = s.state.as_ref().and_then(|st| st.waiting.as_ref()) {
            out.push_str(&format!(
                "; container {} waiting: {}",
                s.name,
                w.reason.as_deref().unwrap_or("?")
            ));
        }
    }
    out
}

fn session_of(pod: &Pod) -> Option<SessionId> {
    let raw = pod.metadata.annotations.as_ref()?.get(SESSION_ANNOTATION)?;
    SessionId::new(raw.clone()).ok()
}

#[async_trait]
impl ContainerDriver for K8sDriver {
    fn name(&self) -> &str {
        "k8s"
    }

    async fn get_worker(&self, session_id: &SessionId) -> Result<WorkerEndpoint> {
        let _guard = self.locks.lock(session_id).await;
        let deadline = Instant::now() + self.config.ready_timeout;
        let (pod, reused) = self.ready_pod(session_id, deadline).await?;
        self.ensure_service(session_id, &pod).await?;
        let endpoint = self.endpoint_of(&pod).ok_or_else(|| {
            Error::internal(format!(
                "pod {} is Ready without an address",
                self.pod_name(session_id)
            ))
        })?;
        // A new worker may need a moment after Ready (DNS, its listener); one that was
        // serving already gets a short grace, not the whole ready timeout.
        let within = if reused {
            self.config.health_timeout * 2
        } else {
            deadline
                .saturating_duration_since(Instant::now())
                .max(self.config.health_timeout)
        };
        self.health
            .wait_ready(&endpoint.base_url, within)
            .await
            .map_err(|e| {
                let hint = match self.config.addressing {
                    Addressing::Service => {
                        "the server must run in the cluster to resolve service names; \
                         outside it set K8S_WORKER_ADDRESS=pod-ip on a network that reaches \
                         pod IPs"
                    }
                    Addressing::PodIp => {
                        "the server must reach pod IPs; inside the cluster prefer \
                         K8S_WORKER_ADDRESS=service, and check NetworkPolicies"
                    }
                };
                Error::new(
                    ErrorKind::Unavailable,
                    format!("pod {} is Ready but {e}: {hint}", endpoint.worker_id),
                )
            })?;
        self.clock.touch(session_id);
        Ok(endpoint)
    }

    async fn release(&self, session_id: &SessionId) -> Result<()> {
        let _guard = self.locks.lock(session_id).await;
        self.remove(session_id).await
    }

    /// Deletes the pod and service, then with `pvc` storage the workspace claim (the cluster
    /// frees it once the pod is gone). With `emptydir` storage the workspace went with the pod.
    async fn purge(&self, session_id: &SessionId) -> Result<()> {
        let _guard = self.locks.lock(session_id).await;
        self.remove(session_id).await?;
        if matches!(self.config.storage, WorkspaceStorage::Pvc { .. }) {
            self.delete_pvc(&self.pvc_name(session_id)).await?;
        }
        Ok(())
    }

    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool {
        self.health.check(&endpoint.base_url).await.is_some()
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let pods = self.list_pods().await?;
        let checks = pods.into_iter().filter_map(|(session, pod)| {
            let endpoint = self.endpoint_of(&pod)?;
            let ready = is_ready(&pod);
            Some(async move {
                let healthy = ready && self.health.check(&endpoint.base_url).await.is_some();
                WorkerInfo {
                    endpoint,
                    session_id: Some(session),
                    healthy,
                }
            })
        });
        Ok(futures_util::future::join_all(checks).await)
    }

    async fn reap_idle(&self, busy: &[SessionId]) -> Result<Vec<SessionId>> {
        let ttl = self.config.idle_ttl;
        let mut reaped = Vec::new();
        let mut failed = None;
        for (session, pod) in self.list_pods().await? {
            if self.clock.idle_for(&session) < ttl || busy.contains(&session) {
                continue;
            }
            let health = match self.endpoint_of(&pod) {
                Some(e) if is_ready(&pod) => self.health.check(&e.base_url).await,
                _ => None,
            };
            let _guard = self.locks.lock(&session).await;
            // Asked for while we waited for the lock?
            if may_reap(
                &session,
                self.clock.idle_for(&session),
                ttl,
                busy,
                health.as_ref(),
            ) {
                match self.remove(&session).await {
                    Ok(()) => reaped.push(session),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        self.locks.prune();
        // Report a failure only when it stopped everything; the next round retries the rest.
        match failed {
            Some(e) if reaped.is_empty() => Err(e),
            _ => Ok(reaped),
        }
    }
}

impl K8sDriver {
    /// The live (not terminating) worker pods in the namespace, with their sessions.
    async fn list_pods(&self) -> Result<Vec<(SessionId, Pod)>> {
        let lp = ListParams::default().labels(&Self::selector());
        let list = self
            .pods
            .list(&lp)
            .await
            .map_err(|e| self.api_error(e, "list", "pods", &Self::selector()))?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&self.config.name_prefix))
            })
            .filter_map(|p| Some((session_of(&p)?, p)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn config_from_env_defaults_and_overrides() {
        let c = K8sConfig::from_lookup(vars(&[("K8S_WORKER_IMAGE", "img:1")])).unwrap();
        assert_eq!(c.namespace, "anywork");
        assert_eq!(c.idle_ttl, Duration::from_secs(1800));
        assert_eq!(c.storage, WorkspaceStorage::EmptyDir { size_limit: None });
        assert_eq!(c.addressing, Addressing::Service);
        assert_eq!(c.worker_port, 8080);

        let c = K8sConfig::from_lookup(vars(&[
            ("K8S_WORKER_IMAGE", "img:2"),
            ("K8S_NAMESPACE", "agents"),
            ("K8S_WORKSPACE_STORAGE", "pvc"),
            ("K8S_STORAGE_CLASS", "fast"),
            ("K8S_STORAGE_SIZE", "20Gi"),
            ("K8S_IDLE_TTL_SECONDS", "60"),
            ("K8S_CPU_LIMIT", ""),
            ("K8S_WORKER_ADDRESS", "pod-ip"),
            ("K8S_WORKER_SECRET", "model-keys"),
            ("MODEL", "claude-x"),
            ("API_KEY", "sk-secret"),
            ("K8S_WORKER_ENV", "A=1, B = two"),
        ]))
        .unwrap();
        assert_eq!(c.namespace, "agents");
        assert_eq!(
            c.storage,
            WorkspaceStorage::Pvc {
                storage_class: Some("fast".into()),
                size: "20Gi".into()
            }
        );
        assert_eq!(c.idle_ttl, Duration::from_secs(60));
        assert_eq!(
            c.resources.cpu_limit, None,
            "an empty value leaves the limit out"
        );
        assert_eq!(c.resources.memory_limit.as_deref(), Some("2Gi"));
        assert_eq!(c.addressing, Addressing::PodIp);
        assert_eq!(c.worker_secret.as_deref(), Some("model-keys"));
        assert_eq!(
            c.worker_env,
            vec![
                ("MODEL".to_owned(), "claude-x".to_owned()),
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two".to_owned()),
            ],
            "keys are not copied into pod specs"
        );
    }

    #[test]
    fn config_errors_name_the_variable() {
        let e = K8sConfig::from_lookup(vars(&[])).unwrap_err();
        assert!(e.to_string().contains("K8S_WORKER_IMAGE"), "{e}");
        for (var, value) in [
            ("K8S_WORKSPACE_STORAGE", "nfs"),
            ("K8S_IDLE_TTL_SECONDS", "soon"),
            ("K8S_WORKER_ADDRESS", "node-port"),
            ("K8S_NAMESPACE", "Bad_NS"),
            ("K8S_NAME_PREFIX", "1abc-"),
            ("K8S_RUN_AS_USER", "0"),
            ("K8S_WORKER_ENV", "novalue"),
        ] {
            let e = K8sConfig::from_lookup(vars(&[("K8S_WORKER_IMAGE", "i"), (var, value)]))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(var), "{var}: {e}");
        }
    }
}
