//! The test MCP server (`anywork-test-mcp`) speaks MCP over stdio through an rmcp client.

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};

fn text_of(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| {
            let v = serde_json::to_value(c).ok()?;
            v.get("text").and_then(Value::as_str).map(str::to_owned)
        })
        .collect()
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(map) => map,
        _ => unreachable!("test arguments are objects"),
    }
}

#[tokio::test]
async fn add_and_echo_over_stdio() {
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_anywork-test-mcp"));
    let client = ().serve(TokioChildProcess::new(command).unwrap()).await.unwrap();

    let mut names: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["add", "echo"]);

    let sum = client
        .call_tool(CallToolRequestParams::new("add").with_arguments(args(json!({"a": 2, "b": 3}))))
        .await
        .unwrap();
    assert_eq!(text_of(&sum), r#"{"result":5}"#);
    assert_ne!(sum.is_error, Some(true));

    let half = client
        .call_tool(
            CallToolRequestParams::new("add").with_arguments(args(json!({"a": 0.5, "b": 1}))),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&half), r#"{"result":1.5}"#);

    let echo = client
        .call_tool(CallToolRequestParams::new("echo").with_arguments(args(json!({"text": "hi"}))))
        .await
        .unwrap();
    assert_eq!(text_of(&echo), "hi");

    let missing = client
        .call_tool(CallToolRequestParams::new("add").with_arguments(args(json!({"a": 1}))))
        .await;
    assert!(
        missing.is_err() || missing.as_ref().is_ok_and(|r| r.is_error == Some(true)),
        "{missing:?}"
    );
    client.cancel().await.unwrap();
}
