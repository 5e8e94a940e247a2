//! The objects the driver creates (Pod, Service, workspace claim), its labels and names:
//! pure functions of the configuration and the session, no API calls.

use std::collections::BTreeMap;

use anywork_core::SessionId;
use anywork_core::worker_api::HEALTH_PATH;
use anywork_core::worker_api::WorkerSecret;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretEnvSource, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::common::session_slug;

use super::K8sDriver;
use super::config::WorkspaceStorage;

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
/// The key of the worker's secret in its session's Secret, and the variable it becomes.
pub const WORKER_SECRET_KEY: &str = "WORKER_SECRET";

impl K8sDriver {
    /// The name of `session_id`'s Pod and Service.
    pub fn pod_name(&self, session_id: &SessionId) -> String {
        format!("{}{}", self.config.name_prefix, session_slug(session_id))
    }

    /// The name of `session_id`'s workspace claim (with `pvc` storage).
    pub fn pvc_name(&self, session_id: &SessionId) -> String {
        format!("{}-ws", self.pod_name(session_id))
    }

    /// The name of `session_id`'s Secret holding its worker's secret.
    pub fn auth_secret_name(&self, session_id: &SessionId) -> String {
        format!("{}-auth", self.pod_name(session_id))
    }

    /// The Secret the driver creates for `session_id`: its worker's secret under
    /// [`WORKER_SECRET_KEY`], which the pod takes as an env var (`secretKeyRef`).
    pub fn auth_secret_manifest(&self, session_id: &SessionId, secret: &WorkerSecret) -> Secret {
        Secret {
            metadata: self.meta(self.auth_secret_name(session_id), session_id),
            string_data: Some(BTreeMap::from([(
                WORKER_SECRET_KEY.to_owned(),
                secret.expose().to_owned(),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        }
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
            env_var(anywork_core::worker_api::SESSION_ENV, session_id.as_str()),
            env_var("TMPDIR", "/tmp"),
            // The image's home is on the read-only root filesystem.
            env_var("HOME", "/tmp"),
        ];
        env.extend(
            c.worker_env
                .iter()
                .filter(|(k, _)| {
                    k != WORKER_SECRET_KEY
                        && k != "WORKER_SECRET_FILE"
                        && k != anywork_core::worker_api::SESSION_ENV
                })
                .map(|(k, v)| env_var(k, v)),
        );
        env.push(EnvVar {
            name: WORKER_SECRET_KEY.to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: self.auth_secret_name(session_id),
                    key: WORKER_SECRET_KEY.to_owned(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        });
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
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}
