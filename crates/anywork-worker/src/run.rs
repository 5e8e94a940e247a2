//! Driving one run: the executor's events to the SSE client, with exactly one `done` at the end.
//!
//! Each `/chat` spawns one driver task that owns the executor's event stream. It forwards
//! events through a bounded channel to the response body and ends the run in one of four ways:
//!
//! - the executor sends `done`: forwarded (after a cancel, a `failed` done becomes `canceled`);
//! - the executor's stream ends without `done`: a `failed` done is sent ("the executor ended
//!   without a result"), or `canceled` if a cancel was asked for;
//! - `/cancel` was called and the stream has not ended within the grace period: the stream is
//!   dropped (executors kill their processes on drop) and a `canceled` done is sent;
//! - the client went away (the body was dropped): the stream is dropped at once.
//!
//! In every case the executor's stream is dropped first, then the assistant's history message
//! is written, then the session is freed, and only then is `done` sent, so a client that
//! starts the next task as soon as it reads `done` finds the session free.

use std::convert::Infallible;
use std::time::Duration;

use anywork_core::{
    Execution, ExecutionRequest, TaskEvent, TaskOutcome, TaskStatus, event::WireEvent,
};
use axum::response::sse::Event;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::history::Recorder;
use crate::state::RunGuard;

/// The `error` of the `failed` done sent when the executor's stream ends without one.
pub const NO_RESULT: &str = "the executor ended without a result";

/// Starts driving `request` and returns the receiving end of its events.
pub(crate) fn spawn(guard: RunGuard, request: ExecutionRequest) -> mpsc::Receiver<TaskEvent> {
    let (tx, rx) = mpsc::channel(guard.state().config().event_buffer.max(1));
    tokio::spawn(drive(guard, request, tx));
    rx
}

enum End {
    /// The run ended with this outcome; `true` when it came from the executor.
    Outcome(TaskOutcome, bool),
    /// The SSE client went away.
    Disconnected,
}

async fn drive(guard: RunGuard, request: ExecutionRequest, tx: mpsc::Sender<TaskEvent>) {
    let started = Instant::now();
    let task_id = guard.task_id();
    let session_id = guard.session_id().clone();
    let mut recorder = Recorder::default();
    tracing::info!(task = %task_id, session = %session_id, "run started");

    let end = run(&guard, request, &tx, &mut recorder).await;
    // The executor's stream is gone now (it lived inside `run`).

    let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (mut outcome, from_executor, disconnected) = match end {
        End::Outcome(outcome, from_executor) => (outcome, from_executor, false),
        End::Disconnected => {
            let mut outcome = TaskOutcome::canceled();
            outcome.error = Some("the client disconnected before the run ended".into());
            (outcome, false, true)
        }
    };
    if !from_executor {
        // Made up by the worker: carry what the executor reported so far.
        if let Some((usage, cost)) = recorder.usage() {
            outcome.usage = *usage;
            outcome.cost_usd = *cost;
        }
    }
    if outcome.duration_ms == 0 {
        outcome.duration_ms = elapsed;
    }

    let message = recorder.assistant_message(task_id, &outcome);
    let workspace = guard.state().workspace().clone();
    let sid = session_id.clone();
    let written =
        tokio::task::spawn_blocking(move || workspace.append_history(&sid, &message)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(task = %task_id, error = %e, "cannot write history"),
        Err(e) => tracing::warn!(task = %task_id, error = %e, "cannot write history"),
    }

    let status = outcome.status;
    guard.finish(status);
    tracing::info!(task = %task_id, session = %session_id, status = %status.as_str(), "run ended");
    if !disconnected {
        let _ = tx.send(TaskEvent::Done(outcome)).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs the executor until the run ends; the executor's stream is dropped on return.
async fn run(
    guard: &RunGuard,
    request: ExecutionRequest,
    tx: &mpsc::Sender<TaskEvent>,
    recorder: &mut Recorder,
) -> End {
    let state = guard.state();
    let cancel = guard.cancel_signal();
    let grace: Duration = state.config().cancel_grace;
    let executor = state.executor().clone();

    let Execution {
        mut events,
        control,
    } = tokio::select! {
        biased;
        _ = tx.closed() => return End::Disconnected,
        _ = cancel.notified() => return End::Outcome(TaskOutcome::canceled(), false),
        started = executor.start(request) => match started {
            Ok(execution) => execution,
            Err(e) => {
                tracing::warn!(task = %guard.task_id(), error = %e, "the executor did not start");
                let outcome = TaskOutcome::failed(format!("the executor could not start: {e}"));
                return End::Outcome(outcome, false);
            }
        },
    };
    state.set_control(guard.task_id(), control.clone());

    let mut deadline: Option<Instant> = None;
    let mut pending: Option<TaskEvent> = None;
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => return End::Disconnected,
            _ = sleep_until(deadline) => {
                tracing::warn!(
                    task = %guard.task_id(),
                    "the executor did not stop within {grace:?} of cancel; dropping its stream"
                );
                return End::Outcome(TaskOutcome::canceled(), false);
            }
            _ = cancel.notified(), if deadline.is_none() => {
                deadline = Some(Instant::now() + grace);
                let control = control.clone();
                let task_id = guard.task_id();
                tokio::spawn(async move {
                    if let Err(e) = control.cancel().await {
                        tracing::warn!(task = %task_id, error = %e, "the executor's cancel failed");
                    }
                });
            }
            permit = tx.reserve(), if pending.is_some() => match permit {
                Ok(permit) => {
                    if let Some(event) = pending.take() {
                        permit.send(event);
                    }
                }
                Err(_) => return End::Disconnected,
            },
            event = events.next(), if pending.is_none() => match event {
                None => {
                    let outcome = if deadline.is_some() {
                        TaskOutcome::canceled()
                    } else {
                        TaskOutcome::failed(NO_RESULT)
                    };
                    return End::Outcome(outcome, false);
                }
                Some(TaskEvent::Done(outcome)) => {
                    return End::Outcome(settle(outcome, deadline.is_some()), true);
                }
                Some(event) => {
                    recorder.observe(&event);
                    pending = Some(event);
                }
            },
        }
    }
}

/// Fixes up the executor's own outcome: a non-terminal status is a failure, and a failure
/// after a cancel request is the cancel.
fn settle(mut outcome: TaskOutcome, canceling: bool) -> TaskOutcome {
    if !outcome.status.is_terminal() {
        outcome.error = Some(format!(
            "the executor ended with the non-terminal status {}",
            outcome.status.as_str()
        ));
        outcome.status = TaskStatus::Failed;
    }
    if canceling && outcome.status == TaskStatus::Failed {
        outcome.status = TaskStatus::Canceled;
    }
    outcome
}

/// The SSE form of an event: `event: <type>` and `data: <TaskEvent JSON>`.
pub(crate) fn sse_event(event: &TaskEvent) -> Event {
    let wire: WireEvent = event.to_wire();
    // `Event::event` panics on line breaks; an unknown type from an executor may hold one.
    let kind: String = wire
        .kind
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let data = serde_json::to_string(&wire).unwrap_or_else(|e| {
        serde_json::json!({
            "type": "error",
            "content": format!("the worker could not encode an event: {e}"),
            "metadata": {},
        })
        .to_string()
    });
    Event::default().event(kind).data(data)
}

/// The response body's events: everything the driver sends, up to and including the first
/// `done`. Should the driver vanish without one, a `failed` done is made up here.
pub(crate) fn sse_stream(
    rx: mpsc::Receiver<TaskEvent>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(event) => {
                let next = if event.is_terminal() { None } else { Some(rx) };
                Some((Ok(sse_event(&event)), next))
            }
            None => {
                let done = TaskEvent::Done(TaskOutcome::failed(
                    "the worker lost the run before it ended",
                ));
                Some((Ok(sse_event(&done)), None))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_turns_failures_after_cancel_into_cancels() {
        let failed = TaskOutcome::failed("killed");
        assert_eq!(settle(failed.clone(), false).status, TaskStatus::Failed);
        assert_eq!(settle(failed, true).status, TaskStatus::Canceled);
        let done = TaskOutcome::completed("ok");
        assert_eq!(settle(done, true).status, TaskStatus::Completed);
        let mut odd = TaskOutcome::completed("x");
        odd.status = TaskStatus::Running;
        let settled = settle(odd, false);
        assert_eq!(settled.status, TaskStatus::Failed);
        assert!(settled.error.unwrap().contains("running"));
    }

    #[test]
    fn unknown_event_types_with_line_breaks_do_not_panic() {
        let event = TaskEvent::Other(WireEvent {
            kind: "evil\ntype\r".into(),
            content: "multi\nline".into(),
            metadata: serde_json::json!({}),
        });
        // Encoding must not panic; the data line is one JSON line.
        let _ = sse_event(&event);
        let _ = sse_event(&TaskEvent::text("a\nb"));
    }
}
