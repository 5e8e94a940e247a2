//! [`DispatcherConfig`] and [`DispatcherBuilder`]: what a dispatcher is made of, and its
//! start (re-queueing what a previous run left pending, recovering expired leases, the
//! background loops).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::{
    Channel, ContainerDriver, McpAccess, OutboundPolicy, Result, TaskId, TaskStore,
};
use tokio::sync::Semaphore;

use super::outbox::{OutboxConfig, delivery_loop};
use super::retention::{Retention, retention_loop};
use super::retry::Backoff;
use super::upkeep::{claim_loop, reap_loop, recovery_loop};
use super::{Dispatcher, Inner};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::skills::{NoSkills, SkillSource};
use crate::task_map::TaskMap;
use crate::title::{FirstWords, TitleGenerator};
use crate::worker_client::WorkerClient;

/// How the dispatcher behaves. Start from [`Default`] and set the fields you need: new fields
/// may come in minor releases.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DispatcherConfig {
    /// Tasks running at once, over all sessions.
    pub max_concurrent: usize,
    /// A run that takes longer ends as failed with the reason.
    pub task_timeout: Duration,
    /// How long a running task's lease lasts; renewed every third of it. After a crash, a task
    /// whose lease expired is failed with the reason.
    pub lease_ttl: Duration,
    /// How long a canceled run may take to stop before it is recorded as canceled anyway.
    pub cancel_grace: Duration,
    /// This server's name in leases (unique per process).
    pub owner: String,
    /// Lease owners known to be gone — typically this server's previous incarnation, whose
    /// name the binary keeps in its data folder: their tasks are ended as interrupted at start,
    /// without waiting for their leases to expire.
    pub dead_owners: Vec<String>,
    /// Retries of worker calls.
    pub retry: Backoff,
    /// Retries of a run's store writes that failed for a reason that may pass (a locked
    /// database, an outage); after the last one the run stops and says why.
    pub store_retry: Backoff,
    /// Timeout of worker control calls (`/prepare`, `/cancel`, `/input`).
    pub control_timeout: Duration,
    /// Events appended to the log in one batch, at most.
    pub max_batch: usize,
    /// How long getting a task's worker may take before a `progress` event says that a worker
    /// is being made ready (a worker that is up answers well within it; zero: always told).
    pub progress_after: Duration,
    /// How often the driver is asked to stop idle workers ([`ContainerDriver::reap_idle`]);
    /// `None` never, nor with a driver that [reaps none](ContainerDriver::reaps_workers).
    pub reap_every: Option<Duration>,
    /// How long the reaper holds an idle session in the store while the driver stops its
    /// worker ([`TaskStore::hold_idle_session`]): a task of the session that arrives
    /// meanwhile waits, on every server, until the stop is over (or, if this server dies
    /// mid-stop, until the hold runs out). Longer than the driver's slowest stop (Docker:
    /// its stop grace plus the removal).
    pub reap_hold: Duration,
    /// How often the store is asked for pending tasks of free sessions that no runner here
    /// has (accepted by another server sharing the store, or waiting behind a task that
    /// another server ran): they are queued here and claimed by whichever server gets to
    /// them first ([`TaskStore::claim_task`]). Also when a task ends here.
    pub claim_every: Duration,
    /// How long finished tasks' logs are kept, and how often the store's size is measured.
    pub retention: Retention,
    /// A worker's `/chat` stream silent for this long (no event, not even a keep-alive
    /// comment; workers send one every 15 s) fails its task with the reason.
    pub stream_idle_timeout: Duration,
    /// Where request-chosen URLs may lead (push notifications, webhook callbacks, HTTP MCP
    /// servers): checked when a request comes in and again when connecting. Default:
    /// [`OutboundPolicy::strict`] (https, public addresses only).
    pub outbound: OutboundPolicy,
    /// Which MCP servers a request may ask for: entries of the operator's catalog, and its
    /// own stdio commands only when allowed. Default: an empty catalog, no commands.
    pub mcp: McpAccess,
    /// How the outbox sends channel deliveries and push notifications.
    pub outbox: OutboxConfig,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            task_timeout: Duration::from_secs(30 * 60),
            lease_ttl: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            owner: format!("server-{}", TaskId::generate()),
            dead_owners: Vec::new(),
            retry: Backoff::default(),
            store_retry: Backoff::new(10, Duration::from_millis(200), Duration::from_secs(5)),
            control_timeout: Duration::from_secs(30),
            max_batch: 256,
            progress_after: Duration::from_millis(500),
            reap_every: Some(Duration::from_secs(30)),
            reap_hold: Duration::from_secs(60),
            claim_every: Duration::from_secs(1),
            retention: Retention::default(),
            stream_idle_timeout: Duration::from_secs(60),
            outbound: OutboundPolicy::strict(),
            mcp: McpAccess::default(),
            outbox: OutboxConfig::default(),
        }
    }
}

/// Builds a [`Dispatcher`]: [`Dispatcher::builder`], then `config`, `channel`, `titles`, and
/// [`start`](Self::start).
pub struct DispatcherBuilder {
    store: Arc<dyn TaskStore>,
    driver: Arc<dyn ContainerDriver>,
    config: DispatcherConfig,
    channels: HashMap<String, Arc<dyn Channel>>,
    titles: Arc<dyn TitleGenerator>,
    skills: Arc<dyn SkillSource>,
    push_secret: Option<String>,
}

impl std::fmt::Debug for DispatcherBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("driver", &self.driver.name())
            .field("config", &self.config)
            .field("channels", &self.channels.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A builder over a store and a driver.
    pub fn builder(
        store: Arc<dyn TaskStore>,
        driver: Arc<dyn ContainerDriver>,
    ) -> DispatcherBuilder {
        DispatcherBuilder {
            store,
            driver,
            config: DispatcherConfig::default(),
            channels: HashMap::new(),
            titles: Arc::new(FirstWords),
            skills: Arc::new(NoSkills),
            push_secret: None,
        }
    }
}

impl DispatcherBuilder {
    /// Sets the configuration.
    pub fn config(mut self, config: DispatcherConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a channel: its defaults apply to its tasks, and finished tasks are delivered to it.
    pub fn channel(mut self, channel: Arc<dyn Channel>) -> Self {
        self.channels
            .insert(channel.channel_type().to_owned(), channel);
        self
    }

    /// Signs push notifications with `secret`: `X-AnyWork-Timestamp` and
    /// `X-AnyWork-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, the scheme
    /// the generic webhook checks. Without it pushes go unsigned (their `Authorization`
    /// header, if the task gave one, still goes).
    pub fn push_signing_secret(mut self, secret: impl Into<String>) -> Self {
        self.push_secret = Some(secret.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets how session titles are made (default: [`FirstWords`]).
    pub fn titles(mut self, titles: impl TitleGenerator) -> Self {
        self.titles = Arc::new(titles);
        self
    }

    /// Sets where skills asked for by name come from (default: [`NoSkills`], which refuses
    /// every name saying how to set `SKILLS_DIR`).
    pub fn skills(mut self, skills: impl SkillSource) -> Self {
        self.skills = Arc::new(skills);
        self
    }

    /// Starts the dispatcher: its background loops (lease recovery, the outbox sender, the
    /// idle-worker reaper), and the tasks a previous run left pending are queued again (the
    /// deliveries it left are sent by the outbox sender). Needs a Tokio runtime.
    pub async fn start(self) -> Result<Dispatcher> {
        let client = WorkerClient::new(self.config.control_timeout)?
            .with_stream_idle_timeout(self.config.stream_idle_timeout);
        let http =
            crate::outbound::checked_client(self.config.outbound.clone(), Duration::from_secs(30))?;
        let permits = Arc::new(Semaphore::new(self.config.max_concurrent.max(1)));
        let metrics = Metrics::default();
        metrics.driver(self.driver.name());
        let dispatcher = Dispatcher {
            inner: Arc::new(Inner {
                store: self.store,
                driver: self.driver,
                client,
                hub: Hub::default(),
                config: self.config,
                channels: self.channels,
                titles: self.titles,
                skills: self.skills,
                http,
                metrics,
                queues: Mutex::new(HashMap::new()),
                permits,
                runs: Mutex::new(TaskMap::default()),
                closing: AtomicBool::new(false),
                last_words: Mutex::new(TaskMap::default()),
                held: Mutex::new(HashMap::new()),
                resume: Mutex::new(Default::default()),
                stopped: AtomicBool::new(false),
                hooks: Default::default(),
                outbox_wake: Arc::new(tokio::sync::Notify::new()),
                push_secret: self.push_secret,
                answered: Mutex::new(Default::default()),
                defaults: Mutex::new(Default::default()),
                defaults_read: tokio::sync::Mutex::new(None),
            }),
        };
        // What a previous server left running is settled (or waited for) before any pending
        // task of its session is queued.
        dispatcher.settle_at_start().await?;
        dispatcher.requeue_pending().await?;
        tokio::spawn(recovery_loop(Arc::downgrade(&dispatcher.inner)));
        tokio::spawn(claim_loop(Arc::downgrade(&dispatcher.inner)));
        if let Some(feed) = dispatcher.inner.store.change_feed() {
            tokio::spawn(super::feed::feed_loop(
                Arc::downgrade(&dispatcher.inner),
                feed,
            ));
        }
        tokio::spawn(delivery_loop(Arc::downgrade(&dispatcher.inner)));
        tokio::spawn(retention_loop(Arc::downgrade(&dispatcher.inner)));
        // A driver with nothing to reap gets no reaper: an idle server's store stays unread.
        if let Some(every) = dispatcher.inner.config.reap_every
            && dispatcher.inner.driver.reaps_workers()
        {
            tokio::spawn(reap_loop(Arc::downgrade(&dispatcher.inner), every));
        }
        Ok(dispatcher)
    }
}
