//! The MCP client manager over `rmcp` (feature `mcp`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anywork_core::spec::{McpServerConfig, McpServers};
use futures_util::future::join_all;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::McpServerReport;
use crate::native::model::{ToolDef, truncate_chars};
use crate::native::tools::{ToolOutcome, cut};

/// How long a server may take to start and list its tools.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest tool output kept, in bytes.
pub const MAX_RESULT_BYTES: usize = 100_000;
/// Longest tool name the model APIs accept.
pub const MAX_TOOL_NAME: usize = 64;
/// The error of an `sse` MCP server.
pub const SSE_UNSUPPORTED: &str = "the legacy \"sse\" MCP transport is not supported by the \
native executor (rmcp 3 has no SSE client); use \"type\": \"http\" (streamable HTTP)";

struct Server {
    service: RunningService<RoleClient, ()>,
}

struct Route {
    server: usize,
    tool: String,
}

/// The connected MCP servers of one run.
#[derive(Default)]
pub struct McpClients {
    servers: Vec<Server>,
    tools: Vec<ToolDef>,
    routes: HashMap<String, Route>,
    call_timeout: Option<Duration>,
}

impl std::fmt::Debug for McpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpClients")
            .field("servers", &self.servers.len())
            .field(
                "tools",
                &self.tools.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The last lines a child wrote to stderr.
type StderrTail = Arc<Mutex<VecDeque<String>>>;

fn tail_text(tail: &StderrTail) -> String {
    let lines = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>());
    lines.unwrap_or_default().join("\n")
}

/// Replaces every character a model API refuses in a tool name with `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `mcp__<server>__<tool>`, made valid for the model APIs and unique in `taken`.
fn exposed_name(server: &str, tool: &str, taken: &HashSet<String>) -> String {
    let base: String = format!("mcp__{}__{}", sanitize(server), sanitize(tool))
        .chars()
        .take(MAX_TOOL_NAME)
        .collect();
    if !taken.contains(&base) {
        return base;
    }
    (2..)
        .map(|n| {
            let suffix = format!("_{n}");
            let keep = MAX_TOOL_NAME.saturating_sub(suffix.len());
            format!("{}{suffix}", base.chars().take(keep).collect::<String>())
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or(base)
}

/// Starts one server and lists its tools.
async fn connect_one(
    name: &str,
    config: &McpServerConfig,
    workspace: &Path,
) -> Result<(RunningService<RoleClient, ()>, Vec<rmcp::model::Tool>), String> {
    match config {
        McpServerConfig::Stdio { command, args, env } => {
            let mut cmd = tokio::process::Command::new(command);
            cmd.args(args)
                .envs(env)
                .current_dir(workspace)
                .kill_on_drop(true);
            let (transport, stderr) = TokioChildProcess::builder(cmd)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {command:?}: {e}"))?;
            let tail: StderrTail = Arc::default();
            if let Some(stderr) = stderr {
                let tail = tail.clone();
                let server = name.to_owned();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!(mcp_server = %server, "{line}");
                        if let Ok(mut t) = tail.lock() {
                            if t.len() >= 20 {
                                t.pop_front();
                            }
                            t.push_back(line.chars().take(500).collect());
                        }
                    }
                });
            }
            let with_stderr = |e: String| {
                let stderr = tail_text(&tail);
                if stderr.is_empty() {
                    e
                } else {
                    format!("{e}; stderr: {stderr}")
                }
            };
            let service = ()
                .serve(transport)
                .await
                .map_err(|e| with_stderr(format!("MCP handshake failed: {e}")))?;
            let tools = service
                .list_all_tools()
                .await
                .map_err(|e| with_stderr(format!("cannot list tools: {e}")))?;
            Ok((service, tools))
        }
        McpServerConfig::Http { url, headers } => {
            // rmcp's HTTP client is built with rustls but no crypto provider: use ring, as
            // the rest of the worker does. Installing twice is harmless (the first one stays).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
            let mut custom = HashMap::new();
            for (key, value) in headers {
                if key.eq_ignore_ascii_case("authorization") {
                    let token = value
                        .strip_prefix("Bearer ")
                        .or_else(|| value.strip_prefix("bearer "))
                        .unwrap_or(value);
                    config = config.auth_header(token);
                    continue;
                }
                let name = reqwest::header::HeaderName::try_from(key.as_str())
                    .map_err(|_| format!("invalid header name {key:?}"))?;
                let value = reqwest::header::HeaderValue::try_from(value.as_str())
                    .map_err(|_| format!("invalid value of header {key:?}"))?;
                custom.insert(name, value);
            }
            let transport = rmcp::transport::StreamableHttpClientTransport::from_config(
                config.custom_headers(custom),
            );
            let service = ()
                .serve(transport)
                .await
                .map_err(|e| format!("MCP handshake with {url} failed: {e}"))?;
            let tools = service
                .list_all_tools()
                .await
                .map_err(|e| format!("cannot list tools: {e}"))?;
            Ok((service, tools))
        }
        McpServerConfig::Sse { .. } => Err(SSE_UNSUPPORTED.to_owned()),
    }
}

impl McpClients {
    /// Connects every server (concurrently, each within [`CONNECT_TIMEOUT`]). Never fails as a
    /// whole: a server that cannot start is reported as failed and left out.
    pub async fn connect(
        servers: &McpServers,
        workspace: &Path,
    ) -> (McpClients, Vec<McpServerReport>) {
        Self::connect_with_timeout(servers, workspace, CONNECT_TIMEOUT).await
    }

    /// [`McpClients::connect`] with another start-up limit per server.
    pub async fn connect_with_timeout(
        servers: &McpServers,
        workspace: &Path,
        timeout: Duration,
    ) -> (McpClients, Vec<McpServerReport>) {
        let attempts = servers.iter().map(|(name, config)| async move {
            let result = tokio::time::timeout(timeout, connect_one(name, config, workspace))
                .await
                .unwrap_or_else(|_| Err(format!("did not start within {} s", timeout.as_secs())));
            (name.clone(), result)
        });
        let results = join_all(attempts).await;
        let mut clients = McpClients::default();
        let mut reports = Vec::new();
        let mut taken = HashSet::new();
        for (name, result) in results {
            match result {
                Ok((service, tools)) => {
                    let index = clients.servers.len();
                    let count = tools.len();
                    for tool in tools {
                        let exposed = exposed_name(&name, &tool.name, &taken);
                        taken.insert(exposed.clone());
                        clients.tools.push(ToolDef {
                            name: exposed.clone(),
                            description: tool
                                .description
                                .as_deref()
                                .map(str::to_owned)
                                .unwrap_or_else(|| {
                                    format!("Tool {} of MCP server {name}", tool.name)
                                }),
                            input_schema: Value::Object((*tool.input_schema).clone()),
                        });
                        clients.routes.insert(
                            exposed,
                            Route {
                                server: index,
                                tool: tool.name.to_string(),
                            },
                        );
                    }
                    clients.servers.push(Server { service });
                    reports.push(McpServerReport {
                        name,
                        connected: true,
                        error: None,
                        tools: count,
                    });
                }
                Err(error) => {
                    tracing::warn!(mcp_server = %name, %error, "MCP server failed");
                    reports.push(McpServerReport {
                        name,
                        connected: false,
                        error: Some(error),
                        tools: 0,
                    });
                }
            }
        }
        (clients, reports)
    }

    /// Sets a time limit for [`McpClients::call`].
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// The tools of every connected server, named `mcp__<server>__<tool>`.
    pub fn tools(&self) -> Vec<ToolDef> {
        self.tools.clone()
    }

    /// Whether `name` is one of [`McpClients::tools`].
    pub fn has_tool(&self, name: &str) -> bool {
        self.routes.contains_key(name)
    }

    /// Calls a tool by its exposed name. Failures (unknown tool, server gone, timeout, the
    /// tool's own error) come back as an `is_error` outcome.
    pub async fn call(&self, name: &str, args: Value) -> ToolOutcome {
        let Some(route) = self.routes.get(name) else {
            return ToolOutcome::error(format!("unknown MCP tool {name:?}"));
        };
        let Some(server) = self.servers.get(route.server) else {
            return ToolOutcome::error(format!("the MCP server of {name:?} is gone"));
        };
        let arguments = match args {
            Value::Object(map) => map,
            Value::Null => Default::default(),
            other => {
                return ToolOutcome::error(format!(
                    "the arguments of {name} must be a JSON object, got: {}",
                    truncate_chars(&other.to_string(), 200)
                ));
            }
        };
        let params = CallToolRequestParams::new(route.tool.clone()).with_arguments(arguments);
        let call = server.service.call_tool(params);
        let result = match self.call_timeout {
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r,
                Err(_) => {
                    return ToolOutcome::error(format!(
                        "the MCP tool {name} did not answer within {} s",
                        t.as_secs()
                    ));
                }
            },
            None => call.await,
        };
        match result {
            Err(e) => ToolOutcome::error(format!("MCP call to {name} failed: {e}")),
            Ok(result) => {
                let mut pieces = Vec::new();
                for block in &result.content {
                    let value = serde_json::to_value(block).unwrap_or(Value::Null);
                    match value.get("text").and_then(Value::as_str) {
                        Some(text) if value.get("type").and_then(Value::as_str) == Some("text") => {
                            pieces.push(text.to_owned());
                        }
                        _ => pieces.push(value.to_string()),
                    }
                }
                if pieces.is_empty()
                    && let Some(structured) = &result.structured_content
                {
                    pieces.push(structured.to_string());
                }
                let mut content = pieces.join("\n");
                cut(&mut content, MAX_RESULT_BYTES);
                ToolOutcome {
                    content,
                    is_error: result.is_error.unwrap_or(false),
                }
            }
        }
    }

    /// Closes every connection (stdio servers see their stdin close and are killed if they
    /// linger). Dropping does the same without waiting.
    pub async fn shutdown(self) {
        let closing = self.servers.into_iter().map(|mut s| async move {
            let _ = s.service.close_with_timeout(Duration::from_secs(2)).await;
        });
        join_all(closing).await;
    }
}
