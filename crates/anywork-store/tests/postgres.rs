//! The conformance suite on [`PostgresStore`], each case in a fresh schema of the database
//! named by `ANYWORK_TEST_DATABASE_URL` (the test script starts one). Without that variable
//! these tests fail: a missing database must never pass silently.

use std::str::FromStr;

use anywork_core::TaskStore;
use anywork_store::PostgresStore;
use anywork_test::store_conformance::Fresh;
use sqlx::postgres::PgConnectOptions;

fn database_url() -> String {
    std::env::var("ANYWORK_TEST_DATABASE_URL").expect(
        "ANYWORK_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh, which starts \
         PostgreSQL, or point it at a database you own",
    )
}

/// Drops the test schema when the store is dropped.
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; do the cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&url).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                            .execute(&pool)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

async fn fresh() -> Fresh {
    let url = database_url();
    let name = format!("t_{}", uuid_simple());
    let admin = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to the test database");
    sqlx::query(&format!("CREATE SCHEMA {name}"))
        .execute(&admin)
        .await
        .expect("create test schema");
    admin.close().await;
    let options = PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", name.as_str())]);
    let store = PostgresStore::connect_with(options, 8)
        .await
        .expect("open PostgresStore");
    Fresh::new(store).keeping(Schema { url, name })
}

fn uuid_simple() -> String {
    anywork_core::TaskId::generate().0.simple().to_string()
}

anywork_test::store_conformance_tests!(fresh);

#[tokio::test]
async fn bad_url_is_a_clear_error() {
    let err = PostgresStore::connect("not a url", 1).await.unwrap_err();
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    let err = PostgresStore::connect("postgres://nobody@127.0.0.1:1/none", 1)
        .await
        .unwrap_err();
    assert!(
        err.is_retryable(),
        "unreachable database is retryable: {err}"
    );
}

/// The change feed: an append through one store (one server) is told to the feed of another
/// store on the same database (another server), with its task and seq range, after a `Gap`
/// for the start of listening; the append of the task's `done` is followed by `Ended` (what
/// stops the task's run on the server that runs it). SQLite and memory have no feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_told_to_the_change_feed_of_other_stores() {
    use anywork_core::{
        FeedItem, LogChange, NewSession, NewTask, NewTaskLog, TaskChange, TaskEvent, TaskOutcome,
        TaskRequest, TaskStatus,
    };
    use futures_util::StreamExt;

    let url = database_url();
    let name = format!("t_{}", uuid_simple());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let _schema = Schema {
        url: url.clone(),
        name: name.clone(),
    };
    let connect = || {
        let options = PgConnectOptions::from_str(&url)
            .unwrap()
            .options([("search_path", name.as_str())]);
        PostgresStore::connect_with(options, 2)
    };
    // Two stores on one schema: two servers on one database.
    let (writer, reader) = (connect().await.unwrap(), connect().await.unwrap());
    let session = writer
        .create_session(NewSession::new("webchat"))
        .await
        .unwrap();
    let task = writer
        .create_task(NewTask::from_request(
            session.id.clone(),
            TaskRequest::new("webchat", "hi"),
        ))
        .await
        .unwrap();
    let mut feed = reader.change_feed().expect("PostgreSQL has a change feed");
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
        .await
        .expect("the feed starts")
        .expect("an item");
    assert_eq!(first, FeedItem::Gap, "listening begins with a gap");
    let logs = (0..3)
        .map(|i| NewTaskLog::now(TaskEvent::text(format!("e{i}"))))
        .collect();
    writer.append_logs(task.id, logs).await.unwrap();
    writer
        .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("e3"))])
        .await
        .unwrap();
    // Another server cancels it: its `done` ends the log.
    writer
        .update_task_and_append(
            task.id,
            TaskStatus::Pending,
            TaskChange::finish(TaskOutcome::canceled()),
            vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::canceled()))],
        )
        .await
        .unwrap();
    let mut told = Vec::new();
    while told.last() != Some(&FeedItem::Ended(task.id)) {
        let item = tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
            .await
            .expect("the appends are told")
            .expect("an item");
        match item {
            FeedItem::Changed(c) if c.task_id == task.id => told.push(item),
            FeedItem::Ended(id) if id == task.id => told.push(item),
            _ => {}
        }
    }
    let change = |first, last| {
        FeedItem::Changed(LogChange {
            task_id: task.id,
            first,
            last,
        })
    };
    assert_eq!(
        told,
        vec![
            change(1, 3),
            change(4, 4),
            change(5, 5),
            FeedItem::Ended(task.id)
        ]
    );
    assert!(anywork_store::MemoryStore::new().change_feed().is_none());
}
