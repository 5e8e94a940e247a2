//! [`Channel`]: where tasks come from and where their answers go.

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Result;
use crate::event::{InputRequest, TaskOutcome};
use crate::spec::{McpServers, SkillSpec};
use crate::task::{Task, TaskRequest};

/// An inbound HTTP request, reduced to what a channel needs (no HTTP crate in core). Build it
/// with [`InboundRequest::new`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct InboundRequest {
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The raw body, as signed by the sender.
    pub body: Vec<u8>,
}

impl InboundRequest {
    /// A request with these headers (names in lower case) and this raw body.
    pub fn new(headers: Vec<(String, String)>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            headers,
            body: body.into(),
        }
    }

    /// Adds a header (its name in lower case).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a channel made of an inbound request. See [`Channel`] for what the caller does with
/// each variant.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Inbound {
    /// Run this task (or, if its session waits for input, answer the question with it).
    Task(Box<TaskRequest>),
    /// Like [`Inbound::Task`], but only if a session with this request's `channel_key`
    /// (in this channel) exists already; otherwise nothing happens. A reply in a Slack thread
    /// the bot is in: the channel cannot see the store, so the caller decides.
    FollowUp(Box<TaskRequest>),
    /// Only the answer to a question: used if the session with this request's `channel_key`
    /// has a task waiting for input; otherwise nothing happens. A GitHub comment without the
    /// trigger in an issue where the agent asked something.
    AnswerOnly(Box<TaskRequest>),
    /// Answer the sender right away with this JSON body (HTTP 200) and do nothing else: a
    /// handshake such as Slack's `url_verification` challenge.
    Respond(Value),
    /// Nothing to do (a bot's own comment, an event type the channel ignores).
    Skip {
        /// Why, for logs.
        reason: String,
    },
}

/// Skills and MCP servers every task of a channel gets, merged with the task's own. Build it
/// with [`ChannelDefaults::new`] or from [`Default`] and the `with_` methods.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ChannelDefaults {
    /// Default skills; a task's skill of the same name wins. Name-only entries
    /// ([`SkillSpec::named`]) are resolved by the caller like a request's.
    pub skills: Vec<SkillSpec>,
    /// Default MCP servers; a task's server of the same name wins.
    pub mcp_servers: McpServers,
}

impl ChannelDefaults {
    /// These skills and MCP servers.
    pub fn new(skills: Vec<SkillSpec>, mcp_servers: McpServers) -> Self {
        Self {
            skills,
            mcp_servers,
        }
    }

    /// Adds a default skill.
    pub fn with_skill(mut self, skill: SkillSpec) -> Self {
        self.skills.push(skill);
        self
    }

    /// Adds a default MCP server under `name`.
    pub fn with_mcp_server(
        mut self,
        name: impl Into<String>,
        server: crate::spec::McpServerConfig,
    ) -> Self {
        self.mcp_servers.insert(name.into(), server);
        self
    }
}

/// A source of tasks (webhook, GitHub, Slack, ...).
///
/// Errors from [`parse`](Channel::parse): `Unauthorized` for a failed signature,
/// `InvalidInput` for a malformed payload, each with a message for the sender (and never a
/// secret). Verification happens on the raw body before it is parsed.
///
/// # What the caller (the HTTP endpoint and the runtime) does
///
/// With what [`parse`](Channel::parse) returns:
///
/// - Any request: its `channel_type` is this channel's. If `idempotency_key` is set and a
///   task of this channel was already created with that key, no second task is made; the
///   sender gets the first one's ids. Keys are recorded only with a created task, so a
///   request that ran nothing (skipped, refused) never blocks a later one.
/// - [`Inbound::Task`], [`Inbound::FollowUp`], [`Inbound::AnswerOnly`]: the session is found
///   by `session_id` (see `TaskRequest::session_mode`) or by `(channel_type, channel_key)`.
///   If that session exists and has a task in `input_required`, the request **answers** it
///   (`InputResponse { request_id, answer: request.answer_text() }`; for a permission request, an answer
///   starting with yes/y/allow/ok allows, anything else denies) instead of starting a task.
///   Otherwise: `Task` submits a task (creating the session if needed), `FollowUp` submits
///   only if the session exists, `AnswerOnly` does nothing. "Nothing" answers
///   `200 {"ok": true, "skipped": true}`; a submitted task `202 {"taskId", "sessionId"}`.
/// - [`Inbound::Respond`]: `200` with that JSON body; nothing is stored.
/// - [`Inbound::Skip`]: `200 {"ok": true, "skipped": true}`.
///
/// Then, while the task lives, each hook is called once per transition, off the request
/// path (a failed hook is logged and never fails the task; hooks are best effort, only
/// [`deliver`](Channel::deliver) is retried):
/// [`on_accepted`](Channel::on_accepted) when the task is stored,
/// [`on_started`](Channel::on_started) when it starts running,
/// [`on_progress`](Channel::on_progress) with the answer text so far while it runs (at most
/// about once a second), [`on_input_required`](Channel::on_input_required) when it waits
/// for an answer, and [`deliver`](Channel::deliver) once it has a terminal status.
///
/// Every hook and `deliver` may be called again for the same task (a retry, a restart), so
/// an implementation makes them idempotent: it edits the message it posted before rather
/// than post a second one. They read what they need from `task.channel_meta`, which the
/// channel wrote in `parse`.
#[async_trait]
pub trait Channel: Send + Sync + 'static {
    /// The type in `/api/channel/:type/webhook` and in `Task::channel_type`.
    fn channel_type(&self) -> &str;

    /// Verifies and parses an inbound request. Must not panic on any input.
    async fn parse(&self, request: InboundRequest) -> Result<Inbound>;

    /// Skills and MCP servers for every task of this channel.
    fn defaults(&self) -> ChannelDefaults {
        ChannelDefaults::default()
    }

    /// Another id for the new session of a request that [`parse`](Channel::parse) named
    /// itself (`SessionMode::CreateNew`), when a session with the id it named exists already:
    /// a random id can repeat (`wh-` and 8 hex digits repeat by chance once a few ten
    /// thousand sessions have them). The request is then stored with this one instead (a few
    /// times at most), in a session of its own still. `None` (the default): the request is
    /// refused with `Conflict`.
    fn fresh_session_id(&self) -> Option<crate::SessionId> {
        None
    }

    /// The task was stored (queued): e.g. a 👀 reaction on the message that asked.
    async fn on_accepted(&self, _task: &Task) -> Result<()> {
        Ok(())
    }

    /// The task started running: e.g. a "working…" placeholder that
    /// [`deliver`](Channel::deliver) later edits into the answer.
    async fn on_started(&self, _task: &Task) -> Result<()> {
        Ok(())
    }

    /// The answer so far, `text` being the assistant's text since the task started: e.g.
    /// the placeholder updated.
    async fn on_progress(&self, _task: &Task, _text: &str) -> Result<()> {
        Ok(())
    }

    /// The task asks something and waits: post the question where the task came from. The
    /// next message there reaches the caller as a request on the same `channel_key`, which
    /// answers the question (see the trait docs).
    async fn on_input_required(&self, _task: &Task, _request: &InputRequest) -> Result<()> {
        Ok(())
    }

    /// The git repository the task works in, checked out in the session's workspace (and
    /// refreshed) before the task runs: e.g. the repository of a GitHub issue, at a pull
    /// request's head. `None` (the default): none. An error fails the task with its message.
    async fn workspace_repository(
        &self,
        _task: &Task,
    ) -> Result<Option<crate::worker_api::RepoCheckout>> {
        Ok(None)
    }

    /// Delivers a finished task's outcome back (a comment, a reply, a callback). Errors that
    /// are [`retryable`](crate::Error::is_retryable) may be tried again by the caller, no
    /// sooner than [`retry_after`](crate::Error::retry_after) when set; others are final.
    async fn deliver(&self, task: &Task, outcome: &TaskOutcome) -> Result<()>;
}
