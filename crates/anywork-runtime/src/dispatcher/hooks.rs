//! The channel hooks of a task (`on_accepted`, `on_started`, `on_progress`,
//! `on_input_required`), called off the run's path, in order, one at a time per task: each
//! task with a channel gets a queue and a small task that empties it. A failed hook is logged
//! and never fails the task. Progress is coalesced (only the latest text is sent) and sent at
//! most once per [`PROGRESS_EVERY`]. Before the outbox delivers a task's outcome to its
//! channel it [`flush`](Hooks::flush)es the task's hooks, so that the answer never races the
//! placeholder a hook is still posting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anywork_core::{Channel, InputRequest, Task, TaskId};
use tokio::sync::{mpsc, oneshot};

use super::lock;
use crate::shrink::Shrink;
use crate::task_map::TaskMap;

/// Progress hooks of one task are at least this far apart.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a delivery waits for a task's earlier hooks.
const FLUSH_WAIT: Duration = Duration::from_secs(30);

enum Hook {
    Accepted(Task),
    Started(Task),
    Progress(Task),
    InputRequired(Task, InputRequest),
    Flush(oneshot::Sender<()>),
    Close,
}

struct Queue {
    tx: mpsc::UnboundedSender<Hook>,
    /// The latest progress text not yet handed to the channel.
    progress: Arc<Mutex<Option<String>>>,
    last_progress: Option<Instant>,
}

/// The hook queues of the tasks that have one.
#[derive(Default)]
pub(super) struct Hooks {
    queues: Arc<Mutex<TaskMap<Queue>>>,
}

impl Hooks {
    fn send(&self, channel: &Arc<dyn Channel>, task_id: TaskId, hook: Hook) {
        let mut queues = lock(&self.queues);
        let queue = queues.entry(task_id).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let progress = Arc::new(Mutex::new(None));
            tokio::spawn(run_hooks(
                channel.clone(),
                task_id,
                rx,
                progress.clone(),
                self.queues.clone(),
            ));
            Queue {
                tx,
                progress,
                last_progress: None,
            }
        });
        let _ = queue.tx.send(hook);
    }

    /// The task was stored.
    pub(super) fn accepted(&self, channel: &Arc<dyn Channel>, task: &Task) {
        self.send(channel, task.id, Hook::Accepted(task.clone()));
    }

    /// The task started running.
    pub(super) fn started(&self, channel: &Arc<dyn Channel>, task: &Task) {
        self.send(channel, task.id, Hook::Started(task.clone()));
    }

    /// The answer so far is `text`: handed to the channel if the last progress is at least
    /// [`PROGRESS_EVERY`] old (a later call brings the newer text).
    pub(super) fn progress(&self, channel: &Arc<dyn Channel>, task: &Task, text: &str) {
        {
            let mut queues = lock(&self.queues);
            if let Some(q) = queues.get_mut(&task.id) {
                if q.last_progress
                    .is_some_and(|t| t.elapsed() < PROGRESS_EVERY)
                {
                    return;
                }
                q.last_progress = Some(Instant::now());
                let already_queued = lock(&q.progress).replace(text.to_owned()).is_some();
                if !already_queued {
                    let _ = q.tx.send(Hook::Progress(task.clone()));
                }
                return;
            }
        }
        // No queue yet (a task queued before a restart): make one.
        self.send(channel, task.id, Hook::Flush(oneshot::channel().0));
        self.progress(channel, task, text);
    }

    /// The task waits for an answer to `request`.
    pub(super) fn input_required(
        &self,
        channel: &Arc<dyn Channel>,
        task: &Task,
        request: &InputRequest,
    ) {
        self.send(
            channel,
            task.id,
            Hook::InputRequired(task.clone(), request.clone()),
        );
    }

    /// The task is over: its queue ends once the hooks already in it ran.
    pub(super) fn close(&self, task_id: TaskId) {
        if let Some(q) = lock(&self.queues).get(&task_id) {
            let _ = q.tx.send(Hook::Close);
        }
    }

    /// Waits (at most 30 s) until the hooks queued so far for `task_id` ran.
    pub(super) async fn flush(&self, task_id: TaskId) {
        let (tx, rx) = oneshot::channel();
        let sent = match lock(&self.queues).get(&task_id) {
            Some(q) => q.tx.send(Hook::Flush(tx)).is_ok(),
            None => false,
        };
        if sent {
            // An error means the queue ended, after running what it held: done as well.
            let _ = tokio::time::timeout(FLUSH_WAIT, rx).await;
        }
    }
}

async fn run_hooks(
    channel: Arc<dyn Channel>,
    task_id: TaskId,
    mut rx: mpsc::UnboundedReceiver<Hook>,
    progress: Arc<Mutex<Option<String>>>,
    queues: Arc<Mutex<TaskMap<Queue>>>,
) {
    while let Some(hook) = rx.recv().await {
        let (name, result) = match hook {
            Hook::Accepted(task) => ("on_accepted", channel.on_accepted(&task).await),
            Hook::Started(task) => ("on_started", channel.on_started(&task).await),
            Hook::Progress(task) => {
                let text = lock(&progress).take();
                match text {
                    Some(text) => ("on_progress", channel.on_progress(&task, &text).await),
                    None => continue,
                }
            }
            Hook::InputRequired(task, request) => (
                "on_input_required",
                channel.on_input_required(&task, &request).await,
            ),
            Hook::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Hook::Close => break,
        };
        if let Err(e) = result {
            tracing::warn!(task = %task_id, channel = channel.channel_type(), hook = name, error = %e, "channel hook failed");
        }
    }
    let mut queues = lock(&queues);
    queues.remove(&task_id);
    queues.shrink_when_sparse();
}
