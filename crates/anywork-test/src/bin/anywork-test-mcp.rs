//! A tiny MCP server on stdin/stdout for tests: tools `add {a, b}` and `echo {text}`.
//!
//! Point an MCP client at it with `.mcp.json` such as
//! `{"mcpServers": {"calc": {"command": "/path/to/anywork-test-mcp"}}}`.
//! It logs nothing on stdout (the protocol channel); diagnostics go to stderr.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let service = match TestServer::new().serve(rmcp::transport::stdio()).await {
        Ok(service) => service,
        Err(e) => {
            eprintln!("anywork-test-mcp: cannot start: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = service.waiting().await {
        eprintln!("anywork-test-mcp: {e}");
        std::process::exit(1);
    }
}
