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
//! | `anywork_retention_deleted_total` | counter | `what`: tasks, events |

use anywork_core::{Task, TaskStatus};
use prometheus_client::collector::Collector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the task duration histogram.
pub const DURATION_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

type Label = [(&'static str, &'static str); 1];

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
        for what in ["tasks", "events"] {
            let _ = retention.get_or_create(&[("what", what)]);
        }
        Self {
            submitted: Counter::default(),
            finished,
            runs,
            duration: Histogram::new(DURATION_BUCKETS),
            store_bytes: Gauge::default(),
            store_reclaimable: Gauge::default(),
            retention,
        }
    }
}

impl Metrics {
    pub(crate) fn submitted(&self) {
        self.submitted.inc();
    }

    pub(crate) fn started(&self) {
        self.runs.get_or_create(&[("phase", "started")]).inc();
    }

    pub(crate) fn stopped(&self) {
        self.runs.get_or_create(&[("phase", "stopped")]).inc();
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

    pub(crate) fn finished(&self, task: &Task) {
        let status = match task.status {
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Canceled => "canceled",
            _ => return,
        };
        self.finished.get_or_create(&[("status", status)]).inc();
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
            "Finished tasks' logs deleted by retention: tasks and events",
            self.retention.clone(),
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
}
