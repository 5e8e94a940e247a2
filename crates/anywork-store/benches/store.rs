//! Task-log throughput and read-after-seq latency of each store.
//!
//! `cargo bench -p anywork-store --all-features --bench store`
//! PostgreSQL is measured when `ANYWORK_TEST_DATABASE_URL` names a database (as
//! `scripts/bench-store.sh` arranges); results go to docs/benchmarks.md.
// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskId, TaskRequest, TaskStore};
use anywork_store::{MemoryStore, SqliteStore};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A realistic mix: streamed text, a tool call and its result, about 200 bytes each.
fn events(n: usize) -> Vec<NewTaskLog> {
    (0..n)
        .map(|i| {
            let event = match i % 3 {
                0 => TaskEvent::text(format!(
                    "Streaming answer chunk {i}: the quick brown fox jumps over the lazy dog, \
                     again and again, until the benchmark has enough bytes to be honest."
                )),
                1 => TaskEvent::ToolCall {
                    id: format!("toolu_{i:08}"),
                    name: "Bash".into(),
                    input: json!({"command": "ls -la files/", "description": "List files"}),
                },
                _ => TaskEvent::ToolResult {
                    tool_use_id: format!("toolu_{i:08}"),
                    content: "total 8\ndrwxr-xr-x 2 agent agent 4096 .\n-rw-r--r-- 1 a a 5 out.txt"
                        .into(),
                    is_error: false,
                },
            };
            NewTaskLog::now(event)
        })
        .collect()
}

async fn task_in(store: &dyn TaskStore) -> TaskId {
    let session = store
        .create_session(NewSession::new("bench"))
        .await
        .expect("session");
    let task = NewTask::from_request(session.id, TaskRequest::new("bench", "hi"));
    store.create_task(task).await.expect("task").id
}

struct Backend {
    name: &'static str,
    store: Arc<dyn TaskStore>,
    _guard: Option<tempfile::TempDir>,
}

fn backends(rt: &Runtime) -> Vec<Backend> {
    let mut out = vec![Backend {
        name: "memory",
        store: Arc::new(MemoryStore::new()),
        _guard: None,
    }];
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = rt
        .block_on(SqliteStore::open_in_dir(dir.path()))
        .expect("sqlite");
    out.push(Backend {
        name: "sqlite",
        store: Arc::new(sqlite),
        _guard: Some(dir),
    });
    #[cfg(feature = "postgres")]
    match std::env::var("ANYWORK_TEST_DATABASE_URL") {
        Ok(url) => {
            let pg = rt
                .block_on(anywork_store::PostgresStore::connect(&url, 8))
                .expect("postgres");
            out.push(Backend {
                name: "postgres",
                store: Arc::new(pg),
                _guard: None,
            });
        }
        Err(_) => eprintln!("ANYWORK_TEST_DATABASE_URL not set: PostgreSQL not measured"),
    }
    out
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_logs");
    group.measurement_time(Duration::from_secs(4));
    for backend in backends(&rt) {
        for batch in [1usize, 10, 100, 1000] {
            let task = rt.block_on(task_in(backend.store.as_ref()));
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(backend.name, batch),
                &batch,
                |b, &batch| {
                    b.iter_batched(
                        || events(batch),
                        |logs| {
                            rt.block_on(backend.store.append_logs(task, logs))
                                .expect("append")
                        },
                        criterion::BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    group.finish();
}

fn read_after(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("read_logs_after_seq");
    group.measurement_time(Duration::from_secs(4));
    for backend in backends(&rt) {
        let task = rt.block_on(async {
            let task = task_in(backend.store.as_ref()).await;
            for _ in 0..10 {
                backend
                    .store
                    .append_logs(task, events(1000))
                    .await
                    .expect("fill");
            }
            task
        });
        // Read the 100 events after a seq in the middle of a 10,000-event log, as a
        // reconnecting client or a log poller does.
        let mut after = 0u64;
        group.bench_function(BenchmarkId::new(backend.name, "100 of 10k"), |b| {
            b.iter(|| {
                after = (after + 997) % 9_900;
                let logs = rt
                    .block_on(backend.store.read_logs(task, after, 100))
                    .expect("read");
                assert_eq!(logs.len(), 100);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append, read_after);
criterion_main!(benches);
