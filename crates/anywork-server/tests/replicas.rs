//! Scale-out with the real `anywork-server` binary: three replicas on one PostgreSQL database
//! (a fresh one per test, on the server `ANYWORK_TEST_DATABASE_URL` names; without it these
//! tests fail), the static driver to one stand-in worker, load spread round-robin over REST
//! and WebSocket, and each task followed by a client on another replica than the one that
//! took it. Checked: no task lost or run twice (the worker sees each task id once), each
//! session's tasks reach the worker in the order they were sent, every log is gap-free with
//! one `done` at its end, and every client saw every event of its task. Then the same with
//! one replica killed (`kill -9`) mid-load: the survivors settle its tasks within the lease.
//!
//! Also two replicas in this process (two dispatchers, each with its own PostgreSQL pool and
//! `LISTEN`, on one database): a cancel through the replica that does not run a streaming task
//! stops the run on the other at once, with a lease far too long for its renewal to be what
//! noticed it.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_test::original_worker::{OriginalEvent, OriginalWorker, Script};
use common::{TestServer, free_port, wait_healthy};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// How long a whole load may take to settle.
const SETTLE: Duration = Duration::from_secs(90);

fn database_url() -> String {
    std::env::var("ANYWORK_TEST_DATABASE_URL").expect(
        "ANYWORK_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts \
         PostgreSQL, or point it at a database you own",
    )
}

/// A database of its own on the test server, dropped with this.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Database {
        let admin = database_url();
        let name = format!("replicas_{}", anywork_core::TaskId::generate().0.simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("connect to the test database server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .expect("create the test database");
        pool.close().await;
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin.as_str(), String::new()),
        };
        let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
        let url = format!("{base}/{name}{query}");
        Database { admin, name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&pool)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// One `anywork-server` process.
struct Replica {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_replica(db: &Database, worker_url: &str) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_anywork-server"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SERVER_PORT", port.to_string())
        .env("DB_DIR", dir.path())
        .env("DATABASE_URL", &db.url)
        .env("CONTAINER_DRIVER", "static")
        .env("STATIC_WORKER_URL", worker_url)
        .env("LEASE_TTL_SECONDS", "2")
        // The push receiver is on loopback over http.
        .env("ALLOW_HTTP_CALLBACKS", "true")
        .env("OUTBOUND_ALLOW", "127.0.0.1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start anywork-server");
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&format!("{url}/api/health")).await;
    Replica {
        child,
        url,
        _dir: dir,
    }
}

/// The replicas a load balancer still sends to.
#[derive(Clone)]
struct Pool {
    urls: Arc<Mutex<Vec<String>>>,
    /// Where the tasks sent over REST ask for their push notification.
    hook: String,
}

impl Pool {
    fn new(replicas: &[Replica], hook: &str) -> Pool {
        Pool {
            urls: Arc::new(Mutex::new(replicas.iter().map(|r| r.url.clone()).collect())),
            hook: hook.to_owned(),
        }
    }

    /// The `i`-th replica round-robin, and the one after it.
    fn pick(&self, i: usize) -> (String, String) {
        let urls = self.urls.lock().unwrap();
        (
            urls[i % urls.len()].clone(),
            urls[(i + 1) % urls.len()].clone(),
        )
    }

    fn remove(&self, url: &str) {
        self.urls.lock().unwrap().retain(|u| u != url);
    }

    fn first(&self) -> String {
        self.urls.lock().unwrap()[0].clone()
    }
}

/// A task as sent: its session, the order within the session, and what its client saw.
#[derive(Debug, Clone)]
struct Sent {
    task: String,
    session: String,
    /// seq → event type, as the client received them.
    seen: BTreeMap<u64, String>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Option<Ws> {
    let ws = format!("{}/ws", url.replacen("http://", "ws://", 1));
    tokio_tungstenite::connect_async(ws)
        .await
        .ok()
        .map(|(s, _)| s)
}

/// The next JSON message; `None` when the socket ended or broke.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(SETTLE, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Records the events of `task` among `messages`; whether its `done` was among them.
fn note(seen: &mut BTreeMap<u64, String>, task: &str, messages: &[Value]) -> bool {
    let mut done = false;
    for m in messages.iter().filter(|m| m["task_id"] == task) {
        if let Some(seq) = m["seq"].as_u64() {
            seen.insert(seq, m["type"].as_str().unwrap_or_default().to_owned());
        }
        done |= m["type"] == "done";
    }
    done
}

/// Follows `task` from `pool`, starting on `first` with what `ws` already has, resuming on
/// another replica after the last seq seen when the connection breaks, until its `done`.
async fn follow(pool: &Pool, task: &str, mut ws: Option<Ws>, seen: &mut BTreeMap<u64, String>) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut attempt = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task}: no done within {SETTLE:?}; seen {seen:?}"
        );
        let mut socket = match ws.take() {
            Some(s) => s,
            None => {
                attempt += 1;
                let (url, _) = pool.pick(attempt);
                let Some(mut s) = connect(&url).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let after = seen.keys().next_back().copied().unwrap_or(0);
                let resume = json!({"type": "resume", "task_id": task, "after_seq": after});
                if s.send(Message::Text(resume.to_string().into()))
                    .await
                    .is_err()
                {
                    continue;
                }
                s
            }
        };
        while let Some(m) = next(&mut socket).await {
            if note(seen, task, std::slice::from_ref(&m)) {
                return;
            }
        }
        // The replica went away: resume elsewhere.
    }
}

/// Sends one task of `session` (`None`: a new session) to the `i`-th replica — over REST
/// for even `k`, over WebSocket (`chat`) for odd — and follows it to its `done` from another
/// replica (REST) or on the chat's own socket, resuming elsewhere if that breaks. Retries
/// on another replica when the chosen one is down.
async fn send_and_follow(
    pool: &Pool,
    i: usize,
    k: usize,
    session: Option<&str>,
    message: &str,
) -> (Sent, tokio::task::JoinHandle<Sent>) {
    let http = reqwest::Client::new();
    for attempt in 0..20 {
        let (url, other) = pool.pick(i + attempt);
        if k.is_multiple_of(2) {
            let mut body = json!({ "message": message, "push_notification": {"url": pool.hook} });
            if let Some(s) = session {
                body["session_id"] = json!(s);
            }
            let Ok(r) = http
                .post(format!("{url}/api/tasks"))
                .json(&body)
                .send()
                .await
            else {
                continue;
            };
            assert_eq!(r.status(), 202, "task refused by {url}");
            let created: Value = r.json().await.unwrap();
            let sent = Sent {
                task: created["taskId"].as_str().unwrap().to_owned(),
                session: created["sessionId"].as_str().unwrap().to_owned(),
                seen: BTreeMap::new(),
            };
            let (pool, mut out) = (pool.clone(), sent.clone());
            let follower = tokio::spawn(async move {
                let ws = connect(&other).await;
                let ws = match ws {
                    Some(mut s) => {
                        let resume = json!({"type": "resume", "task_id": out.task, "after_seq": 0});
                        s.send(Message::Text(resume.to_string().into()))
                            .await
                            .ok()
                            .map(|()| s)
                    }
                    None => None,
                };
                let task = out.task.clone();
                follow(&pool, &task, ws, &mut out.seen).await;
                out
            });
            return (sent, follower);
        }
        let Some(mut ws) = connect(&url).await else {
            continue;
        };
        let mut chat = json!({"type": "chat", "message": message});
        if let Some(s) = session {
            chat["session_id"] = json!(s);
        }
        if ws
            .send(Message::Text(chat.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        let mut before = Vec::new();
        let created = loop {
            match next(&mut ws).await {
                Some(m) if m["type"] == "task_created" => break Some(m),
                Some(m) if m["type"] == "error" && m["task_id"].is_null() => {
                    panic!("chat refused by {url}: {m}")
                }
                Some(m) => before.push(m),
                None => break None,
            }
        };
        // The replica died before it answered: the chat may or may not have been taken;
        // a lost chat is the client's to send again, as with any broken connection.
        let Some(created) = created else { continue };
        let mut sent = Sent {
            task: created["task_id"].as_str().unwrap().to_owned(),
            session: created["session_id"].as_str().unwrap().to_owned(),
            seen: BTreeMap::new(),
        };
        let done = note(&mut sent.seen, &sent.task, &before);
        let (pool, mut out) = (pool.clone(), sent.clone());
        let follower = tokio::spawn(async move {
            if !done {
                let task = out.task.clone();
                follow(&pool, &task, Some(ws), &mut out.seen).await;
            }
            out
        });
        return (sent, follower);
    }
    panic!("no replica took the task");
}

/// `sessions` sessions of `per_session` tasks each, sent concurrently across the pool (each
/// session's tasks one after the other, each without waiting for the previous to end).
/// Returns what every client saw, by session, in the order sent.
async fn load(pool: &Pool, tag: &str, sessions: usize, per_session: usize) -> Vec<Vec<Sent>> {
    let runs: Vec<_> = (0..sessions)
        .map(|s| {
            let (pool, tag) = (pool.clone(), tag.to_owned());
            tokio::spawn(async move {
                let mut session: Option<String> = None;
                let mut followers = Vec::new();
                for k in 0..per_session {
                    let message = format!("{tag} s{s} k{k}");
                    let (sent, follower) =
                        send_and_follow(&pool, s + k, k, session.as_deref(), &message).await;
                    session = Some(sent.session.clone());
                    followers.push(follower);
                    // Creation times in distinct milliseconds: the order sent is the order
                    // stored.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                let mut out = Vec::new();
                for f in followers {
                    out.push(f.await.expect("follower"));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for r in runs {
        all.push(r.await.expect("session load"));
    }
    all
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Checks the invariants over what was sent; returns the final status of each task.
async fn check(
    pool: &Pool,
    worker: &OriginalWorker,
    sessions: &[Vec<Sent>],
) -> HashMap<String, String> {
    let url = pool.first();
    let chats: Vec<(String, String)> = worker
        .bodies("POST /chat")
        .iter()
        .map(|b| {
            (
                b["task_id"].as_str().unwrap_or_default().to_owned(),
                b["session_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for (task, _) in &chats {
        *times.entry(task.as_str()).or_default() += 1;
    }
    let mut statuses = HashMap::new();
    for session in sessions {
        for sent in session {
            let task = get(&format!("{url}/api/tasks/{}", sent.task)).await;
            let status = task["status"].as_str().unwrap_or_default().to_owned();
            assert!(
                ["completed", "failed", "canceled"].contains(&status.as_str()),
                "task {} not settled: {task}",
                sent.task
            );
            // Run at most once; a completed task ran exactly once.
            let ran = times.get(sent.task.as_str()).copied().unwrap_or(0);
            assert!(
                ran <= 1,
                "task {} reached the worker {ran} times",
                sent.task
            );
            if status == "completed" {
                assert_eq!(ran, 1, "task {} completed without a run", sent.task);
            }
            // The log: seqs 1..=n, one done, last.
            let logs = get(&format!(
                "{url}/api/tasks/{}/logs?after=0&limit=500",
                sent.task
            ))
            .await;
            let logs = logs["logs"].as_array().unwrap().clone();
            let seqs: Vec<u64> = logs.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
            assert_eq!(
                seqs,
                (1..=logs.len() as u64).collect::<Vec<_>>(),
                "task {}: gaps in {seqs:?}",
                sent.task
            );
            let dones = logs.iter().filter(|l| l["type"] == "done").count();
            assert_eq!(dones, 1, "task {}: {logs:?}", sent.task);
            assert_eq!(logs.last().unwrap()["type"], "done", "task {}", sent.task);
            // The client saw every event of the log.
            let logged: BTreeMap<u64, String> = logs
                .iter()
                .map(|l| {
                    (
                        l["seq"].as_u64().unwrap(),
                        l["type"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            assert_eq!(
                sent.seen, logged,
                "task {}: the client's events differ from the log",
                sent.task
            );
            statuses.insert(sent.task.clone(), status);
        }
        // The session's tasks reached the worker in the order sent.
        let order: Vec<&str> = session.iter().map(|s| s.task.as_str()).collect();
        let ran: Vec<&str> = chats
            .iter()
            .filter(|(t, _)| order.contains(&t.as_str()))
            .map(|(t, _)| t.as_str())
            .collect();
        let expected: Vec<&str> = order.iter().copied().filter(|t| ran.contains(t)).collect();
        assert_eq!(
            ran, expected,
            "session {} ran out of order",
            session[0].session
        );
        let sessions: HashSet<&str> = session.iter().map(|s| s.session.as_str()).collect();
        assert_eq!(sessions.len(), 1, "one session per run of sends");
    }
    statuses
}

/// A push receiver on loopback: the task ids it was sent, each time it was sent one.
async fn push_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                let id = body["id"].as_str().unwrap_or_default().to_owned();
                seen.lock().unwrap().push(id);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, got)
}

/// Every settled task sent over REST had its push delivered once, by one of the replicas.
async fn pushed_once(pushes: &Mutex<Vec<String>>, sessions: &[Vec<Sent>]) {
    let want: HashSet<String> = sessions
        .iter()
        .flat_map(|s| s.iter().step_by(2).map(|t| t.task.clone()))
        .collect();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let got: HashSet<String> = pushes.lock().unwrap().iter().cloned().collect();
        if want.is_subset(&got) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pushes missing: {:?}",
            want.difference(&got).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past the senders' next poll, where a second sender would have sent a copy.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pushes = pushes.lock().unwrap().clone();
    for task in &want {
        let n = pushes.iter().filter(|p| *p == task).count();
        assert_eq!(n, 1, "task {task} was pushed {n} times");
    }
}

fn slow_script(delay_ms: u64) -> Script {
    Script {
        events: vec![
            OriginalEvent::text("one "),
            OriginalEvent::text("two "),
            OriginalEvent::text("three"),
            OriginalEvent::done("one two three", 0.0, 1, 1),
        ],
        delay: Duration::from_millis(delay_ms),
        hang: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_each_task_once_in_session_order_and_survive_a_kill_9() {
    let db = Database::create().await;
    let worker = OriginalWorker::start().await;
    worker.set_default(slow_script(30));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start_replica(&db, &worker.url()).await);
    }
    let (hook, pushes) = push_receiver().await;
    let pool = Pool::new(&replicas, &hook);

    // Three healthy replicas: everything completes, and each push goes out once.
    let sent = load(&pool, "calm", 6, 4).await;
    let statuses = check(&pool, &worker, &sent).await;
    pushed_once(&pushes, &sent).await;
    assert_eq!(statuses.len(), 24);
    assert!(statuses.values().all(|s| s == "completed"), "{statuses:?}");

    // Again, with the first replica killed while it runs tasks.
    worker.set_default(slow_script(120));
    let victim = replicas[0].url.clone();
    let loader = {
        let pool = pool.clone();
        tokio::spawn(async move { load(&pool, "kill", 6, 4).await })
    };
    // Kill it once this load is under way (its tasks spread round-robin, some run there).
    let deadline = tokio::time::Instant::now() + SETTLE;
    while worker.bodies("POST /chat").len() < 24 + 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the load did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.remove(&victim);
    replicas[0].child.start_kill().expect("kill -9");
    let _ = replicas[0].child.wait().await;
    let sent = loader.await.expect("load");
    let statuses = check(&pool, &worker, &sent).await;
    assert!(!statuses.is_empty());
    // Whatever the victim was running failed with the reason; the rest completed.
    for (task, status) in &statuses {
        if status != "completed" {
            let t = get(&format!("{}/api/tasks/{task}", pool.first())).await;
            assert_eq!(status, "failed", "{t}");
            let error = t["error"].as_str().unwrap_or_default();
            assert!(error.contains("stopped before it finished"), "{t}");
        }
    }
    assert!(
        statuses.values().filter(|s| *s == "completed").count() >= statuses.len() / 2,
        "most tasks completed on the survivors: {statuses:?}"
    );
}

/// A replica in this process on `db`, named `owner` (its lease owner), with a lease of 60 s:
/// its first renewal comes after 20 s.
async fn replica_in_process(db: &Database, worker_url: &str, owner: &str) -> TestServer {
    let store = anywork_store::PostgresStore::connect(&db.url, 8)
        .await
        .expect("connect to the test database");
    let mut config = anywork_runtime::DispatcherConfig::default();
    config.owner = owner.to_owned();
    config.lease_ttl = Duration::from_secs(60);
    TestServer::start_on(
        tempfile::tempdir().unwrap(),
        Arc::new(store),
        worker_url,
        config,
        anywork_runtime::FirstWords,
    )
    .await
}

/// Polls `ready` every 20 ms until it holds; fails after `patience`, saying `what`.
async fn eventually<F, Fut>(patience: Duration, what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} (waited {patience:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 18: a cancel made on the replica that does not run the task reaches the one that
/// runs it through the store's change feed, not at its next lease renewal (20 s away here):
/// its worker is asked to cancel within the test's patience, its run stops, the log ends
/// with the one `done`, and a WebSocket follower on the running replica gets that `done`.
/// Here the worker has gone quiet (it thinks): only the feed can tell the running replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_replica_stops_the_quiet_run_on_the_other_at_once() {
    let script = Script {
        events: (0..5)
            .map(|i| OriginalEvent::text(format!("w{i} ")))
            .collect(),
        delay: Duration::from_millis(20),
        hang: true,
    };
    // The `running` status and the five texts: the worker is quiet from there.
    cancel_through_the_other_replica(script, 6).await;
}

/// The same while the worker streams a text every 5 ms: the running replica keeps
/// appending until it learns of the cancel, and nothing of it lands after the `done` (without
/// the store's refusal of appends to a finished task, one often did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_replica_stops_the_streaming_run_on_the_other_at_once() {
    let script = Script {
        events: (0..12_000)
            .map(|i| OriginalEvent::text(format!("w{i} ")))
            .collect(),
        delay: Duration::from_millis(5),
        hang: true,
    };
    cancel_through_the_other_replica(script, 5).await;
}

/// Two replicas in this process, a task whose `/chat` plays `script`, canceled through the
/// replica that does not run it once its log has `logged` events; checks what issue 18 asks.
async fn cancel_through_the_other_replica(script: Script, logged: usize) {
    const PATIENCE: Duration = Duration::from_secs(10);
    let db = Database::create().await;
    let worker = OriginalWorker::start().await;
    worker.set_default(script);
    let a = replica_in_process(&db, &worker.url(), "replica-a").await;
    let b = replica_in_process(&db, &worker.url(), "replica-b").await;

    let (status, created) = a.post("/api/tasks", json!({"message": "go on"})).await;
    assert_eq!(status, 202, "{created}");
    let task = created["taskId"].as_str().unwrap().to_owned();
    let id: anywork_core::TaskId = task.parse().unwrap();
    eventually(PATIENCE, "the task did not start", || async {
        a.logs(&task).await.len() >= logged
    })
    .await;
    // Either replica may have claimed it: the lease says which.
    let stored = a.dispatcher().task(id).await.unwrap();
    let holder = stored.lease.as_ref().map(|l| l.owner.clone());
    let (owner, other) = match holder.as_deref() {
        Some("replica-a") => (&a, &b),
        Some("replica-b") => (&b, &a),
        _ => panic!("the running task has no lease of ours: {stored:?}"),
    };
    assert_eq!(owner.dispatcher().running(), 1);
    assert_eq!(other.dispatcher().running(), 0);
    let mut follower = owner.ws().await;
    follower
        .send(json!({"type": "resume", "task_id": task, "after_seq": 0}))
        .await;
    let first = follower.recv().await;
    assert_eq!(first["task_id"], task.as_str(), "{first}");

    let (status, canceled) = other
        .post(&format!("/api/tasks/{task}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "canceled", "{canceled}");

    // The running replica learns it long before a lease renewal.
    eventually(PATIENCE, "the worker was not asked to cancel", || async {
        worker
            .bodies("POST /cancel")
            .iter()
            .any(|b| b["task_id"] == task.as_str())
    })
    .await;
    eventually(PATIENCE, "the run did not stop", || async {
        owner.dispatcher().running() == 0
    })
    .await;
    let events = follower.events_until_done(&task).await;
    let done = events.last().unwrap();
    assert_eq!(done["metadata"]["status"], "canceled", "{done}");

    // The run is over: the log is final. Gap-free, one done, last.
    let mut logs: Vec<Value> = Vec::new();
    loop {
        let after = logs.last().map_or(0, |l| l["seq"].as_u64().unwrap());
        let (_, page) = owner
            .get(&format!("/api/tasks/{task}/logs?after={after}&limit=500"))
            .await;
        let page = page["logs"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            break;
        }
        logs.extend(page);
    }
    let seqs: Vec<u64> = logs.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=logs.len() as u64).collect::<Vec<_>>());
    assert_eq!(logs.iter().filter(|l| l["type"] == "done").count(), 1);
    assert_eq!(logs.last().unwrap()["type"], "done", "{logs:?}");
    assert_eq!(
        logs.last().unwrap()["seq"],
        done["seq"],
        "the follower's done is the log's"
    );
    assert_eq!(owner.wait_final(&task).await["status"], "canceled");
    assert_eq!(worker.bodies("POST /chat").len(), 1, "the task ran once");
}

/// A container engine shared by the drivers of two replicas, as the Docker engine or the
/// Kubernetes API is: a worker (a stand-in) per session, made on demand, one at a time. Its
/// reaper ignores the busy sessions the runtime read (by the time of a stop that read may be
/// stale), so that only the store's hold decides; once it holds a session it waits — until a
/// replica asks for that session's worker, or 2 s — before the stop. A replica that asks
/// meanwhile is handed the worker about to go and gets it only once it is gone: the race of a
/// stop by name with a replica that has just started using the worker.
#[derive(Default)]
struct Engine {
    workers: Mutex<HashMap<anywork_core::SessionId, Arc<OriginalWorker>>>,
    /// The workers made, by URL (their ids), in order.
    made: Mutex<Vec<String>>,
    creating: tokio::sync::Mutex<()>,
    /// Sessions held by the reaper, their worker about to be stopped.
    reaping: Mutex<HashSet<anywork_core::SessionId>>,
    /// Told when the reaper holds a session.
    held: tokio::sync::Notify,
    /// Told when a replica asks for a worker being reaped.
    asked_while_reaping: tokio::sync::Notify,
}

impl Engine {
    fn worker_of(&self, session: &anywork_core::SessionId) -> Option<Arc<OriginalWorker>> {
        self.workers.lock().unwrap().get(session).cloned()
    }

    fn made(&self) -> Vec<String> {
        self.made.lock().unwrap().clone()
    }
}

struct EngineDriver(Arc<Engine>);

#[async_trait::async_trait]
impl anywork_core::ContainerDriver for EngineDriver {
    fn name(&self) -> &str {
        "engine"
    }

    async fn get_worker(
        &self,
        session: &anywork_core::SessionId,
    ) -> anywork_core::Result<anywork_core::WorkerEndpoint> {
        let engine = &self.0;
        let _creating = engine.creating.lock().await;
        if let Some(worker) = engine.worker_of(session) {
            let url = worker.url();
            drop(worker);
            if engine.reaping.lock().unwrap().contains(session) {
                engine.asked_while_reaping.notify_one();
                while engine.reaping.lock().unwrap().contains(session) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            return Ok(anywork_core::WorkerEndpoint::new(url.clone(), url));
        }
        let worker = OriginalWorker::start().await;
        let url = worker.url();
        engine
            .workers
            .lock()
            .unwrap()
            .insert(session.clone(), Arc::new(worker));
        engine.made.lock().unwrap().push(url.clone());
        Ok(anywork_core::WorkerEndpoint::new(url.clone(), url))
    }

    async fn release(&self, session: &anywork_core::SessionId) -> anywork_core::Result<()> {
        self.0.workers.lock().unwrap().remove(session);
        Ok(())
    }

    async fn is_healthy(&self, _: &anywork_core::WorkerEndpoint) -> bool {
        true
    }

    async fn list(&self) -> anywork_core::Result<Vec<anywork_core::WorkerInfo>> {
        Ok(Vec::new())
    }

    async fn reap_idle_guarded(
        &self,
        _busy: &[anywork_core::SessionId],
        guard: &dyn anywork_core::ReapGuard,
    ) -> anywork_core::Result<Vec<anywork_core::SessionId>> {
        let engine = &self.0;
        let sessions: Vec<_> = engine.workers.lock().unwrap().keys().cloned().collect();
        let mut reaped = Vec::new();
        for session in sessions {
            if !guard.hold(&session).await {
                continue;
            }
            engine.reaping.lock().unwrap().insert(session.clone());
            engine.held.notify_one();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                engine.asked_while_reaping.notified(),
            )
            .await;
            // Dropped: the stand-in stops listening.
            let gone = engine.workers.lock().unwrap().remove(&session);
            drop(gone);
            engine.reaping.lock().unwrap().remove(&session);
            guard.release(&session).await;
            reaped.push(session);
        }
        Ok(reaped)
    }
}

/// A replica in this process on `db`, named `owner`, whose workers come from `engine`; its
/// reaper runs when the test says, and a worker call that fails is not retried.
async fn engine_replica(
    db: &Database,
    engine: &Arc<Engine>,
    owner: &str,
) -> anywork_runtime::Dispatcher {
    let store = anywork_store::PostgresStore::connect(&db.url, 8)
        .await
        .expect("connect to the test database");
    let mut config = anywork_runtime::DispatcherConfig::default();
    config.owner = owner.to_owned();
    config.lease_ttl = Duration::from_secs(60);
    config.reap_every = None;
    config.retry = anywork_runtime::Backoff::none();
    anywork_runtime::Dispatcher::builder(Arc::new(store), Arc::new(EngineDriver(engine.clone())))
        .config(config)
        .start()
        .await
        .expect("start a replica")
}

/// The task once it is over.
async fn finished(d: &anywork_runtime::Dispatcher, id: anywork_core::TaskId) -> anywork_core::Task {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let task = d.task(id).await.expect("read the task");
        if task.status.is_terminal() {
            return task;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} never ended: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 18: the idle reaper on all replicas is safe. A task that comes while its session's
/// worker is being reaped, through another replica, waits for the stop and runs on a new
/// worker (it is never handed the one going away, which the engine here would make fail);
/// a task that came first keeps the worker (the reaper's hold is refused). No task fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_comes_while_its_session_is_reaped_keeps_a_working_worker() {
    let db = Database::create().await;
    let engine = Arc::new(Engine::default());
    let a = engine_replica(&db, &engine, "replica-a").await;
    let b = engine_replica(&db, &engine, "replica-b").await;
    let in_session = |session: &anywork_core::SessionId, text: &str| {
        let mut request = anywork_core::TaskRequest::new("web", text);
        request.session_id = Some(session.clone());
        request
    };

    // A session with a worker.
    let first = a
        .submit(anywork_core::TaskRequest::new("web", "one"))
        .await
        .unwrap()
        .task;
    let session = first.session_id.clone();
    assert_eq!(
        finished(&a, first.id).await.status,
        anywork_core::TaskStatus::Completed
    );
    let w1 = engine.made()[0].clone();

    // A task that came first (running through the other replica, the worker busy with it):
    // the reaper's hold is refused and the worker stays.
    engine.worker_of(&session).unwrap().push(Script {
        events: vec![OriginalEvent::text("thinking")],
        delay: Duration::ZERO,
        hang: true,
    });
    let second = b.submit(in_session(&session, "two")).await.unwrap().task;
    eventually(SETTLE, "the second task did not start", || async {
        b.task(second.id).await.unwrap().status == anywork_core::TaskStatus::Running
    })
    .await;
    assert_eq!(
        a.reap_idle().await.unwrap(),
        Vec::<anywork_core::SessionId>::new()
    );
    assert_eq!(engine.made(), vec![w1.clone()], "the worker stays");
    b.cancel(second.id).await.unwrap();
    let second = finished(&b, second.id).await;
    assert_eq!(
        second.status,
        anywork_core::TaskStatus::Canceled,
        "{second:?}"
    );
    assert_eq!(second.worker_id.as_deref(), Some(w1.as_str()));

    // The reaper holds the idle session; a task comes through the other replica meanwhile.
    let reaper = {
        let a = a.clone();
        tokio::spawn(async move { a.reap_idle().await })
    };
    engine.held.notified().await;
    let third = b.submit(in_session(&session, "three")).await.unwrap().task;
    let reaped = reaper.await.unwrap().unwrap();
    assert_eq!(reaped, vec![session.clone()], "the idle worker was reaped");
    let third = finished(&b, third.id).await;
    assert_eq!(
        third.status,
        anywork_core::TaskStatus::Completed,
        "{third:?}"
    );
    let made = engine.made();
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(
        third.worker_id.as_deref(),
        Some(made[1].as_str()),
        "a new worker"
    );
    let w2 = engine
        .worker_of(&session)
        .expect("the session's worker is up");
    assert!(
        w2.bodies("POST /chat")
            .iter()
            .any(|c| c["task_id"] == third.id.to_string().as_str()),
        "the new worker ran the task"
    );
}
