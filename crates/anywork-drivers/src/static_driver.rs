//! [`StaticDriver`]: every session uses one worker at a fixed URL (`STATIC_WORKER_URL`),
//! called with its secret (`STATIC_WORKER_SECRET`, the worker's `WORKER_SECRET`) when one is
//! set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::worker_api::{SECRET_HEADER, WorkerSecret};
use anywork_core::{
    ContainerDriver, Error, ErrorKind, Result, SessionId, SetupCheck, WorkerEndpoint, WorkerInfo,
    worker_api::WorkerHealth,
};
use async_trait::async_trait;

/// Hands out one worker URL to every session. The worker serves many sessions at once.
#[derive(Debug, Clone)]
pub struct StaticDriver {
    endpoint: WorkerEndpoint,
    /// What [`ContainerDriver::name`] reports: `static`, or `local` for a server's in-process
    /// worker.
    name: &'static str,
    client: reqwest::Client,
    /// When `/health` last answered: `get_worker` trusts it for [`Self::HEALTH_FRESH`].
    healthy_at: Arc<Mutex<Option<Instant>>>,
    /// Held by the one check of `get_worker` under way, with when the last one ended and
    /// whether it passed: the calls that found the answer stale meanwhile take its result
    /// instead of a check each.
    checked: Arc<tokio::sync::Mutex<Option<(Instant, bool)>>>,
    /// A check started by [`ContainerDriver::ready_worker`] is under way.
    refreshing: Arc<AtomicBool>,
}

impl StaticDriver {
    /// How long `/health` may take before the worker counts as down.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

    /// How long a passed health check stands for `get_worker`. A worker that dies within it is
    /// found by the dispatcher's next call to it, which fails and is retried.
    pub const HEALTH_FRESH: Duration = Duration::from_secs(1);

    /// Idle connections the health checks keep to the worker.
    const HEALTH_IDLE_CONNECTIONS: usize = 4;

    /// How long [`purge`](ContainerDriver::purge) waits for a task still running in the
    /// session to end.
    pub const PURGE_WAIT: Duration = Duration::from_secs(10);

    /// A driver for the worker at `url` (`http://host:port`, no path).
    pub fn new(url: &str) -> Result<Self> {
        let base_url = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base_url).map_err(|e| {
            Error::invalid_input(format!(
                "STATIC_WORKER_URL {url:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8080"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(Error::invalid_input(format!(
                "STATIC_WORKER_URL {url:?} must be an http:// or https:// URL with a host"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(Self::HEALTH_TIMEOUT)
            // Once the check is stale, every task asking for the worker checks at once: after
            // a 10,000-session burst ≈ 250 connections stayed open, idle, for reqwest's 90 s
            // (docs/benchmarks.md, "Memory after the connections close"). A few suffice.
            .pool_max_idle_per_host(Self::HEALTH_IDLE_CONNECTIONS)
            .pool_idle_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            // Not the URL: the worker id reaches clients (a task's `workerId`).
            endpoint: WorkerEndpoint::new("static-worker", base_url),
            name: "static",
            client,
            healthy_at: Arc::default(),
            checked: Arc::default(),
            refreshing: Arc::default(),
        })
    }

    /// The same driver, calling the worker with `secret` (the worker's `WORKER_SECRET`).
    /// Without one the worker must have none either: it then accepts calls from anyone who
    /// reaches it.
    pub fn with_secret(mut self, secret: Option<WorkerSecret>) -> Self {
        self.endpoint.secret = secret;
        self
    }

    /// The same driver reporting `name` (e.g. `local` for a worker inside the server process):
    /// its [`name`](ContainerDriver::name), and its worker id `<name>-worker`.
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self.endpoint.worker_id = format!("{name}-worker");
        self
    }

    /// The one endpoint.
    pub fn endpoint(&self) -> &WorkerEndpoint {
        &self.endpoint
    }

    /// How long ago `/health` last answered, if its last check passed.
    fn health_age(&self) -> Option<Duration> {
        self.healthy_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }

    fn fresh(&self) -> bool {
        self.health_age()
            .is_some_and(|age| age < Self::HEALTH_FRESH)
    }

    /// Checks `/health` in the background, unless a check started here is under way (or no
    /// runtime runs this call): what it finds is what `get_worker`'s own check would have
    /// found, kept the same way.
    fn refresh(&self) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.refreshing.store(false, Ordering::Release);
            return;
        };
        let driver = self.clone();
        runtime.spawn(async move {
            driver.is_healthy(&driver.endpoint).await;
            driver.refreshing.store(false, Ordering::Release);
        });
    }
}

#[async_trait]
impl ContainerDriver for StaticDriver {
    fn name(&self) -> &str {
        self.name
    }

    async fn get_worker(&self, _session_id: &SessionId) -> Result<WorkerEndpoint> {
        if self.fresh() {
            return Ok(self.endpoint.clone());
        }
        // One check at a time: the calls that wait for it take its answer (a stale answer
        // under load sent a check per task in flight).
        let asked = Instant::now();
        let mut last = self.checked.lock().await;
        let healthy = match *last {
            Some((ended, healthy)) if ended >= asked => healthy,
            _ if self.fresh() => true,
            _ => {
                let healthy = self.is_healthy(&self.endpoint).await;
                *last = Some((Instant::now(), healthy));
                healthy
            }
        };
        drop(last);
        if healthy {
            Ok(self.endpoint.clone())
        } else {
            // The address stays in the server log: this message reaches clients.
            tracing::warn!(url = %self.endpoint.base_url, driver = self.name, "the worker does not answer GET /health");
            let what = if self.name == "static" {
                "the worker (STATIC_WORKER_URL) does not answer GET /health: start it, or fix \
                 STATIC_WORKER_URL"
            } else {
                "the worker does not answer GET /health: see the server log, or restart the server"
            };
            Err(Error::new(ErrorKind::Unavailable, what))
        }
    }

    /// The one worker while its last health check is fresh (what `get_worker` would answer
    /// without a call). Past half its freshness the check is made again in the background,
    /// so that under steady traffic it never goes stale: a stale answer sent every task
    /// started meanwhile the long way (stored `pending`, queued, its status read back, then
    /// claimed) until a `get_worker` had checked again.
    fn ready_worker(&self, _session_id: &SessionId) -> Option<WorkerEndpoint> {
        let age = self.health_age()?;
        if age >= Self::HEALTH_FRESH {
            return None;
        }
        if age >= Self::HEALTH_FRESH / 2 {
            self.refresh();
        }
        Some(self.endpoint.clone())
    }

    async fn release(&self, _session_id: &SessionId) -> Result<()> {
        // The worker is shared; nothing to stop.
        Ok(())
    }

    /// The one worker is shared by every session: never idle, nothing to reap.
    fn reaps_workers(&self) -> bool {
        false
    }

    /// Asks the worker to delete the session's workspace (`DELETE /sessions/:id`), waiting
    /// while a task still runs in it (a canceled task ending). A worker without that route (the
    /// original AnyWork's) keeps the files: that is logged, not an error.
    async fn purge(&self, session_id: &SessionId) -> Result<()> {
        let deadline = Instant::now() + Self::PURGE_WAIT;
        loop {
            match crate::common::delete_session_workspace(&self.client, &self.endpoint, session_id)
                .await
            {
                Err(e) if e.kind() == ErrorKind::Conflict && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    tracing::warn!(
                        session = %session_id,
                        "the worker has no DELETE /sessions/:id: the session's workspace stays \
                         on its disk"
                    );
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool {
        let url = format!("{}/health", endpoint.base_url);
        let healthy = matches!(self.client.get(url).send().await, Ok(r) if r.status().is_success());
        if endpoint == &self.endpoint {
            *self.healthy_at.lock().unwrap_or_else(|e| e.into_inner()) = healthy.then(Instant::now);
        }
        healthy
    }

    /// The worker answers `/health` (and says which executor it runs, when it takes the
    /// secret).
    async fn check_setup(&self) -> Vec<SetupCheck> {
        let url = &self.endpoint.base_url;
        let mut request = self.client.get(format!("{url}/health"));
        if let Some(secret) = &self.endpoint.secret {
            request = request.header(SECRET_HEADER, secret.expose());
        }
        let health = match request.send().await {
            // Answered; the executor is told with the secret only.
            Ok(r) if r.status().is_success() => {
                Some(r.json::<WorkerHealth>().await.ok().map(|h| h.executor))
            }
            _ => None,
        };
        let (what, fix) = if self.name == "static" {
            (
                format!("the worker at {url}"),
                "start it, or fix STATIC_WORKER_URL",
            )
        } else {
            (
                "the worker".to_owned(),
                "see the server log, or restart the server",
            )
        };
        vec![match health {
            Some(h) => SetupCheck::ok(
                "worker",
                match h {
                    Some(executor) => format!("{what} answers (executor {executor})"),
                    None => format!("{what} answers"),
                },
            ),
            None => SetupCheck::problem(
                "worker",
                format!("{what} does not answer GET /health: {fix}"),
            ),
        }]
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        Ok(vec![WorkerInfo {
            endpoint: self.endpoint.clone(),
            session_id: None,
            healthy: self.is_healthy(&self.endpoint).await,
        }])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::{Router, http::StatusCode, routing::get};
    use tokio::sync::Semaphore;

    use super::*;

    /// A worker whose `/health` counts the checks and answers `status` once `gate` lets it.
    async fn worker(checks: Arc<AtomicUsize>, gate: Arc<Semaphore>, status: StatusCode) -> String {
        let router = Router::new().route(
            "/health",
            get(move || {
                let (checks, gate) = (checks.clone(), gate.clone());
                async move {
                    checks.fetch_add(1, Ordering::SeqCst);
                    drop(gate.acquire().await);
                    status
                }
            }),
        );
        let (addr, _) = anywork_test::fake_http::serve(router).await;
        format!("http://{addr}")
    }

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    /// Waits (up to 10 s) until `checks` reaches `n`.
    async fn reach(checks: &AtomicUsize, n: usize) {
        for _ in 0..1000 {
            if checks.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} checks, expected {n}", checks.load(Ordering::SeqCst));
    }

    /// Eight `get_worker` calls while the answer is stale, the check answering `status` only
    /// once they all are in: the driver and how many checks the worker saw.
    async fn eight_at_once(status: StatusCode) -> (Vec<Result<WorkerEndpoint>>, usize) {
        let (checks, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(0)));
        let driver =
            StaticDriver::new(&worker(checks.clone(), gate.clone(), status).await).unwrap();
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let driver = driver.clone();
                tokio::spawn(async move { driver.get_worker(&sid(&format!("s{i}"))).await })
            })
            .collect();
        reach(&checks, 1).await;
        // The other calls come in meanwhile (each sent a check of its own before).
        tokio::time::sleep(Duration::from_millis(200)).await;
        gate.add_permits(64);
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        (answers, checks.load(Ordering::SeqCst))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_find_the_health_stale_together_share_one_check() {
        let (answers, checks) = eight_at_once(StatusCode::OK).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(checks, 1, "one check for the eight calls");

        // A failed check fails every call that waited for it, as a check of its own would.
        let (answers, checks) = eight_at_once(StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(
            answers.iter().all(|a| a
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::Unavailable)),
            "{answers:?}"
        );
        assert_eq!(checks, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ready_worker_is_checked_again_before_its_health_goes_stale() {
        let (checks, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Semaphore::new(64)));
        let driver =
            StaticDriver::new(&worker(checks.clone(), gate, StatusCode::OK).await).unwrap();
        assert_eq!(driver.ready_worker(&sid("a")), None, "never checked");
        driver.get_worker(&sid("a")).await.unwrap();
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        assert!(driver.ready_worker(&sid("a")).is_some());
        assert!(!driver.refreshing.load(Ordering::SeqCst), "fresh: no check");

        // Past half its freshness: still ready, and checked again in the background.
        let set_age = |age: Duration| {
            *driver.healthy_at.lock().unwrap() = Some(Instant::now().checked_sub(age).unwrap());
        };
        set_age(StaticDriver::HEALTH_FRESH * 3 / 5);
        assert_eq!(
            driver.ready_worker(&sid("b")),
            Some(driver.endpoint.clone())
        );
        assert!(driver.ready_worker(&sid("c")).is_some());
        reach(&checks, 2).await;
        for _ in 0..1000 {
            if !driver.refreshing.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(checks.load(Ordering::SeqCst), 2, "one check for both");
        assert!(
            driver.health_age().unwrap() < StaticDriver::HEALTH_FRESH / 2,
            "the check's answer is kept"
        );

        // Stale: not ready (`get_worker` checks), and no check from here.
        set_age(StaticDriver::HEALTH_FRESH);
        assert_eq!(driver.ready_worker(&sid("d")), None);
        assert!(!driver.refreshing.load(Ordering::SeqCst));
        driver.get_worker(&sid("d")).await.unwrap();
        assert_eq!(checks.load(Ordering::SeqCst), 3);
    }
}
