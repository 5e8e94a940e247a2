//! One run of the native agent loop: model call, tools, repeat.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anywork_core::spec::McpServers;
use anywork_core::{
    AgentInit, ExecutionRequest, InputKind, InputRequest, InputResponse, McpServerConfig, Progress,
    TaskEvent, TaskOutcome, TokenUsage,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::config::NativeConfig;
use super::mcp::{McpClients, McpServerReport};
use super::model::ToolDef;
use super::model::{
    ApiFailure, Emitter, Message, ModelBackend, Part, Role, StopReason, TurnRequest, truncate_chars,
};
use super::skills::{self, Skill};
use super::tools::ToolOutcome;
use super::tools::{self, Builtins};
use super::{pricing, transcript};
use crate::pull_request;

/// Name of the tool that asks the user.
pub const ASK_USER: &str = "ask_user";
/// Name of the tool that loads a skill.
pub const SKILL: &str = "skill";
/// Largest `.mcp.json` read.
const MAX_MCP_JSON: u64 = 1024 * 1024;

/// The shared state behind [`anywork_core::ExecutionControl`].
#[derive(Debug)]
pub struct Control {
    pub(crate) cancel: watch::Sender<bool>,
    pub(crate) pending: Mutex<Option<(String, oneshot::Sender<InputResponse>)>>,
}

impl Control {
    pub(crate) fn new() -> Self {
        Self {
            cancel: watch::channel(false).0,
            pending: Mutex::new(None),
        }
    }
}

/// What the run needs.
pub(crate) struct Run {
    pub config: Arc<NativeConfig>,
    pub backend: Arc<dyn ModelBackend>,
    pub workspace: PathBuf,
    pub request: ExecutionRequest,
    pub tx: mpsc::Sender<TaskEvent>,
    pub control: Arc<Control>,
}

/// Counted while the run goes; kept outside the loop so a cancel still reports it.
#[derive(Default)]
struct Stats {
    usage: TokenUsage,
    turns: u32,
}

enum End {
    Completed(String),
    Failed(String),
    Canceled,
}

/// A pseudo-random number in `[0, 1)` for jitter.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let x = nanos
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The MCP servers of `.mcp.json` (`{"mcpServers": {..}}`); entries that do not parse are
/// reported as failed.
fn read_mcp_json(workspace: &Path) -> (McpServers, Vec<McpServerReport>) {
    let path = workspace.join(".mcp.json");
    let mut failed = Vec::new();
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(_) => return (McpServers::new(), failed),
    };
    if !meta.is_file() || meta.len() > MAX_MCP_JSON {
        failed.push(McpServerReport {
            name: ".mcp.json".into(),
            connected: false,
            error: Some("`.mcp.json` is not a regular file of at most 1 MiB".into()),
            tools: 0,
        });
        return (McpServers::new(), failed);
    }
    let parsed: Result<Value, String> = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
    let servers = match parsed {
        Ok(v) => v.get("mcpServers").cloned().unwrap_or(Value::Null),
        Err(e) => {
            failed.push(McpServerReport {
                name: ".mcp.json".into(),
                connected: false,
                error: Some(format!("`.mcp.json` is not valid JSON: {e}")),
                tools: 0,
            });
            return (McpServers::new(), failed);
        }
    };
    let mut out = McpServers::new();
    if let Value::Object(map) = servers {
        for (name, config) in map {
            match serde_json::from_value::<McpServerConfig>(config) {
                Ok(c) => {
                    out.insert(name, c);
                }
                Err(e) => failed.push(McpServerReport {
                    name,
                    connected: false,
                    error: Some(format!("bad configuration: {e}")),
                    tools: 0,
                }),
            }
        }
    }
    (out, failed)
}

fn ask_user_def() -> ToolDef {
    ToolDef {
        name: ASK_USER.into(),
        description: "Ask the user a question and wait for the answer. Use it when you need \
                      a decision or information only the user has."
            .into(),
        input_schema: json!({
            "type": "object",
            "properties": {
                "question": {"type": "string", "description": "The question"},
                "options": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Suggested answers, if any"
                }
            },
            "required": ["question"]
        }),
    }
}

fn skill_def(skills: &[Skill]) -> ToolDef {
    let names: Vec<&str> = skills.iter().map(|s| s.name.as_str()).collect();
    ToolDef {
        name: SKILL.into(),
        description: "Load the full instructions of one of the skills listed in the system \
                      prompt."
            .into(),
        input_schema: json!({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": names}},
            "required": ["name"]
        }),
    }
}

impl Run {
    /// Runs to the end and sends exactly one `Done`, last.
    pub async fn execute(self) {
        let started = Instant::now();
        let mut stats = Stats::default();
        let mut cancel = self.control.cancel.subscribe();
        let end = {
            let work = self.run_loop(&mut stats);
            tokio::select! {
                biased;
                _ = cancel.wait_for(|c| *c) => End::Canceled,
                end = work => end,
            }
        };
        // The loop's future is gone: its HTTP stream, bash group and MCP servers with it.
        let mut outcome = match end {
            End::Completed(result) => TaskOutcome::completed(result),
            End::Failed(error) => TaskOutcome::failed(error),
            End::Canceled => TaskOutcome::canceled(),
        };
        outcome.usage = stats.usage;
        outcome.num_turns = stats.turns;
        outcome.cost_usd = pricing::cost(&self.config.model, &stats.usage);
        outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ = self.tx.send(TaskEvent::Done(outcome)).await;
    }

    async fn emit(&self, event: TaskEvent) {
        let _ = self.tx.send(event).await;
    }

    async fn run_loop(&self, stats: &mut Stats) -> End {
        let ws = self.workspace.as_path();
        let builtins = match Builtins::new(
            ws,
            self.config.bash_timeout,
            self.config.max_tool_output,
            self.config.sandbox.clone(),
        ) {
            Ok(b) => b,
            Err(e) => return End::Failed(format!("cannot open the workspace: {e}")),
        };
        // The workspace's files, read off the runtime's threads (a slow disk must not stall
        // the other runs).
        let dir = self.workspace.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let skills = skills::scan(&dir);
            let system = skills::system_prompt(&dir, &skills);
            (skills, system, read_mcp_json(&dir), transcript::load(&dir))
        })
        .await;
        let (skills, system, (servers, mut reports), mut history) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => return End::Failed(format!("cannot read the workspace: {e}")),
        };
        let (mcp, connected) = McpClients::connect_in(&servers, ws, &self.config.sandbox).await;
        let mcp = mcp.with_call_timeout(self.config.mcp_call_timeout);
        reports.extend(connected);

        let mut tools = tools::definitions();
        tools.push(ask_user_def());
        if !skills.is_empty() {
            tools.push(skill_def(&skills));
        }
        if let Some(opener) = &self.request.pull_requests {
            tools.push(ToolDef {
                name: pull_request::TOOL_NAME.to_owned(),
                description: pull_request::description(opener.folder()),
                input_schema: pull_request::input_schema(),
            });
        }
        tools.extend(mcp.tools());

        self.emit(TaskEvent::Init(AgentInit {
            model: self.config.model.clone(),
            agent_session_id: None,
            tools: tools.iter().map(|t| t.name.clone()).collect(),
            skills: skills.iter().map(|s| s.name.clone()).collect(),
            mcp_servers: reports.iter().map(McpServerReport::status).collect(),
        }))
        .await;
        for report in reports.iter().filter(|r| !r.connected) {
            self.emit(TaskEvent::Error {
                message: format!(
                    "MCP server {} failed: {}",
                    report.name,
                    report.error.as_deref().unwrap_or("unknown error")
                ),
                code: Some("mcp_server_failed".into()),
            })
            .await;
        }

        // A previous turn cut off mid-run (the worker was killed) is marked as such, so the
        // model does not take its instruction as still to do.
        transcript::close_unanswered_turn(&mut history);
        let first = Message::user_text(self.request.message.clone());
        self.record(&first).await;
        history.push(first);

        let end = self
            .turns(
                stats,
                &mut history,
                &system,
                &tools,
                &builtins,
                &skills,
                &mcp,
            )
            .await;
        mcp.shutdown().await;
        end
    }

    /// Appends to the transcript; a failure is logged, the run goes on.
    /// Appends `message` to the transcript, off the runtime's threads.
    async fn record(&self, message: &Message) {
        let (dir, message) = (self.workspace.clone(), message.clone());
        let written = tokio::task::spawn_blocking(move || transcript::append(&dir, &message)).await;
        let error = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(task = %self.request.task_id, error = %error, "cannot write the native transcript");
    }

    #[allow(clippy::too_many_arguments)]
    async fn turns(
        &self,
        stats: &mut Stats,
        history: &mut Vec<Message>,
        system: &str,
        tools: &[ToolDef],
        builtins: &Builtins,
        skills: &[Skill],
        mcp: &McpClients,
    ) -> End {
        let config = &self.config;
        let mut last_text = String::new();
        loop {
            if stats.turns >= config.max_turns {
                let message = format!("reached the maximum of {} turns", config.max_turns);
                self.emit(TaskEvent::Error {
                    message: message.clone(),
                    code: Some("max_turns".into()),
                })
                .await;
                return End::Failed(message);
            }
            let request = TurnRequest {
                model: &config.model,
                system,
                messages: history,
                tools,
                max_tokens: config.max_tokens,
            };
            let response = match self.call_model(&request).await {
                Ok(r) => r,
                Err(failure) => {
                    self.emit(TaskEvent::Error {
                        message: failure.message.clone(),
                        code: Some("api_error".into()),
                    })
                    .await;
                    return End::Failed(failure.message);
                }
            };
            stats.turns += 1;
            stats.usage.add(&response.usage);
            self.emit(TaskEvent::Usage {
                usage: stats.usage,
                cost_usd: pricing::cost(&config.model, &stats.usage),
            })
            .await;

            let message = response.message;
            let text = message.text();
            if !text.trim().is_empty() {
                last_text = text;
            }
            let calls: Vec<(String, String, Value)> = message
                .tool_uses()
                .map(|(id, name, input)| (id.to_owned(), name.to_owned(), input.clone()))
                .collect();
            if !message.content.is_empty() {
                self.record(&message).await;
                history.push(message);
            }
            if calls.is_empty() {
                if response.stop == StopReason::MaxTokens {
                    self.emit(TaskEvent::Error {
                        message: format!(
                            "the answer was cut off at max_tokens ({})",
                            config.max_tokens
                        ),
                        code: Some("max_tokens".into()),
                    })
                    .await;
                }
                return End::Completed(last_text);
            }

            let mut results = Vec::with_capacity(calls.len());
            for (id, name, input) in calls {
                let outcome = self
                    .run_tool(&id, &name, input, builtins, skills, mcp)
                    .await;
                self.emit(TaskEvent::ToolResult {
                    tool_use_id: id.clone(),
                    content: outcome.content.clone(),
                    is_error: outcome.is_error,
                })
                .await;
                results.push(Part::ToolResult {
                    tool_use_id: id,
                    content: outcome.content,
                    is_error: outcome.is_error,
                });
            }
            let results = Message {
                role: Role::User,
                content: results,
            };
            self.record(&results).await;
            history.push(results);
        }
    }

    /// One model call with retries (only while nothing of it was streamed).
    async fn call_model(
        &self,
        request: &TurnRequest<'_>,
    ) -> Result<super::model::TurnResponse, ApiFailure> {
        let retry = self.config.retry;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut out = Emitter::new(&self.tx);
            match self.backend.turn(request, &mut out).await {
                Ok(response) => return Ok(response),
                Err(failure)
                    if failure.retryable
                        && !failure.emitted
                        && !out.emitted()
                        && attempt < retry.max_attempts =>
                {
                    let backoff = retry.backoff(attempt - 1);
                    let wait = match failure.retry_after {
                        Some(after) => after.min(retry.max_backoff),
                        None => Duration::try_from_secs_f64(
                            backoff.as_secs_f64() * (0.75 + 0.5 * jitter()),
                        )
                        .unwrap_or(backoff),
                    };
                    tracing::warn!(
                        task = %self.request.task_id,
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        error = %failure.message,
                        "model call failed; retrying"
                    );
                    let next = attempt + 1;
                    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                    self.emit(TaskEvent::Progress(
                        Progress::new(
                            Progress::MODEL_RETRY,
                            format!(
                                "the model call failed ({}); trying again in {:.1} s (attempt {next} of {})",
                                failure.message,
                                wait.as_secs_f64(),
                                retry.max_attempts
                            ),
                        )
                        .attempt(next, retry.max_attempts)
                        .retry(wait_ms, failure.message.clone()),
                    ))
                    .await;
                    tokio::time::sleep(wait).await;
                }
                Err(mut failure) => {
                    if attempt > 1 {
                        failure.message = format!("{} (after {attempt} attempts)", failure.message);
                    }
                    return Err(failure);
                }
            }
        }
    }

    async fn run_tool(
        &self,
        id: &str,
        name: &str,
        input: Value,
        builtins: &Builtins,
        skills: &[Skill],
        mcp: &McpClients,
    ) -> ToolOutcome {
        if let Value::String(raw) = &input {
            return ToolOutcome::error(format!(
                "the arguments of {name} are not valid JSON: {}",
                truncate_chars(raw, 200)
            ));
        }
        match name {
            ASK_USER => self.ask_user(id, &input).await,
            SKILL => {
                let wanted = input.get("name").and_then(Value::as_str).unwrap_or("");
                match skills.iter().find(|s| s.name == wanted) {
                    Some(skill) => ToolOutcome::ok(if skill.body.is_empty() {
                        "(this skill has no instructions)".to_owned()
                    } else {
                        skill.body.clone()
                    }),
                    None => ToolOutcome::error(format!(
                        "no skill named {wanted:?}; available: {}",
                        skills
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
            pull_request::TOOL_NAME => match &self.request.pull_requests {
                Some(opener) => match pull_request::call(opener.as_ref(), input).await {
                    Ok(text) => ToolOutcome::ok(text),
                    Err(e) => ToolOutcome::error(e),
                },
                None => ToolOutcome::error(format!("there is no tool named {name:?}")),
            },
            _ if mcp.has_tool(name) => mcp.call(name, input).await,
            _ => match builtins.call(name, &input).await {
                Some(outcome) => outcome,
                None => ToolOutcome::error(format!("there is no tool named {name:?}")),
            },
        }
    }

    async fn ask_user(&self, id: &str, input: &Value) -> ToolOutcome {
        let Some(question) = input
            .get("question")
            .and_then(Value::as_str)
            .filter(|q| !q.trim().is_empty())
        else {
            return ToolOutcome::error("missing string argument `question`");
        };
        let options: Vec<String> = input
            .get("options")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|o| o.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let request_id = format!("ask-{id}");
        let (tx, rx) = oneshot::channel();
        match self.control.pending.lock() {
            Ok(mut pending) => *pending = Some((request_id.clone(), tx)),
            Err(_) => return ToolOutcome::error("cannot wait for the user (internal error)"),
        }
        self.emit(TaskEvent::InputRequired(InputRequest {
            request_id,
            kind: InputKind::Question,
            prompt: question.to_owned(),
            tool_name: None,
            input: None,
            options,
        }))
        .await;
        match rx.await {
            Ok(response) if response.answer.trim().is_empty() => {
                ToolOutcome::ok("(the user gave an empty answer)")
            }
            Ok(response) => ToolOutcome::ok(response.answer),
            Err(_) => ToolOutcome::error("the question was withdrawn"),
        }
    }
}
