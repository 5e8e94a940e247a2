//! [`Channel`]: where tasks come from and where their answers go.

use async_trait::async_trait;

use crate::error::Result;
use crate::event::TaskOutcome;
use crate::spec::{McpServers, SkillSpec};
use crate::task::{Task, TaskRequest};

/// An inbound HTTP request, reduced to what a channel needs (no HTTP crate in core).
#[derive(Debug, Clone, Default)]
pub struct InboundRequest {
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The raw body, as signed by the sender.
    pub body: Vec<u8>,
}

impl InboundRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What a channel made of an inbound request.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// Run this task.
    Task(Box<TaskRequest>),
    /// Nothing to do (a bot's own comment, an event type the channel ignores).
    Skip {
        /// Why, for logs.
        reason: String,
    },
}

/// Skills and MCP servers every task of a channel gets, merged with the task's own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelDefaults {
    /// Default skills; a task's skill of the same name wins.
    pub skills: Vec<SkillSpec>,
    /// Default MCP servers; a task's server of the same name wins.
    pub mcp_servers: McpServers,
}

/// A source of tasks (webhook, GitHub, Slack, ...).
///
/// Errors from [`parse`](Channel::parse): `Unauthorized` for a failed signature,
/// `InvalidInput` for a malformed payload, each with a message for the sender.
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

    /// Delivers a finished task's outcome back (a comment, a reply, a callback). Retryable
    /// errors may be tried again by the caller.
    async fn deliver(&self, task: &Task, outcome: &TaskOutcome) -> Result<()>;
}
