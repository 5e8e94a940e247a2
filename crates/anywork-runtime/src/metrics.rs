//! The dispatcher's metrics, as [`prometheus_client`] metrics: an embedder registers them in its
//! own [`Registry`] ([`Dispatcher::register_metrics`](crate::Dispatcher::register_metrics)) and
//! exposes that however it likes (Prometheus or OpenMetrics text, protobuf, a push gateway).
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `anywork_tasks_submitted_total` | counter | |
//! | `anywork_tasks_finished_total` | counter | `status`: completed, failed, canceled |
//! | `anywork_task_runs_total` | counter | `phase`: started, stopped |
//! | `anywork_task_duration_seconds` | histogram (start to final status) | |
//! | `anywork_tasks_running` | gauge, read at scrape time | |
//! | `anywork_queue_depth` | gauge, read at scrape time | |
//! | `anywork_store_bytes` | gauge, measured every retention round | |
//! | `anywork_store_reclaimable_bytes` | gauge, free space compaction can give back | |
//! | `anywork_retention_deleted_total` | counter | `what`: tasks, events, deliveries |
//! | `anywork_delivery_attempts_total` | counter: outbox delivery attempts by result | `result`: sent, retry, dead |
//! | `anywork_worker_starts_total` | counter: a task got its worker | `driver` |
//! | `anywork_worker_failures_total` | counter: an attempt to get a worker failed | `driver` |
//! | `anywork_worker_prepares_total` | counter: a task's worker `/prepare`, sent or left out (unchanged since the worker acknowledged it) | `result`: sent, skipped |
//! | `anywork_worker_start_seconds` | histogram: time for a task to get its worker, retries included | `driver` |
//! | `anywork_model_tokens_total` | counter: tokens of finished tasks | `model`, `kind`: input, output, cache_read, cache_write |
//! | `anywork_model_cost_usd_total` | counter: cost of finished tasks, US dollars | `model` |
//! | `anywork_model_retries_total` | counter: model calls retried (progress `model_retry`) | `model` |
//! | `anywork_model_errors_total` | counter: model API errors told by an `error` event | `model`, `code` |
//! | `anywork_feed_changes_total` | counter: log appends told by the store's change feed (other servers' runs) | `outcome`: read (started a log read), covered (its events were read, or are being read, by a read of another change), skipped (nobody follows the task here, or it runs here) |
//! | `anywork_feed_tasks` | gauge: tasks followed here and run elsewhere that the change feed keeps track of (an entry each; bounded, swept of tasks nobody follows here any more) | |
//! | `anywork_feed_log_reads_total` | counter: log pages the change feed read | |
//! | `anywork_feed_wait_seconds` | histogram: from a change's arrival on this server to the start of the log read that forwards it | |
//! | `anywork_feed_read_seconds` | histogram: one log read of the change feed | |
//! | `anywork_follow_fallback_reads_total` | counter: log reads of a follower that got nothing live for a while (`quiet`) or whose live channel closed before the `done` (`closed`) | `why`: quiet, closed; `found`: events, nothing |
//!
//! Every counter counts since this process started: nothing survives a restart (Prometheus'
//! `rate()` and `increase()` handle the resets).

use anywork_core::{Task, TaskStatus};
use prometheus_client::collector::Collector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the task duration histogram.
pub const DURATION_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// Upper bounds (seconds) of the change feed's wait and read histograms.
pub const FEED_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Upper bounds (seconds) of the worker start-latency histogram.
pub const WORKER_START_BUCKETS: [f64; 10] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

type Label = [(&'static str, &'static str); 1];
type DriverLabel = [(&'static str, String); 1];

fn by_driver(driver: &str) -> DriverLabel {
    [("driver", driver.to_owned())]
}

/// What the dispatcher counts. Clones share the counts.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    submitted: Counter,
    finished: Family<Label, Counter>,
    runs: Family<Label, Counter>,
    duration: Histogram,
    store_bytes: Gauge,
    store_reclaimable: Gauge,
    retention: Family<Label, Counter>,
    deliveries: Family<Label, Counter>,
    worker_starts: Family<DriverLabel, Counter>,
    worker_failures: Family<DriverLabel, Counter>,
    worker_start: Family<DriverLabel, Histogram>,
    prepares: Family<Label, Counter>,
    tokens: Family<[(&'static str, String); 2], Counter>,
    cost: Family<[(&'static str, String); 1], Counter<f64, std::sync::atomic::AtomicU64>>,
    model_retries: Family<[(&'static str, String); 1], Counter>,
    model_errors: Family<[(&'static str, String); 2], Counter>,
    feed_changes: Family<Label, Counter>,
    feed_reads: Counter,
    feed_tasks: Gauge,
    feed_wait: Histogram,
    feed_read: Histogram,
    fallback_reads: Family<[(&'static str, &'static str); 2], Counter>,
    /// The counters of the fixed labels counted for every task, taken out of their families
    /// once (a clone shares the family's count): a family's `get_or_create` hashes the label
    /// and takes its lock on every call.
    hot: HotCounters,
}

/// Counters of [`Metrics`]' families that every task counts, by label.
#[derive(Debug, Clone)]
struct HotCounters {
    started: Counter,
    stopped: Counter,
    prepare_sent: Counter,
    prepare_skipped: Counter,
    completed: Counter,
    failed: Counter,
    canceled: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let finished = Family::<Label, Counter>::default();
        // Every status from the start, so a scrape shows zeros rather than nothing.
        for status in ["completed", "failed", "canceled"] {
            let _ = finished.get_or_create(&[("status", status)]);
        }
        let runs = Family::<Label, Counter>::default();
        for phase in ["started", "stopped"] {
            let _ = runs.get_or_create(&[("phase", phase)]);
        }
        let retention = Family::<Label, Counter>::default();
        for what in ["tasks", "events", "deliveries"] {
            let _ = retention.get_or_create(&[("what", what)]);
        }
        let deliveries = Family::<Label, Counter>::default();
        for result in ["sent", "retry", "dead"] {
            let _ = deliveries.get_or_create(&[("result", result)]);
        }
        let prepares = Family::<Label, Counter>::default();
        for result in ["sent", "skipped"] {
            let _ = prepares.get_or_create(&[("result", result)]);
        }
        let feed_changes = Family::<Label, Counter>::default();
        for outcome in ["read", "covered", "skipped"] {
            let _ = feed_changes.get_or_create(&[("outcome", outcome)]);
        }
        let fallback_reads = Family::<[(&'static str, &'static str); 2], Counter>::default();
        for why in ["quiet", "closed"] {
            for found in ["events", "nothing"] {
                let _ = fallback_reads.get_or_create(&[("why", why), ("found", found)]);
            }
        }
        let counter =
            |family: &Family<Label, Counter>, label: Label| family.get_or_create(&label).clone();
        let hot = HotCounters {
            started: counter(&runs, [("phase", "started")]),
            stopped: counter(&runs, [("phase", "stopped")]),
            prepare_sent: counter(&prepares, [("result", "sent")]),
            prepare_skipped: counter(&prepares, [("result", "skipped")]),
            completed: counter(&finished, [("status", "completed")]),
            failed: counter(&finished, [("status", "failed")]),
            canceled: counter(&finished, [("status", "canceled")]),
        };
        Self {
            hot,
            feed_changes,
            feed_reads: Counter::default(),
            feed_tasks: Gauge::default(),
            feed_wait: Histogram::new(FEED_BUCKETS),
            feed_read: Histogram::new(FEED_BUCKETS),
            fallback_reads,
            prepares,
            submitted: Counter::default(),
            finished,
            runs,
            duration: Histogram::new(DURATION_BUCKETS),
            store_bytes: Gauge::default(),
            store_reclaimable: Gauge::default(),
            retention,
            deliveries,
            worker_starts: Family::default(),
            worker_failures: Family::default(),
            worker_start: Family::new_with_constructor(|| Histogram::new(WORKER_START_BUCKETS)),
            tokens: Family::default(),
            cost: Family::default(),
            model_retries: Family::default(),
            model_errors: Family::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn submitted(&self) {
        self.submitted.inc();
    }

    pub(crate) fn started(&self) {
        self.hot.started.inc();
    }

    pub(crate) fn stopped(&self) {
        self.hot.stopped.inc();
    }

    pub(crate) fn store_size(&self, bytes: u64, reclaimable: u64) {
        self.store_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.store_reclaimable
            .set(i64::try_from(reclaimable).unwrap_or(i64::MAX));
    }

    pub(crate) fn logs_deleted(&self, tasks: u64, events: u64) {
        self.retention
            .get_or_create(&[("what", "tasks")])
            .inc_by(tasks);
        self.retention
            .get_or_create(&[("what", "events")])
            .inc_by(events);
    }

    /// Settled outbox deliveries deleted by retention.
    pub(crate) fn deliveries_deleted(&self, n: u64) {
        self.retention
            .get_or_create(&[("what", "deliveries")])
            .inc_by(n);
    }

    /// One outbox delivery attempt ended as `result` (`sent`, `retry`, `dead`).
    pub(crate) fn delivery_attempt(&self, result: &'static str) {
        self.deliveries.get_or_create(&[("result", result)]).inc();
    }

    /// A task got its worker from `driver` after `took` (retries included).
    pub(crate) fn worker_ready(&self, driver: &str, took: std::time::Duration) {
        self.worker_starts.get_or_create(&by_driver(driver)).inc();
        self.worker_start
            .get_or_create(&by_driver(driver))
            .observe(took.as_secs_f64());
    }

    /// An attempt to get a worker from `driver` failed.
    pub(crate) fn worker_failed(&self, driver: &str) {
        self.worker_failures.get_or_create(&by_driver(driver)).inc();
    }

    /// A finished task of `model` used `usage` and cost `cost_usd`.
    pub(crate) fn model_usage(
        &self,
        model: &str,
        usage: &anywork_core::TokenUsage,
        cost_usd: Option<f64>,
    ) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&[("model", model.to_owned()), ("kind", kind.to_owned())])
                    .inc_by(n);
            }
        }
        if let Some(cost) = cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
            self.cost
                .get_or_create(&[("model", model.to_owned())])
                .inc_by(cost);
        }
    }

    /// A call to `model` is being retried.
    pub(crate) fn model_retry(&self, model: &str) {
        self.model_retries
            .get_or_create(&[("model", model.to_owned())])
            .inc();
    }

    /// `model`'s API failed with `code`.
    pub(crate) fn model_error(&self, model: &str, code: &str) {
        self.model_errors
            .get_or_create(&[("model", model.to_owned()), ("code", code.to_owned())])
            .inc();
    }

    /// A task's `/prepare` was sent (`sent`) or left out as unchanged (`skipped`).
    pub(crate) fn prepare(&self, result: &'static str) {
        match result {
            "sent" => self.hot.prepare_sent.inc(),
            "skipped" => self.hot.prepare_skipped.inc(),
            _ => self.prepares.get_or_create(&[("result", result)]).inc(),
        };
    }

    /// A change told by the store's change feed was handled as `outcome` (`read`, `covered`,
    /// `skipped`).
    pub(crate) fn feed_change(&self, outcome: &'static str) {
        self.feed_changes
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// The change feed read one log page, which took `took`, for a change that had waited
    /// `waited` since it arrived here.
    pub(crate) fn feed_read(&self, waited: std::time::Duration, took: std::time::Duration) {
        self.feed_reads.inc();
        self.feed_wait.observe(waited.as_secs_f64());
        self.feed_read.observe(took.as_secs_f64());
    }

    /// The change feed keeps track of `n` remote tasks now.
    pub(crate) fn feed_tasks(&self, n: usize) {
        self.feed_tasks.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Remote tasks the change feed keeps track of now.
    #[cfg(test)]
    pub(crate) fn feed_tasks_now(&self) -> i64 {
        self.feed_tasks.get()
    }

    /// Log pages read by the change feed so far.
    #[cfg(test)]
    pub(crate) fn feed_reads(&self) -> u64 {
        self.feed_reads.get()
    }

    /// Changes the change feed took in so far.
    #[cfg(test)]
    pub(crate) fn feed_changes_told(&self) -> u64 {
        ["read", "covered", "skipped"]
            .into_iter()
            .map(|o| self.feed_changes.get_or_create(&[("outcome", o)]).get())
            .sum()
    }

    /// A follower read the log because nothing came live (`why`: `quiet`, `closed`), and
    /// found events or nothing.
    pub(crate) fn fallback_read(&self, why: &'static str, found_events: bool) {
        let found = if found_events { "events" } else { "nothing" };
        self.fallback_reads
            .get_or_create(&[("why", why), ("found", found)])
            .inc();
    }

    /// Shows the worker metrics of `driver` from the start (zeros rather than nothing).
    pub(crate) fn driver(&self, driver: &str) {
        let _ = self.worker_starts.get_or_create(&by_driver(driver));
        let _ = self.worker_failures.get_or_create(&by_driver(driver));
    }

    pub(crate) fn finished(&self, task: &Task) {
        let counter = match task.status {
            TaskStatus::Completed => &self.hot.completed,
            TaskStatus::Failed => &self.hot.failed,
            TaskStatus::Canceled => &self.hot.canceled,
            _ => return,
        };
        counter.inc();
        if let (Some(start), Some(end)) = (task.started_at, task.finished_at) {
            let ms = (end.as_millis() - start.as_millis()).max(0);
            self.duration.observe(ms as f64 / 1000.0);
        }
    }

    /// Registers the counters, the histogram and `gauges` (read at scrape time) in `registry`.
    pub(crate) fn register(&self, registry: &mut Registry, gauges: impl Collector) {
        registry.register(
            "anywork_tasks_submitted",
            "Tasks accepted since the server started",
            self.submitted.clone(),
        );
        registry.register(
            "anywork_tasks_finished",
            "Tasks that reached a final status, by status",
            self.finished.clone(),
        );
        registry.register(
            "anywork_task_runs",
            "Runs started and stopped by this server",
            self.runs.clone(),
        );
        registry.register(
            "anywork_task_duration_seconds",
            "Time from start to final status",
            self.duration.clone(),
        );
        registry.register(
            "anywork_store_bytes",
            "Bytes the task store takes on disk (0 until measured, or when it cannot tell)",
            self.store_bytes.clone(),
        );
        registry.register(
            "anywork_store_reclaimable_bytes",
            "Of those, free bytes inside the store that compaction can give back",
            self.store_reclaimable.clone(),
        );
        registry.register(
            "anywork_retention_deleted",
            "Deleted by retention: finished tasks' logs (tasks, events) and settled deliveries",
            self.retention.clone(),
        );
        registry.register(
            "anywork_delivery_attempts",
            "Outbox delivery attempts (channel answers, push notifications) by result",
            self.deliveries.clone(),
        );
        registry.register(
            "anywork_worker_starts",
            "Tasks that got their worker, by driver",
            self.worker_starts.clone(),
        );
        registry.register(
            "anywork_worker_failures",
            "Failed attempts to get a worker, by driver",
            self.worker_failures.clone(),
        );
        registry.register(
            "anywork_worker_prepares",
            "Worker /prepare calls of tasks, sent or left out as unchanged",
            self.prepares.clone(),
        );
        registry.register(
            "anywork_worker_start_seconds",
            "Time for a task to get its worker (retries included), by driver",
            self.worker_start.clone(),
        );
        registry.register(
            "anywork_model_tokens",
            "Tokens used by finished tasks, by model and kind",
            self.tokens.clone(),
        );
        registry.register(
            "anywork_model_cost_usd",
            "Cost of finished tasks in US dollars, by model",
            self.cost.clone(),
        );
        registry.register(
            "anywork_model_retries",
            "Model calls retried, by model",
            self.model_retries.clone(),
        );
        registry.register(
            "anywork_model_errors",
            "Model API errors told by tasks, by model and code",
            self.model_errors.clone(),
        );
        registry.register(
            "anywork_feed_changes",
            "Log appends told by the store's change feed, by what this server did with them",
            self.feed_changes.clone(),
        );
        registry.register(
            "anywork_feed_log_reads",
            "Log pages read by the change feed to forward other servers' events",
            self.feed_reads.clone(),
        );
        registry.register(
            "anywork_feed_tasks",
            "Tasks followed here and run elsewhere that the change feed keeps track of",
            self.feed_tasks.clone(),
        );
        registry.register(
            "anywork_feed_wait_seconds",
            "Time from a change's arrival here to the start of the log read that forwards it",
            self.feed_wait.clone(),
        );
        registry.register(
            "anywork_feed_read_seconds",
            "Time of one log read of the change feed",
            self.feed_read.clone(),
        );
        registry.register(
            "anywork_follow_fallback_reads",
            "Log reads of followers that got nothing live for a while (quiet) or whose live \
             channel closed before the done (closed), by whether they found events",
            self.fallback_reads.clone(),
        );
        registry.register_collector(Box::new(gauges));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anywork_core::{NewTask, SessionId, TaskRequest, Timestamp};
    use prometheus_client::encoding::prometheus_text::encode;

    #[derive(Debug)]
    struct NoGauges;

    impl Collector for NoGauges {
        fn encode(
            &self,
            _: prometheus_client::encoding::DescriptorEncoder<'_>,
        ) -> Result<(), std::fmt::Error> {
            Ok(())
        }
    }

    #[test]
    fn histogram_counts_a_finished_task() {
        let m = Metrics::default();
        let mut t = NewTask::from_request(
            SessionId::new("s").unwrap(),
            TaskRequest::new("webchat", "hi"),
        )
        .into_task();
        t.status = TaskStatus::Completed;
        t.started_at = Some(Timestamp(1_000));
        t.finished_at = Some(Timestamp(3_000));
        m.finished(&t);
        let mut registry = Registry::default();
        m.register(&mut registry, NoGauges);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("anywork_tasks_finished_total{status=\"completed\"} 1"),
            "{text}"
        );
        assert!(text.contains("anywork_tasks_finished_total{status=\"failed\"} 0"));
        assert!(
            text.contains("anywork_task_duration_seconds_bucket{le=\"1\"} 0"),
            "{text}"
        );
        assert!(text.contains("anywork_task_duration_seconds_bucket{le=\"2.5\"} 1"));
        assert!(text.contains("anywork_task_duration_seconds_sum 2.0"));
        assert!(text.contains("anywork_task_duration_seconds_count 1"));
        assert!(text.contains("anywork_tasks_submitted_total 0"), "{text}");
    }

    /// The counters every task counts (kept out of their families) show in the families'
    /// lines, under their labels, also through a clone of the metrics.
    #[test]
    fn the_kept_counters_count_in_their_families() {
        let m = Metrics::default();
        let shared = m.clone();
        m.started();
        shared.started();
        m.stopped();
        m.prepare("sent");
        shared.prepare("skipped");
        shared.prepare("skipped");
        let mut t = NewTask::from_request(
            SessionId::new("s").unwrap(),
            TaskRequest::new("webchat", "hi"),
        )
        .into_task();
        for status in [
            TaskStatus::Failed,
            TaskStatus::Canceled,
            TaskStatus::Canceled,
        ] {
            t.status = status;
            m.finished(&t);
        }
        let mut registry = Registry::default();
        m.register(&mut registry, NoGauges);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "anywork_task_runs_total{phase=\"started\"} 2",
            "anywork_task_runs_total{phase=\"stopped\"} 1",
            "anywork_worker_prepares_total{result=\"sent\"} 1",
            "anywork_worker_prepares_total{result=\"skipped\"} 2",
            "anywork_tasks_finished_total{status=\"completed\"} 0",
            "anywork_tasks_finished_total{status=\"failed\"} 1",
            "anywork_tasks_finished_total{status=\"canceled\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
