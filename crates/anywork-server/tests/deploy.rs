//! The deploy files as an operator applies them: deploy/k8s (three replicas on PostgreSQL,
//! probes on routes a real server answers without its token, graceful termination longer
//! than the server's shutdown grace, a PodDisruptionBudget, the driver's RBAC unchanged,
//! kustomization listing every manifest) and the two-replica compose example's proxy.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anywork_runtime::{DispatcherConfig, FirstWords};
use anywork_server::{ApiOptions, ApiToken};
use common::{TestServer, free_port};
use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of the kustomization, in its order, with the file each came from.
fn k8s_objects() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("k8s");
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .flat_map(|f| {
            let f = f.as_str().unwrap().to_owned();
            documents(&dir.join(&f))
                .into_iter()
                .map(move |o| (f.clone(), o))
        })
        .collect()
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the kustomization"))
}

fn seconds(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number of seconds: {v}"))
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_example() {
    let dir = deploy_dir().join("k8s");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .filter(|f| !f.contains("example"))
        .collect();
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, on_disk);
    // Every object is namespaced in `anywork` (the namespace itself aside).
    for (file, o) in k8s_objects() {
        if o["kind"] != "Namespace" {
            assert_eq!(o["metadata"]["namespace"], "anywork", "{file}: {o}");
        }
    }
}

#[test]
fn the_server_runs_three_replicas_on_postgresql() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "anywork-server");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    // A rollout never takes a serving replica away before its successor is Ready.
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let server = &containers[0];
    let env = server["env"].as_array().unwrap();
    let database_url = env
        .iter()
        .find(|e| e["name"] == "DATABASE_URL")
        .expect("DATABASE_URL is set");
    assert_eq!(
        database_url["valueFrom"]["secretKeyRef"],
        json!({"name": "anywork-database", "key": "DATABASE_URL"}),
        "the database URL (with its password) comes from a Secret"
    );
    assert!(database_url.get("value").is_none());
    // No replica holds data of its own: no claim is mounted (SQLite on a ReadWriteOnce
    // volume would serve one replica only).
    for v in pod["volumes"].as_array().unwrap() {
        assert!(
            v.get("persistentVolumeClaim").is_none(),
            "a replica mounts a claim: {v}"
        );
    }
    // The settings are one ConfigMap for all replicas, without secrets in it.
    let config = object(&objects, "ConfigMap", "anywork-server");
    for key in config["data"].as_object().unwrap().keys() {
        assert!(
            ![
                "DATABASE_URL",
                "ANYWORK_API_TOKEN",
                "API_KEY",
                "ANTHROPIC_API_KEY"
            ]
            .contains(&key.as_str()),
            "{key} belongs in a Secret"
        );
    }
    assert_eq!(config["data"]["CONTAINER_DRIVER"], "k8s");
    let from: Vec<&Value> = server["envFrom"].as_array().unwrap().iter().collect();
    assert!(
        from.iter()
            .any(|f| f["configMapRef"]["name"] == "anywork-server")
    );
    // Spread over nodes.
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
}

#[test]
fn termination_outlasts_the_shutdown_grace() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "anywork-server");
    let pod = &deployment["spec"]["template"]["spec"];
    let server = &pod["containers"][0];
    let config = object(&objects, "ConfigMap", "anywork-server");
    let shutdown_grace = seconds(&config["data"]["SHUTDOWN_GRACE_SECONDS"]);
    let pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop pause");
    assert_eq!(pre_stop[0], "sleep", "{pre_stop:?}");
    let pause = seconds(&pre_stop[1]);
    assert!(pause >= 2, "the pause lets the endpoints update: {pause}");
    let termination = seconds(&pod["terminationGracePeriodSeconds"]);
    // The kubelet's SIGKILL comes after the pause, the grace, and a margin to close.
    assert!(
        termination >= pause + shutdown_grace + 5,
        "terminationGracePeriodSeconds {termination} <= preStop {pause} + \
         SHUTDOWN_GRACE_SECONDS {shutdown_grace} + 5"
    );
    let lease = seconds(&config["data"]["LEASE_TTL_SECONDS"]);
    assert!(lease > 0);
}

#[test]
fn a_disruption_budget_keeps_a_majority_serving() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "anywork-server");
    let pdb = object(&objects, "PodDisruptionBudget", "anywork-server");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"],
        "the budget covers the server's pods"
    );
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    let left = match (
        pdb["spec"]["maxUnavailable"].as_u64(),
        pdb["spec"]["minAvailable"].as_u64(),
    ) {
        (Some(max), None) => replicas - max,
        (None, Some(min)) => min,
        other => panic!("one of maxUnavailable / minAvailable, as a count: {other:?}"),
    };
    assert!(
        left >= 2 && left < replicas,
        "a drain leaves {left} of {replicas}: it must leave a majority and still be possible"
    );
}

#[test]
fn the_rbac_is_exactly_the_drivers_calls() {
    let objects = k8s_objects();
    let role = object(&objects, "Role", "anywork-driver");
    let rules: Vec<(String, Vec<String>)> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            assert_eq!(r["apiGroups"], json!([""]), "{r}");
            let verbs: Vec<String> = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |res| (res.as_str().unwrap().to_owned(), verbs.clone()))
        })
        .collect();
    let expected = |r: &str, v: &[&str]| (r.to_owned(), v.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        rules,
        vec![
            expected("pods", &["get", "list", "create", "delete"]),
            expected("services", &["get", "create", "delete"]),
            expected("persistentvolumeclaims", &["create", "delete"]),
            expected("secrets", &["get", "create", "delete"]),
        ]
    );
    let binding = object(&objects, "RoleBinding", "anywork-driver");
    assert_eq!(binding["subjects"][0]["name"], "anywork-server");
    let deployment = object(&objects, "Deployment", "anywork-server");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "anywork-server"
    );
}

/// The probes name routes that a server with an API token (as the Deployment's is) answers
/// without it: a probe carries no token, and a 401 would keep every replica unready (or
/// restart it, for liveness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_reach_a_server_with_a_token() {
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "anywork-server");
    let server = &deployment["spec"]["template"]["spec"]["containers"][0];
    let config = object(&objects, "ConfigMap", "anywork-server");
    assert!(
        config["data"].get("ANYWORK_PROTECT_HEALTH").is_none(),
        "the readiness probe carries no token"
    );
    let port = &server["ports"][0];
    assert_eq!(port["name"], "http");
    assert_eq!(
        port["containerPort"].as_u64().map(|p| p.to_string()),
        config["data"]["SERVER_PORT"].as_str().map(str::to_owned),
        "the probes' port is the server's"
    );
    let readiness = &server["readinessProbe"]["httpGet"];
    let liveness = &server["livenessProbe"]["httpGet"];
    assert_eq!(readiness["port"], "http");
    assert_eq!(liveness["port"], "http");
    assert_ne!(
        readiness["path"], liveness["path"],
        "liveness is not readiness"
    );

    let mut options = ApiOptions::default();
    options.api_token = ApiToken::new("a-token-the-probes-do-not-have");
    let url = format!("http://127.0.0.1:{}", free_port());
    let running = TestServer::start_with_options(
        &url,
        DispatcherConfig::default(),
        FirstWords,
        options.clone(),
    )
    .await;
    let http = reqwest::Client::new();
    for probe in [readiness, liveness] {
        let path = probe["path"].as_str().unwrap();
        let r = http
            .get(format!("{}{path}", running.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} without the token");
    }
    // Readiness is the store check: it fails once the server shuts down (so the Service
    // stops routing to it during the preStop pause and the grace), liveness does not.
    running
        .state
        .dispatcher()
        .shutdown(std::time::Duration::ZERO)
        .await;
    let path = readiness["path"].as_str().unwrap();
    let r = http
        .get(format!("{}{path}", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{path} while shutting down");
    let path = liveness["path"].as_str().unwrap();
    let r = http
        .get(format!("{}{path}", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path} while shutting down");
}

/// The compose example: two servers with the same settings behind a proxy that upgrades
/// WebSockets. (`docker-compose config` checks the file's syntax in scripts/test.sh.)
#[test]
fn the_compose_replicas_share_one_database_behind_a_websocket_proxy() {
    let dir = deploy_dir();
    let compose = documents(&dir.join("docker-compose.replicas.yml")).remove(0);
    let services = compose["services"].as_object().unwrap();
    let servers: Vec<&String> = services
        .keys()
        .filter(|k| k.starts_with("server-"))
        .collect();
    assert_eq!(servers.len(), 2, "{servers:?}");
    // One settings block (a YAML merge key) for both: what must match does.
    let text = read(&dir.join("docker-compose.replicas.yml"));
    assert_eq!(text.matches("<<: *server").count(), 2);
    let base = &compose["x-server"];
    assert!(base["entrypoint"].to_string().contains("@postgres:5432/"));
    assert_eq!(base["environment"]["CONTAINER_DRIVER"], "docker");
    assert!(
        base["environment"].get("DATABASE_URL").is_none(),
        "the password is not in the environment compose shows"
    );
    assert!(services.contains_key("postgres"));
    let proxy = &services["proxy"];
    assert!(
        proxy["volumes"][0]
            .as_str()
            .unwrap()
            .contains("nginx.replicas.conf")
    );

    let nginx = read(&dir.join("nginx.replicas.conf"));
    for server in servers {
        assert!(nginx.contains(&format!("server {server}:3001")), "{server}");
    }
    for line in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_buffering off;",
    ] {
        assert!(nginx.contains(line), "nginx.replicas.conf lacks {line}");
    }
}
