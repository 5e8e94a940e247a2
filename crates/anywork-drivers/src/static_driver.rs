//! [`StaticDriver`]: every session uses one worker at a fixed URL (`STATIC_WORKER_URL`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::{
    ContainerDriver, Error, ErrorKind, Result, SessionId, SetupCheck, WorkerEndpoint, WorkerInfo,
    worker_api::WorkerHealth,
};
use async_trait::async_trait;

/// Hands out one worker URL to every session. The worker serves many sessions at once.
#[derive(Debug, Clone)]
pub struct StaticDriver {
    endpoint: WorkerEndpoint,
    client: reqwest::Client,
    /// When `/health` last answered: `get_worker` trusts it for [`Self::HEALTH_FRESH`].
    healthy_at: Arc<Mutex<Option<Instant>>>,
}

impl StaticDriver {
    /// How long `/health` may take before the worker counts as down.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

    /// How long a passed health check stands for `get_worker`. A worker that dies within it is
    /// found by the dispatcher's next call to it, which fails and is retried.
    pub const HEALTH_FRESH: Duration = Duration::from_secs(1);

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
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            endpoint: WorkerEndpoint {
                worker_id: format!("static:{base_url}"),
                base_url,
            },
            client,
            healthy_at: Arc::default(),
        })
    }

    /// The one endpoint.
    pub fn endpoint(&self) -> &WorkerEndpoint {
        &self.endpoint
    }
}

#[async_trait]
impl ContainerDriver for StaticDriver {
    fn name(&self) -> &str {
        "static"
    }

    async fn get_worker(&self, _session_id: &SessionId) -> Result<WorkerEndpoint> {
        let fresh = self
            .healthy_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < Self::HEALTH_FRESH);
        if fresh || self.is_healthy(&self.endpoint).await {
            Ok(self.endpoint.clone())
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the worker at {} does not answer GET /health: start it, or fix STATIC_WORKER_URL",
                    self.endpoint.base_url
                ),
            ))
        }
    }

    async fn release(&self, _session_id: &SessionId) -> Result<()> {
        // The worker is shared; nothing to stop.
        Ok(())
    }

    async fn is_healthy(&self, endpoint: &WorkerEndpoint) -> bool {
        let url = format!("{}/health", endpoint.base_url);
        let healthy = matches!(self.client.get(url).send().await, Ok(r) if r.status().is_success());
        if endpoint == &self.endpoint {
            *self.healthy_at.lock().unwrap_or_else(|e| e.into_inner()) = healthy.then(Instant::now);
        }
        healthy
    }

    /// The worker answers `/health` (and says which executor it runs).
    async fn check_setup(&self) -> Vec<SetupCheck> {
        let url = &self.endpoint.base_url;
        let health = match self.client.get(format!("{url}/health")).send().await {
            Ok(r) if r.status().is_success() => r.json::<WorkerHealth>().await.ok(),
            _ => None,
        };
        vec![match health {
            Some(h) => SetupCheck::ok(
                "worker",
                format!("the worker at {url} answers (executor {})", h.executor),
            ),
            None => SetupCheck::problem(
                "worker",
                format!(
                    "the worker at {url} does not answer GET /health: start it, or fix \
                     STATIC_WORKER_URL"
                ),
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
