//! Conformance cases of the lean writes, [`TaskStore::claim_task_lean`] and
//! [`TaskStore::update_task_lean`]: the same checks, answers and stored rows as
//! `claim_task` and `update_task_and_enqueue`, only without the task in the answer. Part of
//! [`store_conformance`](super), run by
//! [`store_conformance_tests!`](crate::store_conformance_tests).

use anywork_core::{Claim, DeliveryTarget, Lease, NewDelivery, TokenUsage};

use super::*;

fn claim_change(owner: &str, at: i64) -> TaskChange {
    TaskChange::to(TaskStatus::Running)
        .at(Timestamp(at))
        .worker(format!("w-{owner}"))
        .lease(owner, Timestamp(at + 1000))
}

fn events(kinds: &[&str]) -> Vec<NewTaskLog> {
    kinds
        .iter()
        .map(|k| NewTaskLog::now(TaskEvent::text(*k)))
        .collect()
}

fn push(n: u32) -> NewDelivery {
    NewDelivery::new(
        DeliveryTarget::Push {
            url: format!("https://hooks.example/{n}"),
            authorization: None,
            events: vec!["completed".into()],
        },
        json!({ "n": n }),
    )
}

/// `task` with `change` applied from `expected`: what the store must hold after it.
fn applied(task: &Task, expected: TaskStatus, change: &TaskChange) -> Task {
    let mut want = task.clone();
    want.status = expected;
    change.apply(&mut want).expect("the change applies");
    want
}

async fn lean_claim(store: &Store, task: TaskId, change: TaskChange) -> Claim<()> {
    store
        .claim_task_lean(task, change, events(&["running"]), Vec::new())
        .await
        .expect("lean claim")
}

/// A lean claim starts a session's oldest pending task exactly as `claim_task` does (the
/// row it stores, its event, its seq), and answers busy, not first and not pending with the
/// task as stored; nothing changes when it does not claim.
pub async fn lean_claims_store_and_answer_as_claims_do(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 10)).await.unwrap();
    let b = store.create_task(new_task("s1", 2, 20)).await.unwrap();
    // b is not first: a is older.
    match lean_claim(&store, b.id, claim_change("srv-1", 30)).await {
        Claim::NotFirst(first) => assert_eq!(first, store.get_task(a.id).await.unwrap()),
        other => panic!("b is not first: {other:?}"),
    }
    assert_eq!(store.get_task(b.id).await.unwrap(), b, "b is unchanged");
    assert!(store.read_logs(b.id, 0, 10).await.unwrap().is_empty());

    // a starts: the row is the change applied to it, the event is in its log.
    let change = claim_change("srv-1", 40);
    assert_eq!(
        lean_claim(&store, a.id, change.clone()).await,
        Claim::Claimed((), 1)
    );
    let started = store.get_task(a.id).await.unwrap();
    assert_eq!(started, applied(&a, TaskStatus::Pending, &change));
    assert_eq!(started.started_at, Some(Timestamp(40)));
    assert_eq!(started.worker_id.as_deref(), Some("w-srv-1"));
    assert_eq!(store.read_logs(a.id, 0, 10).await.unwrap().len(), 1);

    // Busy while a runs, not pending for a itself.
    match lean_claim(&store, b.id, claim_change("srv-2", 50)).await {
        Claim::Busy(holder) => assert_eq!(holder, started),
        other => panic!("the session is busy: {other:?}"),
    }
    match lean_claim(&store, a.id, claim_change("srv-2", 50)).await {
        Claim::NotPending(t) => assert_eq!(t, started),
        other => panic!("a runs already: {other:?}"),
    }
    assert_eq!(store.get_task(a.id).await.unwrap(), started);
    assert_eq!(store.read_logs(a.id, 0, 10).await.unwrap().len(), 1);

    // Queued again (crash recovery) and claimed again: the first start time stays, the new
    // worker and lease are taken, the seqs go on.
    let requeue = TaskChange::to(TaskStatus::Pending).at(Timestamp(60));
    assert_eq!(
        store
            .update_task_lean(a.id, TaskStatus::Running, requeue, Vec::new(), Vec::new())
            .await
            .unwrap(),
        1
    );
    let queued = store.get_task(a.id).await.unwrap();
    assert_eq!(queued.lease, None, "back to pending drops the lease");
    let again = claim_change("srv-3", 70);
    assert_eq!(
        lean_claim(&store, a.id, again.clone()).await,
        Claim::Claimed((), 2)
    );
    let restarted = store.get_task(a.id).await.unwrap();
    assert_eq!(restarted, applied(&queued, TaskStatus::Pending, &again));
    assert_eq!(restarted.started_at, Some(Timestamp(40)));
    assert_eq!(restarted.worker_id.as_deref(), Some("w-srv-3"));

    // What a lean claim refuses, as claim_task does.
    let bad = store
        .claim_task_lean(
            b.id,
            TaskChange::to(TaskStatus::Running),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput, "{bad}");
    let gone = store
        .claim_task_lean(
            TaskId::generate(),
            claim_change("srv-1", 80),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
}

/// A lean claim enqueues its deliveries in the claim's transaction; a delivery id that is
/// taken refuses the whole claim (`Conflict`) and nothing is written.
pub async fn lean_claims_enqueue_with_the_claim_or_not_at_all(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    store.create_session(new_session("s2", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 10)).await.unwrap();
    let b = store.create_task(new_task("s2", 2, 20)).await.unwrap();
    let first = push(1);
    let claimed = store
        .claim_task_lean(
            a.id,
            claim_change("srv-1", 30),
            events(&["running"]),
            vec![first.clone()],
        )
        .await
        .unwrap();
    assert_eq!(claimed, Claim::Claimed((), 1));
    assert_eq!(store.get_delivery(first.id).await.unwrap().task_id, a.id);
    // The same delivery id again: refused, b stays pending without events.
    let dup = store
        .claim_task_lean(
            b.id,
            claim_change("srv-1", 40),
            events(&["running"]),
            vec![push(2), first.clone()],
        )
        .await
        .unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::Conflict, "{dup}");
    assert_eq!(store.get_task(b.id).await.unwrap(), b);
    assert!(store.read_logs(b.id, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .list_deliveries(None, Page::first(10))
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A lean update stores exactly what `update_task` stores (the change applied to the row:
/// status, worker, lease, start and end times, the outcome's fields, an error), appends its
/// events and enqueues its deliveries in one transaction, and answers the log's last seq.
pub async fn lean_updates_store_what_the_change_sets(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 10)).await.unwrap();
    let id = a.id;
    let mut now = a.clone();
    let mut last = 0u64;
    // The task as it must be stored after `change`, and the log's last seq after `n` events.
    let mut step = |expected: TaskStatus, change: TaskChange, n: usize, now: &mut Task| {
        *now = applied(now, expected, &change);
        last += n as u64;
        (change, last)
    };
    let run = |store: Store, expected, change: TaskChange, n: usize, deliveries| async move {
        let kinds = vec!["e"; n];
        store
            .update_task_lean(id, expected, change, events(&kinds), deliveries)
            .await
    };
    // pending → running with a worker and a lease, one event.
    let (change, seq) = step(TaskStatus::Pending, claim_change("srv-1", 20), 1, &mut now);
    let got = run(store.clone(), TaskStatus::Pending, change, 1, Vec::new()).await;
    assert_eq!(got.unwrap(), seq);
    assert_eq!(store.get_task(a.id).await.unwrap(), now);

    // running → input_required with a renewed lease, two events.
    let change = TaskChange::to(TaskStatus::InputRequired)
        .at(Timestamp(30))
        .lease("srv-1", Timestamp(5000));
    let (change, seq) = step(TaskStatus::Running, change, 2, &mut now);
    let got = run(store.clone(), TaskStatus::Running, change, 2, Vec::new()).await;
    assert_eq!(got.unwrap(), seq);
    assert_eq!(store.get_task(a.id).await.unwrap(), now);

    // input_required → running, no events: the answer is the log's last seq; the start time
    // stays the first one.
    let change = TaskChange::to(TaskStatus::Running)
        .at(Timestamp(40))
        .lease("srv-1", Timestamp(6000));
    let (change, seq) = step(TaskStatus::InputRequired, change, 0, &mut now);
    let got = run(
        store.clone(),
        TaskStatus::InputRequired,
        change,
        0,
        Vec::new(),
    )
    .await;
    assert_eq!(got.unwrap(), seq);
    assert_eq!(store.get_task(a.id).await.unwrap(), now);
    assert_eq!(now.started_at, Some(Timestamp(20)));

    // What is refused, with nothing written: a lost compare-and-set, another lease, an
    // illegal change, an outcome of another status, an unknown task.
    let before = store.get_task(a.id).await.unwrap();
    let lost = run(
        store.clone(),
        TaskStatus::InputRequired,
        TaskChange::to(TaskStatus::Running),
        1,
        vec![push(9)],
    )
    .await
    .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Conflict, "{lost}");
    let other_lease = TaskChange::finish(TaskOutcome::failed("taken over")).if_lease(Some(Lease {
        owner: "srv-1".into(),
        expires_at: Timestamp(5000),
    }));
    let taken = run(
        store.clone(),
        TaskStatus::Running,
        other_lease,
        1,
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::Conflict, "{taken}");
    let illegal = run(
        store.clone(),
        TaskStatus::Running,
        TaskChange::to(TaskStatus::Running),
        1,
        Vec::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(illegal.kind(), ErrorKind::InvalidTransition, "{illegal}");
    let mut mismatch = TaskChange::finish(TaskOutcome::completed("x"));
    mismatch.status = TaskStatus::Failed;
    let mismatch = run(store.clone(), TaskStatus::Running, mismatch, 1, Vec::new())
        .await
        .unwrap_err();
    assert_eq!(mismatch.kind(), ErrorKind::InvalidInput, "{mismatch}");
    let gone = store
        .update_task_lean(
            TaskId::generate(),
            TaskStatus::Running,
            TaskChange::to(TaskStatus::Completed),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    assert_eq!(store.get_task(a.id).await.unwrap(), before);
    assert_eq!(store.read_logs(a.id, 0, 100).await.unwrap().len(), 3);
    assert!(
        store
            .list_deliveries(None, Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );

    // running → completed with every field of an outcome, under its current lease, with a
    // delivery: the outcome's fields, the end time, no lease.
    let outcome = TaskOutcome {
        result: Some("forty-two ✅".into()),
        structured_output: Some(json!({"answer": 42, "why": ["a", "b"]})),
        cost_usd: Some(0.25),
        usage: TokenUsage {
            input_tokens: 11,
            output_tokens: 22,
            cache_creation_input_tokens: 33,
            cache_read_input_tokens: 44,
        },
        num_turns: 3,
        duration_ms: 1234,
        ..TaskOutcome::completed("ignored")
    };
    let change = TaskChange::finish(outcome)
        .at(Timestamp(90))
        .if_lease(before.lease.clone());
    let (change, seq) = step(TaskStatus::Running, change, 2, &mut now);
    let delivery = push(1);
    let got = run(
        store.clone(),
        TaskStatus::Running,
        change,
        2,
        vec![delivery.clone()],
    )
    .await;
    assert_eq!(got.unwrap(), seq);
    let done = store.get_task(a.id).await.unwrap();
    assert_eq!(done, now);
    assert_eq!(done.lease, None);
    assert_eq!(done.finished_at, Some(Timestamp(90)));
    assert_eq!(done.usage.cache_read_input_tokens, 44);
    assert_eq!(store.get_delivery(delivery.id).await.unwrap().task_id, a.id);

    // A failure with an error of its own over the outcome's, from pending (never started).
    let b = store.create_task(new_task("s1", 2, 100)).await.unwrap();
    let mut change = TaskChange::finish(TaskOutcome::failed("the outcome's")).at(Timestamp(110));
    change.error = Some("the change's own".into());
    let want = applied(&b, TaskStatus::Pending, &change);
    let got = store
        .update_task_lean(b.id, TaskStatus::Pending, change, Vec::new(), Vec::new())
        .await
        .unwrap();
    assert_eq!(got, 0);
    let failed = store.get_task(b.id).await.unwrap();
    assert_eq!(failed, want);
    assert_eq!(failed.error.as_deref(), Some("the change's own"));
    assert_eq!(failed.started_at, None);
}
