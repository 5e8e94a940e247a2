//! Driving one run: the executor's events to the SSE client, with exactly one `done` at the end.
//!
//! Each `/chat` spawns one driver task that owns the executor's event stream. It writes the
//! events into the run's [`Journal`] (numbered from 1), which every client of the run reads
//! from — the `/chat` response, and `/chat/attach` for a client that lost its stream — and
//! ends the run in one of four ways:
//!
//! - the executor sends `done`: forwarded (after a cancel, a `failed` done becomes `canceled`);
//! - the executor's stream ends without `done`: a `failed` done is sent ("the executor ended
//!   without a result"), or `canceled` if a cancel was asked for;
//! - `/cancel` was called and the stream has not ended within the grace period: the stream is
//!   dropped (executors kill their processes on drop) and a `canceled` done is sent;
//! - no client has been attached for [`WorkerConfig::detach_grace`] (zero by default: as
//!   soon as the client went away): the stream is dropped.
//!
//! [`WorkerConfig::detach_grace`]: crate::WorkerConfig::detach_grace
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
use tokio::time::Instant;

use crate::history::Recorder;
use crate::state::RunGuard;

/// The `error` of the `failed` done sent when the executor's stream ends without one.
pub const NO_RESULT: &str = "the executor ended without a result";

/// The events of one run, numbered from 1 in the order they happened, kept for as long as
/// the run (and, with a detach grace, a while after it), so that any number of clients can
/// read them from any point.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    events: std::sync::Mutex<Vec<TaskEvent>>,
    grew: tokio::sync::Notify,
    readers: std::sync::atomic::AtomicUsize,
}

impl Journal {
    fn push(&self, event: TaskEvent) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        self.grew.notify_waiters();
    }

    /// The event at `index` (seq `index + 1`), once there is one.
    fn get(&self, index: usize) -> Option<TaskEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(index)
            .cloned()
    }

    fn readers(&self) -> usize {
        self.readers.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A client reading a journal; counted while it lives.
struct Reader(std::sync::Arc<Journal>);

impl Reader {
    fn new(journal: std::sync::Arc<Journal>) -> Self {
        journal
            .readers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(journal)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0
            .readers
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts driving `request`; its events go to the guard's journal.
pub(crate) fn spawn(guard: RunGuard, request: ExecutionRequest) {
    tokio::spawn(drive(guard, request));
}

enum End {
    /// The run ended with this outcome; `true` when it came from the executor.
    Outcome(TaskOutcome, bool),
    /// The SSE client went away.
    Disconnected,
}

/// Ends the journal with a `failed` done if the run never wrote one (its task panicked).
struct LastWord {
    journal: std::sync::Arc<Journal>,
    said: bool,
}

impl Drop for LastWord {
    fn drop(&mut self) {
        if !self.said {
            self.journal.push(TaskEvent::Done(TaskOutcome::failed(
                "the worker lost the run before it ended",
            )));
        }
    }
}

async fn drive(guard: RunGuard, request: ExecutionRequest) {
    let journal = guard.journal().clone();
    let mut last_word = LastWord {
        journal: journal.clone(),
        said: false,
    };
    // Declared after `last_word`, so dropped before it on a panic: the session is free
    // before the made-up `done` goes out.
    let guard = guard;
    let started = Instant::now();
    let task_id = guard.task_id();
    let session_id = guard.session_id().clone();
    let mut recorder = Recorder::default();
    tracing::info!(task = %task_id, session = %session_id, "run started");

    let end = run(&guard, request, &journal, &mut recorder).await;
    // The executor's stream is gone now (it lived inside `run`).

    let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (mut outcome, from_executor) = match end {
        End::Outcome(outcome, from_executor) => (outcome, from_executor),
        End::Disconnected => {
            let mut outcome = TaskOutcome::canceled();
            outcome.error = Some("the client disconnected before the run ended".into());
            (outcome, false)
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
    // Reported by the worker's own tool, whatever the executor said.
    for link in guard.opened_links() {
        if !outcome.pull_requests.contains(&link) {
            outcome.pull_requests.push(link);
        }
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
    // Also after a disconnect: a client re-attaching reads how the run ended.
    journal.push(TaskEvent::Done(outcome));
    last_word.said = true;
}

/// Completes once no client has read the journal for `grace` (checked every 100 ms at most).
async fn abandoned(journal: &Journal, grace: Duration) {
    let mut alone_since: Option<Instant> = None;
    loop {
        if journal.readers() > 0 {
            alone_since = None;
        } else if alone_since.get_or_insert_with(Instant::now).elapsed() >= grace {
            return;
        }
        tokio::time::sleep(grace.clamp(Duration::from_millis(10), Duration::from_millis(100)))
            .await;
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
    journal: &Journal,
    recorder: &mut Recorder,
) -> End {
    let state = guard.state();
    let cancel = guard.cancel_signal();
    let grace: Duration = state.config().cancel_grace;
    let executor = state.executor().clone();
    let gone = abandoned(journal, state.config().detach_grace);
    tokio::pin!(gone);

    let Execution {
        mut events,
        control,
    } = tokio::select! {
        biased;
        _ = &mut gone => return End::Disconnected,
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
    loop {
        tokio::select! {
            biased;
            _ = &mut gone => return End::Disconnected,
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
            event = events.next() => match event {
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
                    journal.push(event);
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

/// A client's events of a run: those of the journal after seq `after`, then each as it
/// comes, up to and including the `done`. Each SSE event's `id` is its seq. The client counts
/// as attached (see [`abandoned`]) from this call until the stream is dropped.
pub(crate) fn journal_stream(
    journal: std::sync::Arc<Journal>,
    after: usize,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let reader = Reader::new(journal);
    futures_util::stream::unfold(Some((reader, after)), |state| async move {
        let (reader, next) = state?;
        let journal = reader.0.clone();
        let event = loop {
            let grew = journal.grew.notified();
            tokio::pin!(grew);
            // Registered before the look, so that a push in between is not missed.
            grew.as_mut().enable();
            if let Some(event) = journal.get(next) {
                break event;
            }
            grew.await;
        };
        let seq = next + 1;
        let more = (!event.is_terminal()).then_some((reader, seq));
        Some((Ok(sse_event(&event).id(seq.to_string())), more))
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
