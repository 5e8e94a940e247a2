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
        let policy = self.config.outbound.clone();
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
                    || push_outcome(&http, &policy, push, &task),
                    Error::is_retryable,
                )
                .await
            {
                tracing::warn!(task = %task.id, host = %url_host(&push.url), error = %e, "push notification failed");
            }
        });
    }
}

/// POSTs the finished task (the REST task shape) to its push-notification URL.
async fn push_outcome(
    http: &reqwest::Client,
    policy: &anywork_core::OutboundPolicy,
    push: &anywork_core::PushNotification,
    task: &Task,
) -> Result<()> {
    // Checked again at send time (the policy may have changed since the task came in); the
    // client checks every resolved address and redirect, so the caller's `Authorization`
    // only goes where the policy allows.
    let url = reqwest::Url::parse(&push.url)
        .map_err(|e| Error::invalid_input(format!("push notification URL: {e}")))?;
    policy.check_target(
        "push_notification.url",
        url.scheme(),
        url.host_str().unwrap_or(""),
    )?;
    let host = url_host(&push.url);
    let mut request = http.post(url).json(&WireTask::from(task));
    if let Some(auth) = &push.authorization {
        request = request.header(reqwest::header::AUTHORIZATION, auth);
    }
    let response = request.send().await.map_err(|e| {
        // A refused address or redirect will not pass on a retry.
        let chain = error_chain(&e);
        let refused = e.is_redirect() || chain.contains("requests may only reach public addresses");
        let message = format!("push notification to {host}: {chain}");
        if refused {
            Error::invalid_input(message)
        } else {
            Error::unavailable(message)
        }
    })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status.as_u16() == 429 {
        Err(Error::unavailable(format!(
            "push notification to {host} answered {status}"
        )))
    } else {
        Err(Error::invalid_input(format!(
            "push notification to {host} answered {status}"
        )))
    }
}

/// `scheme://host[:port]` of a URL (no user info, path or query, which may hold secrets).
fn url_host(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<not a URL>".to_owned(),
    }
}

/// An error with its sources, `: `-separated, without URLs.
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = if e.is_redirect() {
        "redirect refused"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    }
    .to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
