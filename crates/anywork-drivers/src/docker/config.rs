//! [`DockerConfig`]: how the Docker driver runs workers, from `DOCKER_*` variables.

use std::time::Duration;

use anywork_core::{Error, Result};

/// Variables passed from the server's environment to every worker when set.
pub const PASSED_THROUGH_ENV: &[&str] = &[
    "EXECUTOR",
    "MODEL",
    "API_KEY",
    "API_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
];

/// How [`DockerDriver`](super::DockerDriver) runs workers. Build it with [`DockerConfig::new`]
/// or [`DockerConfig::from_env`], then set fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DockerConfig {
    /// The engine (`DOCKER_HOST`): `unix:///var/run/docker.sock`, `tcp://host:2375`; `None`
    /// uses the local socket.
    pub docker_host: Option<String>,
    /// Worker image (`DOCKER_WORKER_IMAGE`, default `anywork-worker:latest`). It is never
    /// pulled: build it (`deploy/build-worker-image.sh`, or `deploy/Dockerfile.worker`).
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
    /// How long a worker may go unused before
    /// [`ContainerDriver::reap_idle`](anywork_core::ContainerDriver::reap_idle) stops it
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
        let mut c = Self::new(
            // WORKER_IMAGE: the original AnyWork's name.
            set("DOCKER_WORKER_IMAGE")
                .or_else(|| set("WORKER_IMAGE"))
                .unwrap_or_else(|| "anywork-worker:latest".into()),
        );
        c.docker_host = set("DOCKER_HOST");
        if let Some(v) = set("DOCKER_NETWORK") {
            c.network = v;
        }
        if let Some(v) = set("DOCKER_NAME_PREFIX") {
            c.name_prefix = v;
        }
        // WORKER_PORT: the original AnyWork's name.
        for name in ["DOCKER_WORKER_PORT", "WORKER_PORT"] {
            if let Some(v) = set(name) {
                c.worker_port = parse(name, &v)?;
                break;
            }
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use anywork_core::ErrorKind;

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
}
