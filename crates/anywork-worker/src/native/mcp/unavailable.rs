//! The MCP side of the native executor in a build without the `mcp` feature: every server of
//! `.mcp.json` is reported as failed, saying how to get a build that has an MCP client.

use std::path::Path;
use std::time::Duration;

use anywork_core::spec::McpServers;
use serde_json::Value;

use super::{McpServerReport, ToolDef, ToolOutcome};

/// Why no server of `.mcp.json` is connected in this build.
const NOT_BUILT: &str = "this worker was built without MCP support: build anywork-worker with \
    its `mcp` feature (on by default) to use the servers of .mcp.json";

/// No connections and no tools; the same crate-internal API as the real client manager.
#[derive(Debug, Default)]
pub(crate) struct McpClients;

impl McpClients {
    /// Reports every server as failed.
    pub(crate) async fn connect(
        servers: &McpServers,
        _workspace: &Path,
    ) -> (McpClients, Vec<McpServerReport>) {
        let reports = servers
            .keys()
            .map(|name| McpServerReport {
                name: name.clone(),
                connected: false,
                error: Some(NOT_BUILT.to_owned()),
                tools: 0,
            })
            .collect();
        (McpClients, reports)
    }

    /// Nothing to limit.
    pub(crate) fn with_call_timeout(self, _timeout: Duration) -> Self {
        self
    }

    /// No tools.
    pub(crate) fn tools(&self) -> Vec<ToolDef> {
        Vec::new()
    }

    /// No tool is an MCP tool.
    pub(crate) fn has_tool(&self, _name: &str) -> bool {
        false
    }

    /// Every call fails, saying why.
    pub(crate) async fn call(&self, name: &str, _args: Value) -> ToolOutcome {
        ToolOutcome::error(format!("unknown MCP tool {name:?}: {NOT_BUILT}"))
    }

    /// Nothing to close.
    pub(crate) async fn shutdown(self) {}
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn every_server_is_reported_failed_with_the_missing_feature() {
        let servers: McpServers = serde_json::from_value(json!({
            "calc": {"command": "calc-server"},
            "web": {"type": "http", "url": "http://127.0.0.1:9/mcp"},
        }))
        .unwrap();
        let (clients, reports) = McpClients::connect(&servers, Path::new(".")).await;
        assert_eq!(reports.len(), 2);
        for report in &reports {
            assert!(!report.connected, "{report:?}");
            let error = report.error.as_deref().unwrap_or_default();
            assert!(error.contains("`mcp` feature"), "{error}");
        }
        assert!(clients.tools().is_empty());
        assert!(!clients.has_tool("mcp__calc__add"));
        assert!(clients.call("mcp__calc__add", json!({})).await.is_error);
    }
}
