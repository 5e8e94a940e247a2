//! A long queue (issue 16, "Performance"): what a task costs while it waits for a slot must
//! not grow with the number of tasks waiting with it. Counted, never timed: the store reads
//! the followers of queued tasks make (each queued WebSocket chat follows its task).

use std::sync::Arc;
use std::time::Duration;

use anywork_core::{
    ContainerDriver, Error, Result, SessionId, TaskEvent, TaskRequest, TaskStatus, TaskStore,
    WorkerEndpoint, WorkerInfo,
};
use anywork_runtime::{Backoff, Dispatcher, DispatcherConfig, LiveEvent};
use anywork_store::MemoryStore;
use anywork_test::faulty_store::FaultyStore;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

/// A driver whose workers come only once the gate opens, and then never (no worker: the
/// task fails at once with the reason). Until then the first task holds the only slot.
struct GatedDriver {
    gate: Semaphore,
}

#[async_trait::async_trait]
impl ContainerDriver for GatedDriver {
    fn name(&self) -> &str {
        "gated"
    }
    async fn get_worker(&self, _: &SessionId) -> Result<WorkerEndpoint> {
        let _open = self.gate.acquire().await;
        Err(Error::unavailable("no workers in this test"))
    }
    async fn release(&self, _: &SessionId) -> Result<()> {
        Ok(())
    }
    async fn is_healthy(&self, _: &WorkerEndpoint) -> bool {
        false
    }
    async fn list(&self) -> Result<Vec<WorkerInfo>> {
        Ok(Vec::new())
    }
    async fn reap_idle(&self, _: &[SessionId]) -> Result<Vec<SessionId>> {
        Ok(Vec::new())
    }
}

/// Tasks queued behind a full dispatcher, each followed as a WebSocket chat follows it: while
/// they wait, their followers read nothing from the store (they did: each read the task's
/// empty log and the task every second, so a task's cost grew with how long the queue was),
/// the queue depth counts them, and once they run each follower gets its task's events to
/// the `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_queued_tasks_read_nothing_while_they_wait() {
    const QUEUED: usize = 20;
    let store = FaultyStore::new(Arc::new(MemoryStore::new()));
    let driver = Arc::new(GatedDriver {
        gate: Semaphore::new(0),
    });
    let mut config = DispatcherConfig::default();
    config.max_concurrent = 1;
    config.retry = Backoff::none();
    config.reap_every = None;
    let d = Dispatcher::builder(store.clone() as Arc<dyn TaskStore>, driver.clone())
        .config(config)
        .start()
        .await
        .unwrap();

    // The first task takes the only slot and waits for its worker.
    let (_, first) = d
        .submit_and_follow(TaskRequest::new("web", "first"))
        .await
        .unwrap();
    let first = tokio::spawn(first.collect::<Vec<_>>());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while d.running() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first task never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The queue: one task in each of its own sessions, followed.
    let mut followers = Vec::new();
    for i in 0..QUEUED {
        let (submitted, events) = d
            .submit_and_follow(TaskRequest::new("web", format!("queued {i}")))
            .await
            .unwrap();
        followers.push((submitted.task.id, tokio::spawn(events.collect::<Vec<_>>())));
    }
    assert_eq!(d.running(), 1);
    assert_eq!(
        d.queue_depth(),
        QUEUED,
        "tasks waiting for a slot are in the queue depth"
    );

    // Longer than a follower waits before it reads the log of a quiet task (1 s), twice over.
    let before = store.log_reads();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = store.log_reads() - before;
    assert_eq!(
        during, 0,
        "the followers of {QUEUED} queued tasks read the log {during} times while they waited"
    );
    assert_eq!(d.queue_depth(), QUEUED);

    // The slot frees up: every task runs (and fails: no worker), each follower sees its run.
    driver.gate.add_permits(QUEUED + 1);
    let first = first.await.unwrap();
    assert!(matches!(
        first.last().map(|e| &e.as_ref().unwrap().event),
        Some(TaskEvent::Done(_))
    ));
    for (id, follower) in followers {
        let events: Vec<LiveEvent> = follower
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.unwrap())
            .collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "{events:?}"
        );
        let Some(TaskEvent::Done(outcome)) = events.last().map(|e| &e.event) else {
            panic!("no done for {id}: {events:?}");
        };
        assert_eq!(outcome.status, TaskStatus::Failed, "{outcome:?}");
        assert!(events.iter().all(|e| e.task_id == id));
    }
    assert_eq!((d.running(), d.queue_depth()), (0, 0));
}
