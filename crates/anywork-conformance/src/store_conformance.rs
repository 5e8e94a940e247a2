//! The conformance suite every [`TaskStore`] passes.
//!
//! Use [`store_conformance_tests!`](crate::store_conformance_tests) in a test file with a
//! factory `async fn() -> Arc<dyn TaskStore>` (or `-> Fresh`, for a store that needs
//! something kept alive beside it, see [`Fresh`]) that returns a fresh, empty store each call:
//!
//! ```ignore
//! async fn fresh() -> Arc<dyn TaskStore> { Arc::new(MemoryStore::new()) }
//! anywork_conformance::store_conformance_tests!(fresh);
//! ```
//!
//! Each case is also a public async function, for stores that want to pick.

use std::collections::BTreeMap;
use std::sync::Arc;

use anywork_core::{
    ErrorKind, McpServerConfig, NewSession, NewTask, NewTaskLog, Page, PushNotification, Session,
    SessionId, SkillSpec, Task, TaskChange, TaskEvent, TaskId, TaskOutcome, TaskRequest,
    TaskStatus, TaskStore, Timestamp,
};
use serde_json::json;

// The cases of the outbox, idempotency keys, retention and readiness.
#[path = "store_conformance_outbox.rs"]
mod outbox;
pub use outbox::*;

// The cases of session search and usage totals.
#[path = "store_conformance_search.rs"]
mod search;
pub use search::*;
// The cases of a new session created with its first task in one write.
#[path = "store_conformance_first_task.rs"]
mod first_task;
pub use first_task::*;
// The cases of task claims across servers.
#[path = "store_conformance_claim.rs"]
mod claim;
pub use claim::*;
// The cases of the lean claim and update (no task read back).
#[path = "store_conformance_lean.rs"]
mod lean;
pub use lean::*;

// The cases of a new task created already claimed.
#[path = "store_conformance_create_claimed.rs"]
mod create_claimed;
pub use create_claimed::*;

/// Generates one `#[tokio::test]` per conformance case, plus the model-based property test,
/// calling `$factory()` for a fresh store each time.
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:path) => {
        $crate::store_conformance_tests!(@cases $factory;
            sessions_crud, session_keys_are_unique_per_channel, list_sessions_order_and_pages,
            task_round_trips_every_field, task_status_is_the_stored_status,
            status_changes_are_compare_and_set,
            illegal_transitions_are_refused, one_winner_among_concurrent_updates,
            leases_renew_and_expire, tasks_by_session_and_status,
            a_sessions_tasks_in_one_status,
            logs_are_numbered_from_one_and_read_after_seq,
            concurrent_appenders_get_gap_free_seqs, ten_thousand_logs,
            delete_session_cascades, unicode_and_large_payloads, encoded_logs_read_back_as_their_events,
            bad_input_is_refused_cleanly,
            status_change_and_its_event_commit_together,
            idempotency_keys_are_unique_per_channel,
            deliveries_commit_with_the_status_change_or_not_at_all,
            one_claimer_per_delivery_and_expired_claims_move_on,
            deliveries_are_claimed_due_first_and_in_order_per_target,
            failed_deliveries_retry_die_and_are_retried_by_hand,
            retention_deletes_whole_logs_of_finished_tasks_only,
            settled_deliveries_are_deleted_by_age_open_ones_never,
            readiness_size_and_compaction, settings_are_kept_by_key,
            sessions_are_searched_by_title, usage_totals_sum_every_task,
            claims_start_the_oldest_task_of_a_free_session,
            an_active_task_is_told_before_an_older_pending_one,
            taking_over_an_expired_lease_loses_to_a_renewal,
            concurrent_claimers_start_one_task_per_session,
            a_finished_task_takes_no_more_events,
            the_reaper_holds_only_idle_sessions,
            a_hold_and_a_new_task_never_miss_each_other,
            a_session_and_its_first_task_are_created_together,
            a_refused_session_with_its_task_stores_nothing,
            concurrent_first_tasks_make_one_session_each_key,
            lean_claims_store_and_answer_as_claims_do,
            lean_claims_enqueue_with_the_claim_or_not_at_all,
            lean_updates_store_what_the_change_sets,
            concurrent_lean_claimers_start_one_task_per_session,
            a_new_task_of_a_free_session_is_created_claimed,
            a_new_task_that_must_wait_is_created_pending,
            a_new_task_of_a_held_session_is_created_pending,
            create_task_claimed_refuses_as_create_task_does,
            a_task_of_a_deleted_session_is_refused_not_found,
            a_new_sessions_first_task_is_created_claimed);

        #[test]
        fn matches_the_memory_model_on_random_operations() {
            $crate::store_conformance::model_check(|| {
                Box::pin(async { ::std::convert::Into::into($factory().await) })
            });
        }
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::store_conformance::run_case($factory, $crate::store_conformance::$case)
                    .await;
            }
        )*
    };
}

type Store = Arc<dyn TaskStore>;

fn sid(s: &str) -> SessionId {
    SessionId::new(s).expect("valid test session id")
}

fn new_session(id: &str, at: i64) -> NewSession {
    NewSession {
        id: sid(id),
        channel_type: "webchat".into(),
        channel_key: None,
        title: "New Chat".into(),
        created_at: Timestamp(at),
    }
}

fn new_task(session: &str, n: u128, at: i64) -> NewTask {
    let mut t = NewTask::from_request(sid(session), TaskRequest::new("webchat", format!("m{n}")));
    t.id = TaskId(uuid_from(n));
    t.created_at = Timestamp(at);
    t
}

fn uuid_from(n: u128) -> uuid::Uuid {
    // Version-7 layout so the ids look like the real ones; ordered by `n`.
    uuid::Uuid::from_u128((n << 80) | 0x0000_0000_0000_7000_8000_0000_0000_0000)
}

async fn session_with_task(store: &Store, session: &str, n: u128) -> Task {
    store
        .create_session(new_session(session, 1))
        .await
        .expect("create session");
    store
        .create_task(new_task(session, n, 2))
        .await
        .expect("create task")
}

fn text_logs(prefix: &str, n: usize) -> Vec<NewTaskLog> {
    (0..n)
        .map(|i| NewTaskLog::new(TaskEvent::text(format!("{prefix}{i}")), Timestamp(i as i64)))
        .collect()
}

async fn all_logs(store: &Store, task: TaskId) -> Vec<anywork_core::TaskLog> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_logs(task, after, 500).await.expect("read logs");
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    out
}

/// Settings: unset is `None`, a put replaces, keys are independent, any text survives, and a
/// bad key is `InvalidInput`.
pub async fn settings_are_kept_by_key(store: Store) {
    assert_eq!(store.get_setting("workspace.soul").await.unwrap(), None);
    store.put_setting("workspace.soul", "first").await.unwrap();
    store.put_setting("workspace.agents", "").await.unwrap();
    assert_eq!(
        store
            .get_setting("workspace.soul")
            .await
            .unwrap()
            .as_deref(),
        Some("first")
    );
    assert_eq!(
        store
            .get_setting("workspace.agents")
            .await
            .unwrap()
            .as_deref(),
        Some(""),
        "an empty value is a value"
    );
    let text = "Ünïcødé ✓ 'quotes' \"and\" \\ backslashes\n".repeat(2000);
    store.put_setting("workspace.soul", &text).await.unwrap();
    assert_eq!(
        store
            .get_setting("workspace.soul")
            .await
            .unwrap()
            .as_deref(),
        Some(text.as_str()),
        "replaced, byte for byte"
    );
    assert_eq!(
        store
            .get_setting("workspace.agents")
            .await
            .unwrap()
            .as_deref(),
        Some("")
    );
    for bad in ["", "with space", &"k".repeat(129)] {
        let e = store.put_setting(bad, "x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
        let e = store.get_setting(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
}

/// Create, read, rename, touch; unknown ids are `NotFound`, duplicates `Conflict`.
pub async fn sessions_crud(store: Store) {
    let s = store.create_session(new_session("s1", 1000)).await.unwrap();
    assert_eq!(s.last_active, Timestamp(1000));
    assert_eq!(store.get_session(&sid("s1")).await.unwrap(), s);
    let dup = store
        .create_session(new_session("s1", 5))
        .await
        .unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::Conflict);

    store
        .set_session_title(&sid("s1"), "Weather in Paris")
        .await
        .unwrap();
    assert_eq!(
        store.get_session(&sid("s1")).await.unwrap().title,
        "Weather in Paris"
    );

    store
        .touch_session(&sid("s1"), Timestamp(2000))
        .await
        .unwrap();
    store
        .touch_session(&sid("s1"), Timestamp(1500))
        .await
        .unwrap();
    assert_eq!(
        store.get_session(&sid("s1")).await.unwrap().last_active,
        Timestamp(2000),
        "last_active never moves backwards"
    );

    let nope = sid("nope");
    assert_eq!(
        store.get_session(&nope).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store
            .set_session_title(&nope, "x")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store
            .touch_session(&nope, Timestamp(1))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.delete_session(&nope).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

/// `(channel_type, channel_key)` finds a session again and is unique per channel.
pub async fn session_keys_are_unique_per_channel(store: Store) {
    let gh = NewSession {
        channel_type: "github".into(),
        ..new_session("g1", 1)
    }
    .with_key("owner/repo#12");
    store.create_session(gh.clone()).await.unwrap();
    let found = store
        .find_session("github", "owner/repo#12")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, sid("g1"));
    assert_eq!(found.channel_key.as_deref(), Some("owner/repo#12"));
    assert!(
        store
            .find_session("github", "owner/repo#13")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .find_session("slack", "owner/repo#12")
            .await
            .unwrap()
            .is_none()
    );

    let again = store
        .create_session(gh.with_id(sid("g2")))
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict);
    // The same key on another channel is another session.
    let slack = NewSession {
        channel_type: "slack".into(),
        ..new_session("k1", 1)
    }
    .with_key("owner/repo#12");
    store.create_session(slack).await.unwrap();
    // Sessions without a key never collide.
    store.create_session(new_session("n1", 1)).await.unwrap();
    store.create_session(new_session("n2", 1)).await.unwrap();
}

/// Most recently active first (ties: larger id first), counts, and gap-free pages.
pub async fn list_sessions_order_and_pages(store: Store) {
    for i in 0..25 {
        // Two sessions share each last_active value to exercise the tie-break.
        store
            .create_session(new_session(&format!("s{i:02}"), 100 + (i / 2)))
            .await
            .unwrap();
    }
    let all = store.list_sessions(Page::first(100)).await.unwrap();
    assert_eq!(all.len(), 25);
    let keys: Vec<(Timestamp, SessionId)> = all
        .iter()
        .map(|s| (s.session.last_active, s.session.id.clone()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(
        keys, sorted,
        "newest last_active first, then larger id first"
    );

    let mut paged = Vec::new();
    for offset in (0..30).step_by(10) {
        paged.extend(
            store
                .list_sessions(Page { limit: 10, offset })
                .await
                .unwrap(),
        );
    }
    assert_eq!(paged, all, "pages concatenate to the whole list");
    assert!(
        store
            .list_sessions(Page {
                limit: 10,
                offset: 25
            })
            .await
            .unwrap()
            .is_empty()
    );

    // Counts: one finished and two active tasks in s03.
    for n in 0..3u128 {
        store
            .create_task(new_task("s03", n, 500 + n as i64))
            .await
            .unwrap();
    }
    let first = TaskId(uuid_from(0));
    store
        .update_task(
            first,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled),
        )
        .await
        .unwrap();
    let top = store.list_sessions(Page::first(1)).await.unwrap();
    assert_eq!(
        top[0].session.id,
        sid("s03"),
        "creating a task makes the session active"
    );
    assert_eq!(top[0].session.last_active, Timestamp(502));
    assert_eq!((top[0].task_count, top[0].active_task_count), (3, 2));
}

/// Every field of a task survives the store, before and after it finishes.
pub async fn task_round_trips_every_field(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let mut new = new_task("s1", 7, 10);
    new.channel_meta = json!({"repo": "owner/repo", "issue": 12, "nested": {"a": [1, 2]}});
    new.skills = vec![SkillSpec {
        name: "greet".into(),
        content: "---\nname: greet\ndescription: says hi\n---\nSay hi.".into(),
        files: BTreeMap::from([("scripts/hi.sh".into(), "echo hi".into())]),
    }];
    new.mcp_servers = BTreeMap::from([
        (
            "calc".into(),
            McpServerConfig::Stdio {
                command: "python3".into(),
                args: vec!["calc.py".into()],
                env: BTreeMap::from([("K".into(), "v".into())]),
            },
        ),
        (
            "web".into(),
            McpServerConfig::Http {
                url: "http://127.0.0.1:9/mcp".into(),
                headers: BTreeMap::new(),
            },
        ),
    ]);
    new.push_notification = Some(PushNotification {
        url: "http://127.0.0.1:9/cb".into(),
        authorization: Some("Bearer t".into()),
        events: Vec::new(),
    });
    let created = store.create_task(new.clone()).await.unwrap();
    assert_eq!(created, new.clone().into_task());
    assert_eq!(store.get_task(created.id).await.unwrap(), created);

    let running = store
        .update_task(
            created.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running)
                .at(Timestamp(20))
                .worker("worker-1")
                .lease("server-a", Timestamp(30)),
        )
        .await
        .unwrap();
    assert_eq!(running.started_at, Some(Timestamp(20)));
    assert_eq!(running.worker_id.as_deref(), Some("worker-1"));
    assert_eq!(store.get_task(created.id).await.unwrap(), running);

    let mut outcome = TaskOutcome::completed("All done ✅");
    outcome.structured_output = Some(json!({"answer": 42}));
    outcome.cost_usd = Some(0.0125);
    outcome.num_turns = 4;
    outcome.duration_ms = 1234;
    outcome.usage.input_tokens = 100;
    outcome.usage.output_tokens = 50;
    outcome.usage.cache_creation_input_tokens = 7;
    outcome.usage.cache_read_input_tokens = 9;
    let done = store
        .update_task(
            created.id,
            TaskStatus::Running,
            TaskChange::finish(outcome).at(Timestamp(40)),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.finished_at, Some(Timestamp(40)));
    assert_eq!(done.lease, None, "finishing drops the lease");
    assert_eq!(done.usage.cache_read_input_tokens, 9);
    assert_eq!(store.get_task(created.id).await.unwrap(), done);

    let missing = TaskId(uuid_from(999));
    assert_eq!(
        store.get_task(missing).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let dup = store.create_task(new).await.unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::Conflict);
    let orphan = store
        .create_task(new_task("ghost", 8, 1))
        .await
        .unwrap_err();
    assert_eq!(orphan.kind(), ErrorKind::NotFound);
}

/// `task_status` is the status `get_task` has, through every change; `NotFound` for an
/// unknown task.
pub async fn task_status_is_the_stored_status(store: Store) {
    let task = session_with_task(&store, "s-status", 1).await;
    assert_eq!(
        store.task_status(task.id).await.unwrap(),
        TaskStatus::Pending
    );
    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running).lease("server-a", Timestamp(30)),
        )
        .await
        .unwrap();
    assert_eq!(
        store.task_status(task.id).await.unwrap(),
        TaskStatus::Running
    );
    store
        .update_task(
            task.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
        )
        .await
        .unwrap();
    assert_eq!(
        store.task_status(task.id).await.unwrap(),
        TaskStatus::InputRequired
    );
    let done = store
        .update_task(
            task.id,
            TaskStatus::InputRequired,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Canceled);
    assert_eq!(
        store.task_status(task.id).await.unwrap(),
        store.get_task(task.id).await.unwrap().status
    );
    assert_eq!(
        store
            .task_status(TaskId(uuid_from(999)))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

/// A stale `expected` status loses and changes nothing.
pub async fn status_changes_are_compare_and_set(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();
    let stale = store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled).error("too late"),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.kind(), ErrorKind::Conflict);
    let now = store.get_task(task.id).await.unwrap();
    assert_eq!(now.status, TaskStatus::Running);
    assert_eq!(now.error, None);
    // Through input_required and back.
    store
        .update_task(
            task.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
        )
        .await
        .unwrap();
    store
        .update_task(
            task.id,
            TaskStatus::InputRequired,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();
    let missing = store
        .update_task(
            TaskId(uuid_from(404)),
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

/// `update_task_and_append`: both or neither; seqs continue the log.
pub async fn status_change_and_its_event_commit_together(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    store.append_logs(task.id, text_logs("a", 2)).await.unwrap();
    let (running, last) = store
        .update_task_and_append(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running).worker("w1"),
            vec![NewTaskLog::now(TaskEvent::Status {
                status: TaskStatus::Running,
            })],
        )
        .await
        .unwrap();
    assert_eq!(running.status, TaskStatus::Running);
    assert_eq!(running.worker_id.as_deref(), Some("w1"));
    assert_eq!(last, 3);
    // A lost compare-and-set appends nothing.
    let lost = store
        .update_task_and_append(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled),
            text_logs("lost", 3),
        )
        .await
        .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Conflict);
    assert_eq!(all_logs(&store, task.id).await.len(), 3);
    assert_eq!(
        store.get_task(task.id).await.unwrap().status,
        TaskStatus::Running
    );
    let (done, last) = store
        .update_task_and_append(
            task.id,
            TaskStatus::Running,
            TaskChange::finish(TaskOutcome::completed("ok")),
            vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::completed(
                "ok",
            )))],
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(last, 4);
    let logs = all_logs(&store, task.id).await;
    assert_eq!(
        logs.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(matches!(logs[3].event, TaskEvent::Done(_)));
    // No logs: only the change, and the current last seq.
    let other = store.create_task(new_task("s1", 2, 3)).await.unwrap();
    let (_, last) = store
        .update_task_and_append(
            other.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled),
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(last, 0);
    // An illegal transition appends nothing either.
    let illegal = store
        .update_task_and_append(
            other.id,
            TaskStatus::Canceled,
            TaskChange::to(TaskStatus::Running),
            text_logs("illegal", 1),
        )
        .await
        .unwrap_err();
    assert_eq!(illegal.kind(), ErrorKind::InvalidTransition);
    assert!(all_logs(&store, other.id).await.is_empty());
    let missing = store
        .update_task_and_append(
            TaskId(uuid_from(404)),
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
            text_logs("x", 1),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

/// Every pair the state machine forbids is refused with `InvalidTransition`.
pub async fn illegal_transitions_are_refused(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    // Reach each status on its own task, then try every illegal move from it.
    let paths: [&[TaskStatus]; 6] = [
        &[],
        &[TaskStatus::Running],
        &[TaskStatus::Running, TaskStatus::InputRequired],
        &[TaskStatus::Running, TaskStatus::Completed],
        &[TaskStatus::Failed],
        &[TaskStatus::Canceled],
    ];
    let mut n = 0u128;
    for path in paths {
        for to in TaskStatus::ALL {
            n += 1;
            let task = store
                .create_task(new_task("s1", n, n as i64))
                .await
                .unwrap();
            let mut from = TaskStatus::Pending;
            for step in path {
                store
                    .update_task(task.id, from, TaskChange::to(*step))
                    .await
                    .unwrap();
                from = *step;
            }
            if from.can_transition_to(to) {
                continue;
            }
            let before = store.get_task(task.id).await.unwrap();
            let err = store
                .update_task(task.id, from, TaskChange::to(to).error("nope"))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidTransition, "{from} -> {to}");
            assert_eq!(
                store.get_task(task.id).await.unwrap(),
                before,
                "{from} -> {to}"
            );
        }
    }
}

/// Of many concurrent `pending → running` attempts, exactly one wins.
pub async fn one_winner_among_concurrent_updates(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    let attempts: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .update_task(
                        task.id,
                        TaskStatus::Pending,
                        TaskChange::to(TaskStatus::Running).worker(format!("w{i}")),
                    )
                    .await
            })
        })
        .collect();
    let mut wins = Vec::new();
    for a in attempts {
        match a.await.expect("join") {
            Ok(t) => wins.push(t),
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::Conflict | ErrorKind::InvalidTransition),
                "loser got {e}"
            ),
        }
    }
    assert_eq!(wins.len(), 1, "exactly one compare-and-set wins");
    assert_eq!(
        store.get_task(task.id).await.unwrap().worker_id,
        wins[0].worker_id
    );
}

/// Leases are renewed by their owner only and found once expired.
pub async fn leases_renew_and_expire(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 1)).await.unwrap();
    let b = store.create_task(new_task("s1", 2, 2)).await.unwrap();
    let c = store.create_task(new_task("s1", 3, 3)).await.unwrap();
    for (t, until) in [(&a, 100), (&b, 200)] {
        store
            .update_task(
                t.id,
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running).lease("srv-1", Timestamp(until)),
            )
            .await
            .unwrap();
    }
    assert!(
        store
            .expired_leases(Timestamp(99), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store.expired_leases(Timestamp(100), 10).await.unwrap();
    assert_eq!(expired.iter().map(|t| t.id).collect::<Vec<_>>(), vec![a.id]);

    store
        .renew_lease(a.id, "srv-1", Timestamp(300))
        .await
        .unwrap();
    let ids: Vec<TaskId> = store
        .expired_leases(Timestamp(250), 10)
        .await
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, vec![b.id]);
    assert_eq!(
        store
            .get_task(a.id)
            .await
            .unwrap()
            .lease
            .unwrap()
            .expires_at,
        Timestamp(300)
    );

    let theft = store
        .renew_lease(a.id, "srv-2", Timestamp(999))
        .await
        .unwrap_err();
    assert_eq!(theft.kind(), ErrorKind::Conflict);
    let unleased = store
        .renew_lease(c.id, "srv-1", Timestamp(999))
        .await
        .unwrap_err();
    assert_eq!(unleased.kind(), ErrorKind::Conflict);
    let missing = store
        .renew_lease(TaskId(uuid_from(77)), "srv-1", Timestamp(1))
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);

    // Requeueing or finishing drops the lease; a finished task is never "expired".
    store
        .update_task(
            b.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::Pending),
        )
        .await
        .unwrap();
    assert_eq!(store.get_task(b.id).await.unwrap().lease, None);
    store
        .update_task(
            a.id,
            TaskStatus::Running,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    assert!(
        store
            .expired_leases(Timestamp(10_000), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let gone = store
        .renew_lease(a.id, "srv-1", Timestamp(1))
        .await
        .unwrap_err();
    assert_eq!(
        gone.kind(),
        ErrorKind::Conflict,
        "finished tasks have no lease to renew"
    );
    // The limit is honoured.
    for (t, st) in [(&b, TaskStatus::Pending), (&c, TaskStatus::Pending)] {
        store
            .update_task(
                t.id,
                st,
                TaskChange::to(TaskStatus::Running).lease("srv-1", Timestamp(5)),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        store.expired_leases(Timestamp(10), 1).await.unwrap().len(),
        1
    );
}

/// Tasks by session and by status come oldest first, paged.
pub async fn tasks_by_session_and_status(store: Store) {
    store.create_session(new_session("a", 1)).await.unwrap();
    store.create_session(new_session("b", 1)).await.unwrap();
    // Created out of time order on purpose.
    for (s, n, at) in [("a", 1, 30), ("a", 2, 10), ("b", 3, 20), ("a", 4, 20)] {
        store.create_task(new_task(s, n, at)).await.unwrap();
    }
    let ids = |ts: Vec<Task>| ts.iter().map(|t| t.id).collect::<Vec<_>>();
    let t = |n| TaskId(uuid_from(n));
    assert_eq!(
        ids(store
            .tasks_by_session(&sid("a"), Page::first(10))
            .await
            .unwrap()),
        vec![t(2), t(4), t(1)]
    );
    assert_eq!(
        ids(store
            .tasks_by_session(
                &sid("a"),
                Page {
                    limit: 1,
                    offset: 1
                }
            )
            .await
            .unwrap()),
        vec![t(4)]
    );
    assert!(
        store
            .tasks_by_session(&sid("zzz"), Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
    store
        .update_task(
            t(3),
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();
    assert_eq!(
        ids(store
            .tasks_by_status(TaskStatus::Pending, Page::first(10))
            .await
            .unwrap()),
        vec![t(2), t(4), t(1)]
    );
    assert_eq!(
        ids(store
            .tasks_by_status(TaskStatus::Running, Page::first(10))
            .await
            .unwrap()),
        vec![t(3)]
    );
    assert!(
        store
            .tasks_by_status(TaskStatus::Completed, Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// `tasks_by_session_in_status`: only that session's tasks in that status, oldest first,
/// paged; nothing for another status or an unknown session.
pub async fn a_sessions_tasks_in_one_status(store: Store) {
    store.create_session(new_session("a", 1)).await.unwrap();
    store.create_session(new_session("b", 1)).await.unwrap();
    for (s, n, at) in [("a", 1, 30), ("a", 2, 10), ("b", 3, 20), ("a", 4, 20)] {
        store.create_task(new_task(s, n, at)).await.unwrap();
    }
    let t = |n| TaskId(uuid_from(n));
    // Task 2 (session a) and task 3 (session b) ask a question.
    for n in [2, 3] {
        store
            .update_task(
                t(n),
                TaskStatus::Pending,
                TaskChange::to(TaskStatus::Running),
            )
            .await
            .unwrap();
        store
            .update_task(
                t(n),
                TaskStatus::Running,
                TaskChange::to(TaskStatus::InputRequired),
            )
            .await
            .unwrap();
    }
    let ids = |ts: Vec<Task>| ts.iter().map(|t| t.id).collect::<Vec<_>>();
    let of = |s: &'static str, status, page| {
        let store = store.clone();
        async move {
            ids(store
                .tasks_by_session_in_status(&sid(s), status, page)
                .await
                .unwrap())
        }
    };
    let all = Page::first(10);
    assert_eq!(of("a", TaskStatus::InputRequired, all).await, vec![t(2)]);
    assert_eq!(of("b", TaskStatus::InputRequired, all).await, vec![t(3)]);
    assert_eq!(of("a", TaskStatus::Pending, all).await, vec![t(4), t(1)]);
    assert_eq!(
        of(
            "a",
            TaskStatus::Pending,
            Page {
                limit: 1,
                offset: 1
            }
        )
        .await,
        vec![t(1)]
    );
    assert!(of("b", TaskStatus::Pending, all).await.is_empty());
    assert!(of("a", TaskStatus::Completed, all).await.is_empty());
    assert!(of("zzz", TaskStatus::Pending, all).await.is_empty());
    // The task as stored, not just its id.
    let waiting = store
        .tasks_by_session_in_status(&sid("a"), TaskStatus::InputRequired, all)
        .await
        .unwrap();
    assert_eq!(waiting, vec![store.get_task(t(2)).await.unwrap()]);
}

/// The first event is seq 1 (so `after=0` returns it), and `after`/`limit` are exact.
pub async fn logs_are_numbered_from_one_and_read_after_seq(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    assert_eq!(store.append_logs(task.id, Vec::new()).await.unwrap(), 0);
    let events = vec![
        TaskEvent::text("Hello"),
        TaskEvent::ToolCall {
            id: "toolu_1".into(),
            name: "Bash".into(),
            input: json!({"command": "ls"}),
        },
        TaskEvent::ToolResult {
            tool_use_id: "toolu_1".into(),
            content: "a.txt".into(),
            is_error: false,
        },
        TaskEvent::Done(TaskOutcome::completed("bye")),
    ];
    let logs: Vec<NewTaskLog> = events
        .iter()
        .enumerate()
        .map(|(i, e)| NewTaskLog::new(e.clone(), Timestamp(1000 + i as i64)))
        .collect();
    assert_eq!(
        store
            .append_logs(task.id, logs[..1].to_vec())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .append_logs(task.id, logs[1..].to_vec())
            .await
            .unwrap(),
        4
    );
    assert_eq!(store.append_logs(task.id, Vec::new()).await.unwrap(), 4);

    let read = store.read_logs(task.id, 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        read.iter().map(|l| l.event.clone()).collect::<Vec<_>>(),
        events
    );
    assert_eq!(read[2].timestamp, Timestamp(1002));
    assert!(read.iter().all(|l| l.task_id == task.id));

    let mid = store.read_logs(task.id, 1, 2).await.unwrap();
    assert_eq!(mid.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert!(store.read_logs(task.id, 4, 100).await.unwrap().is_empty());
    assert!(
        store
            .read_logs(task.id, 1000, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.read_logs(task.id, 0, 0).await.unwrap().is_empty());
    let ghost = TaskId(uuid_from(404));
    assert!(store.read_logs(ghost, 0, 10).await.unwrap().is_empty());
    let err = store
        .append_logs(ghost, text_logs("x", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

/// Many appenders on one task: seqs 1..=N with no duplicate and no gap, each appender's
/// events in its own order, each batch contiguous.
pub async fn concurrent_appenders_get_gap_free_seqs(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    const WRITERS: usize = 8;
    const BATCHES: usize = 25;
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut lasts = Vec::new();
                for b in 0..BATCHES {
                    let size = 1 + (w + b) % 5;
                    let logs = (0..size)
                        .map(|i| NewTaskLog::now(TaskEvent::text(format!("w{w}-b{b}-i{i}"))))
                        .collect();
                    lasts.push(store.append_logs(task.id, logs).await.expect("append"));
                }
                lasts
            })
        })
        .collect();
    let mut expected_total = 0;
    for w in 0..WRITERS {
        expected_total += (0..BATCHES).map(|b| 1 + (w + b) % 5).sum::<usize>();
    }
    for h in handles {
        let lasts = h.await.expect("join");
        assert!(
            lasts.windows(2).all(|p| p[0] < p[1]),
            "an appender's seqs grow"
        );
    }
    let logs = all_logs(&store, task.id).await;
    assert_eq!(logs.len(), expected_total);
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log.seq, i as u64 + 1, "gap-free from 1");
    }
    // Each batch landed contiguously and in order.
    for (i, log) in logs.iter().enumerate() {
        let TaskEvent::Text { text } = &log.event else {
            panic!("unexpected event {:?}", log.event)
        };
        let idx: usize = text.rsplit("-i").next().unwrap().parse().unwrap();
        if idx > 0 {
            let TaskEvent::Text { text: prev } = &logs[i - 1].event else {
                panic!()
            };
            let stem = text.rsplit_once("-i").unwrap().0;
            assert_eq!(
                prev,
                &format!("{stem}-i{}", idx - 1),
                "batch split at seq {}",
                log.seq
            );
        }
    }
}

/// 10,000 events, one large batch among them, read back exactly in pages.
pub async fn ten_thousand_logs(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    let mut last = 0;
    for b in 0..75 {
        last = store
            .append_logs(task.id, text_logs(&format!("b{b}-"), 100))
            .await
            .unwrap();
    }
    last = last.max(
        store
            .append_logs(task.id, text_logs("big-", 2500))
            .await
            .unwrap(),
    );
    assert_eq!(last, 10_000);
    let logs = all_logs(&store, task.id).await;
    assert_eq!(logs.len(), 10_000);
    assert!(logs.iter().enumerate().all(|(i, l)| l.seq == i as u64 + 1));
    assert_eq!(logs[7_500].event, TaskEvent::text("big-0"));
    assert_eq!(logs[9_999].event, TaskEvent::text("big-2499"));
    let tail = store.read_logs(task.id, 9_990, 500).await.unwrap();
    assert_eq!(tail.len(), 10);
    assert_eq!(tail[0].seq, 9_991);
}

/// Deleting a session deletes its tasks and logs, and nothing else.
pub async fn delete_session_cascades(store: Store) {
    let doomed = session_with_task(&store, "doomed", 1).await;
    let second = store.create_task(new_task("doomed", 2, 3)).await.unwrap();
    let kept = session_with_task(&store, "kept", 3).await;
    for t in [&doomed, &second, &kept] {
        store.append_logs(t.id, text_logs("x", 5)).await.unwrap();
    }
    store.delete_session(&sid("doomed")).await.unwrap();
    assert_eq!(
        store.get_session(&sid("doomed")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    for t in [&doomed, &second] {
        assert_eq!(
            store.get_task(t.id).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(store.read_logs(t.id, 0, 10).await.unwrap().is_empty());
    }
    assert!(
        store
            .tasks_by_session(&sid("doomed"), Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .delete_session(&sid("doomed"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(store.get_task(kept.id).await.unwrap(), kept);
    assert_eq!(store.read_logs(kept.id, 0, 10).await.unwrap().len(), 5);
    let listed: Vec<Session> = store
        .list_sessions(Page::first(10))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session)
        .collect();
    assert_eq!(listed.len(), 1);
    // A recreated session of the same id starts empty.
    store
        .create_session(new_session("doomed", 9))
        .await
        .unwrap();
    assert!(
        store
            .tasks_by_session(&sid("doomed"), Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Events appended with their wire JSON made already ([`NewTaskLog::now_encoded`], what a
/// run hands the store to share the bytes with its followers) read back as the events, and
/// as those appended without it, whatever they hold (escapes, NUL, astral planes, metadata).
pub async fn encoded_logs_read_back_as_their_events(store: Store) {
    let task = session_with_task(&store, "s1", 1).await;
    let weird = "h\u{e9}llo \"q\" \\ \u{0} \u{1F980} \u{202e}rtl\u{202c}\n\t</script>";
    let mut done = TaskOutcome::completed(weird);
    done.cost_usd = Some(0.5);
    done.structured_output = Some(json!({"b": weird, "a": [1, 2.5, null]}));
    let events = vec![
        TaskEvent::Status {
            status: TaskStatus::Running,
        },
        TaskEvent::text(weird),
        TaskEvent::ToolCall {
            id: "toolu_1".into(),
            name: weird.into(),
            input: json!({"z": weird, "a": 1}),
        },
        TaskEvent::Error {
            message: weird.into(),
            code: Some("api_error".into()),
        },
        TaskEvent::Other(anywork_core::WireEvent {
            kind: "custom_\u{1F980}".into(),
            content: weird.into(),
            metadata: json!({"k": weird}),
        }),
        TaskEvent::Done(done),
    ];
    // Encoded and plain logs mixed, in one batch and alone.
    let logs: Vec<NewTaskLog> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if i % 2 == 0 {
                let (log, wire) = NewTaskLog::now_encoded(e.clone()).unwrap();
                assert_eq!(*wire, e.wire_json().unwrap());
                log
            } else {
                NewTaskLog::now(e.clone())
            }
        })
        .collect();
    store
        .append_logs(task.id, logs[..1].to_vec())
        .await
        .unwrap();
    assert_eq!(
        store
            .append_logs(task.id, logs[1..].to_vec())
            .await
            .unwrap(),
        events.len() as u64
    );
    let read: Vec<TaskEvent> = all_logs(&store, task.id)
        .await
        .into_iter()
        .map(|l| l.event)
        .collect();
    assert_eq!(read, events);
}

/// Any Unicode (NUL and astral planes included) and 1 MB payloads round-trip.
pub async fn unicode_and_large_payloads(store: Store) {
    let weird = "héllo 世界 🦀 مرحبا \u{0} \u{202e}rtl\u{202c} \"quotes\" \\ 'single' \n\t end";
    let mut s = new_session("owner/repo#12~!@$%^&*()", 1);
    s.title = "Título 🚀 — 标题".into();
    s.channel_key = Some("键/🔑#1".into());
    let session = store.create_session(s).await.unwrap();
    assert_eq!(store.get_session(&session.id).await.unwrap(), session);
    assert_eq!(
        store
            .find_session("webchat", "键/🔑#1")
            .await
            .unwrap()
            .map(|s| s.id),
        Some(session.id.clone())
    );

    let mut new = new_task(session.id.as_str(), 1, 2);
    new.message = format!("{weird} {}", "m".repeat(1 << 20));
    new.channel_meta = json!({"text": weird});
    let task = store.create_task(new).await.unwrap();
    assert_eq!(store.get_task(task.id).await.unwrap(), task);

    let big = "x".repeat(1 << 20);
    let events = vec![
        TaskEvent::text(weird),
        TaskEvent::text(big.clone()),
        TaskEvent::ToolResult {
            tool_use_id: weird.into(),
            content: format!("{big}{weird}"),
            is_error: true,
        },
        TaskEvent::Other(anywork_core::WireEvent {
            kind: "custom_🦀".into(),
            content: weird.into(),
            metadata: json!({"k": weird, "n": [1, 2.5, null, true]}),
        }),
    ];
    store
        .append_logs(
            task.id,
            events.iter().cloned().map(NewTaskLog::now).collect(),
        )
        .await
        .unwrap();
    let read: Vec<TaskEvent> = all_logs(&store, task.id)
        .await
        .into_iter()
        .map(|l| l.event)
        .collect();
    assert_eq!(read, events);

    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();
    let mut outcome = TaskOutcome::completed(format!("{weird}{big}"));
    outcome.structured_output = Some(json!({"w": weird}));
    let done = store
        .update_task(task.id, TaskStatus::Running, TaskChange::finish(outcome))
        .await
        .unwrap();
    assert_eq!(store.get_task(task.id).await.unwrap(), done);
}

/// Bad input gets a clear `InvalidInput` and changes nothing.
pub async fn bad_input_is_refused_cleanly(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    for title in ["a\u{0}b", "line\nbreak", &"t".repeat(501)] {
        let err = store
            .set_session_title(&sid("s1"), title)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{title:?}");
        let mut s = new_session("s2", 1);
        s.title = title.to_string();
        assert_eq!(
            store.create_session(s).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    assert_eq!(
        store.get_session(&sid("s1")).await.unwrap().title,
        "New Chat"
    );
    assert_eq!(
        store.get_session(&sid("s2")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // An outcome whose status disagrees with the change is refused before any write.
    let task = store.create_task(new_task("s1", 1, 2)).await.unwrap();
    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running),
        )
        .await
        .unwrap();
    let mut change = TaskChange::finish(TaskOutcome::completed("x"));
    change.status = TaskStatus::Failed;
    let err = store
        .update_task(task.id, TaskStatus::Running, change)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        store.get_task(task.id).await.unwrap().status,
        TaskStatus::Running
    );
}

pub use model::model_check;

mod model {
    //! Random operation sequences, run against the store under test and a
    //! [`MemoryModel`]-backed reference, compared call by call.

    use super::*;
    use anywork_core::Claim;
    use proptest::prelude::*;
    use std::future::Future;
    use std::pin::Pin;

    #[derive(Debug, Clone)]
    enum Op {
        CreateSession {
            s: u8,
            key: Option<u8>,
            at: i64,
        },
        CreateTask {
            s: u8,
            t: u8,
            at: i64,
            key: Option<u8>,
        },
        /// A session and its first task in one write.
        CreateWithTask {
            s: u8,
            key: Option<u8>,
            at: i64,
            t: u8,
            task_at: i64,
            task_key: Option<u8>,
        },
        FindByKey {
            key: u8,
        },
        Update {
            t: u8,
            expected: TaskStatus,
            to: TaskStatus,
            at: i64,
        },
        /// `update_task_lean` with `n` events.
        UpdateLean {
            t: u8,
            expected: TaskStatus,
            to: TaskStatus,
            at: i64,
            n: u8,
        },
        /// `create_session_with_task_claimed` with `n` events.
        CreateWithTaskClaimed {
            s: u8,
            key: Option<u8>,
            at: i64,
            t: u8,
            n: u8,
        },
        /// `create_task_claimed` with `n` events.
        CreateClaimed {
            s: u8,
            t: u8,
            at: i64,
            n: u8,
        },
        /// `claim_task` (or `claim_task_lean`) with `n` events.
        Claim {
            t: u8,
            at: i64,
            n: u8,
            lean: bool,
        },
        Append {
            t: u8,
            n: u8,
            /// Through `append_logs_while_active`.
            active: bool,
        },
        Read {
            t: u8,
            after: u8,
            limit: u8,
        },
        Touch {
            s: u8,
            at: i64,
        },
        Title {
            s: u8,
            title: String,
        },
        Delete {
            s: u8,
        },
        List {
            limit: u8,
            offset: u8,
        },
        BySession {
            s: u8,
        },
        ByStatus {
            status: TaskStatus,
        },
        BySessionInStatus {
            s: u8,
            status: TaskStatus,
        },
        Renew {
            t: u8,
            owner: bool,
            at: i64,
        },
        Expired {
            at: i64,
        },
    }

    fn status() -> impl Strategy<Value = TaskStatus> {
        proptest::sample::select(TaskStatus::ALL.to_vec())
    }

    fn op() -> impl Strategy<Value = Op> {
        let s = 0u8..4;
        let t = 0u8..6;
        let at = 0i64..50;
        prop_oneof![
            (s.clone(), proptest::option::of(0u8..2), at.clone())
                .prop_map(|(s, key, at)| Op::CreateSession { s, key, at }),
            (
                s.clone(),
                t.clone(),
                at.clone(),
                proptest::option::of(0u8..3)
            )
                .prop_map(|(s, t, at, key)| Op::CreateTask { s, t, at, key }),
            (
                s.clone(),
                proptest::option::of(0u8..2),
                at.clone(),
                t.clone(),
                at.clone(),
                proptest::option::of(0u8..3)
            )
                .prop_map(|(s, key, at, t, task_at, task_key)| Op::CreateWithTask {
                    s,
                    key,
                    at,
                    t,
                    task_at,
                    task_key
                }),
            (0u8..3).prop_map(|key| Op::FindByKey { key }),
            (t.clone(), status(), status(), at.clone()).prop_map(|(t, expected, to, at)| {
                Op::Update {
                    t,
                    expected,
                    to,
                    at,
                }
            }),
            (t.clone(), status(), status(), at.clone(), 0u8..3).prop_map(
                |(t, expected, to, at, n)| Op::UpdateLean {
                    t,
                    expected,
                    to,
                    at,
                    n
                }
            ),
            (t.clone(), at.clone(), 0u8..3, any::<bool>()).prop_map(|(t, at, n, lean)| Op::Claim {
                t,
                at,
                n,
                lean
            }),
            (s.clone(), t.clone(), at.clone(), 0u8..3)
                .prop_map(|(s, t, at, n)| Op::CreateClaimed { s, t, at, n }),
            (
                s.clone(),
                proptest::option::of(0u8..2),
                at.clone(),
                t.clone(),
                0u8..3
            )
                .prop_map(|(s, key, at, t, n)| Op::CreateWithTaskClaimed {
                    s,
                    key,
                    at,
                    t,
                    n
                }),
            (t.clone(), 0u8..5, any::<bool>()).prop_map(|(t, n, active)| Op::Append {
                t,
                n,
                active
            }),
            (t.clone(), 0u8..8, 0u8..4).prop_map(|(t, after, limit)| Op::Read { t, after, limit }),
            (s.clone(), at.clone()).prop_map(|(s, at)| Op::Touch { s, at }),
            (s.clone(), "[a-z ]{0,8}").prop_map(|(s, title)| Op::Title { s, title }),
            s.clone().prop_map(|s| Op::Delete { s }),
            (0u8..5, 0u8..5).prop_map(|(limit, offset)| Op::List { limit, offset }),
            s.clone().prop_map(|s| Op::BySession { s }),
            status().prop_map(|status| Op::ByStatus { status }),
            (s, status()).prop_map(|(s, status)| Op::BySessionInStatus { s, status }),
            (t, any::<bool>(), at.clone()).prop_map(|(t, owner, at)| Op::Renew { t, owner, at }),
            at.prop_map(|at| Op::Expired { at }),
        ]
    }

    /// One observable result, comparable across stores.
    #[derive(Debug, PartialEq)]
    enum Out {
        Err(ErrorKind),
        Session(Session),
        Task(Box<Task>),
        Created(Session, Box<Task>),
        /// A task created, and the seq of its last event when it was claimed too.
        CreatedClaimed(Box<Task>, Option<u64>),
        /// A session and its first task created, and the seq of the task's last event when
        /// it was claimed too.
        CreatedWithClaimed(Session, Box<Task>, Option<u64>),
        /// What a claim did; the claimed task as stored, or `None` from the lean claim.
        Claimed(Box<Claim<Option<Task>>>),
        Seq(u64),
        Logs(Vec<(u64, TaskEvent)>),
        Sessions(Vec<(Session, u64, u64)>),
        Tasks(Vec<Task>),
        Unit,
    }

    fn out<T>(r: anywork_core::Result<T>, f: impl FnOnce(T) -> Out) -> Out {
        match r {
            Ok(v) => f(v),
            Err(e) => Out::Err(e.kind()),
        }
    }

    /// The change an update to `to` at `at` makes: a lease and a worker for `running`, an
    /// outcome for a terminal status.
    fn change_to(to: TaskStatus, at: i64) -> TaskChange {
        if to.is_terminal() {
            return TaskChange::finish(TaskOutcome {
                status: to,
                ..TaskOutcome::completed(format!("r{at}"))
            })
            .at(Timestamp(at));
        }
        let change = TaskChange::to(to).at(Timestamp(at));
        if to == TaskStatus::Running {
            change.lease("owner", Timestamp(at + 10)).worker("w")
        } else {
            change
        }
    }

    async fn apply(store: &Store, op: &Op) -> Out {
        let sname = |s: u8| sid(&format!("s{s}"));
        let tid = |t: u8| TaskId(uuid_from(u128::from(t) + 1));
        match op.clone() {
            Op::CreateSession { s, key, at } => {
                let mut n = new_session(sname(s).as_str(), at);
                n.channel_key = key.map(|k| format!("key{k}"));
                out(store.create_session(n).await, Out::Session)
            }
            Op::CreateTask { s, t, at, key } => {
                let mut n = new_task(sname(s).as_str(), u128::from(t) + 1, at);
                n.idempotency_key = key.map(|k| format!("event-{k}"));
                out(store.create_task(n).await, |t| Out::Task(Box::new(t)))
            }
            Op::CreateWithTask {
                s,
                key,
                at,
                t,
                task_at,
                task_key,
            } => {
                let mut n = new_session(sname(s).as_str(), at);
                n.channel_key = key.map(|k| format!("key{k}"));
                let mut task = new_task(sname(s).as_str(), u128::from(t) + 1, task_at);
                task.idempotency_key = task_key.map(|k| format!("event-{k}"));
                out(store.create_session_with_task(n, task).await, |(s, t)| {
                    Out::Created(s, Box::new(t))
                })
            }
            Op::FindByKey { key } => out(
                store
                    .find_task_by_idempotency_key("webchat", &format!("event-{key}"))
                    .await,
                |t| Out::Tasks(t.into_iter().collect()),
            ),
            Op::Update {
                t,
                expected,
                to,
                at,
            } => out(
                store.update_task(tid(t), expected, change_to(to, at)).await,
                |t| Out::Task(Box::new(t)),
            ),
            Op::UpdateLean {
                t,
                expected,
                to,
                at,
                n,
            } => out(
                store
                    .update_task_lean(
                        tid(t),
                        expected,
                        change_to(to, at),
                        text_logs("u", usize::from(n)),
                        Vec::new(),
                    )
                    .await,
                Out::Seq,
            ),
            Op::CreateWithTaskClaimed { s, key, at, t, n } => {
                let mut session = new_session(sname(s).as_str(), at);
                session.channel_key = key.map(|k| format!("key{k}"));
                let task = new_task(sname(s).as_str(), u128::from(t) + 1, at);
                out(
                    store
                        .create_session_with_task_claimed(
                            session,
                            task,
                            change_to(TaskStatus::Running, at),
                            text_logs("f", usize::from(n)),
                            Vec::new(),
                        )
                        .await,
                    |(s, t, last)| Out::CreatedWithClaimed(s, Box::new(t), last),
                )
            }
            Op::CreateClaimed { s, t, at, n } => {
                let new = new_task(sname(s).as_str(), u128::from(t) + 1, at);
                out(
                    store
                        .create_task_claimed(
                            new,
                            change_to(TaskStatus::Running, at),
                            text_logs("n", usize::from(n)),
                            Vec::new(),
                        )
                        .await,
                    |(t, last)| Out::CreatedClaimed(Box::new(t), last),
                )
            }
            Op::Claim { t, at, n, lean } => {
                let change = change_to(TaskStatus::Running, at);
                let logs = text_logs("c", usize::from(n));
                if lean {
                    out(
                        store
                            .claim_task_lean(tid(t), change, logs, Vec::new())
                            .await,
                        |c| Out::Claimed(Box::new(c.map(|()| None))),
                    )
                } else {
                    out(
                        store.claim_task(tid(t), change, logs, Vec::new()).await,
                        |c| Out::Claimed(Box::new(c.map(Some))),
                    )
                }
            }
            Op::Append { t, n, active } => {
                let logs = text_logs("e", usize::from(n));
                let appended = if active {
                    store.append_logs_while_active(tid(t), logs).await
                } else {
                    store.append_logs(tid(t), logs).await
                };
                out(appended, Out::Seq)
            }
            Op::Read { t, after, limit } => out(
                store
                    .read_logs(tid(t), u64::from(after), u32::from(limit))
                    .await,
                |logs| Out::Logs(logs.into_iter().map(|l| (l.seq, l.event)).collect()),
            ),
            Op::Touch { s, at } => out(store.touch_session(&sname(s), Timestamp(at)).await, |_| {
                Out::Unit
            }),
            Op::Title { s, title } => out(store.set_session_title(&sname(s), &title).await, |_| {
                Out::Unit
            }),
            Op::Delete { s } => out(store.delete_session(&sname(s)).await, |_| Out::Unit),
            Op::List { limit, offset } => out(
                store
                    .list_sessions(Page {
                        limit: u32::from(limit),
                        offset: u32::from(offset),
                    })
                    .await,
                |rows| {
                    Out::Sessions(
                        rows.into_iter()
                            .map(|r| (r.session, r.task_count, r.active_task_count))
                            .collect(),
                    )
                },
            ),
            Op::BySession { s } => out(
                store.tasks_by_session(&sname(s), Page::first(100)).await,
                Out::Tasks,
            ),
            Op::ByStatus { status } => out(
                store.tasks_by_status(status, Page::first(100)).await,
                Out::Tasks,
            ),
            Op::BySessionInStatus { s, status } => out(
                store
                    .tasks_by_session_in_status(&sname(s), status, Page::first(100))
                    .await,
                Out::Tasks,
            ),
            Op::Renew { t, owner, at } => {
                let who = if owner { "owner" } else { "intruder" };
                out(store.renew_lease(tid(t), who, Timestamp(at)).await, |_| {
                    Out::Unit
                })
            }
            Op::Expired { at } => out(store.expired_leases(Timestamp(at), 100).await, Out::Tasks),
        }
    }

    /// Runs random operation sequences on fresh stores from `factory` and on the in-memory
    /// model side by side; every call must give the same result. Cases: `PROPTEST_CASES`
    /// (default 32).
    pub fn model_check(factory: impl Fn() -> Pin<Box<dyn Future<Output = super::Fresh> + Send>>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32);
        let config = ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec(op(), 1..60))| {
            rt.block_on(async {
                let (store, guard) = factory().await.into_parts();
                let model: Store = Arc::new(crate::store_conformance::MemoryModel::default());
                let mut result = Ok(());
                for (i, op) in ops.iter().enumerate() {
                    let got = apply(&store, op).await;
                    let want = apply(&model, op).await;
                    result = (|| -> Result<(), proptest::test_runner::TestCaseError> {
                        prop_assert_eq!(got, want, "op #{} {:?}", i, op);
                        Ok(())
                    })();
                    if result.is_err() {
                        break;
                    }
                }
                // The store before what it needs (its directory, its schema).
                drop(store);
                drop(guard);
                result
            })?;
        });
    }
}

pub use memory_model::MemoryModel;

mod memory_model {
    //! The reference model for [`model_check`](super::model_check): the plainest possible
    //! store, written to be obviously right rather than fast. Kept here (not in
    //! anywork-store) so that the store crate's own `MemoryStore` is checked against it too.

    use super::*;
    use anywork_core::session::validate_title;
    use anywork_core::{Error, Result, SessionSummary, TaskLog};
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// Vectors under one lock; every query is a scan.
    #[derive(Debug, Default)]
    pub struct MemoryModel {
        state: Mutex<(Vec<Session>, Vec<Task>, Vec<TaskLog>)>,
    }

    fn nf(what: &str) -> Error {
        Error::not_found(format!("{what} not found"))
    }

    fn page<T>(v: Vec<T>, p: Page) -> Vec<T> {
        v.into_iter()
            .skip(p.offset as usize)
            .take(p.limit as usize)
            .collect()
    }

    #[async_trait]
    impl TaskStore for MemoryModel {
        async fn create_session(&self, new: NewSession) -> Result<Session> {
            validate_title(&new.title)?;
            let mut st = self.state.lock().unwrap();
            let clash = st.0.iter().any(|s| {
                s.id == new.id
                    || (new.channel_key.is_some()
                        && s.channel_type == new.channel_type
                        && s.channel_key == new.channel_key)
            });
            if clash {
                return Err(Error::conflict("exists"));
            }
            let s = new.into_session();
            st.0.push(s.clone());
            Ok(s)
        }
        async fn get_session(&self, id: &SessionId) -> Result<Session> {
            let st = self.state.lock().unwrap();
            st.0.iter()
                .find(|s| &s.id == id)
                .cloned()
                .ok_or_else(|| nf("session"))
        }
        async fn find_session(&self, ct: &str, key: &str) -> Result<Option<Session>> {
            let st = self.state.lock().unwrap();
            Ok(st
                .0
                .iter()
                .find(|s| s.channel_type == ct && s.channel_key.as_deref() == Some(key))
                .cloned())
        }
        async fn list_sessions(&self, p: Page) -> Result<Vec<SessionSummary>> {
            let st = self.state.lock().unwrap();
            let mut v: Vec<SessionSummary> =
                st.0.iter()
                    .map(|s| SessionSummary {
                        session: s.clone(),
                        task_count: st.1.iter().filter(|t| t.session_id == s.id).count() as u64,
                        active_task_count: st
                            .1
                            .iter()
                            .filter(|t| t.session_id == s.id && t.status.is_active())
                            .count() as u64,
                    })
                    .collect();
            v.sort_by(|a, b| {
                (b.session.last_active, &b.session.id).cmp(&(a.session.last_active, &a.session.id))
            });
            Ok(page(v, p))
        }
        async fn set_session_title(&self, id: &SessionId, title: &str) -> Result<()> {
            validate_title(title)?;
            let mut st = self.state.lock().unwrap();
            let s =
                st.0.iter_mut()
                    .find(|s| &s.id == id)
                    .ok_or_else(|| nf("session"))?;
            s.title = title.into();
            Ok(())
        }
        async fn touch_session(&self, id: &SessionId, at: Timestamp) -> Result<()> {
            let mut st = self.state.lock().unwrap();
            let s =
                st.0.iter_mut()
                    .find(|s| &s.id == id)
                    .ok_or_else(|| nf("session"))?;
            s.last_active = s.last_active.max(at);
            Ok(())
        }
        async fn delete_session(&self, id: &SessionId) -> Result<()> {
            let mut st = self.state.lock().unwrap();
            let before = st.0.len();
            st.0.retain(|s| &s.id != id);
            if st.0.len() == before {
                return Err(nf("session"));
            }
            let gone: Vec<TaskId> =
                st.1.iter()
                    .filter(|t| &t.session_id == id)
                    .map(|t| t.id)
                    .collect();
            st.1.retain(|t| &t.session_id != id);
            st.2.retain(|l| !gone.contains(&l.task_id));
            Ok(())
        }
        async fn create_task(&self, new: NewTask) -> Result<Task> {
            let mut st = self.state.lock().unwrap();
            let same_key = |t: &Task| {
                new.idempotency_key.is_some()
                    && t.channel_type == new.channel_type
                    && t.idempotency_key == new.idempotency_key
            };
            if st.1.iter().any(|t| t.id == new.id || same_key(t)) {
                return Err(Error::conflict("exists"));
            }
            let s =
                st.0.iter_mut()
                    .find(|s| s.id == new.session_id)
                    .ok_or_else(|| nf("session"))?;
            s.last_active = s.last_active.max(new.created_at);
            let t = new.into_task();
            st.1.push(t.clone());
            Ok(t)
        }
        async fn create_session_with_task(
            &self,
            session: NewSession,
            task: NewTask,
        ) -> Result<(Session, Task)> {
            anywork_core::store::check_first_task(&session, &task)?;
            validate_title(&session.title)?;
            let mut st = self.state.lock().unwrap();
            let session_clash = st.0.iter().any(|s| {
                s.id == session.id
                    || (session.channel_key.is_some()
                        && s.channel_type == session.channel_type
                        && s.channel_key == session.channel_key)
            });
            let task_clash = st.1.iter().any(|t| {
                t.id == task.id
                    || (task.idempotency_key.is_some()
                        && t.channel_type == task.channel_type
                        && t.idempotency_key == task.idempotency_key)
            });
            if session_clash || task_clash {
                return Err(Error::conflict("exists"));
            }
            let mut s = session.into_session();
            s.last_active = s.last_active.max(task.created_at);
            let t = task.into_task();
            st.0.push(s.clone());
            st.1.push(t.clone());
            Ok((s, t))
        }
        async fn get_task(&self, id: TaskId) -> Result<Task> {
            let st = self.state.lock().unwrap();
            st.1.iter()
                .find(|t| t.id == id)
                .cloned()
                .ok_or_else(|| nf("task"))
        }
        async fn find_task_by_idempotency_key(&self, ct: &str, key: &str) -> Result<Option<Task>> {
            let st = self.state.lock().unwrap();
            Ok(st
                .1
                .iter()
                .find(|t| t.channel_type == ct && t.idempotency_key.as_deref() == Some(key))
                .cloned())
        }
        async fn update_task(&self, id: TaskId, exp: TaskStatus, c: TaskChange) -> Result<Task> {
            let mut st = self.state.lock().unwrap();
            let t =
                st.1.iter_mut()
                    .find(|t| t.id == id)
                    .ok_or_else(|| nf("task"))?;
            if t.status != exp {
                return Err(Error::conflict("status changed"));
            }
            let mut n = t.clone();
            c.apply(&mut n)?;
            *t = n.clone();
            Ok(n)
        }
        async fn update_task_and_append(
            &self,
            id: TaskId,
            exp: TaskStatus,
            c: TaskChange,
            logs: Vec<NewTaskLog>,
        ) -> Result<(Task, u64)> {
            // The model is used from one thread: one after the other is atomic here.
            let task = self.update_task(id, exp, c).await?;
            Ok((task, self.append_logs(id, logs).await?))
        }
        async fn tasks_by_session(&self, id: &SessionId, p: Page) -> Result<Vec<Task>> {
            let st = self.state.lock().unwrap();
            let mut v: Vec<Task> =
                st.1.iter()
                    .filter(|t| &t.session_id == id)
                    .cloned()
                    .collect();
            v.sort_by_key(|t| (t.created_at, t.id));
            Ok(page(v, p))
        }
        async fn tasks_by_status(&self, s: TaskStatus, p: Page) -> Result<Vec<Task>> {
            let st = self.state.lock().unwrap();
            let mut v: Vec<Task> = st.1.iter().filter(|t| t.status == s).cloned().collect();
            v.sort_by_key(|t| (t.created_at, t.id));
            Ok(page(v, p))
        }
        async fn renew_lease(&self, id: TaskId, owner: &str, at: Timestamp) -> Result<()> {
            let mut st = self.state.lock().unwrap();
            let t =
                st.1.iter_mut()
                    .find(|t| t.id == id)
                    .ok_or_else(|| nf("task"))?;
            let active = t.status.is_active();
            match t.lease.as_mut() {
                Some(l) if l.owner == owner && active => {
                    l.expires_at = at;
                    Ok(())
                }
                _ => Err(Error::conflict("not leased")),
            }
        }
        async fn expired_leases(&self, now: Timestamp, limit: u32) -> Result<Vec<Task>> {
            let st = self.state.lock().unwrap();
            let mut v: Vec<Task> = st
                .1
                .iter()
                .filter(|t| {
                    t.status.is_active() && t.lease.as_ref().is_some_and(|l| l.expires_at <= now)
                })
                .cloned()
                .collect();
            v.sort_by_key(|t| (t.created_at, t.id));
            v.truncate(limit as usize);
            Ok(v)
        }
        async fn append_logs(&self, id: TaskId, logs: Vec<NewTaskLog>) -> Result<u64> {
            let mut st = self.state.lock().unwrap();
            if !st.1.iter().any(|t| t.id == id) {
                return Err(nf("task"));
            }
            let mut last = st.2.iter().filter(|l| l.task_id == id).count() as u64;
            for l in logs {
                last += 1;
                st.2.push(TaskLog {
                    task_id: id,
                    seq: last,
                    event: l.event,
                    timestamp: l.timestamp,
                });
            }
            Ok(last)
        }
        async fn read_logs(&self, id: TaskId, after: u64, limit: u32) -> Result<Vec<TaskLog>> {
            let st = self.state.lock().unwrap();
            Ok(st
                .2
                .iter()
                .filter(|l| l.task_id == id && l.seq > after)
                .take(limit as usize)
                .cloned()
                .collect())
        }
    }
}

/// A fresh store for one case, with whatever must outlive the case (a temporary directory,
/// a test schema). The suite calls the store itself, not a wrapper around it: a wrapper
/// that forwarded the trait's methods would run the trait's default for any method it
/// forgot, and the case would check the default instead of the store.
///
/// A factory returns a `Fresh`, or just the store (`Arc<dyn TaskStore>` converts):
///
/// ```ignore
/// async fn fresh() -> Fresh {
///     let dir = tempfile::tempdir().unwrap();
///     let store = SqliteStore::open_in_dir(dir.path()).await.unwrap();
///     Fresh::new(store).keeping(dir)
/// }
/// ```
pub struct Fresh {
    store: Store,
    guard: Option<Box<dyn Send + Sync>>,
}

impl Fresh {
    /// A store with nothing to keep alive beside it.
    pub fn new(store: impl TaskStore + 'static) -> Self {
        let store: Store = Arc::new(store);
        store.into()
    }

    /// Keeps `guard` alive until the case has ended; it is dropped after the case (the store
    /// may be dropped before it, never after the case).
    pub fn keeping(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    /// The store, and what must be dropped only after the case.
    pub fn into_parts(self) -> (Store, impl Send + Sync) {
        (self.store, self.guard)
    }
}

impl From<Store> for Fresh {
    fn from(store: Store) -> Self {
        Self { store, guard: None }
    }
}

/// Runs one case on a fresh store from `fresh`, dropping the store before its guard. Used by
/// [`store_conformance_tests!`](crate::store_conformance_tests).
pub async fn run_case<F, Fut>(fresh: impl FnOnce() -> Fut, case: impl FnOnce(Store) -> F)
where
    Fut: Future<Output: Into<Fresh>>,
    F: Future<Output = ()>,
{
    let (store, guard) = fresh().await.into().into_parts();
    case(store).await;
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trait's default claims (the model implements none) answer as the shipped stores.
    #[tokio::test]
    async fn the_default_claim_tells_an_active_task_first() {
        let model: Store = Arc::new(MemoryModel::default());
        an_active_task_is_told_before_an_older_pending_one(model).await;
    }
}
