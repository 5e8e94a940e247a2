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

/// `scheme://host[:port]` of a URL (no user info, path or query, which may hold secrets).
pub(super) fn url_host(url: &str) -> String {
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
pub(super) fn error_chain(e: &reqwest::Error) -> String {
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
