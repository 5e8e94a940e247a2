//! MCP client manager: connects the servers of a workspace's `.mcp.json` through `rmcp` and
//! exposes their tools as `mcp__<server>__<tool>`.
//!
//! - `stdio` servers are spawned with their `args` and `env`, working directory = the
//!   workspace; their stderr is kept (last lines) to explain failures.
//! - `http` servers use rmcp's streamable HTTP client, over `http://` or `https://` (rustls
//!   with the ring provider, the system's root certificates).
//! - `sse` (the older HTTP + SSE transport) has no client in rmcp 3 and is reported as failed.
//!
//! A server that fails to start is reported as `failed` and its tools are absent; the others
//! work. Dropping `McpClients` closes every connection and kills the spawned servers.
//!
//! Without the `mcp` feature the native executor reports every server of `.mcp.json` as
//! failed, saying that this build has no MCP client.

use anywork_core::McpServerStatus;

pub use crate::native::model::ToolDef;
pub use crate::native::tools::ToolOutcome;

#[cfg(feature = "mcp")]
mod client;
#[cfg(feature = "mcp")]
pub use client::{CONNECT_TIMEOUT, MAX_RESULT_BYTES, MAX_TOOL_NAME, McpClients, SSE_UNSUPPORTED};

#[cfg(not(feature = "mcp"))]
mod unavailable;
#[cfg(not(feature = "mcp"))]
pub(crate) use unavailable::McpClients;

/// How connecting one server went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServerReport {
    /// Server name (the key in `.mcp.json`).
    pub name: String,
    /// Whether it is usable.
    pub connected: bool,
    /// Why not, when it is not.
    pub error: Option<String>,
    /// How many tools it offers.
    pub tools: usize,
}

impl McpServerReport {
    /// The status as [`anywork_core::AgentInit`] reports it (`connected` or `failed`).
    pub fn status(&self) -> McpServerStatus {
        McpServerStatus {
            name: self.name.clone(),
            status: if self.connected {
                "connected"
            } else {
                "failed"
            }
            .to_owned(),
        }
    }
}
