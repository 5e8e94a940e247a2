//! Tasks: one unit of agent work in a session.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::ids::{SessionId, TaskId, Timestamp};
use crate::outcome::TaskOutcome;
pub use crate::outcome::TokenUsage;
use crate::spec::{McpServers, SkillSpec, validate_mcp_servers};
use crate::status::TaskStatus;

/// Where to POST the outcome when a task ends (a webhook's `callback_url`, the
/// `push_notification` of `POST /api/tasks`). Sent through the outbox as a signed POST.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushNotification {
    /// URL to POST to.
    pub url: String,
    /// Value of the `Authorization` header, if any (a secret: hidden by `Debug`).
    #[serde(
        default,
        alias = "auth_header",
        skip_serializing_if = "Option::is_none"
    )]
    pub authorization: Option<String>,
    /// The statuses to tell (`completed`, `failed`, `canceled`, `input_required`); empty:
    /// the final status only, whatever it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

impl PushNotification {
    /// A push of the final status to `url`, with no `Authorization` header.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            authorization: None,
            events: Vec::new(),
        }
    }

    /// Whether the receiver wants to hear of `status`: a final status when it named no
    /// events, else the statuses it named.
    pub fn wants(&self, status: TaskStatus) -> bool {
        if self.events.is_empty() {
            status.is_terminal()
        } else {
            self.events.iter().any(|e| e == status.as_str())
        }
    }
}

impl PushNotification {
    /// Checks the URL (`http://` or `https://`, at most 2048 characters, no spaces) and the
    /// event names; `InvalidInput` saying what to fix.
    pub fn validate(&self) -> Result<()> {
        let url = self.url.as_str();
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.len() > 2048
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid_input(
                "the push notification `url` must be an http:// or https:// URL of at most \
                 2048 characters",
            ));
        }
        if let Some(auth) = &self.authorization
            && auth.chars().any(char::is_control)
        {
            return Err(Error::invalid_input(
                "the push notification's authorization header may not contain control characters",
            ));
        }
        for e in &self.events {
            let known = [
                TaskStatus::Running,
                TaskStatus::InputRequired,
                TaskStatus::Completed,
                TaskStatus::Failed,
                TaskStatus::Canceled,
            ];
            if !known.iter().any(|s| s.as_str() == e) {
                return Err(Error::invalid_input(format!(
                    "push notification event {e:?} is unknown: use running, input_required, \
                     completed, failed or canceled"
                )));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for PushNotification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushNotification")
            .field("url", &self.url)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[redacted]"),
            )
            .field("events", &self.events)
            .finish()
    }
}

/// Who is running a task, and until when, so that a crashed server's tasks can be found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Server instance holding the task.
    pub owner: String,
    /// After this time, anyone may take the task over.
    pub expires_at: Timestamp,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Id (UUID v7).
    pub id: TaskId,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// The channel it came from (`webchat`, `github`, ...).
    pub channel_type: String,
    /// Channel-specific data needed to deliver the answer (repo and issue, Slack thread).
    pub channel_meta: Value,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// The user's message.
    pub message: String,
    /// Skills the worker sets up before the run.
    pub skills: Vec<SkillSpec>,
    /// MCP servers the worker sets up before the run.
    pub mcp_servers: McpServers,
    /// Final answer text.
    pub result: Option<String>,
    /// Structured output, when the agent produced one.
    pub structured_output: Option<Value>,
    /// Why it failed.
    pub error: Option<String>,
    /// Cost in US dollars, when known.
    pub cost_usd: Option<f64>,
    /// Tokens used.
    pub usage: TokenUsage,
    /// Model turns taken.
    pub num_turns: u32,
    /// Run time of the worker.
    pub duration_ms: Option<u64>,
    /// The worker that ran it.
    pub worker_id: Option<String>,
    /// Where to POST the outcome.
    pub push_notification: Option<PushNotification>,
    /// The current lease, while running.
    pub lease: Option<Lease>,
    /// The channel's once-per-event key, if it gave one (unique per `channel_type`).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// When it first started running.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal status.
    pub finished_at: Option<Timestamp>,
    /// When retention deleted its log (all of it); `None` while the log is kept.
    #[serde(default)]
    pub logs_deleted_at: Option<Timestamp>,
}

/// What `TaskRequest::session_id` means when it names no stored session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// The session must exist: `NotFound` otherwise (the REST API, the WebSocket chat).
    #[default]
    Existing,
    /// Continued when it exists, else created with that id: a generic-webhook sender's own
    /// `session_id`, as the original AnyWork did.
    GetOrCreate,
    /// Created with that id, which the channel just generated (`wh-1a2b3c4d`); an existing
    /// session with that id is a `Conflict`, never continued, so that two senders never share
    /// a session by chance.
    CreateNew,
}

impl SessionMode {
    fn is_existing(&self) -> bool {
        *self == SessionMode::Existing
    }
}

/// A request for work, as a channel or the API produces it. Build it with [`TaskRequest::new`]
/// and set the other fields on the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskRequest {
    /// An existing session to continue; `None` finds one by `channel_key` or creates one.
    #[serde(default)]
    pub session_id: Option<SessionId>,
    /// What `session_id` means when no session has that id (ignored without `session_id`).
    #[serde(default, skip_serializing_if = "SessionMode::is_existing")]
    pub session_mode: SessionMode,
    /// The channel it came from.
    pub channel_type: String,
    /// A key that finds the session again (`owner/repo#12`, a Slack thread).
    #[serde(default)]
    pub channel_key: Option<String>,
    /// Channel-specific delivery data.
    #[serde(default)]
    pub channel_meta: Value,
    /// The user's message.
    pub message: String,
    /// Skills for the worker.
    #[serde(default)]
    pub skills: Vec<SkillSpec>,
    /// MCP servers for the worker.
    #[serde(default)]
    pub mcp_servers: McpServers,
    /// Where to POST the outcome.
    #[serde(default)]
    pub push_notification: Option<PushNotification>,
    /// A key the channel saw once per event (a GitHub delivery id, a Slack event id); a second
    /// request with the same key in the same channel runs no second task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl TaskRequest {
    /// The longest message accepted, in bytes.
    pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

    /// A plain request with just a message.
    pub fn new(channel_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            session_id: None,
            session_mode: SessionMode::Existing,
            channel_type: channel_type.into(),
            channel_key: None,
            channel_meta: Value::Null,
            message: message.into(),
            skills: Vec::new(),
            mcp_servers: McpServers::new(),
            push_notification: None,
            idempotency_key: None,
        }
    }

    /// The text that answers a question the session's task is waiting on, when this request
    /// arrives as the answer: the sender's own words (`channel_meta.text`, which a channel
    /// sets when it wrapped them in context to make `message`), else `message`.
    pub fn answer_text(&self) -> &str {
        self.channel_meta
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or(&self.message)
    }

    /// The names of the skills asked for by name only ([`SkillSpec::is_name_only`]), which
    /// the caller resolves (e.g. from a skills directory) before submitting.
    pub fn unresolved_skills(&self) -> Vec<&str> {
        self.skills
            .iter()
            .filter(|s| s.is_name_only())
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Replaces every name-only skill with `resolve(name)`; the first error is returned (and
    /// should name the skill and where it was looked for).
    pub fn resolve_skills(
        &mut self,
        mut resolve: impl FnMut(&str) -> Result<SkillSpec>,
    ) -> Result<()> {
        for skill in &mut self.skills {
            if skill.is_name_only() {
                *skill = resolve(&skill.name)?;
            }
        }
        Ok(())
    }

    /// Checks the request before anything is stored: [`validate_shape`](Self::validate_shape)
    /// and no skill left unresolved.
    pub fn validate(&self) -> Result<()> {
        self.validate_shape()?;
        self.skills.iter().try_for_each(SkillSpec::validate)
    }

    /// What [`validate`](Self::validate) checks except that name-only skills (still to be
    /// resolved by the caller) only need a valid name: what a channel checks in `parse`.
    pub fn validate_shape(&self) -> Result<()> {
        if self.message.trim().is_empty() {
            return Err(Error::invalid_input("`message` must not be empty"));
        }
        if self.message.len() > Self::MAX_MESSAGE_BYTES {
            return Err(Error::invalid_input(format!(
                "`message` is longer than {} bytes",
                Self::MAX_MESSAGE_BYTES
            )));
        }
        crate::spec::validate_name("channel type", &self.channel_type)?;
        for skill in &self.skills {
            if skill.is_name_only() {
                crate::spec::validate_name("skill name", &skill.name)?;
            } else {
                skill.validate()?;
            }
        }
        if let Some(key) = &self.idempotency_key {
            validate_idempotency_key(key)?;
        }
        if let Some(push) = &self.push_notification {
            push.validate()?;
        }
        validate_mcp_servers(&self.mcp_servers)
    }
}

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes, no control characters.
pub fn validate_idempotency_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Error::invalid_input(format!(
            "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes long"
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid_input(
            "`idempotency_key` may not contain control characters",
        ));
    }
    Ok(())
}

/// What a store needs to create a task (status starts as `pending`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// Id to use; [`TaskId::generate`] by default.
    pub id: TaskId,
    /// An existing session.
    pub session_id: SessionId,
    /// The channel it came from.
    pub channel_type: String,
    /// Channel-specific delivery data.
    pub channel_meta: Value,
    /// The user's message.
    pub message: String,
    /// Skills for the worker.
    pub skills: Vec<SkillSpec>,
    /// MCP servers for the worker.
    pub mcp_servers: McpServers,
    /// Where to POST the outcome.
    pub push_notification: Option<PushNotification>,
    /// The channel's once-per-event key: unique per `channel_type` in every store
    /// (see [`TaskRequest::idempotency_key`]).
    pub idempotency_key: Option<String>,
    /// Submission time.
    pub created_at: Timestamp,
}

impl NewTask {
    /// A task in `session_id` built from `request`, created now.
    pub fn from_request(session_id: SessionId, request: TaskRequest) -> Self {
        Self {
            id: TaskId::generate(),
            session_id,
            channel_type: request.channel_type,
            channel_meta: request.channel_meta,
            message: request.message,
            skills: request.skills,
            mcp_servers: request.mcp_servers,
            push_notification: request.push_notification,
            idempotency_key: request.idempotency_key,
            created_at: Timestamp::now(),
        }
    }

    /// The task as stored right after creation.
    pub fn into_task(self) -> Task {
        Task {
            id: self.id,
            session_id: self.session_id,
            channel_type: self.channel_type,
            channel_meta: self.channel_meta,
            status: TaskStatus::Pending,
            message: self.message,
            skills: self.skills,
            mcp_servers: self.mcp_servers,
            result: None,
            structured_output: None,
            error: None,
            cost_usd: None,
            usage: TokenUsage::default(),
            num_turns: 0,
            duration_ms: None,
            worker_id: None,
            push_notification: self.push_notification,
            lease: None,
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
            started_at: None,
            finished_at: None,
            logs_deleted_at: None,
        }
    }
}

/// A status change with the fields that go with it, applied by
/// [`TaskStore::update_task`](crate::TaskStore::update_task) as one compare-and-set.
///
/// Applying it ([`TaskChange::apply`]) also keeps the timestamps and the lease right:
/// `started_at` is set the first time a task runs, `finished_at` and lease removal happen on
/// terminal statuses, and going back to `pending` drops the lease.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    /// The new status.
    pub status: TaskStatus,
    /// When the change happened.
    pub at: Timestamp,
    /// Sets the worker that runs the task.
    pub worker_id: Option<String>,
    /// Sets the lease (only kept while the task is active).
    pub lease: Option<Lease>,
    /// Copies result, error, cost, usage, turns and duration.
    pub outcome: Option<TaskOutcome>,
    /// Sets the error without a whole outcome (e.g. a recovered task that failed).
    pub error: Option<String>,
    /// Applies only while the task's lease is still exactly this one (`Conflict`
    /// otherwise): how a server that takes over an expired lease loses to the owner's renewal
    /// that came first.
    pub if_lease: Option<Lease>,
}

impl TaskChange {
    /// A change to `status`, now.
    pub fn to(status: TaskStatus) -> Self {
        Self {
            status,
            at: Timestamp::now(),
            worker_id: None,
            lease: None,
            outcome: None,
            error: None,
            if_lease: None,
        }
    }

    /// The change that records `outcome` (its status included).
    pub fn finish(outcome: TaskOutcome) -> Self {
        let status = outcome.status;
        Self {
            outcome: Some(outcome),
            ..Self::to(status)
        }
    }

    /// Sets the time of the change.
    pub fn at(mut self, at: Timestamp) -> Self {
        self.at = at;
        self
    }

    /// Sets the worker id.
    pub fn worker(mut self, worker_id: impl Into<String>) -> Self {
        self.worker_id = Some(worker_id.into());
        self
    }

    /// Sets the lease.
    pub fn lease(mut self, owner: impl Into<String>, expires_at: Timestamp) -> Self {
        self.lease = Some(Lease {
            owner: owner.into(),
            expires_at,
        });
        self
    }

    /// Applies only while the task's lease is still `lease` (the field `if_lease`).
    pub fn if_lease(mut self, lease: Option<Lease>) -> Self {
        self.if_lease = lease;
        self
    }

    /// Sets the error text.
    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    /// Applies the change to `task` after checking that `task.status` may become
    /// `self.status`. Stores call this so that every backend has the same semantics.
    pub fn apply(&self, task: &mut Task) -> Result<()> {
        if let Some(lease) = &self.if_lease
            && task.lease.as_ref() != Some(lease)
        {
            return Err(Error::conflict(format!(
                "task {} is no longer leased by {} until {}: its lease was renewed or taken",
                task.id, lease.owner, lease.expires_at.0
            )));
        }
        task.status.check_transition(self.status)?;
        if let Some(outcome) = &self.outcome
            && outcome.status != self.status
        {
            return Err(Error::invalid_input(format!(
                "outcome status {} does not match the new status {}",
                outcome.status, self.status
            )));
        }
        task.status = self.status;
        if let Some(w) = &self.worker_id {
            task.worker_id = Some(w.clone());
        }
        if self.status == TaskStatus::Running && task.started_at.is_none() {
            task.started_at = Some(self.at);
        }
        if let Some(lease) = &self.lease {
            task.lease = Some(lease.clone());
        }
        if self.status.is_terminal() || self.status == TaskStatus::Pending {
            task.lease = None;
        }
        if self.status.is_terminal() {
            task.finished_at = Some(self.at);
        }
        if let Some(o) = &self.outcome {
            task.result = o.result.clone();
            task.structured_output = o.structured_output.clone();
            task.error = o.error.clone();
            task.cost_usd = o.cost_usd;
            task.usage = o.usage;
            task.num_turns = o.num_turns;
            task.duration_ms = Some(o.duration_ms);
        }
        if let Some(e) = &self.error {
            task.error = Some(e.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        NewTask::from_request(
            SessionId::new("s1").unwrap(),
            TaskRequest::new("webchat", "hi"),
        )
        .into_task()
    }

    #[test]
    fn apply_sets_timestamps_and_lease() {
        let mut t = task();
        TaskChange::to(TaskStatus::Running)
            .at(Timestamp(10))
            .worker("w1")
            .lease("srv", Timestamp(100))
            .apply(&mut t)
            .unwrap();
        assert_eq!(t.started_at, Some(Timestamp(10)));
        assert_eq!(t.lease.as_ref().unwrap().owner, "srv");
        let mut outcome = TaskOutcome::completed("42");
        outcome.num_turns = 3;
        TaskChange::finish(outcome)
            .at(Timestamp(20))
            .apply(&mut t)
            .unwrap();
        assert_eq!(t.status, TaskStatus::Completed);
        assert_eq!(t.finished_at, Some(Timestamp(20)));
        assert_eq!(t.started_at, Some(Timestamp(10)));
        assert_eq!(t.result.as_deref(), Some("42"));
        assert_eq!(t.num_turns, 3);
        assert!(t.lease.is_none());
        assert!(TaskChange::to(TaskStatus::Running).apply(&mut t).is_err());
    }

    #[test]
    fn outcome_must_match_status() {
        let mut t = task();
        let mut change = TaskChange::finish(TaskOutcome::completed("x"));
        change.status = TaskStatus::Canceled;
        assert!(change.apply(&mut t).is_err());
        assert_eq!(t.status, TaskStatus::Pending);
    }

    #[test]
    fn requests_are_validated() {
        assert!(TaskRequest::new("webchat", "hello").validate().is_ok());
        assert!(TaskRequest::new("webchat", "  ").validate().is_err());
        assert!(TaskRequest::new("web chat", "x").validate().is_err());
        let big = "x".repeat(TaskRequest::MAX_MESSAGE_BYTES + 1);
        assert!(TaskRequest::new("webchat", big).validate().is_err());
        let keyed = |key: &str| TaskRequest {
            idempotency_key: Some(key.into()),
            ..TaskRequest::new("github", "hi")
        };
        assert!(
            keyed("72d3162e-cc78-11e3-81ab-4c9367dc0958")
                .validate()
                .is_ok()
        );
        assert!(keyed("").validate().is_err());
        assert!(keyed("a\nb").validate().is_err());
        assert!(
            keyed(&"k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn the_answer_is_the_senders_own_words() {
        let mut r = TaskRequest::new("github", "context…\n\nRequest:\nyes");
        assert_eq!(r.answer_text(), r.message);
        r.channel_meta = serde_json::json!({"text": "yes"});
        assert_eq!(r.answer_text(), "yes");
    }

    #[test]
    fn named_skills_are_resolved_by_the_caller() {
        let mut r = TaskRequest::new("webhook", "hi");
        r.skills = vec![SkillSpec::named("review"), SkillSpec::new("inline", "body")];
        assert_eq!(r.unresolved_skills(), ["review"]);
        assert!(r.validate().is_err(), "an unresolved skill must not pass");
        r.validate_shape().unwrap();
        r.resolve_skills(|name| Ok(SkillSpec::new(name, format!("resolved {name}"))))
            .unwrap();
        assert!(r.unresolved_skills().is_empty());
        assert_eq!(r.skills[0].content, "resolved review");
        assert_eq!(r.skills[1].content, "body");
        r.validate().unwrap();
        let mut r2 = TaskRequest::new("webhook", "hi");
        r2.skills = vec![SkillSpec::named("missing")];
        let e = r2
            .resolve_skills(|n| Err(Error::invalid_input(format!("no skill {n}"))))
            .unwrap_err();
        assert_eq!(e.to_string(), "no skill missing");
    }

    #[test]
    fn session_mode_and_idempotency_key_are_left_out_of_json_when_default() {
        let r = TaskRequest::new("webchat", "hi");
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("session_mode").is_none() && v.get("idempotency_key").is_none());
        let mut r = r;
        r.session_mode = SessionMode::CreateNew;
        r.idempotency_key = Some("d-1".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["session_mode"], "create_new");
        assert_eq!(v["idempotency_key"], "d-1");
        assert_eq!(serde_json::from_value::<TaskRequest>(v).unwrap(), r);
    }
}
