//! A fake Kubernetes API server on loopback: pods, services, persistentvolumeclaims and secrets
//! in namespaces, in memory, answering as the real API does, and recording every request.
//!
//! What it implements, under
//! `/api/v1/namespaces/{ns}/{pods|services|persistentvolumeclaims|secrets}`:
//!
//! - `POST` on a collection creates (201): `uid`, `resourceVersion`, `creationTimestamp` are
//!   set, names and label values are validated (422 `Invalid`), an existing name answers 409
//!   `AlreadyExists`, an unknown namespace 404 `NotFound`;
//! - `GET` on a collection lists, filtered by `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`,
//!   `!k`, comma-separated), with the list's `resourceVersion`;
//! - `GET` and `DELETE` on an object (404 `NotFound` when it is not there). Deleting an object
//!   garbage-collects the objects whose `ownerReferences` name its uid.
//!
//! Errors are `Status` objects (`{"kind":"Status","status":"Failure","reason":…,"code":…}`).
//!
//! A secret's `stringData` is stored base64-encoded in `data`, as the API server does. A pod
//! whose container takes an env var from a secret that does not exist (`secretKeyRef`) stays
//! waiting in `CreateContainerConfigError`, as the kubelet leaves it.
//!
//! A created pod is `Pending`; after [`FakeK8s::set_pod_start`]'s delay it becomes `Running`
//! and `Ready` — and then a tiny worker answering `GET /health` (a [`WorkerHealth`]
//! document, with `idle_ms`) and `GET /sessions/{id}/messages`, and requiring the
//! secret of its `WORKER_SECRET` variable as the real worker does, listens on a loopback
//! address of its own (`127.x.y.z`, all of 127/8 being local on Linux) at the pod's first
//! container port, which becomes the pod's
//! `podIP`. Deleting the pod stops that worker, so a driver's released worker really stops
//! answering. Every connection to it is closed after one answer (no keep-alive survives).
//!
//! Failures are injected with [`FakeK8s::inject`] ([`Fault`]): a Status answer (quota, RBAC,
//! …) for the next matching requests, or a concurrent creator that makes the object just
//! before the driver's `POST` (which then gets 409).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anywork_core::SessionId;
use anywork_core::worker_api::{HEALTH_PATH, SECRET_HEADER, WorkerHealth};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The kinds of object the fake keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `pods`
    Pods,
    /// `services`
    Services,
    /// `persistentvolumeclaims`
    PersistentVolumeClaims,
    /// `secrets`
    Secrets,
}

impl Resource {
    /// The plural used in paths.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Services => "services",
            Resource::PersistentVolumeClaims => "persistentvolumeclaims",
            Resource::Secrets => "secrets",
        }
    }

    /// The `kind` of one object.
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Services => "Service",
            Resource::PersistentVolumeClaims => "PersistentVolumeClaim",
            Resource::Secrets => "Secret",
        }
    }

    fn from_plural(s: &str) -> Option<Self> {
        [
            Resource::Pods,
            Resource::Services,
            Resource::PersistentVolumeClaims,
            Resource::Secrets,
        ]
        .into_iter()
        .find(|r| r.plural() == s)
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// `GET`, `POST`, `DELETE`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The body as JSON, if it had one that parsed.
    pub body: Option<Value>,
}

impl RecordedRequest {
    /// The decoded value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        parse_query(self.query.as_deref()?).remove(name)
    }

    /// Whether this is `method` on exactly `path`.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// How a created pod starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodStart {
    /// Running and Ready (and its worker answering) after this delay.
    Ready(Duration),
    /// Pending forever, its container `ContainerCreating`.
    NeverReady,
    /// After this delay, its container waits in `ImagePullBackOff`.
    ImagePullBackOff(Duration),
}

/// What an injected fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with a Status of this code, reason and message.
    Status {
        /// HTTP code.
        code: u16,
        /// `Forbidden`, `AlreadyExists`, …
        reason: String,
        /// The message.
        message: String,
    },
    /// For a `POST`: create the object as a concurrent creator would, then answer 409
    /// `AlreadyExists` as the real API does to the second creator.
    ConcurrentCreate,
}

/// A failure injected for the next `times` requests of `method` on `resource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `GET`, `POST`, `DELETE`.
    pub method: String,
    /// Which collection.
    pub resource: Resource,
    /// How many matching requests it applies to.
    pub times: usize,
    /// What happens.
    pub action: FaultAction,
}

impl Fault {
    /// The next `POST` of `resource` is refused by a ResourceQuota (403 Forbidden).
    pub fn quota(resource: Resource) -> Self {
        Self {
            method: "POST".into(),
            resource,
            times: 1,
            action: FaultAction::Status {
                code: 403,
                reason: "Forbidden".into(),
                message: format!(
                    "{} is forbidden: exceeded quota: compute-resources, requested: \
                     limits.cpu=2, used: limits.cpu=8, limited: limits.cpu=8",
                    resource.plural()
                ),
            },
        }
    }

    /// The next `method` on `resource` is refused by RBAC (403 Forbidden).
    pub fn forbidden(method: &str, resource: Resource) -> Self {
        let verb = match method {
            "POST" => "create",
            "DELETE" => "delete",
            _ => "get",
        };
        Self {
            method: method.into(),
            resource,
            times: 1,
            action: FaultAction::Status {
                code: 403,
                reason: "Forbidden".into(),
                message: format!(
                    "{} is forbidden: User \"system:serviceaccount:anywork:anywork-server\" \
                     cannot {verb} resource \"{}\" in API group \"\"",
                    resource.plural(),
                    resource.plural()
                ),
            },
        }
    }

    /// The next `POST` of `resource` races a concurrent creator and loses (409).
    pub fn concurrent_create(resource: Resource) -> Self {
        Self {
            method: "POST".into(),
            resource,
            times: 1,
            action: FaultAction::ConcurrentCreate,
        }
    }

    /// Applies to the next `times` matching requests instead of one.
    pub fn times(mut self, times: usize) -> Self {
        self.times = times;
        self
    }
}

/// A worker's `/health` on a loopback address; dropping it stops it.
struct FakeWorker {
    addr: SocketAddr,
    busy: Arc<Mutex<Vec<SessionId>>>,
    task: JoinHandle<()>,
}

/// What a fake pod's worker knows: its secret (from its `WORKER_SECRET` variable, resolved
/// from the Secret at start as the kubelet does), its busy sessions, and when it was last
/// used.
#[derive(Debug)]
struct WorkerCore {
    secret: Option<String>,
    busy: Arc<Mutex<Vec<SessionId>>>,
    last_used: Mutex<std::time::Instant>,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Key = (Resource, String, String);

struct FakeState {
    namespaces: BTreeSet<String>,
    objects: BTreeMap<Key, Value>,
    resource_version: u64,
    requests: Vec<RecordedRequest>,
    faults: Vec<Fault>,
    pod_start: PodStart,
    delete_delay: Duration,
    /// By pod uid.
    workers: HashMap<String, FakeWorker>,
    next_cluster_ip: u32,
}

struct Shared {
    state: Mutex<FakeState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stops (with every fake worker) when dropped.
pub struct FakeK8s {
    url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeK8s {
    fn drop(&mut self) {
        self.server.abort();
        self.shared.lock().workers.clear();
    }
}

impl FakeK8s {
    /// Starts a fake with the namespaces `default` and `anywork`, pods Ready after 50 ms.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(FakeState {
                namespaces: ["default", "anywork"].map(String::from).into(),
                objects: BTreeMap::new(),
                resource_version: 1000,
                requests: Vec::new(),
                faults: Vec::new(),
                pod_start: PodStart::Ready(Duration::from_millis(50)),
                delete_delay: Duration::ZERO,
                workers: HashMap::new(),
                next_cluster_ip: 10,
            }),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Kubernetes API server");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Adds a namespace.
    pub fn add_namespace(&self, ns: &str) {
        self.shared.lock().namespaces.insert(ns.to_owned());
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// How pods created from now on start.
    pub fn set_pod_start(&self, start: PodStart) {
        self.shared.lock().pod_start = start;
    }

    /// Deleted pods stay, terminating (`deletionTimestamp` set, worker stopped), this long.
    pub fn set_delete_delay(&self, delay: Duration) {
        self.shared.lock().delete_delay = delay;
    }

    /// Injects a failure.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(fault);
    }

    /// The stored object, as the API would return it.
    pub fn object(&self, resource: Resource, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(resource, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The names of the stored objects of `resource` in `ns`.
    pub fn names(&self, resource: Resource, ns: &str) -> Vec<String> {
        self.shared
            .lock()
            .objects
            .keys()
            .filter(|(r, n, _)| *r == resource && n == ns)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    /// Stores `object` as if someone else created it (answers like a `POST` would).
    pub fn create(&self, resource: Resource, ns: &str, object: Value) -> Result<Value, Value> {
        create_object(&self.shared, resource, ns, object).map_err(|(_, status)| status)
    }

    /// Deletes an object as `kubectl delete` would (with garbage collection of dependents).
    pub fn delete(&self, resource: Resource, ns: &str, name: &str) -> bool {
        delete_object(&self.shared, resource, ns, name).is_ok()
    }

    /// The address of the pod's fake worker, while it runs.
    pub fn worker_addr(&self, ns: &str, pod: &str) -> Option<SocketAddr> {
        let st = self.shared.lock();
        let uid = uid_of(
            st.objects
                .get(&(Resource::Pods, ns.to_owned(), pod.to_owned()))?,
        )?;
        st.workers.get(&uid).map(|w| w.addr)
    }

    /// Sets the `busy_sessions` the pod's worker reports on `/health`.
    pub fn set_busy(&self, ns: &str, pod: &str, busy: Vec<SessionId>) -> bool {
        let st = self.shared.lock();
        let Some(uid) = st
            .objects
            .get(&(Resource::Pods, ns.to_owned(), pod.to_owned()))
            .and_then(uid_of)
        else {
            return false;
        };
        match st.workers.get(&uid) {
            Some(w) => {
                *w.busy.lock().unwrap_or_else(|e| e.into_inner()) = busy;
                true
            }
            None => false,
        }
    }

    /// Stops the pod's worker while the pod stays Running and Ready (a hung worker).
    pub fn stop_worker(&self, ns: &str, pod: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(uid) = st
            .objects
            .get(&(Resource::Pods, ns.to_owned(), pod.to_owned()))
            .and_then(uid_of)
        else {
            return false;
        };
        st.workers.remove(&uid).is_some()
    }

    /// Sets a pod's phase (`Failed`, `Succeeded`: an evicted or exited pod), marks it not
    /// Ready and stops its worker.
    pub fn set_pod_phase(&self, ns: &str, pod: &str, phase: &str) -> bool {
        let mut st = self.shared.lock();
        let key = (Resource::Pods, ns.to_owned(), pod.to_owned());
        let Some(obj) = st.objects.get_mut(&key) else {
            return false;
        };
        obj["status"]["phase"] = json!(phase);
        obj["status"]["reason"] = json!("Evicted");
        obj["status"]["message"] = json!("The node was low on resource: memory.");
        if let Some(conds) = obj["status"]["conditions"].as_array_mut() {
            for c in conds {
                if c["type"] == "Ready" || c["type"] == "ContainersReady" {
                    c["status"] = json!("False");
                }
            }
        }
        let uid = uid_of(obj);
        if let Some(uid) = uid {
            st.workers.remove(&uid);
        }
        true
    }
}

fn uid_of(obj: &Value) -> Option<String> {
    obj["metadata"]["uid"].as_str().map(str::to_owned)
}

fn status(code: u16, reason: &str, message: String, details: Value) -> (StatusCode, Value) {
    let code_status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code_status,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": details,
            "code": code,
        }),
    )
}

fn not_found(resource: &str, name: &str) -> (StatusCode, Value) {
    status(
        404,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        json!({"name": name, "kind": resource}),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body_json: Option<Value> = serde_json::from_slice(&body).ok();
    let query = uri.query().map(str::to_owned);
    shared.lock().requests.push(RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: query.clone(),
        body: body_json.clone(),
    });
    let (code, value) = route(
        &shared,
        &method,
        uri.path(),
        query.as_deref(),
        &body,
        body_json,
    );
    json_response(code, &value)
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    raw_body: &[u8],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (ns, resource, name) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, plural] => (*ns, *plural, None),
        ["api", "v1", "namespaces", ns, plural, name] => (*ns, *plural, Some(*name)),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                json!({}),
            );
        }
    };
    let Some(resource) = Resource::from_plural(resource) else {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({resource})"),
            json!({}),
        );
    };
    // Injected faults come first.
    let fault = {
        let mut st = shared.lock();
        let found = st
            .faults
            .iter_mut()
            .find(|f| f.times > 0 && f.resource == resource && f.method == method.as_str());
        found.map(|f| {
            f.times -= 1;
            f.action.clone()
        })
    };
    match fault {
        Some(FaultAction::Status {
            code,
            reason,
            message,
        }) => return status(code, &reason, message, json!({"kind": resource.plural()})),
        Some(FaultAction::ConcurrentCreate) if *method == Method::POST => {
            if let Some(b) = body.clone() {
                let _ = create_object(shared, resource, ns, b);
            }
        }
        _ => {}
    }
    if !shared.lock().namespaces.contains(ns) {
        return status(
            404,
            "NotFound",
            format!("namespaces \"{ns}\" not found"),
            json!({"name": ns, "kind": "namespaces"}),
        );
    }
    match (method.clone(), name) {
        (Method::GET, None) => list(shared, resource, ns, query),
        (Method::POST, None) => {
            let Some(body) = body else {
                return status(
                    400,
                    "BadRequest",
                    format!(
                        "the body of the request could not be read as JSON ({} bytes)",
                        raw_body.len()
                    ),
                    json!({}),
                );
            };
            match create_object(shared, resource, ns, body) {
                Ok(obj) => (StatusCode::CREATED, obj),
                Err(e) => e,
            }
        }
        (Method::GET, Some(name)) => {
            let st = shared.lock();
            match st.objects.get(&(resource, ns.to_owned(), name.to_owned())) {
                Some(obj) => (StatusCode::OK, obj.clone()),
                None => not_found(resource.plural(), name),
            }
        }
        (Method::DELETE, Some(name)) => match delete_object(shared, resource, ns, name) {
            Ok(obj) => (StatusCode::OK, obj),
            Err(e) => e,
        },
        _ => status(
            405,
            "MethodNotAllowed",
            format!("the fake does not support {method} on {path}"),
            json!({}),
        ),
    }
}

fn list(
    shared: &Arc<Shared>,
    resource: Resource,
    ns: &str,
    query: Option<&str>,
) -> (StatusCode, Value) {
    let selector = query
        .map(parse_query)
        .and_then(|mut q| q.remove("labelSelector"))
        .unwrap_or_default();
    let requirements = match parse_selector(&selector) {
        Ok(r) => r,
        Err(e) => {
            return status(
                400,
                "BadRequest",
                format!("unable to parse requirement: {e}"),
                json!({}),
            );
        }
    };
    let st = shared.lock();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((r, n, _), _)| *r == resource && n == ns)
        .map(|(_, obj)| obj)
        .filter(|obj| {
            requirements
                .iter()
                .all(|req| req.matches(&obj["metadata"]["labels"]))
        })
        .cloned()
        .collect();
    (
        StatusCode::OK,
        json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": st.resource_version.to_string()},
            "items": items,
        }),
    )
}

enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        }
    }
}

fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains(' ') || term.contains('(') {
            return Err(format!(
                "set-based requirement {term:?} is not supported by the fake"
            ));
        }
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.into(), v.into())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Equals(k.into(), v.into())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Equals(k.into(), v.into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.into())
        } else {
            Requirement::Exists(term.into())
        };
        let key = match &req {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if key.is_empty() {
            return Err(format!("{term:?} has an empty key"));
        }
        out.push(req);
    }
    Ok(out)
}

/// `a%2Fb=c&d=e` → {a/b: c, d: e}
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3339 UTC time, second precision, as the API writes it.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

/// A DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, at most 253.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label value: at most 63, `[A-Za-z0-9]` at both ends, `-_.` inside.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn invalid(resource: Resource, name: &str, field: &str, why: String) -> (StatusCode, Value) {
    status(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {field}: {why}", resource.kind()),
        json!({"name": name, "kind": resource.plural(), "causes": [{"field": field, "message": why}]}),
    )
}

fn validate(resource: Resource, ns: &str, obj: &Value) -> Result<String, (StatusCode, Value)> {
    if let Some(kind) = obj["kind"].as_str()
        && kind != resource.kind()
    {
        return Err(status(
            400,
            "BadRequest",
            format!(
                "the kind {kind:?} does not match the collection {}",
                resource.plural()
            ),
            json!({}),
        ));
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() {
        return Err(invalid(
            resource,
            "",
            "metadata.name",
            "Required value: name or generateName is required".into(),
        ));
    }
    let name_ok = match resource {
        // Service names are DNS-1035 labels: they start with a letter.
        Resource::Services => {
            is_dns_label(&name) && name.starts_with(|c: char| c.is_ascii_lowercase())
        }
        _ => is_dns_subdomain(&name),
    };
    if !name_ok {
        return Err(invalid(
            resource,
            &name,
            "metadata.name",
            format!("Invalid value: {name:?}: not a valid name"),
        ));
    }
    if let Some(obj_ns) = obj["metadata"]["namespace"].as_str()
        && obj_ns != ns
    {
        return Err(status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the \
             request"
                .into(),
            json!({}),
        ));
    }
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            let v = v.as_str().unwrap_or("\u{0}");
            if !is_label_value(v) {
                return Err(invalid(
                    resource,
                    &name,
                    &format!("metadata.labels[{k}]"),
                    format!("Invalid value: {v:?}: not a valid label value"),
                ));
            }
        }
    }
    if resource == Resource::Pods {
        let containers = obj["spec"]["containers"].as_array();
        if containers.is_none_or(|c| c.is_empty()) {
            return Err(invalid(
                resource,
                &name,
                "spec.containers",
                "Required value".into(),
            ));
        }
        for (i, c) in containers.into_iter().flatten().enumerate() {
            if c["image"].as_str().is_none_or(str::is_empty) {
                return Err(invalid(
                    resource,
                    &name,
                    &format!("spec.containers[{i}].image"),
                    "Required value".into(),
                ));
            }
        }
    }
    Ok(name)
}

fn create_object(
    shared: &Arc<Shared>,
    resource: Resource,
    ns: &str,
    mut obj: Value,
) -> Result<Value, (StatusCode, Value)> {
    let name = validate(resource, ns, &obj)?;
    let uid = uuid::Uuid::now_v7().to_string();
    let start = {
        let mut st = shared.lock();
        if !st.namespaces.contains(ns) {
            return Err(status(
                404,
                "NotFound",
                format!("namespaces \"{ns}\" not found"),
                json!({"name": ns, "kind": "namespaces"}),
            ));
        }
        let key = (resource, ns.to_owned(), name.clone());
        if st.objects.contains_key(&key) {
            return Err(status(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.plural()),
                json!({"name": name, "kind": resource.plural()}),
            ));
        }
        st.resource_version += 1;
        obj["apiVersion"] = json!("v1");
        obj["kind"] = json!(resource.kind());
        let meta = &mut obj["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(st.resource_version.to_string());
        meta["creationTimestamp"] = json!(now());
        match resource {
            Resource::Pods => {
                obj["spec"]["nodeName"] = json!("fake-node");
                obj["status"] = json!({
                    "phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "qosClass": "Burstable",
                });
            }
            Resource::Services => {
                st.next_cluster_ip += 1;
                let n = st.next_cluster_ip;
                obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", n / 250, n % 250 + 1));
                obj["status"] = json!({"loadBalancer": {}});
            }
            Resource::PersistentVolumeClaims => {
                obj["status"] = json!({"phase": "Bound"});
            }
            Resource::Secrets => {
                use base64::Engine as _;
                let string_data = obj
                    .as_object_mut()
                    .and_then(|o| o.remove("stringData"))
                    .and_then(|v| v.as_object().cloned())
                    .unwrap_or_default();
                for (k, v) in string_data {
                    let encoded = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(encoded);
                }
                if obj["type"].is_null() {
                    obj["type"] = json!("Opaque");
                }
            }
        }
        st.objects.insert(key, obj.clone());
        st.pod_start
    };
    if resource == Resource::Pods {
        let port = obj["spec"]["containers"][0]["ports"][0]["containerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(8080);
        let image = obj["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let container = obj["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or("main")
            .to_owned();
        let shared = shared.clone();
        let key = (Resource::Pods, ns.to_owned(), name);
        tokio::spawn(kubelet(shared, key, uid, port, start, container, image));
    }
    Ok(obj)
}

fn delete_object(
    shared: &Arc<Shared>,
    resource: Resource,
    ns: &str,
    name: &str,
) -> Result<Value, (StatusCode, Value)> {
    let mut st = shared.lock();
    let key = (resource, ns.to_owned(), name.to_owned());
    let Some(obj) = st.objects.get(&key).cloned() else {
        return Err(not_found(resource.plural(), name));
    };
    let uid = uid_of(&obj).unwrap_or_default();
    st.workers.remove(&uid);
    st.resource_version += 1;
    let rv = st.resource_version.to_string();
    if resource == Resource::Pods && !st.delete_delay.is_zero() {
        if obj["metadata"]["deletionTimestamp"].is_null() {
            let delay = st.delete_delay;
            let o = st.objects.get_mut(&key).expect("present");
            o["metadata"]["deletionTimestamp"] = json!(now());
            o["metadata"]["deletionGracePeriodSeconds"] = json!(delay.as_secs());
            o["metadata"]["resourceVersion"] = json!(rv);
            let shared = shared.clone();
            let key = key.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut st = shared.lock();
                if st.objects.get(&key).and_then(uid_of).as_deref() == Some(uid.as_str()) {
                    st.objects.remove(&key);
                    collect_garbage(&mut st, &key.1, &uid);
                }
            });
        }
        return Ok(st.objects.get(&key).cloned().unwrap_or(obj));
    }
    st.objects.remove(&key);
    collect_garbage(&mut st, ns, &uid);
    Ok(obj)
}

/// Deletes, in `ns`, what `owner_uid` owned (and what that owned).
fn collect_garbage(st: &mut FakeState, ns: &str, owner_uid: &str) {
    let mut owners = vec![owner_uid.to_owned()];
    while let Some(owner) = owners.pop() {
        let dependents: Vec<Key> = st
            .objects
            .iter()
            .filter(|((_, n, _), _)| n == ns)
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in dependents {
            if let Some(o) = st.objects.remove(&k)
                && let Some(uid) = uid_of(&o)
            {
                st.workers.remove(&uid);
                owners.push(uid);
            }
        }
    }
}

/// Loopback addresses for fake workers: distinct within the process, and spread by process
/// id so that concurrently running test processes rarely meet (a taken one is skipped).
fn next_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = (1 << 24) - 512;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let base = std::process::id().wrapping_mul(7919) % SPAN;
    let host = 256 + (base + n) % SPAN; // skips 127.0.0.x
    let ip = Ipv4Addr::from(0x7f00_0000 | host);
    let last = ip.octets()[3];
    if last == 0 || last == 255 {
        next_loopback()
    } else {
        ip
    }
}

/// Plays the kubelet for one pod: after the start delay, starts its worker and marks it Ready.
async fn kubelet(
    shared: Arc<Shared>,
    key: Key,
    uid: String,
    port: u16,
    start: PodStart,
    container: String,
    image: String,
) {
    let delay = match start {
        PodStart::Ready(d) | PodStart::ImagePullBackOff(d) => d,
        PodStart::NeverReady => {
            let mut st = shared.lock();
            if let Some(o) = st.objects.get_mut(&key) {
                o["status"]["containerStatuses"] = json!([{
                    "name": container, "image": image, "imageID": "", "ready": false,
                    "restartCount": 0, "started": false,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                }]);
            }
            return;
        }
    };
    tokio::time::sleep(delay).await;
    let same_pod = |st: &FakeState| {
        st.objects.get(&key).is_some_and(|o| {
            uid_of(o).as_deref() == Some(uid.as_str())
                && o["metadata"]["deletionTimestamp"].is_null()
        })
    };
    // The kubelet retries a container whose secret is missing until it appears.
    loop {
        let missing = {
            let mut st = shared.lock();
            if !same_pod(&st) {
                return;
            }
            let missing = missing_secret(&st, &key);
            if let (Some(secret), Some(o)) = (&missing, st.objects.get_mut(&key)) {
                o["status"]["containerStatuses"] = json!([{
                    "name": container, "image": image, "imageID": "", "ready": false,
                    "restartCount": 0, "started": false,
                    "state": {"waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": format!("secret \"{secret}\" not found"),
                    }},
                }]);
            }
            missing
        };
        if missing.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let PodStart::ImagePullBackOff(_) = start {
        let mut st = shared.lock();
        if same_pod(&st)
            && let Some(o) = st.objects.get_mut(&key)
        {
            o["status"]["containerStatuses"] = json!([{
                "name": container, "image": image, "imageID": "", "ready": false,
                "restartCount": 0, "started": false,
                "state": {"waiting": {
                    "reason": "ImagePullBackOff",
                    "message": format!("Back-off pulling image \"{image}\""),
                }},
            }]);
        }
        return;
    }
    let secret = {
        let st = shared.lock();
        if !same_pod(&st) {
            return;
        }
        worker_secret(&st, &key)
    };
    let mut worker = None;
    for _ in 0..64 {
        let ip = next_loopback();
        match start_worker(SocketAddr::new(IpAddr::V4(ip), port), secret.clone()).await {
            Ok(w) => {
                worker = Some(w);
                break;
            }
            Err(_) => continue,
        }
    }
    let Some(worker) = worker else {
        return;
    };
    let mut st = shared.lock();
    if !same_pod(&st) {
        return; // deleted meanwhile: the worker is dropped, and stops
    }
    st.resource_version += 1;
    let rv = st.resource_version.to_string();
    let now = now();
    let ip = worker.addr.ip().to_string();
    if let Some(o) = st.objects.get_mut(&key) {
        o["metadata"]["resourceVersion"] = json!(rv);
        o["status"] = json!({
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.0.0.1",
            "startTime": now,
            "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": [{
                "name": container, "image": image, "imageID": format!("fake://{image}"),
                "ready": true, "restartCount": 0, "started": true,
                "state": {"running": {"startedAt": now}},
            }],
        });
    }
    st.workers.insert(uid, worker);
}

/// The value of the pod's `WORKER_SECRET` variable: its `secretKeyRef` read from the Secret
/// now (the container's environment is fixed when it starts), or a plain value.
fn worker_secret(st: &FakeState, key: &Key) -> Option<String> {
    use base64::Engine as _;
    let pod = st.objects.get(key)?;
    let var = pod["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "WORKER_SECRET")?;
    if let Some(v) = var["value"].as_str() {
        return Some(v.to_owned());
    }
    let from = &var["valueFrom"]["secretKeyRef"];
    let secret = st.objects.get(&(
        Resource::Secrets,
        key.1.clone(),
        from["name"].as_str()?.to_owned(),
    ))?;
    let encoded = secret["data"][from["key"].as_str()?].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The first secret that the pod under `key` takes a variable from and that does not exist.
fn missing_secret(st: &FakeState, key: &Key) -> Option<String> {
    let pod = st.objects.get(key)?;
    let ns = &key.1;
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| {
            e["valueFrom"]["secretKeyRef"]["name"]
                .as_str()
                .map(str::to_owned)
        })
        .find(|name| {
            !st.objects
                .contains_key(&(Resource::Secrets, ns.clone(), name.clone()))
        })
}

/// A worker on `addr` requiring `secret` as the real one does: `GET /health` (the whole
/// [`WorkerHealth`] with the secret, `{"status":"ok"}` alone without it), and with the secret
/// `GET /sessions/{id}/messages` (no messages; a use: `idle_ms` counts from the last
/// one); 401 without it, 404 for anything else. Each connection gets one answer and is closed.
async fn start_worker(addr: SocketAddr, secret: Option<String>) -> std::io::Result<FakeWorker> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let busy: Arc<Mutex<Vec<SessionId>>> = Arc::default();
    let core = Arc::new(WorkerCore {
        secret,
        busy: busy.clone(),
        last_used: Mutex::new(std::time::Instant::now()),
    });
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    connections.spawn(answer(stream, core.clone()));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok(FakeWorker { addr, busy, task })
}

async fn answer(mut stream: tokio::net::TcpStream, core: Arc<WorkerCore>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let presented = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(SECRET_HEADER))
        .map(|(_, value)| value.trim().to_owned());
    let authorized = core.secret.is_none() || presented == core.secret;
    let is_messages = path
        .strip_prefix("/sessions/")
        .and_then(|rest| rest.strip_suffix("/messages"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'));
    let (code, body) = if method == "GET" && path == HEALTH_PATH {
        let body = if authorized {
            let busy = core.busy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let idle = if busy.is_empty() {
                core.last_used
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .elapsed()
                    .as_millis()
            } else {
                0
            };
            serde_json::to_string(&WorkerHealth {
                status: "ok".into(),
                version: "fake".into(),
                executor: "fake".into(),
                busy_sessions: busy,
                idle_ms: Some(u64::try_from(idle).unwrap_or(u64::MAX)),
            })
            .unwrap_or_default()
        } else {
            r#"{"status":"ok"}"#.to_owned()
        };
        ("200 OK", body)
    } else if !authorized {
        (
            "401 Unauthorized",
            r#"{"error":{"code":"unauthorized","message":"this worker requires its secret"}}"#
                .to_owned(),
        )
    } else if method == "GET" && is_messages {
        *core.last_used.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        ("200 OK", r#"{"messages":[]}"#.to_owned())
    } else {
        ("404 Not Found", r#"{"error":"not found"}"#.to_owned())
    };
    let response = format!(
        "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(percent_decode("a%2Fb%3Dc%2Cd+e"), "a/b=c,d e");
        assert_eq!(percent_decode("100%"), "100%");
        let q = parse_query("&labelSelector=app%3Dx%2Cb%21%3Dy&limit=5");
        assert_eq!(q["labelSelector"], "app=x,b!=y");
        let reqs = parse_selector("app=x,b!=y,c,!d").unwrap();
        let labels = json!({"app": "x", "c": "1"});
        assert!(reqs.iter().all(|r| r.matches(&labels)));
        assert!(!reqs[0].matches(&json!({"app": "z"})));
        assert!(parse_selector("a in (b)").is_err());
        assert!(is_label_value("owner-repo-12-0123abcd"));
        assert!(!is_label_value("-x"));
        assert!(!is_dns_label("Ab"));
        assert!(is_dns_subdomain("a.b-c"));
    }
}
