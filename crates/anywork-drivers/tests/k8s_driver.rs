//! The Kubernetes driver against a fake API server that checks the exact requests.
#![cfg(feature = "k8s")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anywork_core::{ContainerDriver, ErrorKind, SessionId};
use anywork_drivers::k8s::{Addressing, K8sConfig, K8sDriver, WorkspaceStorage, kube};
use anywork_test::driver_conformance::{self, DriverSuite};
use anywork_test::fake_k8s::{FakeK8s, Fault, PodStart, RecordedRequest, Resource};
use serde_json::{Value, json};

const NS: &str = "anywork";
const IMAGE: &str = "ghcr.io/anywork/anywork-worker:test";
const PODS: &str = "/api/v1/namespaces/anywork/pods";
const SERVICES: &str = "/api/v1/namespaces/anywork/services";
const PVCS: &str = "/api/v1/namespaces/anywork/persistentvolumeclaims";
const SECRETS: &str = "/api/v1/namespaces/anywork/secrets";
const SELECTOR: &str = "app.kubernetes.io/managed-by=anywork,app.kubernetes.io/component=worker";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config() -> K8sConfig {
    let mut c = K8sConfig::new(NS, IMAGE);
    c.addressing = Addressing::PodIp;
    c.worker_port = free_port();
    c.ready_timeout = Duration::from_secs(10);
    c.health_timeout = Duration::from_secs(1);
    c.worker_secret = Some("anywork-model-keys".into());
    c.worker_env = vec![("MODEL".into(), "claude-test".into())];
    c
}

/// The configuration of `d`, for a second driver (a restarted server).
fn config_like(d: &K8sDriver) -> K8sConfig {
    d.config().clone()
}

fn client(url: &str) -> kube::Client {
    anywork_drivers::k8s::client_for(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn driver(fake: &FakeK8s, config: K8sConfig) -> K8sDriver {
    K8sDriver::with_client(client(fake.url()), config).unwrap()
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

/// `(method, path)` of each request, for whole-sequence assertions.
fn calls(reqs: &[RecordedRequest]) -> Vec<(String, String)> {
    reqs.iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect()
}

fn call(method: &str, path: &str) -> (String, String) {
    (method.to_owned(), path.to_owned())
}

/// Removes repeated polling `GET`s of one path that follow each other.
fn dedup_polls(mut c: Vec<(String, String)>) -> Vec<(String, String)> {
    c.dedup();
    c
}

/// The plain `value`s of a container's env (those taken from a Secret are left out).
fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_driver_conformance_suite() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.idle_ttl = Duration::from_secs(1);
    driver_conformance::run(
        DriverSuite::per_session().idle_ttl(Duration::from_secs(1)),
        || {
            let d = driver(&fake, c.clone());
            async move { Arc::new(d) as Arc<dyn ContainerDriver> }
        },
    )
    .await;
    // Everything the suite made was purged; with emptydir storage there never was a claim.
    assert!(fake.names(Resource::Pods, NS).is_empty());
    assert!(fake.names(Resource::Services, NS).is_empty());
    assert!(fake.names(Resource::PersistentVolumeClaims, NS).is_empty());
    assert!(
        fake.requests().iter().all(|r| !r.path.starts_with(PVCS)),
        "emptydir storage makes no claim requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_driver_conformance_suite_with_pvc_storage() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.idle_ttl = Duration::from_secs(1);
    c.storage = WorkspaceStorage::Pvc {
        storage_class: None,
        size: "1Gi".into(),
    };
    driver_conformance::run(
        DriverSuite::per_session().idle_ttl(Duration::from_secs(1)),
        || {
            let d = driver(&fake, c.clone());
            async move { Arc::new(d) as Arc<dyn ContainerDriver> }
        },
    )
    .await;
    assert!(
        fake.requests().iter().any(|r| r.is("POST", PVCS)),
        "the suite's sessions had claims"
    );
    // The suite purges every session it made: no pod, service or claim is left.
    assert!(fake.names(Resource::Pods, NS).is_empty());
    assert!(fake.names(Resource::Services, NS).is_empty());
    assert!(fake.names(Resource::PersistentVolumeClaims, NS).is_empty());
}

#[tokio::test]
async fn creates_a_locked_down_pod_and_an_owned_service() {
    let fake = FakeK8s::start().await;
    let c = config();
    let port = c.worker_port;
    let d = driver(&fake, c);
    let s = sid("Owner/Repo#12");
    let name = d.pod_name(&s);
    assert!(name.starts_with("anywork-owner-repo-12-"), "{name}");
    let pod_path = format!("{PODS}/{name}");
    let svc_path = format!("{SERVICES}/{name}");
    let secret_name = d.auth_secret_name(&s);
    assert_eq!(secret_name, format!("{name}-auth"));

    let w = d.get_worker(&s).await.unwrap();

    let reqs = fake.requests();
    assert_eq!(
        dedup_polls(calls(&reqs)),
        vec![
            call("GET", &pod_path),
            call("GET", &format!("{SECRETS}/{secret_name}")),
            call("POST", SECRETS),
            call("POST", PODS),
            call("GET", &pod_path),
            call("GET", &svc_path),
            call("POST", SERVICES),
        ],
        "no PVC with emptydir storage"
    );

    // The pod as sent.
    let pod = reqs
        .iter()
        .find(|r| r.is("POST", PODS))
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["name"], name.as_str());
    assert_eq!(pod["metadata"]["namespace"], NS);
    let slug = name.strip_prefix("anywork-").unwrap();
    assert_eq!(
        pod["metadata"]["labels"],
        json!({
            "app.kubernetes.io/managed-by": "anywork",
            "app.kubernetes.io/component": "worker",
            "anywork.dev/session": slug,
        })
    );
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({"anywork.dev/session-id": "Owner/Repo#12"})
    );
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Always");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(
        spec["securityContext"],
        json!({
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let ctr = &containers[0];
    assert_eq!(ctr["image"], IMAGE);
    assert_eq!(
        ctr["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
        })
    );
    assert_eq!(
        ctr["ports"],
        json!([{"name": "http", "containerPort": port, "protocol": "TCP"}])
    );
    assert_eq!(
        env_of(ctr),
        vec![
            ("WORKER_HOST".into(), "0.0.0.0".into()),
            ("WORKER_PORT".into(), port.to_string()),
            ("WORKSPACE_DIR".into(), "/workspace".into()),
            ("WORKER_SESSION_ID".into(), "Owner/Repo#12".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("HOME".into(), "/tmp".into()),
            ("MODEL".into(), "claude-test".into()),
        ]
    );
    assert_eq!(
        ctr["envFrom"],
        json!([{"secretRef": {"name": "anywork-model-keys", "optional": false}}])
    );
    // The worker's own secret comes from the session's Secret, created before the pod; the
    // pod spec names it and never holds the value.
    let worker_secret = w.secret.clone().expect("the endpoint carries the secret");
    assert_eq!(
        ctr["env"].as_array().unwrap().last().unwrap(),
        &json!({"name": "WORKER_SECRET", "valueFrom": {"secretKeyRef": {
            "name": secret_name, "key": "WORKER_SECRET", "optional": false}}})
    );
    assert!(!pod.to_string().contains(worker_secret.expose()));
    let sent = reqs
        .iter()
        .find(|r| r.is("POST", SECRETS))
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(sent["kind"], "Secret");
    assert_eq!(sent["type"], "Opaque");
    assert_eq!(sent["metadata"]["name"], secret_name.as_str());
    assert_eq!(sent["metadata"]["labels"], pod["metadata"]["labels"]);
    assert_eq!(
        sent["stringData"],
        json!({"WORKER_SECRET": worker_secret.expose()})
    );
    assert_eq!(worker_secret.expose().len(), 64);
    assert!(
        !format!("{w:?}").contains(worker_secret.expose()),
        "Debug redacts it"
    );
    assert!(
        !serde_json::to_string(&w)
            .unwrap()
            .contains(worker_secret.expose()),
        "never serialized"
    );
    assert_eq!(
        ctr["resources"],
        json!({
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        })
    );
    assert_eq!(
        ctr["readinessProbe"]["httpGet"],
        json!({"path": "/health", "port": "http"})
    );
    assert_eq!(
        ctr["livenessProbe"]["httpGet"],
        json!({"path": "/health", "port": "http"})
    );
    assert!(ctr["livenessProbe"]["failureThreshold"].as_i64().unwrap() >= 3);
    assert_eq!(
        ctr["volumeMounts"],
        json!([
            {"name": "workspace", "mountPath": "/workspace"},
            {"name": "tmp", "mountPath": "/tmp"},
        ])
    );
    assert_eq!(
        spec["volumes"],
        json!([
            {"name": "workspace", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ])
    );

    // The service, owned by the pod the API server made.
    let stored_pod = fake.object(Resource::Pods, NS, &name).unwrap();
    let uid = stored_pod["metadata"]["uid"].as_str().unwrap();
    let svc = reqs
        .iter()
        .find(|r| r.is("POST", SERVICES))
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(svc["metadata"]["name"], name.as_str());
    assert_eq!(
        svc["metadata"]["ownerReferences"],
        json!([{
            "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid,
            "blockOwnerDeletion": false, "controller": false,
        }])
    );
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app.kubernetes.io/managed-by": "anywork", "anywork.dev/session": slug})
    );
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}])
    );

    // The endpoint is the pod's IP, where its worker answers.
    let ip = stored_pod["status"]["podIP"].as_str().unwrap();
    assert_eq!(w.base_url, format!("http://{ip}:{port}"));
    assert_eq!(w.worker_id, name);
    assert!(d.is_healthy(&w).await);

    // Reuse costs two reads and creates nothing.
    fake.clear_requests();
    assert_eq!(d.get_worker(&s).await.unwrap(), w);
    assert_eq!(
        calls(&fake.requests()),
        vec![call("GET", &pod_path), call("GET", &svc_path)]
    );
    // A restarted server reads the secret back from the Secret.
    let again = driver(&fake, config_like(&d));
    assert_eq!(again.get_worker(&s).await.unwrap().secret, w.secret);

    // Deleting the pod (kubectl) garbage-collects its service.
    assert!(fake.delete(Resource::Pods, NS, &name));
    assert!(fake.object(Resource::Services, NS, &name).is_none());
    assert!(!d.is_healthy(&w).await, "the deleted pod's worker is gone");
}

#[tokio::test]
async fn pvc_storage_makes_a_claim_that_outlives_the_pod() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.storage = WorkspaceStorage::Pvc {
        storage_class: Some("fast-ssd".into()),
        size: "20Gi".into(),
    };
    let d = driver(&fake, c);
    let s = sid("pvc-session");
    let name = d.pod_name(&s);
    let pvc_name = d.pvc_name(&s);
    assert_eq!(pvc_name, format!("{name}-ws"));

    d.get_worker(&s).await.unwrap();
    let reqs = fake.requests();
    assert_eq!(
        dedup_polls(calls(&reqs))[..3],
        [
            call("GET", &format!("{PODS}/{name}")),
            call("POST", PVCS),
            call("GET", &format!("{SECRETS}/{name}-auth")),
        ],
        "the claim exists before the pod that mounts it"
    );
    let pvc = reqs
        .iter()
        .find(|r| r.is("POST", PVCS))
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(pvc["kind"], "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["name"], pvc_name.as_str());
    assert_eq!(
        pvc["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "anywork"
    );
    assert!(
        pvc["metadata"].get("ownerReferences").is_none(),
        "not owned by the pod: it must survive it"
    );
    assert_eq!(
        pvc["spec"],
        json!({
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "fast-ssd",
            "resources": {"requests": {"storage": "20Gi"}},
        })
    );
    let pod = reqs
        .iter()
        .find(|r| r.is("POST", PODS))
        .unwrap()
        .body
        .clone()
        .unwrap();
    assert_eq!(
        pod["spec"]["volumes"][0],
        json!({"name": "workspace", "persistentVolumeClaim": {"claimName": pvc_name, "readOnly": false}})
    );

    // Release deletes pod, service and secret, never the claim.
    fake.clear_requests();
    d.release(&s).await.unwrap();
    assert_eq!(
        calls(&fake.requests()),
        vec![
            call("DELETE", &format!("{PODS}/{name}")),
            call("DELETE", &format!("{SERVICES}/{name}")),
            call("DELETE", &format!("{SECRETS}/{name}-auth")),
        ]
    );
    assert!(fake.names(Resource::Secrets, NS).is_empty());
    assert!(fake.object(Resource::Pods, NS, &name).is_none());
    assert!(
        fake.object(Resource::PersistentVolumeClaims, NS, &pvc_name)
            .is_some()
    );

    // The next worker mounts the same claim (its create answers 409 and that is fine).
    let w = d.get_worker(&s).await.unwrap();
    assert!(d.is_healthy(&w).await);
    assert_eq!(
        fake.names(Resource::PersistentVolumeClaims, NS),
        vec![pvc_name]
    );
}

fn pvc_config() -> K8sConfig {
    let mut c = config();
    c.storage = WorkspaceStorage::Pvc {
        storage_class: None,
        size: "1Gi".into(),
    };
    c
}

#[tokio::test]
async fn purge_deletes_pod_service_and_claim() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, pvc_config());
    let s = sid("purged-session");
    let name = d.pod_name(&s);
    let pvc_name = d.pvc_name(&s);
    let w1 = d.get_worker(&s).await.unwrap();
    let old_claim = fake
        .object(Resource::PersistentVolumeClaims, NS, &pvc_name)
        .unwrap()["metadata"]["uid"]
        .clone();

    fake.clear_requests();
    d.purge(&s).await.unwrap();
    assert_eq!(
        calls(&fake.requests()),
        vec![
            call("DELETE", &format!("{PODS}/{name}")),
            call("DELETE", &format!("{SERVICES}/{name}")),
            call("DELETE", &format!("{SECRETS}/{name}-auth")),
            call("DELETE", &format!("{PVCS}/{pvc_name}")),
        ],
        "the claim is deleted after the pod that mounts it"
    );
    assert!(fake.object(Resource::Pods, NS, &name).is_none());
    assert!(fake.object(Resource::Services, NS, &name).is_none());
    assert!(
        fake.object(Resource::PersistentVolumeClaims, NS, &pvc_name)
            .is_none()
    );
    assert!(!d.is_healthy(&w1).await, "the purged worker is gone");

    // The session could start over: a new claim, not the old one.
    let w2 = d.get_worker(&s).await.unwrap();
    assert!(d.is_healthy(&w2).await);
    let new_claim = fake
        .object(Resource::PersistentVolumeClaims, NS, &pvc_name)
        .unwrap()["metadata"]["uid"]
        .clone();
    assert_ne!(new_claim, old_claim, "a fresh, empty workspace");
}

#[tokio::test]
async fn purge_tolerates_404_and_is_idempotent() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, pvc_config());
    let s = sid("never-created");
    let name = d.pod_name(&s);
    let expected = vec![
        call("DELETE", &format!("{PODS}/{name}")),
        call("DELETE", &format!("{SERVICES}/{name}")),
        call("DELETE", &format!("{SECRETS}/{name}-auth")),
        call("DELETE", &format!("{PVCS}/{}", d.pvc_name(&s))),
    ];
    d.purge(&s).await.unwrap();
    assert_eq!(calls(&fake.requests()), expected, "every object was absent");
    fake.clear_requests();
    d.purge(&s).await.unwrap();
    assert_eq!(
        calls(&fake.requests()),
        expected,
        "and purging again is fine"
    );
}

#[tokio::test]
async fn purge_with_emptydir_storage_makes_no_claim_request() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("emptydir-purge");
    let name = d.pod_name(&s);
    d.get_worker(&s).await.unwrap();
    fake.clear_requests();
    d.purge(&s).await.unwrap();
    assert_eq!(
        calls(&fake.requests()),
        vec![
            call("DELETE", &format!("{PODS}/{name}")),
            call("DELETE", &format!("{SERVICES}/{name}")),
            call("DELETE", &format!("{SECRETS}/{name}-auth")),
        ]
    );
    assert!(fake.names(Resource::Pods, NS).is_empty());
}

#[tokio::test]
async fn a_refused_claim_deletion_names_the_missing_permission() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, pvc_config());
    let s = sid("no-pvc-delete");
    d.get_worker(&s).await.unwrap();
    fake.inject(Fault::forbidden("DELETE", Resource::PersistentVolumeClaims));
    let e = d.purge(&s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("delete persistentvolumeclaims"), "{msg}");
    assert!(msg.contains("deploy/k8s/rbac.yaml"), "{msg}");
    // The worker went first; the claim is still there for the retry, which succeeds.
    assert!(fake.names(Resource::Pods, NS).is_empty());
    assert_eq!(
        fake.names(Resource::PersistentVolumeClaims, NS),
        vec![d.pvc_name(&s)]
    );
    d.purge(&s).await.unwrap();
    assert!(fake.names(Resource::PersistentVolumeClaims, NS).is_empty());
}

#[tokio::test]
async fn release_of_unknown_sessions_tolerates_404() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("never-created");
    d.release(&s).await.unwrap();
    let name = d.pod_name(&s);
    assert_eq!(
        calls(&fake.requests()),
        vec![
            call("DELETE", &format!("{PODS}/{name}")),
            call("DELETE", &format!("{SERVICES}/{name}")),
            call("DELETE", &format!("{SECRETS}/{name}-auth")),
        ]
    );
}

#[tokio::test]
async fn a_restarted_driver_lists_and_adopts_by_label_selector() {
    let fake = FakeK8s::start().await;
    let c = config();
    let first = driver(&fake, c.clone());
    let (a, b) = (sid("adopt-a"), sid("adopt-b"));
    let wa = first.get_worker(&a).await.unwrap();
    let wb = first.get_worker(&b).await.unwrap();
    // Someone else's pod in the namespace is not ours.
    fake.create(
        Resource::Pods,
        NS,
        json!({"metadata": {"name": "unrelated", "labels": {"app": "other"}},
               "spec": {"containers": [{"name": "x", "image": "busybox"}]}}),
    )
    .unwrap();

    let second = driver(&fake, c);
    fake.clear_requests();
    let mut listed = second.list().await.unwrap();
    let reqs = fake.requests();
    let mut secret_reads = vec![
        call("GET", &format!("{SECRETS}/{}", second.auth_secret_name(&a))),
        call("GET", &format!("{SECRETS}/{}", second.auth_secret_name(&b))),
    ];
    let mut read = calls(&reqs[1..]);
    secret_reads.sort();
    read.sort();
    assert_eq!(
        (calls(&reqs[..1]), read),
        (vec![call("GET", PODS)], secret_reads),
        "one list, then each worker's secret is read back"
    );
    assert_eq!(
        reqs[0].query_param("labelSelector").as_deref(),
        Some(SELECTOR)
    );
    listed.sort_by(|x, y| x.endpoint.worker_id.cmp(&y.endpoint.worker_id));
    let mut expected = vec![(wa.clone(), a.clone()), (wb, b)];
    expected.sort_by(|x, y| x.0.worker_id.cmp(&y.0.worker_id));
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (info, (w, s)) in listed.iter().zip(&expected) {
        assert_eq!(&info.endpoint, w);
        assert_eq!(info.session_id.as_ref(), Some(s));
        assert!(info.healthy);
    }
    // And reuses the pod instead of creating one.
    fake.clear_requests();
    assert_eq!(second.get_worker(&a).await.unwrap(), wa);
    assert!(fake.requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn a_409_from_a_concurrent_creator_is_adopted() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("raced");
    let name = d.pod_name(&s);
    fake.inject(Fault::concurrent_create(Resource::Pods));
    let w = d.get_worker(&s).await.unwrap();
    assert_eq!(w.worker_id, name);
    assert!(d.is_healthy(&w).await);
    let reqs = fake.requests();
    assert_eq!(reqs.iter().filter(|r| r.is("POST", PODS)).count(), 1);
    assert!(
        reqs.iter().all(|r| r.method != "DELETE"),
        "adopted, not replaced"
    );
    assert_eq!(fake.names(Resource::Pods, NS), vec![name]);
}

#[tokio::test]
async fn quota_refusal_is_rate_limited_with_a_clear_message() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("over-quota");
    fake.inject(Fault::quota(Resource::Pods));
    let e = d.get_worker(&s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited, "{e}");
    assert!(e.is_retryable());
    let msg = e.to_string();
    assert!(
        msg.contains("ResourceQuota") && msg.contains("exceeded quota"),
        "{msg}"
    );
    assert!(msg.contains("namespace anywork"), "{msg}");
    assert!(fake.names(Resource::Pods, NS).is_empty());
    // Once the quota allows it again, the same call works.
    d.get_worker(&s).await.unwrap();
}

#[tokio::test]
async fn rbac_refusal_says_which_permission_is_missing() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    fake.inject(Fault::forbidden("POST", Resource::Services));
    let e = d.get_worker(&sid("no-rbac")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("create services"), "{msg}");
    assert!(msg.contains("deploy/k8s/rbac.yaml"), "{msg}");
}

#[tokio::test]
async fn a_missing_namespace_is_named() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.namespace = "does-not-exist".into();
    let d = driver(&fake, c);
    let e = d.get_worker(&sid("s")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("does-not-exist"), "{e}");
    assert!(e.to_string().contains("K8S_NAMESPACE"), "{e}");
    let e = d.list().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable() {
    let port = free_port();
    let d = K8sDriver::with_client(client(&format!("http://127.0.0.1:{port}")), config()).unwrap();
    let e = d.get_worker(&sid("s")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(
        e.to_string()
            .contains("cannot reach the Kubernetes API server"),
        "{e}"
    );
}

#[tokio::test]
async fn waits_for_slow_readiness_by_polling() {
    let fake = FakeK8s::start().await;
    fake.set_pod_start(PodStart::Ready(Duration::from_millis(700)));
    let d = driver(&fake, config());
    let s = sid("slow");
    let started = Instant::now();
    let w = d.get_worker(&s).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(d.is_healthy(&w).await);
    let pod_path = format!("{PODS}/{}", d.pod_name(&s));
    let polls = fake
        .requests()
        .iter()
        .filter(|r| r.is("GET", &pod_path))
        .count();
    assert!(polls >= 3, "one lookup, then polls until Ready: {polls}");
}

#[tokio::test]
async fn a_pod_that_never_becomes_ready_times_out_with_its_state() {
    let fake = FakeK8s::start().await;
    fake.set_pod_start(PodStart::NeverReady);
    let mut c = config();
    c.ready_timeout = Duration::from_millis(400);
    let d = driver(&fake, c);
    let e = d.get_worker(&sid("stuck")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("ContainerCreating"), "{msg}");
    assert!(msg.contains("K8S_READY_TIMEOUT_SECONDS"), "{msg}");
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_fast() {
    let fake = FakeK8s::start().await;
    fake.set_pod_start(PodStart::ImagePullBackOff(Duration::from_millis(20)));
    // A ready timeout of an hour: an answer at all (and not a Timeout) is the pull failure
    // being seen, not the wait running out. The outer bound only keeps a broken driver from
    // hanging the suite.
    let mut c = config();
    c.ready_timeout = Duration::from_secs(3600);
    let d = driver(&fake, c);
    let e = tokio::time::timeout(Duration::from_secs(600), d.get_worker(&sid("bad-image")))
        .await
        .expect("the driver waited for the ready timeout instead of failing on the pull")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("K8S_WORKER_IMAGE"), "{e}");
    assert!(e.to_string().contains(IMAGE), "{e}");
}

#[tokio::test]
async fn a_failed_pod_is_replaced() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("evicted");
    let name = d.pod_name(&s);
    let w1 = d.get_worker(&s).await.unwrap();
    let uid1 = fake.object(Resource::Pods, NS, &name).unwrap()["metadata"]["uid"].clone();
    assert!(fake.set_pod_phase(NS, &name, "Failed"));
    fake.clear_requests();

    let w2 = d.get_worker(&s).await.unwrap();
    let seq = dedup_polls(calls(&fake.requests()));
    let pod_path = format!("{PODS}/{name}");
    // The worker secret is read from the API before the new pod, not remembered: another
    // server may have replaced the Secret since.
    assert_eq!(
        seq[..5],
        [
            call("GET", &pod_path),
            call("DELETE", &pod_path),
            call("GET", &pod_path),
            call("GET", &format!("{SECRETS}/{name}-auth")),
            call("POST", PODS),
        ]
    );
    let uid2 = fake.object(Resource::Pods, NS, &name).unwrap()["metadata"]["uid"].clone();
    assert_ne!(uid1, uid2);
    assert!(d.is_healthy(&w2).await);
    assert!(!d.is_healthy(&w1).await);
    // The old service went with the old pod; the new one is owned by the new pod.
    let svc = fake.object(Resource::Services, NS, &name).unwrap();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], uid2);
}

#[tokio::test]
async fn get_worker_after_release_waits_for_the_terminating_pod() {
    let fake = FakeK8s::start().await;
    fake.set_delete_delay(Duration::from_millis(500));
    let d = driver(&fake, config());
    let s = sid("terminating");
    let name = d.pod_name(&s);
    let w1 = d.get_worker(&s).await.unwrap();
    d.release(&s).await.unwrap();
    assert!(
        fake.object(Resource::Pods, NS, &name).unwrap()["metadata"]["deletionTimestamp"]
            .is_string()
    );
    assert!(
        d.list().await.unwrap().is_empty(),
        "a terminating pod is not listed"
    );
    assert!(!d.is_healthy(&w1).await);
    let started = Instant::now();
    let w2 = d.get_worker(&s).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the old pod"
    );
    assert!(d.is_healthy(&w2).await);
}

#[tokio::test]
async fn a_stale_service_of_an_earlier_pod_is_replaced() {
    let fake = FakeK8s::start().await;
    let d = driver(&fake, config());
    let s = sid("stale-svc");
    let name = d.pod_name(&s);
    let mut stale = serde_json::to_value(d.service_manifest(&s, "uid-of-a-dead-pod")).unwrap();
    stale["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    fake.create(Resource::Services, NS, stale).unwrap();

    d.get_worker(&s).await.unwrap();
    let uid = fake.object(Resource::Pods, NS, &name).unwrap()["metadata"]["uid"].clone();
    let svc = fake.object(Resource::Services, NS, &name).unwrap();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], uid);
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.is("DELETE", &format!("{SERVICES}/{name}")))
    );
}

#[tokio::test]
async fn a_ready_pod_whose_worker_does_not_answer_is_unavailable() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.ready_timeout = Duration::from_secs(1);
    c.health_timeout = Duration::from_millis(200);
    let d = driver(&fake, c);
    let s = sid("hung");
    d.get_worker(&s).await.unwrap();
    assert!(fake.stop_worker(NS, &d.pod_name(&s)));
    let e = d.get_worker(&s).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("/health"), "{e}");
    assert!(e.to_string().contains("K8S_WORKER_ADDRESS"), "{e}");
    let listed = d.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].healthy);
}

#[tokio::test]
async fn the_reaper_spares_workers_that_report_a_busy_session() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.idle_ttl = Duration::from_millis(300);
    let d = driver(&fake, c);
    let s = sid("long-task");
    let name = d.pod_name(&s);
    d.get_worker(&s).await.unwrap();
    assert!(fake.set_busy(NS, &name, vec![s.clone()]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(d.reap_idle(&[]).await.unwrap(), Vec::<SessionId>::new());
    assert!(fake.object(Resource::Pods, NS, &name).is_some());

    assert!(fake.set_busy(NS, &name, vec![]));
    fake.clear_requests();
    assert_eq!(d.reap_idle(&[]).await.unwrap(), vec![s.clone()]);
    let reqs = fake.requests();
    assert_eq!(
        calls(&reqs),
        vec![
            call("GET", PODS),
            call("DELETE", &format!("{PODS}/{name}")),
            call("DELETE", &format!("{SERVICES}/{name}")),
            call("DELETE", &format!("{SECRETS}/{name}-auth")),
        ]
    );
    assert_eq!(
        reqs[0].query_param("labelSelector").as_deref(),
        Some(SELECTOR)
    );
    assert!(fake.object(Resource::Pods, NS, &name).is_none());
}

#[tokio::test]
async fn service_addressing_uses_cluster_dns_names() {
    let fake = FakeK8s::start().await;
    let first = driver(&fake, config());
    let s = sid("dns");
    first.get_worker(&s).await.unwrap();
    let mut c = config();
    c.addressing = Addressing::Service;
    c.worker_port = 8080;
    let d = driver(&fake, c);
    let listed = d.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let name = d.pod_name(&s);
    assert_eq!(
        listed[0].endpoint.base_url,
        format!("http://{name}.anywork.svc:8080")
    );
}

#[tokio::test]
async fn config_from_env_builds_a_working_driver() {
    let fake = FakeK8s::start().await;
    let port = free_port().to_string();
    let vars = [
        ("K8S_NAMESPACE", "anywork"),
        ("K8S_WORKER_IMAGE", IMAGE),
        ("K8S_WORKER_ADDRESS", "pod-ip"),
        ("K8S_WORKER_PORT", port.as_str()),
        ("K8S_WORKSPACE_STORAGE", "pvc"),
        ("K8S_STORAGE_SIZE", "1Gi"),
        ("K8S_MEMORY_LIMIT", "4Gi"),
    ];
    let c = K8sConfig::from_lookup(|name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    let d = driver(&fake, c);
    let s = sid("from-env");
    let w = d.get_worker(&s).await.unwrap();
    assert!(w.base_url.ends_with(&format!(":{port}")));
    let pod = fake.object(Resource::Pods, NS, &d.pod_name(&s)).unwrap();
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["memory"],
        "4Gi"
    );
    assert!(
        fake.object(Resource::PersistentVolumeClaims, NS, &d.pvc_name(&s))
            .is_some()
    );
}

/// `(resource, verb)` pairs granted by the Role in `deploy/k8s/rbac.yaml`.
fn granted_by_rbac_yaml() -> std::collections::BTreeSet<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/k8s/rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let quoted = |line: &str| -> Vec<String> {
        line.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let mut granted = std::collections::BTreeSet::new();
    let mut resources: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("resources:") {
            resources = quoted(line);
        } else if line.starts_with("verbs:") {
            for r in &resources {
                for v in quoted(line) {
                    granted.insert((r.clone(), v));
                }
            }
        }
    }
    granted
}

#[tokio::test]
async fn rbac_yaml_grants_exactly_the_calls_the_driver_makes() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.storage = WorkspaceStorage::Pvc {
        storage_class: None,
        size: "1Gi".into(),
    };
    c.idle_ttl = Duration::from_millis(200);
    let d = driver(&fake, c);
    let s = sid("rbac-scenario");
    // Every path: a stale service replaced, creation with a claim, reuse, listing, reaping,
    // releasing, purging.
    let mut stale = serde_json::to_value(d.service_manifest(&s, "old-uid")).unwrap();
    stale["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    fake.create(Resource::Services, NS, stale).unwrap();
    d.get_worker(&s).await.unwrap();
    d.get_worker(&s).await.unwrap();
    assert_eq!(d.list().await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(d.reap_idle(&[]).await.unwrap(), vec![s.clone()]);
    d.get_worker(&s).await.unwrap();
    d.release(&s).await.unwrap();
    d.get_worker(&s).await.unwrap();
    d.purge(&s).await.unwrap();

    let used: std::collections::BTreeSet<(String, String)> = fake
        .requests()
        .iter()
        .map(|r| {
            let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
            let resource = parts[4].to_owned();
            let verb = match (r.method.as_str(), parts.len()) {
                ("GET", 5) => "list",
                ("GET", _) => "get",
                ("POST", _) => "create",
                ("DELETE", _) => "delete",
                (m, _) => panic!("unexpected method {m}"),
            };
            (resource, verb.to_owned())
        })
        .collect();
    assert_eq!(
        used,
        granted_by_rbac_yaml(),
        "rbac.yaml drifted from the driver"
    );
}

#[tokio::test]
async fn one_failed_deletion_does_not_stop_the_reaper() {
    let fake = FakeK8s::start().await;
    let mut c = config();
    c.idle_ttl = Duration::from_millis(200);
    let d = driver(&fake, c);
    let (a, b) = (sid("reap-a"), sid("reap-b"));
    d.get_worker(&a).await.unwrap();
    d.get_worker(&b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    fake.inject(Fault::forbidden("DELETE", Resource::Pods));
    let first = d.reap_idle(&[]).await.unwrap();
    assert_eq!(first.len(), 1, "one deletion was refused: {first:?}");
    let second = d.reap_idle(&[]).await.unwrap();
    assert_eq!(second.len(), 1, "the refused one is retried: {second:?}");
    assert_ne!(first, second);
    assert!(fake.names(Resource::Pods, NS).is_empty());

    // When every deletion fails, the error says why.
    d.get_worker(&a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    fake.inject(Fault::forbidden("DELETE", Resource::Pods));
    let e = d.reap_idle(&[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(e.to_string().contains("delete pods"), "{e}");
}
