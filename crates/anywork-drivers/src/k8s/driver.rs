//! The driver against the API server: find, adopt, create, wait for and delete a
//! session's objects.

use std::time::{Duration, Instant};

use anywork_core::worker_api::WorkerSecret;
use anywork_core::{
    ContainerDriver, Error, ErrorKind, ReapGuard, Result, SessionId, SetupCheck, Unguarded,
    WorkerEndpoint, WorkerInfo,
};
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::common::{HealthCheck, IdleClock, SessionLocks, may_reap};

use super::K8sDriver;
use super::config::{Addressing, K8sConfig, WorkspaceStorage};
use super::manifests::{SESSION_ANNOTATION, WORKER_SECRET_KEY};

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
            pvcs: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client, ns),
            known_secrets: std::sync::Mutex::default(),
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
        Some(WorkerEndpoint::new(name, base_url))
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

    /// The worker secret of the session's next pod, from the API: read from its Secret, else
    /// a new one stored in a new Secret (a concurrent creator's 409 makes this read theirs).
    /// Never from memory: another server may have deleted the Secret (with its pod) since.
    async fn ensure_session_secret(&self, session_id: &SessionId) -> Result<WorkerSecret> {
        let name = self.auth_secret_name(session_id);
        for _ in 0..3 {
            if let Some(existing) = self.read_session_secret(session_id).await? {
                return Ok(existing);
            }
            let secret = WorkerSecret::generate();
            let manifest = self.auth_secret_manifest(session_id, &secret);
            match self.secrets.create(&PostParams::default(), &manifest).await {
                Ok(_) => return Ok(secret),
                // Another server made it meanwhile: read theirs.
                Err(e) if api_code(&e) == Some(409) => {}
                Err(e) => return Err(self.api_error(e, "create", "secrets", &name)),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("Secret {name} keeps being replaced by someone else; try again"),
        ))
    }

    /// The session's Secret as the API has it now; `None` when there is none.
    async fn read_session_secret(&self, session_id: &SessionId) -> Result<Option<WorkerSecret>> {
        let name = self.auth_secret_name(session_id);
        let Some(existing) = self
            .secrets
            .get_opt(&name)
            .await
            .map_err(|e| self.api_error(e, "get", "secrets", &name))?
        else {
            return Ok(None);
        };
        let value = existing
            .data
            .as_ref()
            .and_then(|d| d.get(WORKER_SECRET_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| {
                existing
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(WORKER_SECRET_KEY).cloned())
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("Secret {name} has no key {WORKER_SECRET_KEY}"),
                )
            })?;
        WorkerSecret::new(value).map(Some)
    }

    /// The worker secret `pod` started with: remembered for that very pod (by uid), else read
    /// from the session's Secret. Keyed by the pod, not the session: another server may have
    /// replaced the pod and its Secret since this one last looked, and a secret remembered for
    /// the old pod would be refused by the new one. `None` for a pod without a secret (made
    /// before workers had secrets).
    async fn secret_for(&self, session_id: &SessionId, pod: &Pod) -> Result<Option<WorkerSecret>> {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        if let Some(s) = self.remembered_secret(session_id, uid) {
            return Ok(Some(s));
        }
        let secret = self.read_session_secret(session_id).await?;
        if let Some(s) = &secret {
            self.remember_secret(session_id, Some((uid.to_owned(), s.clone())));
        }
        Ok(secret)
    }

    fn remembered_secret(&self, session_id: &SessionId, pod_uid: &str) -> Option<WorkerSecret> {
        self.known_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session_id)
            .filter(|(uid, _)| !uid.is_empty() && uid == pod_uid)
            .map(|(_, s)| s.clone())
    }

    fn remember_secret(&self, session_id: &SessionId, secret: Option<(String, WorkerSecret)>) {
        let mut known = self.known_secrets.lock().unwrap_or_else(|e| e.into_inner());
        match secret {
            Some(s) => known.insert(session_id.clone(), s),
            None => known.remove(session_id),
        };
    }

    async fn delete_secret(&self, name: &str) -> Result<()> {
        match self.secrets.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.api_error(e, "delete", "secrets", name)),
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

    /// Deletes the session's pod, service and secret (the PVC stays).
    async fn remove(&self, session_id: &SessionId) -> Result<()> {
        let name = self.pod_name(session_id);
        self.delete_pod(&name).await?;
        self.delete_service(&name).await?;
        self.remember_secret(session_id, None);
        self.delete_secret(&self.auth_secret_name(session_id))
            .await?;
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
                    let secret = self.ensure_session_secret(session_id).await?;
                    let manifest = self.pod_manifest(session_id);
                    match self.pods.create(&PostParams::default(), &manifest).await {
                        Ok(created) => {
                            // The pod starts with the Secret as it is now: its secret.
                            if let Some(uid) = created.metadata.uid {
                                self.remember_secret(session_id, Some((uid, secret)));
                            }
                            return Ok((self.wait_pod_ready(&name, deadline).await?, false));
                        }
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
        let endpoint = self
            .endpoint_of(&pod)
            .ok_or_else(|| {
                Error::internal(format!(
                    "pod {} is Ready without an address",
                    self.pod_name(session_id)
                ))
            })?
            .with_secret(self.secret_for(session_id, &pod).await?);
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
            .wait_ready(&endpoint, within)
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
        self.health.check(endpoint).await.is_some()
    }

    /// The API server answers for the namespace's pods, and the workers get a model.
    async fn check_setup(&self) -> Vec<SetupCheck> {
        let ns = &self.config.namespace;
        let mut checks = vec![
            match self.pods.list(&ListParams::default().limit(1)).await {
                Ok(_) => SetupCheck::ok(
                    "cluster",
                    format!("the Kubernetes API answers for namespace {ns}"),
                ),
                Err(e) => {
                    SetupCheck::problem("cluster", self.api_error(e, "list", "pods", ns).message())
                }
            },
        ];
        checks.push(match &self.config.worker_secret {
            Some(secret) => SetupCheck::ok(
                "model",
                format!("workers get the keys of the Secret {secret} (its content is not read)"),
            ),
            None => crate::common::model_setup(
                self.config.worker_env.iter().map(|(k, _)| k.as_str()),
                "in a Secret named by K8S_WORKER_SECRET",
            ),
        });
        checks
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        let pods = self.list_pods().await?;
        let checks = pods.into_iter().filter_map(|(session, pod)| {
            let endpoint = self.endpoint_of(&pod)?;
            let ready = is_ready(&pod);
            Some(async move {
                let secret = self.secret_for(&session, &pod).await.ok().flatten();
                let endpoint = endpoint.with_secret(secret);
                let healthy = ready && self.health.check(&endpoint).await.is_some();
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
        self.reap_idle_guarded(busy, &Unguarded).await
    }

    async fn reap_idle_guarded(
        &self,
        busy: &[SessionId],
        guard: &dyn ReapGuard,
    ) -> Result<Vec<SessionId>> {
        let ttl = self.config.idle_ttl;
        let mut reaped = Vec::new();
        let mut failed = None;
        for (session, pod) in self.list_pods().await? {
            if self.clock.idle_for(&session) < ttl || busy.contains(&session) {
                continue;
            }
            let health = match self.endpoint_of(&pod) {
                Some(e) if is_ready(&pod) => {
                    let secret = self.secret_for(&session, &pod).await.ok().flatten();
                    self.health.check(&e.with_secret(secret)).await
                }
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
            ) && guard.hold(&session).await
            {
                // Held: a task of the session that arrives from here on waits for the release.
                let removed = self.remove(&session).await;
                guard.release(&session).await;
                match removed {
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
