//! The outbox sender: what a task tells the outside world (its outcome to its channel, push
//! notifications) is enqueued in the store in the same transaction as the status change it
//! tells of ([`TaskStore::update_task_and_enqueue`]); this loop claims due deliveries (with a
//! lease, so that servers sharing a store never send one at the same time), sends each, and
//! records the attempt: sent; failed and due again after an exponential backoff with jitter
//! (or the receiver's `Retry-After`, whichever is later); dead after the last attempt or a
//! refusal that will not pass. Deliveries left by a stopped server are taken up when their
//! claim runs out. Every attempt of a push carries the delivery id as `Idempotency-Key`, so a
//! receiver can drop the second copy that a crash between sending and recording may cause.
//!
//! [`TaskStore::update_task_and_enqueue`]: anywork_core::TaskStore::update_task_and_enqueue

use std::hash::{BuildHasher, Hasher};
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anywork_core::{
    Delivery, DeliveryAttempt, DeliveryTarget, Error, ErrorKind, InputRequest, NewDelivery,
    PushNotification, Result, Task, TaskChange, TaskOutcome, TaskStatus, Timestamp, WireTask,
};
use serde_json::{Value, json};

use super::{Dispatcher, Inner};

/// Headers of a push notification.
pub mod headers {
    /// The delivery id, the same on every attempt: receivers drop repeats by it.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// The status the push tells of (`completed`, `input_required`, …).
    pub const EVENT: &str = "x-anywork-event";
    /// Unix seconds of the signature.
    pub const TIMESTAMP: &str = "x-anywork-timestamp";
    /// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the push signing secret.
    pub const SIGNATURE: &str = "x-anywork-signature";
}

/// Deliveries claimed per round.
const BATCH: u32 = 32;
/// Longest wait a receiver's `Retry-After` can ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How the outbox sends. Start from [`Default`] and set fields: new ones may come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Attempts of one delivery before it is dead (a manual retry gives it as many again).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles per attempt, with jitter, up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (a receiver's `Retry-After` may ask for more).
    pub max_backoff: Duration,
    /// How often the store is asked for due deliveries when nothing wakes the sender.
    pub poll_every: Duration,
    /// Timeout of one push attempt (a channel's own calls have theirs).
    pub send_timeout: Duration,
    /// How long a claim lasts: longer than any attempt, so that nobody else sends it
    /// meanwhile; a stopped server's claims pass to another after this.
    pub claim_ttl: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(600),
            poll_every: Duration::from_secs(1),
            send_timeout: Duration::from_secs(30),
            claim_ttl: Duration::from_secs(120),
        }
    }
}

impl OutboxConfig {
    /// The wait before attempt `attempts + 1`, after `attempts` failed (≥ 1): doubling from
    /// `initial_backoff`, capped at `max_backoff`, then a random part of up to half of it
    /// taken off (so that receivers that were down are not hit by everyone at once).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        let full = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let half = full / 2;
        let jitter = (half.as_millis() as u64).max(1);
        half + Duration::from_millis(random_u64() % jitter)
    }
}

/// Random bits without a random-number crate: std's hasher keys are random per instance.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Timestamp::now().0 as u64);
    h.finish()
}

/// What the outbox holds for a channel delivery.
pub(super) fn channel_payload(outcome: &TaskOutcome) -> Value {
    json!({ "outcome": outcome })
}

/// The deliveries that tell of `task` once `change` moves it from `from`
/// ([`deliveries_for`] of the task as the change leaves it; none when this copy refuses the
/// change, as the store does). A task with neither a channel of its type registered nor a
/// push receiver has none whatever the change: it is not copied to find out.
pub(super) fn deliveries_after(
    inner: &Inner,
    task: &Task,
    from: TaskStatus,
    change: &TaskChange,
    question: Option<&InputRequest>,
    done: Option<&TaskOutcome>,
) -> Vec<NewDelivery> {
    if task.push_notification.is_none() && !inner.channels.contains_key(&task.channel_type) {
        return Vec::new();
    }
    let mut after = task.clone();
    after.status = from;
    match change.apply(&mut after) {
        Ok(()) => deliveries_for(inner, &after, question, done),
        Err(_) => Vec::new(),
    }
}

/// The deliveries that tell of `after` (the task as the change leaves it): its channel's,
/// when it ended and a channel of its type is registered, and its push notification's, when
/// the receiver wants this status. `done`: the outcome the worker reported, whose pull
/// requests (not stored on the task) go to the channel.
pub(super) fn deliveries_for(
    inner: &Inner,
    after: &Task,
    question: Option<&InputRequest>,
    done: Option<&TaskOutcome>,
) -> Vec<NewDelivery> {
    let mut out = Vec::new();
    if after.status.is_terminal()
        && inner.channels.contains_key(&after.channel_type)
        && let Some(mut outcome) = outcome_of(after)
    {
        if let Some(done) = done {
            outcome.pull_requests = done.pull_requests.clone();
        }
        out.push(NewDelivery::new(
            DeliveryTarget::Channel {
                channel_type: after.channel_type.clone(),
            },
            channel_payload(&outcome),
        ));
    }
    if let Some(push) = &after.push_notification
        && push.wants(after.status)
    {
        let mut body = push_body(after);
        if let Some(q) = question.filter(|_| after.status == TaskStatus::InputRequired) {
            body["input"] = json!({
                "request_id": q.request_id, "kind": q.kind, "prompt": q.prompt,
                "options": q.options, "tool_name": q.tool_name,
            });
        }
        out.push(NewDelivery::new(push_target(push), body));
    }
    out
}

fn push_target(push: &PushNotification) -> DeliveryTarget {
    DeliveryTarget::Push {
        url: push.url.clone(),
        authorization: push.authorization.clone(),
        events: push.events.clone(),
    }
}

/// The body of a push: the task in the REST shape (`GET /api/tasks/:id`) at that status
/// (with `input: {request_id, kind, prompt, options, tool_name}` when it asks something).
fn push_body(task: &Task) -> Value {
    serde_json::to_value(WireTask::from(task)).unwrap_or(Value::Null)
}

/// The outcome a finished task stored.
fn outcome_of(task: &Task) -> Option<TaskOutcome> {
    if !task.status.is_terminal() {
        return None;
    }
    let mut o = match task.status {
        TaskStatus::Completed => TaskOutcome::completed(task.result.clone().unwrap_or_default()),
        TaskStatus::Canceled => TaskOutcome::canceled(),
        _ => TaskOutcome::failed(task.error.clone().unwrap_or_default()),
    };
    o.result = task.result.clone();
    o.error = task.error.clone();
    o.structured_output = task.structured_output.clone();
    o.cost_usd = task.cost_usd;
    o.usage = task.usage;
    o.num_turns = task.num_turns;
    o.duration_ms = task.duration_ms.unwrap_or_default();
    Some(o)
}

pub(super) async fn delivery_loop(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.stopped.load(Ordering::Relaxed) {
            return;
        }
        let sent = strong.send_due().await;
        let (wake, every) = (strong.outbox_wake.clone(), strong.config.outbox.poll_every);
        drop(strong);
        if sent < BATCH as usize {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

impl Inner {
    /// Claims the due deliveries and sends them (concurrently); returns how many.
    async fn send_due(&self) -> usize {
        let now = Timestamp::now();
        let until = now.plus_millis(self.config.outbox.claim_ttl.as_millis() as i64);
        let claimed = match self
            .store
            .claim_deliveries(&self.config.owner, now, until, BATCH)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                if e.kind() != ErrorKind::Unavailable || e.message().contains("outbox") {
                    tracing::warn!(error = %e, "cannot claim deliveries");
                }
                return 0;
            }
        };
        let n = claimed.len();
        futures_util::future::join_all(claimed.into_iter().map(|d| self.attempt(d))).await;
        n
    }

    /// One attempt of `delivery`, recorded.
    async fn attempt(&self, delivery: Delivery) {
        let result = self.send(&delivery).await;
        let attempt = match result {
            Ok(()) => DeliveryAttempt::Sent,
            Err(e) => {
                let error = e.message().to_owned();
                let attempts = delivery.attempts + 1;
                if !e.is_retryable() || attempts >= self.config.outbox.max_attempts.max(1) {
                    tracing::warn!(delivery = %delivery.id, task = %delivery.task_id, target = ?delivery.target, attempts, %error, "delivery is dead");
                    DeliveryAttempt::Dead { error }
                } else {
                    let mut wait = self.config.outbox.backoff(attempts);
                    if let Some(asked) = e.retry_after() {
                        wait = wait.max(asked.min(MAX_RETRY_AFTER));
                    }
                    tracing::info!(delivery = %delivery.id, task = %delivery.task_id, attempts, wait_ms = wait.as_millis() as u64, %error, "delivery failed; will retry");
                    DeliveryAttempt::Retry {
                        error,
                        retry_at: Timestamp::now().plus_millis(wait.as_millis() as i64),
                    }
                }
            }
        };
        self.metrics.delivery_attempt(match &attempt {
            DeliveryAttempt::Sent => "sent",
            DeliveryAttempt::Dead { .. } => "dead",
            _ => "retry",
        });
        if let Err(e) = self
            .store
            .record_delivery_attempt(delivery.id, &self.config.owner, attempt, Timestamp::now())
            .await
        {
            tracing::warn!(delivery = %delivery.id, error = %e, "cannot record a delivery attempt");
        }
    }

    async fn send(&self, delivery: &Delivery) -> Result<()> {
        match &delivery.target {
            DeliveryTarget::Channel { channel_type } => {
                let channel = self.channels.get(channel_type).cloned().ok_or_else(|| {
                    Error::invalid_input(format!(
                        "no channel of type {channel_type:?} is configured on this server: \
                         enable it and retry the delivery"
                    ))
                })?;
                let task = self.store.get_task(delivery.task_id).await?;
                let outcome = match serde_json::from_value::<TaskOutcome>(
                    delivery.payload["outcome"].clone(),
                ) {
                    Ok(o) => o,
                    Err(_) => outcome_of(&task).ok_or_else(|| {
                        Error::invalid_input("the delivery holds no outcome and the task has none")
                    })?,
                };
                self.hooks.flush(task.id).await;
                channel.deliver(&task, &outcome).await
            }
            DeliveryTarget::Push {
                url, authorization, ..
            } => {
                // Checked again at send time (the policy may have changed since the task came
                // in); the client checks every resolved address and redirect too, so the
                // caller's `Authorization` only goes where the policy allows.
                let host = super::deliver::url_host(url);
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| Error::invalid_input(format!("push URL: {e}")))?;
                self.config.outbound.check_target(
                    "push_notification.url",
                    parsed.scheme(),
                    parsed.host_str().unwrap_or(""),
                )?;
                let body = serde_json::to_vec(&delivery.payload)
                    .map_err(|e| Error::internal(format!("push body: {e}")))?;
                let event = delivery.payload["status"].as_str().unwrap_or("").to_owned();
                let mut request = self
                    .http
                    .post(url)
                    .timeout(self.config.outbox.send_timeout)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(headers::IDEMPOTENCY_KEY, delivery.idempotency_key())
                    .header(headers::EVENT, event);
                if let Some(auth) = authorization {
                    request = request.header(reqwest::header::AUTHORIZATION, auth);
                }
                if let Some(secret) = &self.push_secret {
                    let ts = Timestamp::now().as_secs().to_string();
                    request = request
                        .header(headers::TIMESTAMP, &ts)
                        .header(headers::SIGNATURE, sign(secret.as_bytes(), &ts, &body));
                }
                let response = request.body(body).send().await.map_err(|e| {
                    // A refused address or redirect will not pass on a retry.
                    let chain = super::deliver::error_chain(&e);
                    let message = format!("push to {host} could not be sent: {chain}");
                    if e.is_redirect() || chain.contains("requests may only reach public addresses")
                    {
                        Error::invalid_input(message)
                    } else {
                        Error::unavailable(message)
                    }
                })?;
                push_status(&host, response.status().as_u16(), response.headers())
            }
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `"<ts>.<body>"`): the scheme the generic webhook
/// checks, so one AnyWork can take another's pushes.
pub fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(ts.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The result of a push by the receiver's status: 2xx sent; 408, 429 and 5xx tried again
/// (no sooner than `Retry-After`); any other answer is a refusal that will not pass.
fn push_status(host: &str, status: u16, headers: &reqwest::header::HeaderMap) -> Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let kind = match status {
        429 => ErrorKind::RateLimited,
        408 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Unavailable,
        401 | 403 => ErrorKind::Unauthorized,
        404 => ErrorKind::NotFound,
        _ => ErrorKind::InvalidInput,
    };
    let next = if matches!(
        kind,
        ErrorKind::RateLimited | ErrorKind::Timeout | ErrorKind::Unavailable
    ) {
        "it will be tried again"
    } else {
        "it will not be tried again unless retried by hand (POST /api/deliveries/:id/retry)"
    };
    let mut e = Error::new(kind, format!("push to {host} answered {status}; {next}"));
    if let Some(w) = retry_after {
        e = e.with_retry_after(w);
    }
    Err(e)
}

impl Dispatcher {
    /// Deliveries in `status` (all when `None`), oldest first, with secrets redacted.
    pub async fn deliveries(
        &self,
        status: Option<anywork_core::DeliveryStatus>,
        page: anywork_core::Page,
    ) -> Result<Vec<Delivery>> {
        let mut list = self.inner.store.list_deliveries(status, page).await?;
        for d in &mut list {
            d.target = d.target.redacted();
        }
        Ok(list)
    }

    /// Sends a dead delivery again, with a fresh attempt budget; returns it (redacted).
    /// `NotFound` if unknown, `Conflict` if it is not dead.
    pub async fn retry_delivery(&self, id: anywork_core::DeliveryId) -> Result<Delivery> {
        let mut d = self
            .inner
            .store
            .retry_delivery(id, Timestamp::now())
            .await?;
        self.inner.outbox_wake.notify_one();
        d.target = d.target.redacted();
        Ok(d)
    }

    /// Claims and sends the due deliveries now (the background loop does it anyway); returns
    /// how many were attempted.
    pub async fn send_due_deliveries(&self) -> usize {
        self.inner.send_due().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_under_the_cap() {
        let c = OutboxConfig {
            initial_backoff: Duration::from_millis(1000),
            max_backoff: Duration::from_millis(5000),
            ..OutboxConfig::default()
        };
        for _ in 0..50 {
            let d1 = c.backoff(1);
            assert!(d1 >= Duration::from_millis(500) && d1 <= Duration::from_millis(1000));
            let d3 = c.backoff(3);
            assert!(d3 >= Duration::from_millis(2000) && d3 <= Duration::from_millis(4000));
            let d9 = c.backoff(9);
            assert!(d9 >= Duration::from_millis(2500) && d9 <= Duration::from_millis(5000));
        }
    }

    #[test]
    fn signatures_match_the_webhook_scheme() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), split as ts.body.
        let sig = sign(b"key", "The quick brown fox", b"jumps over the lazy dog");
        assert_eq!(sig.len(), 7 + 64);
        assert!(sig.starts_with("sha256="));
        let other = sign(b"key", "The quick brown fox", b"jumps over the lazy cat");
        assert_ne!(sig, other);
    }

    #[test]
    fn push_answers_map_to_retry_or_dead() {
        let h = reqwest::header::HeaderMap::new();
        assert!(push_status("u", 204, &h).is_ok());
        assert!(push_status("u", 500, &h).unwrap_err().is_retryable());
        assert!(!push_status("u", 400, &h).unwrap_err().is_retryable());
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        let e = push_status("u", 429, &h).unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }
}
