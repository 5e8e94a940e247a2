//! The conformance suite every [`ContainerDriver`] passes.
//!
//! ```ignore
//! anywork_conformance::driver_conformance::run(
//!     DriverSuite::per_session().idle_ttl(Duration::from_secs(1)),
//!     || async { Arc::new(MyDriver::new(...)) as Arc<dyn ContainerDriver> },
//! ).await;
//! ```
//!
//! `make` must return a new driver over the same backend each time it is called (the same
//! Docker daemon, the same API server), sharing no memory with the others: the suite checks
//! that a second instance adopts the first one's workers — what a restarted server does —
//! and, for per-session drivers, that two instances used at once behave as the replicas of a
//! scaled-out server need: racing `get_worker` calls for one session make one worker with one
//! secret, a worker one replaced is what the other hands out next, and one's reaper leaves a
//! worker the other used within the TTL. Every session the suite makes has a fresh random
//! id, and the suite purges them at the end (workers and workspaces), so it can run against
//! a shared engine.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anywork_core::{ContainerDriver, ReapGuard, SessionId, WorkerEndpoint};

/// What the driver under test is.
#[derive(Debug, Clone, Default)]
pub struct DriverSuite {
    per_session: bool,
    idle_ttl: Option<Duration>,
    /// How long a released worker may keep answering `/health`.
    stop_within: Duration,
}

impl DriverSuite {
    /// A driver whose sessions share one worker (the static driver).
    pub fn shared() -> Self {
        Self {
            per_session: false,
            idle_ttl: None,
            stop_within: Duration::from_secs(10),
        }
    }

    /// A driver that gives each session its own worker (Docker, Kubernetes).
    pub fn per_session() -> Self {
        Self {
            per_session: true,
            ..Self::shared()
        }
    }

    /// The idle TTL the driver was built with: the reaper cases run (sleeping past it).
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = Some(ttl);
        self
    }
}

fn session(tag: &str) -> SessionId {
    SessionId::new(format!("conf-{tag}-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

async fn get(driver: &dyn ContainerDriver, s: &SessionId) -> WorkerEndpoint {
    driver
        .get_worker(s)
        .await
        .unwrap_or_else(|e| panic!("{}: get_worker({s}): {e}", driver.name()))
}

async fn workers_of(driver: &dyn ContainerDriver, s: &SessionId) -> Vec<WorkerEndpoint> {
    driver
        .list()
        .await
        .unwrap_or_else(|e| panic!("{}: list: {e}", driver.name()))
        .into_iter()
        .filter(|w| w.session_id.as_ref() == Some(s))
        .map(|w| w.endpoint)
        .collect()
}

/// Uses the worker as a server does, with the endpoint's secret (`GET
/// /sessions/{id}/messages`): panics unless the worker takes the call, so a wrong secret
/// fails here.
async fn use_worker(endpoint: &WorkerEndpoint, s: &SessionId) {
    let mut request = reqwest::Client::new()
        .get(format!("{}/sessions/{s}/messages", endpoint.base_url))
        .timeout(Duration::from_secs(10));
    if let Some(secret) = &endpoint.secret {
        request = request.header(anywork_core::worker_api::SECRET_HEADER, secret.expose());
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("worker {}: {e}", endpoint.worker_id));
    assert!(
        response.status().is_success(),
        "worker {} refused a call with the secret its driver gave: {}",
        endpoint.worker_id,
        response.status()
    );
}

/// Waits until `w` stops answering (`within` at most).
async fn until_stopped(d: &dyn ContainerDriver, w: &WorkerEndpoint, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    while d.is_healthy(w).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} still answers after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs every case of the suite; panics with the first broken guarantee.
pub async fn run<F, Fut>(suite: DriverSuite, make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn ContainerDriver>>,
{
    let driver = make().await;
    let d = driver.as_ref();
    let mut made: Vec<SessionId> = Vec::new();

    // A worker is created, healthy, and reused.
    let s1 = session("reuse");
    made.push(s1.clone());
    let w1 = get(d, &s1).await;
    assert!(d.is_healthy(&w1).await, "a new worker answers /health");
    let again = get(d, &s1).await;
    assert_eq!(again, w1, "the same session gets the same worker back");

    // Concurrent calls for one session: one worker.
    let s2 = session("race");
    made.push(s2.clone());
    let calls = (0..6).map(|_| d.get_worker(&s2));
    let results = futures_util::future::join_all(calls).await;
    let ids: HashSet<String> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| panic!("concurrent get_worker: {e}"))
                .worker_id
        })
        .collect();
    assert_eq!(ids.len(), 1, "concurrent get_worker calls made {ids:?}");

    if suite.per_session {
        assert_ne!(
            get(d, &s2).await.worker_id,
            w1.worker_id,
            "two sessions share a worker"
        );
        assert_eq!(
            workers_of(d, &s1).await,
            vec![w1.clone()],
            "list shows s1 once"
        );
        assert_eq!(workers_of(d, &s2).await.len(), 1, "list shows s2 once");
    } else {
        let all = d.list().await.unwrap();
        assert!(
            all.iter().any(|w| w.endpoint == w1 && w.healthy),
            "list shows the shared worker: {all:?}"
        );
    }

    // A second instance over the same backend adopts what exists.
    let adopter = make().await;
    let a = adopter.as_ref();
    if suite.per_session {
        assert_eq!(
            workers_of(a, &s1).await,
            vec![w1.clone()],
            "a restarted driver lists the worker it did not create"
        );
    }
    assert_eq!(
        get(a, &s1).await,
        w1,
        "a restarted driver reuses, not duplicates"
    );
    if suite.per_session {
        assert_eq!(workers_of(a, &s1).await.len(), 1);
    }

    // Two instances at once (two replicas of a server): racing calls for one session from
    // both make one worker, and both hand it out with the same secret.
    let s4 = session("two");
    made.push(s4.clone());
    if suite.per_session {
        let calls = (0..3).flat_map(|_| [d.get_worker(&s4), a.get_worker(&s4)]);
        let results: Vec<WorkerEndpoint> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("get_worker from two instances: {e}")))
            .collect();
        let first = results[0].clone();
        assert!(
            results.iter().all(|w| *w == first),
            "two instances racing for one session got {:?}",
            results
                .iter()
                .map(|w| (&w.worker_id, &w.base_url, w.secret.is_some()))
                .collect::<Vec<_>>()
        );
        assert_eq!(workers_of(d, &s4).await.len(), 1, "one worker for s4");
        assert_eq!(workers_of(a, &s4).await, vec![first.clone()]);
        use_worker(&first, &s4).await;

        // One instance replaces the worker; the other hands out the new one (its address and
        // secret), not the one it knew.
        a.release(&s4)
            .await
            .expect("release from the other instance");
        until_stopped(d, &first, suite.stop_within, "a released worker").await;
        let fresh = get(a, &s4).await;
        let seen = get(d, &s4).await;
        assert_eq!(
            seen, fresh,
            "the other instance hands out the replaced worker"
        );
        assert_ne!(seen.secret, first.secret, "a new worker has a new secret");
        use_worker(&seen, &s4).await;
    }

    // Releasing.
    a.release(&session("never-seen"))
        .await
        .expect("releasing an unknown session is not an error");
    if suite.per_session {
        d.release(&s1).await.expect("release");
        assert!(
            workers_of(d, &s1).await.is_empty(),
            "a released worker is not listed"
        );
        let deadline = tokio::time::Instant::now() + suite.stop_within;
        while d.is_healthy(&w1).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a released worker still answers after {:?}",
                suite.stop_within
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let w1b = get(d, &s1).await;
        assert!(
            d.is_healthy(&w1b).await,
            "the next get_worker brings a worker back"
        );
        assert_eq!(workers_of(d, &s1).await.len(), 1);
    } else {
        d.release(&s1).await.expect("release");
        assert!(
            d.is_healthy(&w1).await,
            "a shared worker outlives one session"
        );
    }

    // Purging: release plus the session's storage; idempotent, and the session can start over.
    a.purge(&session("never-seen"))
        .await
        .expect("purging an unknown session is not an error");
    let s3 = session("purge");
    made.push(s3.clone());
    let w3 = get(d, &s3).await;
    d.purge(&s3).await.expect("purge");
    d.purge(&s3)
        .await
        .expect("purging a purged session again is not an error");
    if suite.per_session {
        assert!(
            workers_of(d, &s3).await.is_empty(),
            "a purged worker is not listed"
        );
        let deadline = tokio::time::Instant::now() + suite.stop_within;
        while d.is_healthy(&w3).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a purged worker still answers after {:?}",
                suite.stop_within
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        assert!(
            d.is_healthy(&w3).await,
            "a shared worker outlives a purged session"
        );
    }
    let fresh = get(d, &s3).await;
    assert!(
        d.is_healthy(&fresh).await,
        "get_worker after purge brings a fresh worker"
    );
    if suite.per_session {
        assert_eq!(workers_of(d, &s3).await.len(), 1);
    }

    // The reaper: idle workers go, busy ones stay.
    if let Some(ttl) = suite.idle_ttl {
        let idle = session("idle");
        let busy = session("busy");
        made.push(idle.clone());
        made.push(busy.clone());
        get(d, &idle).await;
        get(d, &busy).await;
        // Asked for again (a reuse, quick) right before the reaper looks: making `busy`'s
        // worker may have taken longer than the TTL on a loaded machine.
        get(d, &idle).await;
        get(d, &busy).await;
        assert!(
            d.reap_idle(&[])
                .await
                .expect("reap")
                .iter()
                .all(|s| s != &idle && s != &busy),
            "workers used just now are not reaped"
        );
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;
        // The guard is asked last, and a session it keeps keeps its worker.
        let keep = RecordingGuard::new(false);
        let reaped = d
            .reap_idle_guarded(std::slice::from_ref(&busy), &keep)
            .await
            .expect("reap");
        assert!(
            reaped.is_empty(),
            "a worker whose session the guard keeps is reaped: {reaped:?}"
        );
        assert!(
            keep.held().contains(&idle),
            "the guard is asked before a stop"
        );
        assert!(!keep.held().contains(&busy), "{:?}", keep.held());
        assert!(
            keep.released().is_empty(),
            "nothing held, nothing to release"
        );
        assert_eq!(workers_of(d, &idle).await.len(), 1);
        let give = RecordingGuard::new(true);
        let reaped = d
            .reap_idle_guarded(std::slice::from_ref(&busy), &give)
            .await
            .expect("reap");
        assert!(
            reaped.contains(&idle),
            "an idle worker is reaped: {reaped:?}"
        );
        assert!(give.held().contains(&idle), "{:?}", give.held());
        assert_eq!(
            give.released(),
            give.held(),
            "each hold is released after the stop"
        );
        assert!(
            !reaped.contains(&busy),
            "a busy session's worker is not reaped"
        );
        assert!(workers_of(d, &idle).await.is_empty());
        assert_eq!(workers_of(d, &busy).await.len(), 1);
        let back = get(d, &idle).await;
        assert!(
            d.is_healthy(&back).await,
            "a reaped session gets a new worker"
        );

        // One instance's reaper and a worker the other one uses: the worker's own idle time
        // counts, not only the reaper's clock.
        if suite.per_session {
            let shared = get(a, &s4).await;
            assert_eq!(get(d, &s4).await, shared);
            tokio::time::sleep(ttl + Duration::from_millis(200)).await;
            use_worker(&shared, &s4).await;
            let reaped = d.reap_idle(&[]).await.expect("reap");
            assert!(
                !reaped.contains(&s4),
                "one instance reaped a worker the other used just now"
            );
            assert_eq!(workers_of(a, &s4).await, vec![shared.clone()]);
            tokio::time::sleep(ttl + Duration::from_millis(200)).await;
            let reaped = d.reap_idle(&[]).await.expect("reap");
            assert!(
                reaped.contains(&s4),
                "a worker idle for every instance is reaped: {reaped:?}"
            );
            until_stopped(a, &shared, suite.stop_within, "a reaped worker").await;
            let next = get(a, &s4).await;
            use_worker(&next, &s4).await;
        }
    }

    for s in &made {
        d.purge(s)
            .await
            .unwrap_or_else(|e| panic!("cleanup: purge({s}): {e}"));
    }
    if suite.per_session {
        for s in &made {
            assert!(workers_of(d, s).await.is_empty(), "{s} purged");
        }
    }
}

/// A [`ReapGuard`] that gives every session or none, and records what it was asked and told.
struct RecordingGuard {
    give: bool,
    held: std::sync::Mutex<Vec<SessionId>>,
    released: std::sync::Mutex<Vec<SessionId>>,
}

impl RecordingGuard {
    fn new(give: bool) -> Self {
        Self {
            give,
            held: Default::default(),
            released: Default::default(),
        }
    }

    fn held(&self) -> Vec<SessionId> {
        self.held.lock().unwrap().clone()
    }

    fn released(&self) -> Vec<SessionId> {
        self.released.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ReapGuard for RecordingGuard {
    async fn hold(&self, session_id: &SessionId) -> bool {
        self.held.lock().unwrap().push(session_id.clone());
        self.give
    }

    async fn release(&self, session_id: &SessionId) {
        self.released.lock().unwrap().push(session_id.clone());
    }
}
