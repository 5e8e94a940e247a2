//! The agent's credentialed "open a pull request" tool: the worker, not the agent, commits the
//! checkout's working tree on a new branch, pushes it with the checkout's token and opens the
//! pull request through the forge's REST API (GitHub's `POST /repos/{repo}/pulls`).
//!
//! Offered only for a session whose last `/prepare` checked out a repository with a token and
//! a [`PullRequestTarget`](anywork_core::worker_api::PullRequestTarget). The token never
//! reaches the agent: it is not in its environment, files or tool output; git gets it in an
//! HTTP header through its environment-based configuration, as for the checkout.
//!
//! The agent's repository is read, never run: the commit is made in a private git directory
//! outside the workspace (the checkout's objects borrowed as alternates, its working tree
//! added with the agent's `.gitignore`), so that no hook, filter or configuration the agent
//! wrote into `.git` runs with the token, or outside the sandbox. The commit's parent is the
//! commit `/prepare` checked out; commits the agent made itself are folded into it. The push
//! only creates a branch (`--force-with-lease=<branch>:` with nothing expected): it never
//! moves an existing one, the base included.

#[cfg(feature = "pull-requests")]
mod opener;

use anywork_core::{OpenPullRequest, PullRequestLink, PullRequestOpener};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::WorkerState;

#[cfg(feature = "pull-requests")]
pub use opener::TaskPullRequests;

/// The name of the tool (native) and of the MCP server's tool (Claude Code:
/// `mcp__anywork__open_pull_request`).
pub const TOOL_NAME: &str = "open_pull_request";
/// The MCP server's name in the CLI's configuration.
pub const MCP_SERVER_NAME: &str = "anywork";
/// The worker's route of that MCP server.
pub const MCP_PATH: &str = "/mcp/pull-requests";

/// The tool's description for the model.
pub fn description(folder: &str) -> String {
    format!(
        "Open a pull request with your changes to the repository checked out in `{folder}`. \
         The worker commits everything in that folder (respecting .gitignore) on a new branch, \
         pushes it and opens the pull request; it answers the pull request's number and URL. \
         You do not need git credentials and must not commit or push yourself."
    )
}

/// The tool's JSON schema.
pub fn input_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "description": "The pull request's title (also the commit message)"},
            "body": {"type": "string", "description": "The pull request's description (Markdown)"},
            "branch": {"type": "string", "description": "The new branch's name, e.g. fix/readme-typo (default: anywork/<session>-<task>)"},
            "draft": {"type": "boolean", "description": "Open it as a draft"}
        },
        "required": ["title"],
        "additionalProperties": false
    })
}

/// The text the agent gets back.
pub fn answer(link: &PullRequestLink) -> String {
    format!(
        "Opened pull request #{}: {} (branch `{}` into `{}`)",
        link.number, link.url, link.branch, link.base
    )
}

/// Runs the tool with the model's arguments: the answer for the agent, or why not.
pub async fn call(opener: &dyn PullRequestOpener, input: Value) -> Result<String, String> {
    let request: OpenPullRequest = serde_json::from_value(input).map_err(|e| {
        format!("the arguments of {TOOL_NAME} must be {{title, body?, branch?, draft?}}: {e}")
    })?;
    request.validate().map_err(|e| e.message().to_owned())?;
    match opener.open(request).await {
        Ok(link) => Ok(answer(&link)),
        Err(e) => Err(format!("no pull request was opened: {}", e.message())),
    }
}

// ---------------------------------------------------------------------------------------------
// The MCP server (streamable HTTP, JSON answers) that offers the tool to the Claude Code CLI.

/// MCP protocol versions this endpoint speaks (it answers the client's when listed).
const MCP_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];

/// `GET`/`DELETE` of the endpoint: no server-initiated stream, no session to end.
pub(crate) async fn mcp_no_stream() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [("allow", "POST")],
        "this MCP endpoint answers POSTed JSON-RPC messages only",
    )
        .into_response()
}

/// `POST /mcp/pull-requests`: JSON-RPC (one message or a batch) from a caller with the
/// session's tool secret as a Bearer token; 401 otherwise.
pub(crate) async fn mcp_endpoint(
    State(state): State<WorkerState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let Some((_session, tool)) = (!presented.is_empty())
        .then(|| state.tool_for_secret(presented))
        .flatten()
    else {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "unauthorized",
                "message": "this endpoint takes the session's tool secret as a Bearer token"}})),
        )
            .into_response();
    };
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return Json(rpc_error(Value::Null, -32700, "the body is not JSON")).into_response();
    };
    let answers: Vec<Value> = match message {
        Value::Array(batch) => {
            let mut out = Vec::new();
            for m in batch {
                if let Some(a) = rpc(tool.as_deref(), m).await {
                    out.push(a);
                }
            }
            if out.is_empty() {
                return StatusCode::ACCEPTED.into_response();
            }
            return Json(Value::Array(out)).into_response();
        }
        m => rpc(tool.as_deref(), m).await.into_iter().collect(),
    };
    match answers.into_iter().next() {
        Some(a) => Json(a).into_response(),
        // A notification or a response: nothing to answer.
        None => StatusCode::ACCEPTED.into_response(),
    }
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// One JSON-RPC message's answer; `None` for notifications and responses.
async fn rpc(tool: Option<&dyn PullRequestOpener>, message: Value) -> Option<Value> {
    let method = message.get("method").and_then(Value::as_str)?.to_owned();
    let Some(id) = message.get("id").cloned() else {
        return None; // a notification (`notifications/initialized`, …)
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    let result = match method.as_str() {
        "initialize" => {
            let asked = params["protocolVersion"].as_str().unwrap_or("");
            let version = MCP_VERSIONS
                .iter()
                .find(|v| **v == asked)
                .copied()
                .unwrap_or(MCP_VERSIONS[0]);
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": MCP_SERVER_NAME, "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Open pull requests from the repository checkout with the worker's credentials.",
            })
        }
        "ping" => json!({}),
        "tools/list" => {
            let tools: Vec<Value> = tool
                .map(|t| {
                    json!({
                        "name": TOOL_NAME,
                        "description": description(t.folder()),
                        "inputSchema": input_schema(),
                    })
                })
                .into_iter()
                .collect();
            json!({"tools": tools})
        }
        "tools/call" => {
            let name = params["name"].as_str().unwrap_or("");
            if name != TOOL_NAME {
                return Some(rpc_error(id, -32602, &format!("unknown tool {name:?}")));
            }
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            let (text, is_error) = match tool {
                Some(t) => match call(t, arguments).await {
                    Ok(text) => (text, false),
                    Err(e) => (e, true),
                },
                None => (
                    "no pull request can be opened in this task: its repository was checked \
                     out without credentials (or the task has ended)"
                        .to_owned(),
                    true,
                ),
            };
            json!({"content": [{"type": "text", "text": text}], "isError": is_error})
        }
        other => {
            return Some(rpc_error(
                id,
                -32601,
                &format!("method {other:?} is not supported"),
            ));
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}
