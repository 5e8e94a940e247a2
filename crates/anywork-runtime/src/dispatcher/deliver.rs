//! After a task ends: its metrics, and the end of its hook queue (the hooks already queued
//! still run). Its outcome is on its way out already: the deliveries were enqueued with the
//! final status (see `outbox.rs`).

use anywork_core::Task;

use super::Inner;

impl Inner {
    /// Metrics and the end of the hooks of a task that ended.
    pub(super) fn after_finish(&self, task: &Task) {
        self.metrics.finished(task);
        self.hooks.close(task.id);
    }
}
