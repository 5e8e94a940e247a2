//! Deliveries: the outbox of outcomes (and questions) that go back to where a task came from.
//!
//! A delivery is written in the same store transaction as the task change it tells of
//! ([`TaskStore::update_task_and_enqueue`](crate::TaskStore::update_task_and_enqueue)), so an
//! outcome that is stored is never lost on its way out, whatever crashes afterwards. A sender
//! loop claims due deliveries with a lease, sends each with its [`idempotency
//! key`](Delivery::idempotency_key), and records the attempt's result.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ids::{TaskId, Timestamp};
use crate::task::Lease;

/// The id of a delivery: a UUID v7. It is also the idempotency key sent with every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(pub Uuid);

impl DeliveryId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(crate::ids::new_v7())
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for DeliveryId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| Error::invalid_input(format!("delivery id {s:?} is not a UUID: {e}")))
    }
}

/// Where a delivery goes.
///
/// A push target holds the receiver's `Authorization` header in clear text, because the sender
/// needs it on every attempt: it is stored in the delivery row (as it is in the task's
/// `push_notification`). [`Debug`] hides it, and [`DeliveryTarget::redacted`] gives the form
/// to show in APIs; never write it to task logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryTarget {
    /// Through the task's channel (`Channel::deliver` of the channel of this type).
    Channel {
        /// The channel type (`github`, `slack`, `webhook`…).
        channel_type: String,
    },
    /// A signed POST to a URL (a push notification, a webhook's `callback_url`).
    Push {
        /// The URL to POST to.
        url: String,
        /// The `Authorization` header to send, if any (a secret).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authorization: Option<String>,
        /// Which events the receiver asked for (empty: all); kept for the sender.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        events: Vec<String>,
    },
}

impl DeliveryTarget {
    /// `"channel"` or `"push"`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeliveryTarget::Channel { .. } => "channel",
            DeliveryTarget::Push { .. } => "push",
        }
    }

    /// The channel type or the URL: with [`kind`](Self::kind), what deliveries are ordered by
    /// (a task's deliveries to one target are sent one at a time, oldest first).
    pub fn address(&self) -> &str {
        match self {
            DeliveryTarget::Channel { channel_type } => channel_type,
            DeliveryTarget::Push { url, .. } => url,
        }
    }

    /// The target with its secret replaced by `"[redacted]"`, for APIs and logs.
    pub fn redacted(&self) -> Self {
        match self {
            DeliveryTarget::Push {
                url,
                authorization,
                events,
            } => DeliveryTarget::Push {
                url: url.clone(),
                authorization: authorization.as_ref().map(|_| "[redacted]".to_owned()),
                events: events.clone(),
            },
            other => other.clone(),
        }
    }
}

impl fmt::Debug for DeliveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.redacted() {
            DeliveryTarget::Channel { channel_type } => f
                .debug_struct("Channel")
                .field("channel_type", &channel_type)
                .finish(),
            DeliveryTarget::Push {
                url,
                authorization,
                events,
            } => f
                .debug_struct("Push")
                .field("url", &url)
                .field("authorization", &authorization)
                .field("events", &events)
                .finish(),
        }
    }
}

/// Where a delivery is in its life: `pending → sent`, or `pending → failed → … → sent | dead`;
/// `dead → pending` only by [`TaskStore::retry_delivery`](crate::TaskStore::retry_delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not tried yet (or sent again by hand after dying).
    Pending,
    /// Tried and failed; tried again at `next_attempt_at`.
    Failed,
    /// The receiver took it. Final.
    Sent,
    /// Given up on (attempts exhausted or refused for good); waits for a manual retry.
    Dead,
}

impl DeliveryStatus {
    /// Every status.
    pub const ALL: [DeliveryStatus; 4] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Failed,
        DeliveryStatus::Sent,
        DeliveryStatus::Dead,
    ];

    /// The stored and serialized name (`pending`, `failed`, `sent`, `dead`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Dead => "dead",
        }
    }

    /// Whether a sender may still claim it (`pending` or `failed`).
    pub fn is_open(self) -> bool {
        matches!(self, DeliveryStatus::Pending | DeliveryStatus::Failed)
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeliveryStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DeliveryStatus::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                Error::invalid_input(format!(
                    "unknown delivery status {s:?} (expected pending, failed, sent or dead)"
                ))
            })
    }
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Id (UUID v7); also the idempotency key of every attempt.
    pub id: DeliveryId,
    /// The task it tells of.
    pub task_id: TaskId,
    /// Where it goes.
    pub target: DeliveryTarget,
    /// What to send, as the enqueuer built it (the sender renders it for the target).
    pub payload: Value,
    /// Where it is in its life.
    pub status: DeliveryStatus,
    /// Attempts recorded so far (reset to 0 by a manual retry).
    pub attempts: u32,
    /// When it is due (again); claims take only deliveries due at their `now`.
    pub next_attempt_at: Timestamp,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The sender holding it, and until when; `None` when nobody does.
    pub claim: Option<Lease>,
    /// When it was enqueued.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl Delivery {
    /// The key a sender puts on every attempt (e.g. an `Idempotency-Key` header) so that a
    /// receiver can drop a second copy: the delivery id.
    pub fn idempotency_key(&self) -> String {
        self.id.to_string()
    }

    /// Makes a `dead` delivery `pending` again, due at `now`, with a fresh attempt budget
    /// (attempts 0; the last error is kept). `Conflict` if it is not dead. Stores call this
    /// for [`TaskStore::retry_delivery`](crate::TaskStore::retry_delivery).
    pub fn retry(&mut self, now: Timestamp) -> Result<()> {
        if self.status != DeliveryStatus::Dead {
            return Err(Error::conflict(format!(
                "delivery {} is {}, not dead: only dead deliveries are retried by hand",
                self.id, self.status
            )));
        }
        self.status = DeliveryStatus::Pending;
        self.attempts = 0;
        self.next_attempt_at = now;
        self.claim = None;
        self.updated_at = now;
        Ok(())
    }
}

/// A delivery to enqueue together with a task change.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// Id to use; [`DeliveryId::generate`] by default.
    pub id: DeliveryId,
    /// Where it goes.
    pub target: DeliveryTarget,
    /// What to send.
    pub payload: Value,
    /// When it is first due.
    pub next_attempt_at: Timestamp,
    /// When it was made.
    pub created_at: Timestamp,
}

impl NewDelivery {
    /// A delivery of `payload` to `target`, due now.
    pub fn new(target: DeliveryTarget, payload: Value) -> Self {
        let now = Timestamp::now();
        Self {
            id: DeliveryId::generate(),
            target,
            payload,
            next_attempt_at: now,
            created_at: now,
        }
    }

    /// Sets the creation time, and the first due time with it.
    pub fn at(mut self, at: Timestamp) -> Self {
        self.created_at = at;
        self.next_attempt_at = at;
        self
    }

    /// The delivery as stored right after it is enqueued for `task_id`.
    pub fn into_delivery(self, task_id: TaskId) -> Delivery {
        Delivery {
            id: self.id,
            task_id,
            target: self.target,
            payload: self.payload,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: self.next_attempt_at,
            last_error: None,
            claim: None,
            created_at: self.created_at,
            updated_at: self.created_at,
        }
    }
}

/// The result of one attempt, recorded by
/// [`TaskStore::record_delivery_attempt`](crate::TaskStore::record_delivery_attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryAttempt {
    /// The receiver took it: `sent`, final.
    Sent,
    /// It failed and is tried again at `retry_at`: `failed`.
    Retry {
        /// What went wrong (no secrets).
        error: String,
        /// When it is due again.
        retry_at: Timestamp,
    },
    /// It failed for good (the sender's attempt budget is spent, or the receiver refused it
    /// permanently): `dead`, until someone retries it by hand.
    Dead {
        /// What went wrong (no secrets).
        error: String,
    },
}

impl DeliveryAttempt {
    /// The status the delivery has after this attempt.
    pub fn status(&self) -> DeliveryStatus {
        match self {
            DeliveryAttempt::Sent => DeliveryStatus::Sent,
            DeliveryAttempt::Retry { .. } => DeliveryStatus::Failed,
            DeliveryAttempt::Dead { .. } => DeliveryStatus::Dead,
        }
    }

    /// Applies the attempt to `delivery` (held by `owner`) at `at`. Stores call this so that
    /// every backend has the same semantics; `Conflict` if `owner` does not hold it (its
    /// claim was taken over after it expired) or it is no longer open.
    pub fn apply(&self, delivery: &mut Delivery, owner: &str, at: Timestamp) -> Result<()> {
        if !delivery.status.is_open() || delivery.claim.as_ref().is_none_or(|c| c.owner != owner) {
            return Err(Error::conflict(format!(
                "delivery {} is not held by {owner:?} (is {}; its claim may have expired and \
                 been taken over): drop this result",
                delivery.id, delivery.status
            )));
        }
        delivery.status = self.status();
        delivery.attempts = delivery.attempts.saturating_add(1);
        delivery.claim = None;
        delivery.updated_at = at;
        match self {
            DeliveryAttempt::Sent => {}
            DeliveryAttempt::Retry { error, retry_at } => {
                delivery.last_error = Some(error.clone());
                delivery.next_attempt_at = *retry_at;
            }
            DeliveryAttempt::Dead { error } => delivery.last_error = Some(error.clone()),
        }
        Ok(())
    }
}

/// What one retention pass deleted
/// ([`TaskStore::delete_finished_logs`](crate::TaskStore::delete_finished_logs)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeletedLogs {
    /// Tasks whose whole log was deleted.
    pub tasks: u64,
    /// Log events deleted.
    pub events: u64,
}

/// How much room a store takes, for a metric and for size-based retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoreSize {
    /// Bytes on disk (SQLite: database pages plus the WAL file; PostgreSQL: the tables with
    /// their indexes and TOAST).
    pub bytes: u64,
    /// Of those, bytes free inside the files that compaction can give back to the file system
    /// (SQLite's free pages; 0 on PostgreSQL, whose autovacuum reuses space in place).
    pub reclaimable_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        NewDelivery::new(
            DeliveryTarget::Channel {
                channel_type: "github".into(),
            },
            serde_json::json!({"text": "hi"}),
        )
        .at(Timestamp(10))
        .into_delivery(TaskId::generate())
    }

    #[test]
    fn attempts_need_the_claim_and_an_open_delivery() {
        let mut d = delivery();
        let err = DeliveryAttempt::Sent
            .apply(&mut d, "srv-a", Timestamp(20))
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Conflict);
        d.claim = Some(Lease {
            owner: "srv-a".into(),
            expires_at: Timestamp(30),
        });
        assert!(
            DeliveryAttempt::Sent
                .apply(&mut d, "srv-b", Timestamp(20))
                .is_err()
        );
        DeliveryAttempt::Retry {
            error: "503".into(),
            retry_at: Timestamp(50),
        }
        .apply(&mut d, "srv-a", Timestamp(20))
        .unwrap();
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!((d.attempts, d.next_attempt_at), (1, Timestamp(50)));
        assert_eq!(d.claim, None);
        assert_eq!(d.last_error.as_deref(), Some("503"));
        d.claim = Some(Lease {
            owner: "srv-a".into(),
            expires_at: Timestamp(90),
        });
        DeliveryAttempt::Sent
            .apply(&mut d, "srv-a", Timestamp(60))
            .unwrap();
        assert_eq!((d.status, d.attempts), (DeliveryStatus::Sent, 2));
        assert_eq!(d.updated_at, Timestamp(60));
        d.claim = Some(Lease {
            owner: "srv-a".into(),
            expires_at: Timestamp(90),
        });
        assert!(
            DeliveryAttempt::Sent
                .apply(&mut d, "srv-a", Timestamp(70))
                .is_err(),
            "a sent delivery takes no more attempts"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_and_redacted_forms() {
        let target = DeliveryTarget::Push {
            url: "https://example.com/hook".into(),
            authorization: Some("Bearer s3cret".into()),
            events: vec!["completed".into()],
        };
        assert!(!format!("{target:?}").contains("s3cret"));
        assert!(
            !serde_json::to_string(&target.redacted())
                .unwrap()
                .contains("s3cret")
        );
        // The stored form keeps it: the sender needs it.
        let stored = serde_json::to_string(&target).unwrap();
        assert!(stored.contains("s3cret"));
        assert_eq!(
            serde_json::from_str::<DeliveryTarget>(&stored).unwrap(),
            target
        );
        assert_eq!(
            (target.kind(), target.address()),
            ("push", "https://example.com/hook")
        );
    }

    #[test]
    fn statuses_parse() {
        for s in DeliveryStatus::ALL {
            assert_eq!(s.as_str().parse::<DeliveryStatus>().unwrap(), s);
        }
        assert!("sending".parse::<DeliveryStatus>().is_err());
    }
}
