//! After a task ends: its metrics, the delivery of its outcome to its channel, and the push
//! notification to its URL, each retried on errors that may pass. Runs after the outcome is
//! stored, off the run's path.

use std::time::Duration;

use anywork_core::{Error, Result, Task, TaskOutcome, WireTask};

use super::Inner;
use super::retry::{Backoff, retry_if};

impl Inner {
    /// Metrics, channel delivery and the push notification of a task that ended.
    pub(super) async fn after_finish(&self, task: &Task, outcome: TaskOutcome) {
        self.metrics.finished(task);
        let channel = self.channels.get(&task.channel_type).cloned();
        if channel.is_none() && task.push_notification.is_none() {
            return;
        }
        let task = task.clone();
        let http = self.http.clone();
        let backoff = Backoff::new(4, Duration::from_millis(500), Duration::from_secs(10));
        tokio::spawn(async move {
            if let Some(channel) = channel
                && let Err(e) = retry_if(
                    &backoff,
                    || channel.deliver(&task, &outcome),
                    Error::is_retryable,
                )
                .await
            {
                tracing::warn!(task = %task.id, error = %e, "channel delivery failed");
            }
            if let Some(push) = &task.push_notification
                && let Err(e) = retry_if(
                    &backoff,
                    || push_outcome(&http, push, &task),
                    Error::is_retryable,
                )
                .await
            {
                tracing::warn!(task = %task.id, url = %push.url, error = %e, "push notification failed");
            }
        });
    }
}

/// POSTs the finished task (the REST task shape) to its push-notification URL.
async fn push_outcome(
    http: &reqwest::Client,
    push: &anywork_core::PushNotification,
    task: &Task,
) -> Result<()> {
    let mut request = http.post(&push.url).json(&WireTask::from(task));
    if let Some(auth) = &push.authorization {
        request = request.header(reqwest::header::AUTHORIZATION, auth);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Error::unavailable(format!("push notification to {}: {e}", push.url)))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status.as_u16() == 429 {
        Err(Error::unavailable(format!(
            "push notification to {} answered {status}",
            push.url
        )))
    } else {
        Err(Error::invalid_input(format!(
            "push notification to {} answered {status}",
            push.url
        )))
    }
}
