//! [`Metrics`]: counters of the dispatcher, rendered in the Prometheus text format by
//! [`Metrics::render`] (no metrics crate needed for a handful of series).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use anywork_core::{Task, TaskStatus};

/// Upper bounds (seconds) of the task duration histogram.
pub const DURATION_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// What the dispatcher counts.
#[derive(Debug, Default)]
pub struct Metrics {
    submitted: AtomicU64,
    started: AtomicU64,
    stopped: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    canceled: AtomicU64,
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_ms: AtomicU64,
}

/// Gauges read when rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Tasks waiting in session queues.
    pub queue_depth: usize,
    /// Tasks running on this server.
    pub running: usize,
    /// Open WebSocket connections.
    pub websockets: usize,
}

impl Metrics {
    pub(crate) fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stopped(&self) {
        self.stopped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished(&self, task: &Task) {
        let counter = match task.status {
            TaskStatus::Completed => &self.completed,
            TaskStatus::Failed => &self.failed,
            TaskStatus::Canceled => &self.canceled,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let (Some(start), Some(end)) = (task.started_at, task.finished_at) else {
            return;
        };
        let ms = (end.as_millis() - start.as_millis()).max(0) as u64;
        let secs = ms as f64 / 1000.0;
        for (bound, bucket) in DURATION_BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Tasks that ended with `status` since start.
    pub fn finished_total(&self, status: TaskStatus) -> u64 {
        match status {
            TaskStatus::Completed => self.completed.load(Ordering::Relaxed),
            TaskStatus::Failed => self.failed.load(Ordering::Relaxed),
            TaskStatus::Canceled => self.canceled.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP anywork_tasks_submitted_total Tasks accepted since the server started.\n\
             # TYPE anywork_tasks_submitted_total counter\n\
             anywork_tasks_submitted_total {}",
            load(&self.submitted)
        );
        let _ = writeln!(
            out,
            "# HELP anywork_tasks_finished_total Tasks that reached a final status, by status.\n\
             # TYPE anywork_tasks_finished_total counter"
        );
        for (status, counter) in [
            ("completed", &self.completed),
            ("failed", &self.failed),
            ("canceled", &self.canceled),
        ] {
            let _ = writeln!(
                out,
                "anywork_tasks_finished_total{{status=\"{status}\"}} {}",
                load(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP anywork_tasks_running Tasks running on this server.\n\
             # TYPE anywork_tasks_running gauge\n\
             anywork_tasks_running {}\n\
             # HELP anywork_queue_depth Tasks waiting behind another task of their session or for a slot.\n\
             # TYPE anywork_queue_depth gauge\n\
             anywork_queue_depth {}\n\
             # HELP anywork_websocket_connections Open WebSocket connections.\n\
             # TYPE anywork_websocket_connections gauge\n\
             anywork_websocket_connections {}\n\
             # HELP anywork_task_runs_total Runs started and stopped by this server.\n\
             # TYPE anywork_task_runs_total counter\n\
             anywork_task_runs_total{{phase=\"started\"}} {}\n\
             anywork_task_runs_total{{phase=\"stopped\"}} {}",
            gauges.running,
            gauges.queue_depth,
            gauges.websockets,
            load(&self.started),
            load(&self.stopped),
        );
        let _ = writeln!(
            out,
            "# HELP anywork_task_duration_seconds Time from start to final status.\n\
             # TYPE anywork_task_duration_seconds histogram"
        );
        for (bound, bucket) in DURATION_BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "anywork_task_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.duration_count);
        let _ = writeln!(
            out,
            "anywork_task_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             anywork_task_duration_seconds_sum {}\n\
             anywork_task_duration_seconds_count {count}",
            load(&self.duration_sum_ms) as f64 / 1000.0
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anywork_core::{NewTask, SessionId, TaskRequest, Timestamp};

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
        let text = m.render(Gauges {
            queue_depth: 3,
            running: 1,
            websockets: 2,
        });
        assert!(text.contains("anywork_tasks_finished_total{status=\"completed\"} 1"));
        assert!(text.contains("anywork_task_duration_seconds_bucket{le=\"1\"} 0"));
        assert!(text.contains("anywork_task_duration_seconds_bucket{le=\"2.5\"} 1"));
        assert!(text.contains("anywork_task_duration_seconds_sum 2"));
        assert!(text.contains("anywork_queue_depth 3"));
    }
}
