//! The driver: one task per run that reads the CLI's stdout, answers control messages,
//! enforces the timeout and sends exactly one `done`.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anywork_core::{
    Error, ExecutionControl, ExecutionRequest, InputResponse, Progress, Result, TaskEvent,
    TaskOutcome, TaskStatus,
};
use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use super::config::ClaudeCodeConfig;
use super::process::{EXIT_GRACE, Group, KillOnDrop, Line, Proc};
use super::session_files::{
    forget_session_id, read_session_cost, valid_session_id, write_session_cost, write_session_id,
};
use super::stream_json::{
    TurnResult, assistant_events, init_events, permission_request, preview, str_at, text_delta,
    user_events, user_line,
};
use super::warm::{Fingerprint, Running, Warm};
use super::{HISTORY_LOST, LINE_TOO_LONG, tool_mcp};

/// How long an interrupted run may take to send its `result` before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(1);

pub(super) enum ControlMsg {
    Cancel,
    Respond(InputResponse, oneshot::Sender<Result<()>>),
}

/// [`ExecutionControl`] of one run: messages to its driver.
pub(super) struct Control {
    pub(super) tx: mpsc::Sender<ControlMsg>,
}

#[async_trait]
impl ExecutionControl for Control {
    async fn cancel(&self) -> Result<()> {
        // A run that is over needs no cancel.
        let _ = self.tx.send(ControlMsg::Cancel).await;
        Ok(())
    }

    async fn respond(&self, response: InputResponse) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let over = || Error::not_found("the run is over; there is nothing to answer");
        self.tx
            .send(ControlMsg::Respond(response, reply_tx))
            .await
            .map_err(|_| over())?;
        reply_rx.await.unwrap_or_else(|_| Err(over()))
    }
}

pub(super) struct Driver {
    pub(super) config: Arc<ClaudeCodeConfig>,
    pub(super) request: ExecutionRequest,
    pub(super) system_prompt: Option<String>,
    pub(super) tx: mpsc::Sender<TaskEvent>,
    pub(super) control: mpsc::Receiver<ControlMsg>,
    pub(super) control_open: bool,
    pub(super) group: Arc<Group>,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    /// The CLI session id as stored in the workspace.
    pub(super) session_id: Option<String>,
    pub(super) canceled: bool,
    pub(super) timed_out: bool,
    pub(super) interrupts: u64,
    /// Open permission requests: request id → the tool's input.
    pub(super) pending: HashMap<String, Value>,
    /// Text was streamed (`stream_event` deltas) since the last `assistant` line, so that
    /// line's text blocks are not sent a second time.
    pub(super) streamed_text: bool,
    /// Why the run was stopped early as failed (the model API refused the credentials).
    pub(super) fatal: Option<String>,
    /// Counts this run in the warm pool; where a process that finished well goes.
    pub(super) running: Running,
    /// What the process was started with.
    pub(super) fingerprint: Fingerprint,
}

/// How one process ended.
enum Attempt {
    /// The stream's reader went away; the process group was killed.
    Gone,
    /// `--resume` named a conversation the CLI does not have.
    ResumeNotFound(String),
    /// The run is over.
    Ended(TaskOutcome),
    /// The run is over and the process stays up for the session's next task.
    Kept(TaskOutcome),
    /// A warm process ended before answering: the run starts again in a new one.
    WarmLost,
}

impl Driver {
    pub(super) async fn run(mut self, mut proc: Proc) {
        let _kill = KillOnDrop(self.group.clone());
        let outcome = loop {
            match self.attempt(&mut proc).await {
                Attempt::Gone => {
                    tracing::info!(task = %self.request.task_id, "event stream dropped; claude killed");
                    return;
                }
                Attempt::Ended(outcome) => break outcome,
                Attempt::Kept(outcome) => {
                    // Not killed with the event stream any more: it belongs to the pool.
                    self.group.set(None);
                    let warm = Warm::new(proc, self.fingerprint, self.session_id.clone());
                    self.running.keep(self.request.workspace.clone(), warm);
                    break outcome;
                }
                Attempt::WarmLost => {
                    tracing::warn!(task = %self.request.task_id, "the warm claude ended before answering; starting a new one");
                    match self.respawn(self.session_id.clone()) {
                        Ok(fresh) => proc = fresh,
                        Err(e) => break TaskOutcome::failed(e.to_string()),
                    }
                }
                Attempt::ResumeNotFound(message) => {
                    tracing::warn!(task = %self.request.task_id, "{message}; starting a new conversation");
                    forget_session_id(&self.request.workspace);
                    self.session_id = None;
                    let lost = TaskEvent::Error {
                        message: format!(
                            "Claude Code no longer has this session's conversation ({message}); \
                             the earlier history is lost and a new conversation was started"
                        ),
                        code: Some(HISTORY_LOST.to_owned()),
                    };
                    if !self.emit(lost).await {
                        return;
                    }
                    match self.respawn(None) {
                        Ok(fresh) => proc = fresh,
                        Err(e) => break TaskOutcome::failed(e.to_string()),
                    }
                }
            }
        };
        let mut outcome = outcome;
        if outcome.duration_ms == 0 {
            outcome.duration_ms =
                u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        tracing::info!(task = %self.request.task_id, status = %outcome.status, "claude run ended");
        self.running.finish();
        let _ = self.tx.send(TaskEvent::Done(outcome)).await;
    }

    /// A new process for this run, the message written to it.
    fn respawn(&mut self, resume: Option<String>) -> Result<Proc> {
        let proc = Proc::spawn(
            &self.config,
            &self.request.workspace,
            self.system_prompt.as_deref(),
            resume.as_deref(),
            tool_mcp(&self.request).as_ref(),
        )?;
        self.running.pool().started();
        self.group.set(Some(proc.pgid));
        proc.send(user_line(&self.request.message));
        Ok(proc)
    }

    /// Whether the process that just ended its turn with `result` may wait for the session's
    /// next task: only after a clean, successful turn.
    fn keepable(&self, result: Option<&TurnResult>) -> bool {
        self.running.pool().keeps()
            && result.is_some_and(|turn| !turn.is_error)
            && !self.canceled
            && !self.timed_out
            && self.fatal.is_none()
            && self.pending.is_empty()
            && !self.tx.is_closed()
    }

    /// Drives `proc` until its turn is over and it is kept, or until its stdout closes (then
    /// reaps it).
    async fn attempt(&mut self, proc: &mut Proc) -> Attempt {
        let mut result: Option<TurnResult> = None;
        let mut resume_missing: Option<String> = None;
        let mut kill_at: Option<Instant> = None;
        let mut lines = 0u64;
        loop {
            tokio::select! {
                biased;
                () = self.tx.closed() => {
                    self.group.kill();
                    proc.reap().await;
                    self.group.set(None);
                    return Attempt::Gone;
                }
                command = self.control.recv(), if self.control_open => match command {
                    Some(command) => self.on_command(command, proc, result.is_some(), &mut kill_at),
                    None => self.control_open = false,
                },
                () = sleep_until(self.deadline), if !self.timed_out => self.time_out(),
                () = sleep_until(kill_at.unwrap_or(self.deadline)), if kill_at.is_some() => {
                    kill_at = None;
                    tracing::info!(pid = proc.pgid.as_raw(), "killing claude's process group");
                    self.group.kill();
                }
                line = proc.stdout.next_line() => match line {
                    Ok(Some(Line::Complete(line))) => {
                        lines += 1;
                        let had_end = result.is_some() || resume_missing.is_some();
                        if !self.on_line(&line, proc, &mut result, &mut resume_missing).await {
                            self.group.kill();
                            proc.reap().await;
                            self.group.set(None);
                            return Attempt::Gone;
                        }
                        if !had_end && (result.is_some() || resume_missing.is_some()) {
                            if result.is_some() {
                                proc.turns += 1;
                            }
                            if resume_missing.is_none() && self.keepable(result.as_ref()) {
                                let outcome = self.outcome(result, None, "");
                                return Attempt::Kept(outcome);
                            }
                            // The turn is over: let the CLI exit.
                            proc.close_stdin();
                            kill_at = Some(Instant::now() + EXIT_GRACE);
                        }
                    }
                    Ok(Some(Line::TooLong(bytes))) => {
                        let event = TaskEvent::Error {
                            message: format!(
                                "skipped a line of Claude Code output of {bytes} bytes (limit {})",
                                self.config.max_line_bytes
                            ),
                            code: Some(LINE_TOO_LONG.to_owned()),
                        };
                        if !self.emit(event).await {
                            self.group.kill();
                            proc.reap().await;
                            self.group.set(None);
                            return Attempt::Gone;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("cannot read claude's stdout: {e}");
                        break;
                    }
                },
            }
        }

        let status = proc.reap().await;
        self.group.set(None);
        let stderr = proc.stderr_tail().await;
        tracing::debug!(?status, "claude exited");
        if proc.turns > 0 && lines == 0 && !self.canceled && !self.timed_out && self.fatal.is_none()
        {
            return Attempt::WarmLost;
        }
        if let Some(message) = resume_missing
            && result.is_none()
            && !self.canceled
            && !self.timed_out
        {
            return Attempt::ResumeNotFound(message);
        }
        Attempt::Ended(self.outcome(result, status, &stderr))
    }

    fn time_out(&mut self) {
        self.timed_out = true;
        tracing::warn!(
            task = %self.request.task_id,
            timeout = ?self.config.timeout,
            "claude timed out; killing its process group"
        );
        self.group.kill();
    }

    /// Sends `event`; `false` when the stream's reader is gone. Gives up (and times the run
    /// out) if the reader does not take it before the deadline.
    async fn emit(&mut self, event: TaskEvent) -> bool {
        if self.timed_out {
            return self.tx.send(event).await.is_ok();
        }
        tokio::select! {
            sent = self.tx.send(event) => sent.is_ok(),
            () = sleep_until(self.deadline) => {
                self.time_out();
                true
            }
        }
    }

    fn on_command(
        &mut self,
        command: ControlMsg,
        proc: &mut Proc,
        ended: bool,
        kill_at: &mut Option<Instant>,
    ) {
        match command {
            ControlMsg::Cancel => {
                if ended || self.canceled {
                    return;
                }
                self.canceled = true;
                self.interrupts += 1;
                let line = json!({
                    "type": "control_request",
                    "request_id": format!("anywork-interrupt-{}", self.interrupts),
                    "request": {"subtype": "interrupt"},
                });
                tracing::info!(task = %self.request.task_id, "interrupting claude");
                if proc.send(line.to_string()) {
                    *kill_at = Some(Instant::now() + INTERRUPT_GRACE);
                } else {
                    self.group.kill();
                }
            }
            ControlMsg::Respond(response, reply) => {
                let _ = reply.send(self.respond(response, proc));
            }
        }
    }

    fn respond(&mut self, response: InputResponse, proc: &mut Proc) -> Result<()> {
        let Some(input) = self.pending.remove(&response.request_id) else {
            return Err(Error::not_found(format!(
                "no input request `{}` is waiting for an answer",
                response.request_id
            )));
        };
        let answer = response.answer.trim();
        let allow = response.allow.unwrap_or_else(|| {
            matches!(
                answer.to_ascii_lowercase().as_str(),
                "allow" | "yes" | "y" | "approve" | "ok" | "true"
            )
        });
        let decision = if allow {
            json!({"behavior": "allow", "updatedInput": input})
        } else {
            let message = if answer.is_empty() {
                "Denied by the user"
            } else {
                answer
            };
            json!({"behavior": "deny", "message": message})
        };
        let line = json!({
            "type": "control_response",
            "response": {
                "subtype": "success",
                "request_id": response.request_id,
                "response": decision,
            },
        });
        if proc.send(line.to_string()) {
            Ok(())
        } else {
            Err(Error::conflict(
                "the run is ending; the answer came too late",
            ))
        }
    }

    /// Handles one stdout line; `false` when the stream's reader is gone.
    async fn on_line(
        &mut self,
        line: &[u8],
        proc: &mut Proc,
        result: &mut Option<TurnResult>,
        resume_missing: &mut Option<String>,
    ) -> bool {
        let value: Value = match serde_json::from_slice(line) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    tracing::debug!(line = %preview(line), "ignored a non-JSON line from claude");
                }
                return true;
            }
        };
        let kind = str_at(&value, "type").unwrap_or_default();
        let events = match kind {
            "system" if str_at(&value, "subtype") == Some("api_retry") => self.api_retry(&value),
            "system" if str_at(&value, "subtype") == Some("init") => {
                self.remember_session(str_at(&value, "session_id"));
                init_events(&value)
            }
            "stream_event" => match text_delta(&value) {
                Some(text) => {
                    self.streamed_text = true;
                    vec![TaskEvent::text(text)]
                }
                None => Vec::new(),
            },
            "assistant" => {
                let sub_agent = value
                    .get("parent_tool_use_id")
                    .is_some_and(|p| !p.is_null());
                let streamed = self.streamed_text && !sub_agent;
                if !sub_agent {
                    self.streamed_text = false;
                }
                assistant_events(&value, streamed)
            }
            "user" => user_events(&value),
            "result" => {
                if result.is_some() || resume_missing.is_some() {
                    tracing::debug!("ignored a second result line");
                    return true;
                }
                let mut turn = TurnResult::parse(&value);
                if proc.resumed
                    && proc.turns == 0
                    && turn.is_error
                    && let Some(message) = turn.no_conversation()
                {
                    *resume_missing = Some(message);
                    return true;
                }
                self.remember_session(turn.session_id.as_deref());
                turn.cost_usd = self.own_cost(&turn, proc);
                let mut events = vec![TaskEvent::Usage {
                    usage: turn.usage,
                    cost_usd: turn.cost_usd,
                }];
                if turn.is_error && !self.canceled {
                    events.push(TaskEvent::Error {
                        message: turn.error_message(),
                        code: Some(turn.code.clone()),
                    });
                }
                *result = Some(turn);
                events
            }
            "control_request" => match permission_request(&value) {
                Some((request, input)) => {
                    self.pending.insert(request.request_id.clone(), input);
                    vec![TaskEvent::InputRequired(request)]
                }
                None => {
                    let request_id = value.get("request_id").cloned().unwrap_or(Value::Null);
                    let subtype = value
                        .pointer("/request/subtype")
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    tracing::debug!(
                        subtype,
                        "refused an unsupported control request from claude"
                    );
                    let refusal = json!({
                        "type": "control_response",
                        "response": {
                            "subtype": "error",
                            "request_id": request_id,
                            "error": format!("AnyWork does not support `{subtype}` requests"),
                        },
                    });
                    proc.send(refusal.to_string());
                    Vec::new()
                }
            },
            "control_cancel_request" => {
                if let Some(id) = str_at(&value, "request_id") {
                    self.pending.remove(id);
                }
                Vec::new()
            }
            "control_response" => {
                let response = value.get("response").unwrap_or(&Value::Null);
                tracing::debug!(%response, "claude answered a control request");
                Vec::new()
            }
            other => {
                tracing::debug!(kind = other, "ignored a claude output line");
                Vec::new()
            }
        };
        for event in events {
            if !self.emit(event).await {
                return false;
            }
        }
        true
    }

    /// A `system`/`api_retry` line: the CLI retries a failed model call. Told as progress;
    /// but a refused credential (401/403) is never retried — the CLI would try for minutes —:
    /// the run is stopped at once and fails saying what to fix.
    fn api_retry(&mut self, line: &Value) -> Vec<TaskEvent> {
        let count = |key: &str| line.get(key).and_then(Value::as_u64);
        let status = count("error_status");
        let reason = str_at(line, "error").unwrap_or("error").to_owned();
        if matches!(status, Some(401 | 403)) {
            let message = format!(
                "the model API refused the credentials ({} {reason}): check ANTHROPIC_API_KEY \
                 (and ANTHROPIC_BASE_URL) and that the key may use this model",
                status.unwrap_or_default()
            );
            tracing::warn!(task = %self.request.task_id, "{message}; stopping claude");
            self.fatal = Some(message.clone());
            self.group.kill();
            return vec![TaskEvent::Error {
                message,
                code: Some("auth_failed".to_owned()),
            }];
        }
        let attempt = count("attempt")
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(1);
        let max = count("max_retries")
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(attempt);
        let delay = count("retry_delay_ms").unwrap_or(0);
        let what = match status {
            Some(status) => format!("{status} {reason}"),
            None => reason.clone(),
        };
        vec![TaskEvent::Progress(
            Progress::new(
                Progress::MODEL_RETRY,
                format!(
                    "the model call failed ({what}); Claude Code tries again in {:.1} s \
                     (retry {attempt} of {max})",
                    delay as f64 / 1000.0
                ),
            )
            .attempt(attempt, max)
            .retry(delay, what),
        )]
    }

    /// This run's own cost. The CLI's `total_cost_usd` adds up every run of a resumed
    /// conversation (and every turn of a warm process), so the total after the previous run is
    /// taken off: the process's own after its previous turn, else the one remembered in the
    /// workspace; a new conversation's total is its own. A resumed conversation with no
    /// remembered total (it was started by an older worker) has no known cost of its own:
    /// `None`, never a sum of earlier tasks.
    fn own_cost(&self, turn: &TurnResult, proc: &mut Proc) -> Option<f64> {
        let total = turn.cost_usd?;
        let session = turn.session_id.as_deref().filter(|id| valid_session_id(id));
        let before = if proc.turns > 0 {
            proc.last_total_cost
        } else {
            match (proc.resumed, session) {
                (false, _) => Some(0.0),
                (true, Some(id)) => read_session_cost(&self.request.workspace, id),
                (true, None) => None,
            }
        };
        proc.last_total_cost = Some(total);
        if let Some(id) = session
            && let Err(e) = write_session_cost(&self.request.workspace, id, total)
        {
            tracing::warn!("cannot remember the Claude Code session's cost: {e}");
        }
        before.map(|before| (total - before).max(0.0))
    }

    /// Stores a new CLI session id in the workspace.
    fn remember_session(&mut self, id: Option<&str>) {
        let Some(id) = id.filter(|id| valid_session_id(id)) else {
            return;
        };
        if self.session_id.as_deref() == Some(id) {
            return;
        }
        match write_session_id(&self.request.workspace, id) {
            Ok(()) => self.session_id = Some(id.to_owned()),
            Err(e) => tracing::warn!(
                workspace = %self.request.workspace.display(),
                "cannot store the Claude Code session id: {e}"
            ),
        }
    }

    fn outcome(
        &self,
        result: Option<TurnResult>,
        status: Option<ExitStatus>,
        stderr: &str,
    ) -> TaskOutcome {
        if let Some(reason) = &self.fatal {
            return TaskOutcome::failed(reason.clone());
        }
        if let Some(turn) = result {
            let mut outcome = TaskOutcome {
                status: if self.canceled {
                    TaskStatus::Canceled
                } else if turn.is_error {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Completed
                },
                result: None,
                structured_output: turn.structured_output.clone(),
                error: None,
                cost_usd: turn.cost_usd,
                usage: turn.usage,
                num_turns: turn.num_turns,
                duration_ms: turn.duration_ms,
                pull_requests: Vec::new(),
            };
            if !turn.is_error {
                outcome.result = turn.text.clone();
            } else if !self.canceled {
                let mut error = turn.error_message();
                if turn.errors.is_empty() && turn.text.is_none() && !stderr.is_empty() {
                    error = format!("{error}: {stderr}");
                }
                outcome.error = Some(error);
            }
            return outcome;
        }
        if self.timed_out {
            return TaskOutcome::failed(format!("timed out after {:?}", self.config.timeout));
        }
        if self.canceled {
            return TaskOutcome::canceled();
        }
        let how = match status {
            Some(status) => format!("exited ({status})"),
            None => "ended".to_owned(),
        };
        let mut error = format!("Claude Code {how} without a result");
        if !stderr.is_empty() {
            error.push_str(": ");
            error.push_str(stderr);
        }
        TaskOutcome::failed(error)
    }
}
