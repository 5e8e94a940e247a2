//! Conformance cases of session search by title and the usage totals: part of
//! [`store_conformance`](super), run by
//! [`store_conformance_tests!`](crate::store_conformance_tests).

use anywork_core::{SessionSummary, UsageTotals};

use super::*;

async fn titled(store: &Store, id: &str, title: &str, at: i64) {
    store.create_session(new_session(id, at)).await.unwrap();
    store.set_session_title(&sid(id), title).await.unwrap();
}

async fn search_ids(store: &Store, query: &str) -> Vec<String> {
    store
        .search_sessions(query, Page::first(100))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session.id.to_string())
        .collect()
}

/// Search finds titles containing the query ignoring ASCII case, in list order, with task
/// counts; `%`, `_` and `\` are literal, not wildcards; an empty query lists all; pages
/// concatenate to the whole result.
pub async fn sessions_are_searched_by_title(store: Store) {
    titled(&store, "a1", "Apples and pears", 10).await;
    titled(&store, "a2", "Big APPLE pie", 20).await;
    titled(&store, "b1", "Bananas", 30).await;
    titled(&store, "p1", "100% sure", 40).await;
    titled(&store, "p2", "1000 sure", 41).await;
    titled(&store, "u1", "under_score", 50).await;
    titled(&store, "u2", "underXscore", 51).await;
    titled(&store, "k1", r"back\slash", 60).await;
    titled(&store, "k2", "backslash", 61).await;
    titled(&store, "c1", "Crème brûlée ✅", 70).await;

    assert_eq!(search_ids(&store, "apple").await, ["a2", "a1"]);
    assert_eq!(search_ids(&store, "aPpLe").await, ["a2", "a1"]);
    assert_eq!(search_ids(&store, "%").await, ["p1"], "% is literal");
    assert_eq!(search_ids(&store, "0%").await, ["p1"]);
    assert_eq!(search_ids(&store, "_").await, ["u1"], "_ is literal");
    assert_eq!(search_ids(&store, "r_s").await, ["u1"]);
    assert_eq!(search_ids(&store, "\\").await, ["k1"], "\\ is literal");
    assert_eq!(search_ids(&store, r"k\s").await, ["k1"]);
    assert_eq!(
        search_ids(&store, "brûlée ✅").await,
        ["c1"],
        "non-ASCII text"
    );
    assert_eq!(
        search_ids(&store, "CRème").await,
        ["c1"],
        "ASCII case folds"
    );
    assert!(search_ids(&store, "cherries").await.is_empty());
    assert!(
        search_ids(&store, "'; DROP TABLE sessions; --")
            .await
            .is_empty()
    );

    let all = store.list_sessions(Page::first(100)).await.unwrap();
    assert_eq!(
        store.search_sessions("", Page::first(100)).await.unwrap(),
        all,
        "an empty query lists every session"
    );

    // Counts come with the rows, as in the list.
    store.create_task(new_task("a1", 1, 80)).await.unwrap();
    let found = store
        .search_sessions("APPLES", Page::first(10))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].task_count, found[0].active_task_count), (1, 1));
    assert_eq!(found[0].session.last_active, Timestamp(80));

    // Pages of a search: 25 matches among 50 sessions, in list order.
    for i in 0..50 {
        let title = if i % 2 == 0 {
            format!("Report {i}")
        } else {
            format!("Other {i}")
        };
        titled(&store, &format!("r{i:02}"), &title, 100 + i / 3).await;
    }
    let whole = store
        .search_sessions("report", Page::first(100))
        .await
        .unwrap();
    assert_eq!(whole.len(), 25);
    let in_list: Vec<SessionSummary> = store
        .list_sessions(Page::first(200))
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.session.title.starts_with("Report"))
        .collect();
    assert_eq!(whole, in_list, "a search keeps the list's order");
    let mut paged = Vec::new();
    for offset in (0..30).step_by(10) {
        paged.extend(
            store
                .search_sessions("REPORT", Page { limit: 10, offset })
                .await
                .unwrap(),
        );
    }
    assert_eq!(paged, whole, "pages concatenate to the whole result");
}

/// The totals sum cost and tokens of every task in every session (a task without a cost adds
/// none), count sessions and tasks, and lose a deleted session's tasks.
pub async fn usage_totals_sum_every_task(store: Store) {
    assert_eq!(store.usage_totals().await.unwrap(), UsageTotals::default());

    store.create_session(new_session("s1", 1)).await.unwrap();
    store.create_session(new_session("s2", 1)).await.unwrap();
    store.create_session(new_session("empty", 1)).await.unwrap();
    let finish = |n: u128, cost: Option<f64>, input: u64, output: u64| {
        let store = store.clone();
        async move {
            let id = TaskId(uuid_from(n));
            store
                .update_task(
                    id,
                    TaskStatus::Pending,
                    TaskChange::to(TaskStatus::Running).at(Timestamp(5)),
                )
                .await
                .unwrap();
            let mut outcome = TaskOutcome::completed("ok");
            outcome.cost_usd = cost;
            outcome.usage.input_tokens = input;
            outcome.usage.output_tokens = output;
            outcome.usage.cache_creation_input_tokens = 3;
            outcome.usage.cache_read_input_tokens = 5;
            store
                .update_task(id, TaskStatus::Running, TaskChange::finish(outcome))
                .await
                .unwrap();
        }
    };
    for (session, n) in [("s1", 1), ("s1", 2), ("s2", 3), ("s2", 4)] {
        store.create_task(new_task(session, n, 2)).await.unwrap();
    }
    finish(1, Some(0.25), 100, 10).await;
    finish(2, None, 7, 1).await;
    finish(3, Some(0.5), 1000, 200).await;
    // Task 4 stays pending: counted, nothing to add.

    let totals = store.usage_totals().await.unwrap();
    assert_eq!((totals.sessions, totals.tasks), (3, 4));
    assert_eq!(totals.cost_usd, 0.75);
    assert_eq!(totals.usage.input_tokens, 1107);
    assert_eq!(totals.usage.output_tokens, 211);
    assert_eq!(totals.usage.cache_creation_input_tokens, 9);
    assert_eq!(totals.usage.cache_read_input_tokens, 15);

    store.delete_session(&sid("s2")).await.unwrap();
    let totals = store.usage_totals().await.unwrap();
    assert_eq!((totals.sessions, totals.tasks), (2, 2));
    assert_eq!(totals.cost_usd, 0.25);
    assert_eq!(totals.usage.input_tokens, 107);
    assert_eq!(totals.usage.output_tokens, 11);
}
