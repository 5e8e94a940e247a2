//! `/api/openapi.json`: an OpenAPI 3.1 document built from one table of the routes and their
//! shapes, so that adding a route means adding a row here (a test checks that every API route
//! of the router is in the table).

use serde_json::{Map, Value, json};

/// One operation.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    /// Schema name of the JSON body, if any.
    body: Option<&'static str>,
    /// Success status and schema name of its JSON answer.
    ok: (u16, &'static str),
    /// Query parameters: (name, type, description).
    query: &'static [(&'static str, &'static str, &'static str)],
}

const OPS: &[Op] = &[
    Op {
        method: "get",
        path: "/api/health",
        summary: "Readiness, status and version: 503 with `error` when the store cannot take a write now or the server is shutting down",
        body: None,
        ok: (200, "Health"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/health/live",
        summary: "Liveness: 200 while the process answers, whatever the store's state",
        body: None,
        ok: (200, "Ok"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions",
        summary: "Sessions, most recently active first; with q, only those whose title contains q (ignoring case)",
        body: None,
        ok: (200, "SessionList"),
        query: &[
            (
                "q",
                "string",
                "Search: title contains this text, case ignored, % and _ literal (at most 500 characters)",
            ),
            ("limit", "integer", "Page size"),
            ("offset", "integer", "Rows to skip"),
        ],
    },
    Op {
        method: "get",
        path: "/api/usage",
        summary: "Cost and tokens summed over every task of every session",
        body: None,
        ok: (200, "UsageTotals"),
        query: &[],
    },
    Op {
        method: "post",
        path: "/api/sessions",
        summary: "Create a session",
        body: Some("CreateSession"),
        ok: (201, "Session"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}",
        summary: "One session",
        body: None,
        ok: (200, "Session"),
        query: &[],
    },
    Op {
        method: "patch",
        path: "/api/sessions/{id}",
        summary: "Rename a session",
        body: Some("Rename"),
        ok: (200, "Success"),
        query: &[],
    },
    Op {
        method: "delete",
        path: "/api/sessions/{id}",
        summary: "Delete a session with its tasks, logs, worker and workspace (active tasks are canceled)",
        body: None,
        ok: (200, "Success"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/tasks",
        summary: "A session's tasks, oldest first",
        body: None,
        ok: (200, "TaskList"),
        query: PAGE,
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/messages",
        summary: "The conversation as the worker keeps it ([] when the worker cannot be reached)",
        body: None,
        ok: (200, "Messages"),
        query: &[],
    },
    Op {
        method: "post",
        path: "/api/tasks",
        summary: "Submit a task",
        body: Some("CreateTask"),
        ok: (202, "TaskAccepted"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/tasks/{id}",
        summary: "One task",
        body: None,
        ok: (200, "Task"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/tasks/{id}/logs",
        summary: "A task's events with seq > after; with wait, long-polls for the first new one",
        body: None,
        ok: (200, "LogPage"),
        query: &[
            ("after", "integer", "Last seq seen (exclusive); 0 for all"),
            (
                "limit",
                "integer",
                "At most this many (default 100, max 500)",
            ),
            (
                "wait",
                "number",
                "Seconds to wait for a new event when there is none (max 30)",
            ),
        ],
    },
    Op {
        method: "post",
        path: "/api/tasks/{id}/cancel",
        summary: "Cancel a pending, running or input_required task",
        body: None,
        ok: (200, "Task"),
        query: &[],
    },
    Op {
        method: "post",
        path: "/api/tasks/{id}/input",
        summary: "Answer a task's input_required event",
        body: Some("InputResponse"),
        ok: (200, "Ok"),
        query: &[],
    },
    Op {
        method: "post",
        path: "/api/channel/{type}/webhook",
        summary: "Inbound event of a channel (verified and parsed by the channel): 202 \
                  {taskId, sessionId} before the agent runs; 200 {ok, skipped} when there is \
                  nothing to do; 404 unknown type, 401 bad signature, 400 malformed, 413 too large",
        body: Some("Any"),
        ok: (202, "TaskAccepted"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/deliveries",
        summary: "The outbox: channel answers and push notifications, oldest first (secrets \
                  redacted)",
        body: None,
        ok: (200, "DeliveryList"),
        query: &[
            (
                "status",
                "string",
                "pending, failed, sent or dead (all when absent)",
            ),
            (
                "limit",
                "integer",
                "at most this many (default 100, at most 500)",
            ),
            ("offset", "integer", "skip this many"),
        ],
    },
    Op {
        method: "post",
        path: "/api/deliveries/{id}/retry",
        summary: "Send a dead delivery again, with a fresh attempt budget (409 if not dead)",
        body: None,
        ok: (200, "Delivery"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/workspace/{file}",
        summary: "The default SOUL.md (file=soul) or AGENTS.md (file=agents) new sessions start with (kept by the server)",
        body: None,
        ok: (200, "WorkspaceFile"),
        query: &[],
    },
    Op {
        method: "put",
        path: "/api/workspace/{file}",
        summary: "Replace the default SOUL.md or AGENTS.md of sessions created from now on",
        body: Some("WorkspaceContent"),
        ok: (200, "WorkspaceFile"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/workspace/{file}",
        summary: "The session's own SOUL.md or AGENTS.md, from its running worker (409 when none runs; none is started)",
        body: None,
        ok: (200, "WorkspaceFile"),
        query: &[],
    },
    Op {
        method: "put",
        path: "/api/sessions/{id}/workspace/{file}",
        summary: "Replace the session's own SOUL.md or AGENTS.md (409 when no worker runs for it)",
        body: Some("WorkspaceContent"),
        ok: (200, "WorkspaceFile"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/files",
        summary: "The session's files/ folder: every file with its size and time (the session's worker is started if needed)",
        body: None,
        ok: (200, "FileList"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/files.zip",
        summary: "The session's files/ folder as a zip",
        body: None,
        ok: (200, "Binary"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/sessions/{id}/files/{path}",
        summary: "One file of files/ (path may hold slashes): an attachment, or text/plain with inline=1",
        body: None,
        ok: (200, "Binary"),
        query: &[(
            "inline",
            "string",
            "1: show as plain text instead of downloading",
        )],
    },
    Op {
        method: "put",
        path: "/api/sessions/{id}/files/{path}",
        summary: "Upload: the raw body becomes files/<path> (25 MiB at most; .., absolute paths and links refused)",
        body: Some("Binary"),
        ok: (200, "FileSaved"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/admin/tasks",
        summary: "Tasks not over yet (running, waiting for input, queued) and the dispatcher's load",
        body: None,
        ok: (200, "ActiveTasks"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/admin/workers",
        summary: "The driver's workers and the dispatcher's load",
        body: None,
        ok: (200, "Workers"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/skills",
        summary: "Skills a request may name (from SKILLS_DIR), and folders there that cannot be used",
        body: None,
        ok: (200, "Skills"),
        query: &[],
    },
    Op {
        method: "get",
        path: "/api/openapi.json",
        summary: "This document",
        body: None,
        ok: (200, "Any"),
        query: &[],
    },
];

const PAGE: &[(&str, &str, &str)] = &[
    ("limit", "integer", "Page size"),
    ("offset", "integer", "Rows to skip"),
];

/// The paths of the table, for the router test.
#[cfg(test)]
pub(crate) fn documented_paths() -> Vec<(&'static str, &'static str)> {
    OPS.iter().map(|o| (o.method, o.path)).collect()
}

/// The media type of a schema: raw bytes for `Binary`, else JSON.
fn media(schema: &str) -> &'static str {
    if schema == "Binary" {
        "application/octet-stream"
    } else {
        "application/json"
    }
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let int = json!({"type": "integer"});
    let nullable = |t: &str| json!({"type": [t, "null"]});
    let session = json!({"type": "object", "required": ["id", "channel_type", "title", "created_at", "last_active"], "properties": {
        "id": string, "channel_type": string, "channel_key": string, "title": string,
        "created_at": {"type": "integer", "description": "unix seconds"}, "last_active": {"type": "integer", "description": "unix seconds"},
        "task_count": int, "active_task_count": int}});
    let status = json!({"type": "string", "enum": ["pending", "running", "input_required", "completed", "failed", "canceled"]});
    let task = json!({"type": "object", "required": ["id", "sessionId", "status", "message"], "properties": {
        "id": {"type": "string", "format": "uuid"}, "sessionId": string, "channelType": string, "status": status,
        "message": string, "result": nullable("string"), "structuredOutput": {}, "error": nullable("string"),
        "costUsd": nullable("number"), "usage": {"type": "object"}, "numTurns": int, "durationMs": nullable("integer"),
        "workerId": nullable("string"), "createdAt": int, "startedAt": nullable("integer"), "finishedAt": nullable("integer")}});
    let log = json!({"type": "object", "required": ["seq", "type", "content", "metadata", "timestamp"], "properties": {
        "seq": int, "type": {"type": "string", "description": "init, text, thinking, tool_call, tool_result, input_required, usage, status, error, done"},
        "content": string, "metadata": {"type": "object"}, "timestamp": int}});
    let skill = json!({"oneOf": [
        {"type": "string", "description": "a skill's name, resolved from the server's SKILLS_DIR"},
        {"type": "object", "required": ["name"], "properties": {"name": string, "content": string, "files": {"type": "object"}}}]});
    let mcp_entry = json!({"type": "object", "required": ["name"], "properties": {
        "name": string, "transport": {"type": "string", "enum": ["stdio", "http", "sse"]}, "command": string,
        "args": {"type": "array", "items": string}, "env": {"type": "object"}, "url": string, "headers": {"type": "object"}}});
    let mcp_servers = json!({"oneOf": [
        {"type": "array", "items": mcp_entry, "description": "the original AnyWork's list"},
        {"type": "object", "description": "as in .mcp.json's mcpServers"},
        {"type": "null"}]});
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": string, "message": string}}}},
        "Any": {},
        "Ok": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
        "Success": {"type": "object", "properties": {"success": {"type": "boolean"}}},
        "Health": {"type": "object", "required": ["status", "version"], "properties": {"status": string, "version": string, "driver": string, "demo": {"type": "boolean"}, "warning": string, "error": {"type": "object", "properties": {"code": string, "message": string}},
            "setup": {"type": "array", "description": "the set-up check made at start, per driver (engine, image, model, cluster, worker)",
                "items": {"type": "object", "properties": {"name": string, "ok": {"type": "boolean"}, "message": string}}}}},
        "Session": session,
        "SessionList": {"type": "object", "properties": {"sessions": {"type": "array", "items": schema_ref("Session")}}},
        "CreateSession": {"type": "object", "properties": {"title": string, "channelType": string}},
        "Rename": {"type": "object", "required": ["title"], "properties": {"title": string}},
        "Task": task,
        "TaskList": {"type": "object", "properties": {"tasks": {"type": "array", "items": schema_ref("Task")}}},
        "TaskAccepted": {"type": "object", "required": ["taskId"], "properties": {"taskId": string, "sessionId": string, "status": status}},
        "CreateTask": {"type": "object", "required": ["message"], "additionalProperties": false, "properties": {
            "message": string, "session_id": string, "sessionId": {"type": "string", "description": "the same as session_id, as answers spell it"}, "channel_type": string, "channel_key": string, "channel_meta": {},
            "skills": {"type": ["array", "null"], "items": skill}, "mcp_servers": mcp_servers,
            "push_notification": {"type": "object", "required": ["url"], "properties": {"url": string,
                "authorization": {"type": "string", "description": "sent as the Authorization header; also spelled auth_header"},
                "events": {"type": "array", "items": string, "description": "statuses to push (running, input_required, completed, failed, canceled); default: the final one"}}}}},
        "Delivery": {"type": "object", "properties": {"id": string, "task_id": string,
            "target": {"type": "object", "description": "{kind: channel, channel_type} or {kind: push, url, authorization: [redacted], events}"},
            "payload": {}, "status": string, "attempts": int, "next_attempt_at": int, "last_error": string,
            "created_at": int, "updated_at": int}},
        "DeliveryList": {"type": "object", "properties": {"deliveries": {"type": "array", "items": schema_ref("Delivery")}}},
        "TaskLog": log,
        "LogPage": {"type": "object", "properties": {"logs": {"type": "array", "items": schema_ref("TaskLog")}, "hasMore": {"type": "boolean"}, "next": int}},
        "InputResponse": {"type": "object", "required": ["request_id"], "properties": {"request_id": string, "answer": string, "allow": {"type": "boolean"}}},
        "Messages": {"type": "object", "properties": {"messages": {"type": "array", "items": {"type": "object"}}}},
        "WorkspaceFile": {"type": "object", "properties": {"file": string, "content": string,
            "scope": {"enum": ["defaults", "session"], "description": "defaults: what new sessions start with; session: that session's own file"},
            "sessionId": string}},
        "WorkspaceContent": {"type": "object", "required": ["content"], "properties": {"content": string}},
        "ActiveTasks": {"type": "object", "properties": {"tasks": {"type": "array", "items": schema_ref("Task")}, "running": int, "queueDepth": int}},
        "FileList": {"type": "object", "properties": {"files": {"type": "array", "items": {"type": "object",
            "properties": {"path": string, "size": int, "modified": int}}}, "truncated": {"type": "boolean"}}},
        "FileSaved": {"type": "object", "properties": {"path": string, "size": int, "status": string}},
        "Binary": {"type": "string", "format": "binary"},
        "Skills": {"type": "object", "properties": {
            "skills": {"type": "array", "items": {"type": "object", "required": ["name", "description"], "properties": {"name": string, "description": string}}},
            "invalid": {"type": "array", "items": {"type": "object", "properties": {"name": string, "error": string}}}}},
        "UsageTotals": {"type": "object", "required": ["sessions", "tasks", "costUsd", "usage"], "properties": {
            "sessions": int, "tasks": int, "costUsd": {"type": "number", "description": "US dollars; tasks without a known cost add nothing"},
            "usage": {"type": "object", "properties": {"input_tokens": int, "output_tokens": int, "cache_creation_input_tokens": int, "cache_read_input_tokens": int}}}},
        "Workers": {"type": "object", "properties": {"driver": string, "workers": {"type": "array", "items": {"type": "object"}}, "running": int, "queueDepth": int}},
    })
}

/// The document.
pub fn openapi_document() -> Value {
    let mut paths = Map::new();
    for op in OPS {
        let mut params: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(op.query.iter().map(|(name, ty, description)| {
            json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": ty}})
        }));
        let error = json!({"description": "Error", "content": {"application/json": {"schema": schema_ref("Error")}}});
        let mut operation = json!({
            "summary": op.summary,
            "parameters": params,
            "responses": {
                op.ok.0.to_string(): {"description": "OK", "content": {media(op.ok.1): {"schema": schema_ref(op.ok.1)}}},
                "4XX": error.clone(),
                "5XX": error,
            },
        });
        if let Some(body) = op.body {
            operation["requestBody"] =
                json!({"required": true, "content": {media(body): {"schema": schema_ref(body)}}});
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    paths.insert("/ws".to_owned(), websocket_path());
    let mut components = schemas();
    if let Some(map) = components.as_object_mut() {
        for (name, schema) in websocket_schemas() {
            map.insert(name.to_owned(), schema);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "AnyWork API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Sessions, tasks and their event logs. Live events: WebSocket /ws (see ARCHITECTURE.md). Metrics: GET /metrics (Prometheus text).",
            "license": {"name": "MIT"},
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ANYWORK_API_TOKEN, when the server has one (401 without it). /api/health, /metrics (unless ANYWORK_PROTECT_HEALTH) and the channel webhooks are open."
                }
            }
        },
        "security": [{"bearer": []}, {}],
    })
}

/// `/ws`: the upgrade, and the messages each way as schemas (`WsClientMessage`,
/// `WsServerMessage`): JSON text frames, flat, with a `type`.
fn websocket_path() -> Value {
    json!({"get": {
        "summary": "WebSocket: chat and live task events. After the upgrade each text frame is one JSON message: the client sends WsClientMessage, the server sends WsServerMessage.",
        "parameters": [],
        "responses": {
            "101": {"description": "Switching protocols; then WsClientMessage frames in, WsServerMessage frames out",
                "content": {"application/json": {"schema": schema_ref("WsServerMessage")}}},
            "4XX": {"description": "Error", "content": {"application/json": {"schema": schema_ref("Error")}}},
        },
        "x-websocket-client-messages": schema_ref("WsClientMessage"),
        "x-websocket-server-messages": schema_ref("WsServerMessage"),
    }})
}

fn websocket_schemas() -> Vec<(&'static str, Value)> {
    let string = json!({"type": "string"});
    let kind = |t: &str| json!({"const": t});
    let id_desc = |what: &str| json!({"type": "string", "description": format!("{what} (camelCase spelling taken too)")});
    let client = json!({"oneOf": [
        {"type": "object", "required": ["type", "message"], "properties": {"type": kind("chat"), "message": string,
            "session_id": id_desc("session to continue; without it a new session is made"),
            "skills": {"type": "array"}, "mcp_servers": {"type": "object"}}},
        {"type": "object", "required": ["type"], "properties": {"type": kind("ping")}},
        {"type": "object", "required": ["type", "task_id"], "properties": {"type": kind("resume"),
            "task_id": id_desc("the task to follow"), "after_seq": {"type": "integer", "description": "replay events after this seq (0: all)"}}},
        {"type": "object", "required": ["type", "task_id"], "properties": {"type": kind("cancel"), "task_id": id_desc("the task")}},
        {"type": "object", "required": ["type", "task_id", "request_id"], "properties": {"type": kind("input_response"),
            "task_id": id_desc("the waiting task"), "request_id": string, "answer": string, "allow": {"type": "boolean"}}},
    ]});
    let event_types = [
        "init",
        "text",
        "thinking",
        "tool_call",
        "tool_result",
        "input_required",
        "usage",
        "status",
        "error",
        "progress",
        "done",
    ];
    let server = json!({"oneOf": [
        {"type": "object", "required": ["type", "session_id"], "properties": {"type": kind("session_created"), "session_id": string}},
        {"type": "object", "required": ["type", "session_id", "task_id"], "properties": {"type": kind("task_created"), "session_id": string, "task_id": string}},
        {"type": "object", "required": ["type", "session_id", "content"], "properties": {"type": kind("session_title"), "session_id": string, "content": string}},
        {"type": "object", "required": ["type"], "properties": {"type": kind("pong")}},
        {"type": "object", "required": ["type", "task_id", "seq"], "description": "a task event, as stored in its log (see TaskLog); progress: what the task waits for (metadata stage, attempt, max_attempts, retry_in_ms, reason)",
            "properties": {"type": {"enum": event_types}, "content": string, "metadata": {"type": "object"},
                "session_id": string, "task_id": string, "seq": {"type": "integer"}}},
        {"type": "object", "required": ["type", "content"], "description": "a refused client message", "properties": {"type": kind("error"), "content": string}},
    ]});
    vec![("WsClientMessage", client), ("WsServerMessage", server)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc = openapi_document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "missing schema {name}");
        }
        assert_eq!(
            doc["paths"]["/api/tasks"]["post"]["responses"]["202"]["description"],
            "OK"
        );
    }
}
