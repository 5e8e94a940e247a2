//! [`Channel`]: where tasks come from and where their answers go.

use async_trait::async_trait;

use crate::error::Result;
use crate::event::TaskOutcome;
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

/// Skills and MCP servers every task of a channel gets, merged with the task's own. Build it
/// with [`ChannelDefaults::new`] or from [`Default`] and the `with_` methods.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ChannelDefaults {
    /// Default skills; a task's skill of the same name wins.
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
