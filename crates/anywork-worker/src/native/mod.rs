//! [`NativeExecutor`]: an agent loop in Rust that calls a model API directly.
//!
//! Each run: scan the workspace's skills, connect the MCP servers of its `.mcp.json` (see
//! [`mcp`]), emit `init`, load the conversation from
//! `<ws>/sessions/native-transcript.jsonl`, then call the model and run the tools it asks
//! for until it answers without tool calls, streaming `text`, `thinking`, `tool_call`,
//! `tool_result` and `usage` events, and end with exactly one `done`.
//!
//! - Model APIs: the Anthropic Messages API or an OpenAI-compatible chat completions API
//!   ([`Provider`]), both streamed, with retries ([`RetryPolicy`]) while nothing of a request
//!   was streamed yet.
//! - Tools: `bash`, `read_file`, `write_file`, `edit_file`, `list_files`, `grep` (confined
//!   to the workspace), `ask_user` (an `input_required` event answered through
//!   [`ExecutionControl::respond`]), `skill` (when
//!   the workspace has skills) and `mcp__<server>__<tool>`.
//! - `usage` events carry the run's totals so far; `done` the final totals, the number of
//!   model calls, the duration and the cost (`pricing.rs`, `None` for unknown models).
//! - Cancel stops the model stream and kills a running `bash` (its process group) and the
//!   MCP servers; dropping the event stream does the same.

mod agent;
mod anthropic;
mod config;
mod glob;
pub mod mcp;
mod model;
mod openai;
mod pricing;
mod skills;
mod tools;
mod transcript;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anywork_core::{
    Error, Execution, ExecutionControl, ExecutionRequest, Executor, InputResponse, Result,
    TaskEvent, TaskOutcome,
};
use async_trait::async_trait;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use config::{
    DEFAULT_ANTHROPIC_BASE_URL, DEFAULT_ANTHROPIC_MODEL, DEFAULT_OPENAI_BASE_URL, MISSING_CONFIG,
    NativeConfig, Provider, RetryPolicy,
};

use agent::{Control, Run};
use model::ModelBackend;

/// How many events may wait for the consumer before the run pauses.
const EVENT_BUFFER: usize = 256;
/// The error of the `done` sent when the run's task ends without one (it panicked).
const STOPPED: &str = "the native executor stopped unexpectedly";

/// Runs agents with the native loop. Cheap to share; every run is independent.
pub struct NativeExecutor {
    config: Arc<NativeConfig>,
    backend: Arc<dyn ModelBackend>,
}

impl std::fmt::Debug for NativeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeExecutor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NativeExecutor {
    /// The model it calls.
    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// An executor with `config` (checked with [`NativeConfig::validate`]).
    pub fn new(config: NativeConfig) -> Result<Self> {
        config.validate()?;
        let client = reqwest::Client::builder()
            .connect_timeout(
                config
                    .request_timeout
                    .min(std::time::Duration::from_secs(30)),
            )
            .build()
            .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
        let idle = config.request_timeout;
        let backend: Arc<dyn ModelBackend> = match &config.provider {
            Provider::Anthropic { api_key, base_url } => {
                Arc::new(anthropic::Anthropic::new(client, base_url, api_key, idle))
            }
            Provider::OpenAi { api_key, base_url } => {
                Arc::new(openai::OpenAi::new(client, base_url, api_key, idle))
            }
        };
        Ok(Self {
            config: Arc::new(config),
            backend,
        })
    }

    /// An executor configured from the environment ([`NativeConfig::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(NativeConfig::from_env()?)
    }

    /// The configuration.
    pub fn config(&self) -> &NativeConfig {
        &self.config
    }
}

#[async_trait]
impl Executor for NativeExecutor {
    fn name(&self) -> &str {
        "native"
    }

    async fn start(&self, request: ExecutionRequest) -> Result<Execution> {
        let workspace = request.workspace.canonicalize().map_err(|e| {
            Error::invalid_input(format!(
                "the workspace {} cannot be used: {e}",
                request.workspace.display()
            ))
        })?;
        if !workspace.is_dir() {
            return Err(Error::invalid_input(format!(
                "the workspace {} is not a folder",
                request.workspace.display()
            )));
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let control = Arc::new(Control::new());
        let run = Run {
            config: self.config.clone(),
            backend: self.backend.clone(),
            workspace,
            request,
            tx,
            control: control.clone(),
        };
        let task = tokio::spawn(run.execute());
        Ok(Execution {
            events: Box::pin(RunEvents {
                rx,
                task,
                done: false,
            }),
            control: Arc::new(NativeControl { inner: control }),
        })
    }
}

/// The events of one run; dropping it aborts the run (which kills its processes).
struct RunEvents {
    rx: mpsc::Receiver<TaskEvent>,
    task: JoinHandle<()>,
    done: bool,
}

impl Stream for RunEvents {
    type Item = TaskEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                if event.is_terminal() {
                    self.done = true;
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(TaskEvent::Done(TaskOutcome::failed(STOPPED))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RunEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Cancel and answer a native run.
struct NativeControl {
    inner: Arc<Control>,
}

#[async_trait]
impl ExecutionControl for NativeControl {
    async fn cancel(&self) -> Result<()> {
        self.inner.cancel.send_replace(true);
        Ok(())
    }

    async fn respond(&self, response: InputResponse) -> Result<()> {
        let mut pending = self
            .inner
            .pending
            .lock()
            .map_err(|_| Error::internal("the native executor's input lock is poisoned"))?;
        match pending.take() {
            Some((id, tx)) if id == response.request_id => {
                let _ = tx.send(response);
                Ok(())
            }
            other => {
                let waiting = other.as_ref().map(|(id, _)| id.clone());
                *pending = other;
                Err(Error::not_found(match waiting {
                    Some(id) => format!(
                        "no pending input request {:?} (the run waits for {id:?})",
                        response.request_id
                    ),
                    None => format!(
                        "no pending input request {:?}: the run is not waiting for input",
                        response.request_id
                    ),
                }))
            }
        }
    }
}
