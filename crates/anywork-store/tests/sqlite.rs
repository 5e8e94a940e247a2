//! The conformance suite on [`SqliteStore`], each case on a fresh database file.

use std::sync::Arc;

use anywork_core::TaskStore;
use anywork_store::SqliteStore;
use anywork_test::store_conformance::KeepAlive;

async fn fresh() -> Arc<dyn TaskStore> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open_in_dir(dir.path())
        .await
        .expect("open SQLite");
    Arc::new(KeepAlive::new(store, dir))
}

anywork_test::store_conformance_tests!(fresh);

#[tokio::test]
async fn data_survives_reopening_the_file() {
    use anywork_core::{NewSession, NewTask, NewTaskLog, TaskEvent, TaskRequest};
    let dir = tempfile::tempdir().unwrap();
    let session = NewSession::new("webchat");
    let task = NewTask::from_request(session.id.clone(), TaskRequest::new("webchat", "hi"));
    {
        let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
        store.create_session(session.clone()).await.unwrap();
        store.create_task(task.clone()).await.unwrap();
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text("kept"))])
            .await
            .unwrap();
    }
    // Reopening runs the migrations again: they must be a no-op on an up-to-date file.
    let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
    assert_eq!(store.get_task(task.id).await.unwrap().message, "hi");
    let logs = store.read_logs(task.id, 0, 10).await.unwrap();
    assert_eq!(logs[0].event, TaskEvent::text("kept"));
    assert!(dir.path().join("anywork.db").exists());
}

#[tokio::test]
async fn unwritable_directory_is_a_clear_error() {
    let err = SqliteStore::open_in_dir("/proc/anywork-cannot-be-here")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DB_DIR"), "{err}");
}

#[tokio::test]
async fn connect_picks_the_store_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let store = anywork_store::connect(&url).await.unwrap();
    store
        .create_session(anywork_core::NewSession::new("webchat"))
        .await
        .unwrap();
    anywork_store::connect("memory:").await.unwrap();
    anywork_store::connect("sqlite::memory:").await.unwrap();
    let err = anywork_store::connect("mysql://x").await.err().unwrap();
    assert_eq!(err.kind(), anywork_core::ErrorKind::InvalidInput);
}
