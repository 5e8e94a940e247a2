//! A tiny MCP server for tests: tools `add {a, b}` (answers `{"result": a+b}`) and
//! `echo {text}`.
//!
//! - `anywork-test-mcp`: MCP on stdin/stdout. Point a client at it with `.mcp.json` such as
//!   `{"mcpServers": {"calc": {"command": "/path/to/anywork-test-mcp"}}}`. Nothing but the
//!   protocol is written to stdout; diagnostics go to stderr.
//! - `anywork-test-mcp --http 127.0.0.1:0`: streamable HTTP on `/mcp`; the first stdout line
//!   is the endpoint URL (`http://127.0.0.1:PORT/mcp`).

use std::io::Write;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};
use serde::Deserialize;
use serde_json::{Value, json};

/// Arguments of `add`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
struct AddArgs {
    /// The first number.
    a: f64,
    /// The second number.
    b: f64,
}

/// Arguments of `echo`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

/// The server: a calculator with one operation and an echo.
#[derive(Debug, Clone)]
struct TestServer {
    tool_router: ToolRouter<Self>,
}

/// A number as JSON: an integer when it is one (so `2 + 3` reads `5`, not `5.0`).
fn number(x: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if x.fract() == 0.0 && x.abs() < EXACT {
        // In range and integral, so the cast is exact.
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[tool_router]
impl TestServer {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    /// Adds two numbers.
    #[tool(description = "Add two numbers; answers {\"result\": a + b}")]
    fn add(&self, Parameters(AddArgs { a, b }): Parameters<AddArgs>) -> String {
        json!({ "result": number(a + b) }).to_string()
    }

    /// Sends the text back.
    #[tool(description = "Echo the given text back")]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("AnyWork's test MCP server: add and echo")
    }
}

/// Stops with a message on stderr.
fn fail(what: &str, error: impl std::fmt::Display) -> ! {
    eprintln!("anywork-test-mcp: {what}: {error}");
    std::process::exit(1);
}

/// Serves streamable HTTP on `addr` until killed.
async fn serve_http(addr: &str) {
    let service = StreamableHttpService::new(
        || Ok(TestServer::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| fail(&format!("cannot bind {addr}"), e));
    let local = listener
        .local_addr()
        .unwrap_or_else(|e| fail("no local address", e));
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "http://{local}/mcp");
    let _ = stdout.flush();
    if let Err(e) = axum::serve(listener, app).await {
        fail("HTTP server failed", e);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, addr] if flag == "--http" => return serve_http(addr).await,
        _ => fail("usage", "anywork-test-mcp [--http ADDR]"),
    }
    let service = match TestServer::new().serve(rmcp::transport::stdio()).await {
        Ok(service) => service,
        Err(e) => fail("cannot start", e),
    };
    if let Err(e) = service.waiting().await {
        fail("stopped", e);
    }
}
