//! [`K8sConfig`]: the Kubernetes driver's settings, from `K8S_*` variables.

use std::time::Duration;

use anywork_core::{Error, Result};

/// Environment variables copied from the server's environment into every worker, when set.
/// Keys (`API_KEY`, `ANTHROPIC_API_KEY`) are deliberately not among them: they would be
/// readable in the Pod spec by anyone who may `get pods`. Put them in the Secret named by
/// `K8S_WORKER_SECRET` instead.
pub const PASSED_THROUGH_ENV: &[&str] =
    &["EXECUTOR", "MODEL", "API_BASE_URL", "ANTHROPIC_BASE_URL"];

/// Where a session's workspace lives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
pub enum Addressing {
    /// `http://<service>.<namespace>.svc:<port>`: the server runs in the cluster.
    Service,
    /// `http://<podIP>:<port>`: the server reaches pod IPs directly (flat network, tests).
    PodIp,
}

/// CPU and memory for each worker container; `None` leaves a value out of the spec. Start
/// from `Resources::default()` (nothing set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Everything the driver needs to know; [`K8sConfig::from_env`] reads it from `K8S_*`,
/// [`K8sConfig::new`] gives the defaults (then set fields).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// How long a worker may go unused before
    /// [`ContainerDriver::reap_idle`](anywork_core::ContainerDriver::reap_idle) stops it
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
        // WORKER_IMAGE, WORKER_PORT, K8S_PVC_STORAGE_CLASS: the original AnyWork's names.
        let image = set("K8S_WORKER_IMAGE")
            .or_else(|| set("WORKER_IMAGE"))
            .ok_or_else(|| {
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
                storage_class: set("K8S_STORAGE_CLASS").or_else(|| set("K8S_PVC_STORAGE_CLASS")),
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
        for name in ["K8S_WORKER_PORT", "WORKER_PORT"] {
            if let Some(s) = set(name) {
                config.worker_port = parse_num(name, &s)?;
                break;
            }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use anywork_core::ErrorKind;

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
