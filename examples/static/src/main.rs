//! AnyWork as a library, with no HTTP server of its own: a [`Dispatcher`] over a SQLite store
//! and the static driver runs one task on the worker at `STATIC_WORKER_URL` and prints its
//! events as they are stored.
//!
//! ```sh
//! anywork-worker &                      # API_KEY/API_BASE_URL/MODEL or ANTHROPIC_API_KEY set
//! STATIC_WORKER_URL=http://127.0.0.1:8080 cargo run -p example-static -- "What is 2 + 2?"
//! ```

use std::sync::Arc;

use anywork_core::{TaskEvent, TaskRequest};
use anywork_drivers::StaticDriver;
use anywork_runtime::Dispatcher;
use anywork_store::SqliteStore;
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let message = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    anyhow::ensure!(!message.is_empty(), "usage: example-static MESSAGE");
    let url = std::env::var("STATIC_WORKER_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let db_dir = std::env::var("DB_DIR").unwrap_or_else(|_| "./data".into());

    let store = Arc::new(SqliteStore::open_in_dir(&db_dir).await?);
    let driver = Arc::new(StaticDriver::new(&url)?);
    let dispatcher = Dispatcher::builder(store, driver).start().await?;

    // The task, and every event of it as it is stored, until `done`.
    let (submitted, events) = dispatcher
        .submit_and_follow(TaskRequest::new("cli", message))
        .await?;
    let task = submitted.task;
    println!("task {} in session {}", task.id, task.session_id);
    let mut events = std::pin::pin!(events);
    while let Some(live) = events.next().await {
        match live?.event {
            TaskEvent::Text { text } => print!("{text}"),
            TaskEvent::Done(outcome) => {
                println!(
                    "\n[{}] {}",
                    outcome.status,
                    outcome.error.unwrap_or_default()
                );
            }
            other => eprintln!("[{}]", anywork_core::WireEvent::from(other).kind),
        }
    }
    dispatcher.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}
