//! Conformance cases of the outbox (deliveries), idempotency keys, retention and readiness:
//! part of [`store_conformance`](super), run by
//! [`store_conformance_tests!`](crate::store_conformance_tests).

use std::collections::BTreeSet;

use anywork_core::{
    DeletedLogs, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, DeliveryTarget, NewDelivery,
};

use super::*;

fn github() -> DeliveryTarget {
    DeliveryTarget::Channel {
        channel_type: "github".into(),
    }
}

fn push(url: &str) -> DeliveryTarget {
    DeliveryTarget::Push {
        url: url.into(),
        authorization: Some("Bearer hook-s3cret".into()),
        events: vec!["completed".into(), "failed".into()],
    }
}

fn delivery(target: DeliveryTarget, n: u32, at: i64) -> NewDelivery {
    NewDelivery::new(target, json!({"n": n, "text": "Done ✅ — 完成"})).at(Timestamp(at))
}

/// A running task in session `s` (created if needed) with id `n`.
async fn running_task(store: &Store, s: &str, n: u128) -> Task {
    if store.get_session(&sid(s)).await.is_err() {
        store.create_session(new_session(s, 1)).await.unwrap();
    }
    let task = store.create_task(new_task(s, n, n as i64)).await.unwrap();
    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Running).at(Timestamp(5)),
        )
        .await
        .unwrap()
}

/// Finishes `task` (running) with a `done` event and enqueues `deliveries`.
async fn finish_with(store: &Store, task: &Task, at: i64, deliveries: Vec<NewDelivery>) -> Task {
    let outcome = TaskOutcome::completed("ok");
    store
        .update_task_and_enqueue(
            task.id,
            TaskStatus::Running,
            TaskChange::finish(outcome.clone()).at(Timestamp(at)),
            vec![NewTaskLog::now(TaskEvent::Done(outcome))],
            deliveries,
        )
        .await
        .unwrap()
        .0
}

async fn all_deliveries(store: &Store) -> Vec<Delivery> {
    store
        .list_deliveries(None, Page::first(1000))
        .await
        .expect("list deliveries")
}

fn ids(ds: &[Delivery]) -> Vec<DeliveryId> {
    ds.iter().map(|d| d.id).collect()
}

fn ids_of(ds: &[NewDelivery]) -> Vec<DeliveryId> {
    ds.iter().map(|d| d.id).collect()
}

/// A task with an idempotency key is stored once per `(channel_type, key)`: a second one is
/// `Conflict` and stores nothing; the first is found by the key.
pub async fn idempotency_keys_are_unique_per_channel(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let keyed = |n: u128, channel: &str, key: Option<&str>| {
        let mut t = new_task("s1", n, n as i64);
        t.channel_type = channel.into();
        t.idempotency_key = key.map(str::to_owned);
        t
    };
    let first = store
        .create_task(keyed(1, "github", Some("delivery-72d3")))
        .await
        .unwrap();
    assert_eq!(first.idempotency_key.as_deref(), Some("delivery-72d3"));
    assert_eq!(store.get_task(first.id).await.unwrap(), first);

    let again = store
        .create_task(keyed(2, "github", Some("delivery-72d3")))
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict);
    assert_eq!(
        store
            .get_task(TaskId(uuid_from(2)))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound,
        "the duplicate stored nothing"
    );
    let found = store
        .find_task_by_idempotency_key("github", "delivery-72d3")
        .await
        .unwrap();
    assert_eq!(found, Some(first.clone()));

    // The same key in another channel, and tasks without a key, never collide.
    store
        .create_task(keyed(3, "slack", Some("delivery-72d3")))
        .await
        .unwrap();
    store.create_task(keyed(4, "github", None)).await.unwrap();
    store.create_task(keyed(5, "github", None)).await.unwrap();
    assert!(
        store
            .find_task_by_idempotency_key("github", "other")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .find_task_by_idempotency_key("slack", "delivery-72d3")
            .await
            .unwrap()
            .map(|t| t.id),
        Some(TaskId(uuid_from(3)))
    );
    // Concurrent duplicates: exactly one wins.
    let racers: Vec<_> = (10..18u128)
        .map(|n| {
            let store = store.clone();
            let task = keyed(n, "slack", Some("Ev0123"));
            tokio::spawn(async move { store.create_task(task).await })
        })
        .collect();
    let mut wins = 0;
    for r in racers {
        match r.await.expect("join") {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{e}"),
        }
    }
    assert_eq!(wins, 1);
    // Deleting the session frees the keys.
    store.delete_session(&sid("s1")).await.unwrap();
    assert!(
        store
            .find_task_by_idempotency_key("github", "delivery-72d3")
            .await
            .unwrap()
            .is_none()
    );
    store.create_session(new_session("s1", 1)).await.unwrap();
    store
        .create_task(keyed(6, "github", Some("delivery-72d3")))
        .await
        .unwrap();
}

/// `update_task_and_enqueue`: the status change, its events and the deliveries commit
/// together; a lost compare-and-set, an illegal move, an unknown task or a duplicate
/// delivery id enqueues nothing and changes nothing.
pub async fn deliveries_commit_with_the_status_change_or_not_at_all(store: Store) {
    let task = running_task(&store, "s1", 1).await;
    let outcome = TaskOutcome::completed("answer");
    let done = || vec![NewTaskLog::now(TaskEvent::Done(outcome.clone()))];
    let batch = || {
        vec![
            delivery(github(), 1, 50),
            delivery(push("http://h/cb"), 2, 50),
        ]
    };

    let lost = store
        .update_task_and_enqueue(
            task.id,
            TaskStatus::Pending,
            TaskChange::finish(outcome.clone()),
            done(),
            batch(),
        )
        .await
        .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Conflict);
    assert_eq!(
        store.get_task(task.id).await.unwrap().status,
        TaskStatus::Running
    );
    assert!(store.read_logs(task.id, 0, 10).await.unwrap().is_empty());
    assert!(
        all_deliveries(&store).await.is_empty(),
        "a lost CAS enqueues nothing"
    );
    let missing = store
        .update_task_and_enqueue(
            TaskId(uuid_from(404)),
            TaskStatus::Running,
            TaskChange::finish(outcome.clone()),
            done(),
            batch(),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
    assert!(all_deliveries(&store).await.is_empty());

    // A fresh task, finished with its deliveries.
    let other = running_task(&store, "s1", 2).await;
    let wanted = vec![
        delivery(github(), 10, 60),
        delivery(push("https://example.com/hook?x=1"), 11, 60),
    ];
    let (finished, last) = store
        .update_task_and_enqueue(
            other.id,
            TaskStatus::Running,
            TaskChange::finish(outcome.clone()).at(Timestamp(60)),
            done(),
            wanted.clone(),
        )
        .await
        .unwrap();
    assert_eq!(finished.status, TaskStatus::Completed);
    assert_eq!(last, 1);
    for new in &wanted {
        let stored = store.get_delivery(new.id).await.unwrap();
        assert_eq!(
            stored,
            new.clone().into_delivery(other.id),
            "every field kept"
        );
        assert_eq!(stored.idempotency_key(), new.id.to_string());
    }
    // An illegal move (completed → running) enqueues nothing.
    let illegal = store
        .update_task_and_enqueue(
            other.id,
            TaskStatus::Completed,
            TaskChange::to(TaskStatus::Running),
            done(),
            vec![delivery(github(), 12, 70)],
        )
        .await
        .unwrap_err();
    assert_eq!(illegal.kind(), ErrorKind::InvalidTransition);
    // A delivery id that exists fails the whole call: no change, no event.
    let third = running_task(&store, "s1", 3).await;
    let mut dup = delivery(github(), 13, 70);
    dup.id = wanted[0].id;
    let err = store
        .update_task_and_enqueue(
            third.id,
            TaskStatus::Running,
            TaskChange::finish(outcome.clone()),
            done(),
            vec![delivery(github(), 14, 70), dup],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        store.get_task(third.id).await.unwrap().status,
        TaskStatus::Running
    );
    assert!(store.read_logs(third.id, 0, 10).await.unwrap().is_empty());
    assert_eq!(ids(&all_deliveries(&store).await), ids_of(&wanted));
    assert_eq!(
        store
            .get_delivery(DeliveryId(uuid_from(999)))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    // Without deliveries it is `update_task_and_append`.
    let (t, last) = store
        .update_task_and_enqueue(
            third.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!((t.status, last), (TaskStatus::InputRequired, 0));
    // Deleting the session deletes its tasks' deliveries.
    store.delete_session(&sid("s1")).await.unwrap();
    assert!(all_deliveries(&store).await.is_empty());
}

/// Concurrent claimers never hold one delivery at the same time; a claim that runs out lets
/// another claimer take the delivery, and the first one's late result is refused.
pub async fn one_claimer_per_delivery_and_expired_claims_move_on(store: Store) {
    const TASKS: u128 = 24;
    let mut enqueued = BTreeSet::new();
    for n in 1..=TASKS {
        let task = running_task(&store, "s1", n).await;
        let d = delivery(github(), n as u32, 100);
        enqueued.insert(d.id);
        finish_with(&store, &task, 100, vec![d]).await;
    }
    let claimers: Vec<_> = (0..4)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = store
                        .claim_deliveries(&format!("srv-{c}"), Timestamp(200), Timestamp(1000), 3)
                        .await
                        .expect("claim");
                    if batch.is_empty() {
                        return got;
                    }
                    for d in &batch {
                        let claim = d.claim.as_ref().expect("claimed rows carry their claim");
                        assert_eq!(claim.owner, format!("srv-{c}"));
                        assert_eq!(claim.expires_at, Timestamp(1000));
                    }
                    got.extend(batch.into_iter().map(|d| d.id));
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for c in claimers {
        seen.extend(c.await.expect("join"));
    }
    assert_eq!(
        seen.len(),
        enqueued.len(),
        "each delivery claimed exactly once"
    );
    assert_eq!(seen.iter().copied().collect::<BTreeSet<_>>(), enqueued);

    // Everything is held until 1000.
    assert!(
        store
            .claim_deliveries("srv-x", Timestamp(999), Timestamp(2000), 100)
            .await
            .unwrap()
            .is_empty()
    );
    // The claims run out at 1000: another server takes them over.
    let taken = store
        .claim_deliveries("srv-x", Timestamp(1000), Timestamp(2000), 100)
        .await
        .unwrap();
    assert_eq!(ids(&taken).into_iter().collect::<BTreeSet<_>>(), enqueued);
    let first = taken[0].id;
    let old_owner = store.get_delivery(first).await.unwrap();
    assert_eq!(old_owner.claim.as_ref().unwrap().owner, "srv-x");
    // The old holder's late result is refused and changes nothing.
    let mut refused = 0;
    for c in 0..4 {
        if let Err(e) = store
            .record_delivery_attempt(
                first,
                &format!("srv-{c}"),
                DeliveryAttempt::Sent,
                Timestamp(1001),
            )
            .await
        {
            assert_eq!(e.kind(), ErrorKind::Conflict);
            refused += 1;
        }
    }
    assert_eq!(refused, 4);
    assert_eq!(store.get_delivery(first).await.unwrap(), old_owner);
    let sent = store
        .record_delivery_attempt(first, "srv-x", DeliveryAttempt::Sent, Timestamp(1002))
        .await
        .unwrap();
    assert_eq!(sent.status, DeliveryStatus::Sent);
    assert_eq!((sent.attempts, sent.claim.clone()), (1, None));
    assert_eq!(sent.updated_at, Timestamp(1002));
    assert_eq!(store.get_delivery(first).await.unwrap(), sent);
    // A sent delivery is never claimed again, even once every claim ran out.
    let rest = store
        .claim_deliveries("srv-y", Timestamp(5000), Timestamp(6000), 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), enqueued.len() - 1);
    assert!(!ids(&rest).contains(&first));
    assert!(
        store
            .claim_deliveries("srv-y", Timestamp(5000), Timestamp(6000), 0)
            .await
            .unwrap()
            .is_empty(),
        "limit 0 claims nothing"
    );
}

/// Claims take due deliveries only, earliest due first; one task's deliveries to one target
/// go out one at a time in enqueue order, while other targets and tasks proceed.
pub async fn deliveries_are_claimed_due_first_and_in_order_per_target(store: Store) {
    let a = running_task(&store, "s1", 1).await;
    let (a1, a2, a3) = (
        delivery(github(), 1, 100),
        delivery(github(), 2, 100),
        delivery(github(), 3, 100),
    );
    let a_push = delivery(push("http://h/a"), 4, 100);
    finish_with(
        &store,
        &a,
        100,
        vec![a1.clone(), a2.clone(), a_push.clone(), a3.clone()],
    )
    .await;
    let b = running_task(&store, "s1", 2).await;
    let b1 = delivery(github(), 5, 50); // due earlier than all of `a`'s
    let b_later = delivery(push("http://h/b"), 6, 300); // not due before 300
    finish_with(&store, &b, 50, vec![b1.clone(), b_later.clone()]).await;

    assert!(
        store
            .claim_deliveries("srv", Timestamp(49), Timestamp(60), 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing is due before 50"
    );
    // Claims held until 5000: nothing below is taken over.
    let first = store
        .claim_deliveries("srv", Timestamp(100), Timestamp(5000), 1)
        .await
        .unwrap();
    assert_eq!(ids(&first), vec![b1.id], "earliest due first");
    let next = store
        .claim_deliveries("srv", Timestamp(100), Timestamp(5000), 10)
        .await
        .unwrap();
    assert_eq!(
        ids(&next),
        vec![a1.id, a_push.id],
        "a2 and a3 wait for a1; the push to another target does not; b_later is not due"
    );
    // a1 fails: retried at 200. Until then a2 and a3 stay behind it.
    store
        .record_delivery_attempt(
            a1.id,
            "srv",
            DeliveryAttempt::Retry {
                error: "GitHub answered 502".into(),
                retry_at: Timestamp(200),
            },
            Timestamp(110),
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_deliveries("srv", Timestamp(199), Timestamp(5000), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store
        .claim_deliveries("srv", Timestamp(200), Timestamp(5000), 10)
        .await
        .unwrap();
    assert_eq!(ids(&again), vec![a1.id]);
    for d in [&a1, &a_push] {
        store
            .record_delivery_attempt(d.id, "srv", DeliveryAttempt::Sent, Timestamp(210))
            .await
            .unwrap();
    }
    let after = store
        .claim_deliveries("srv", Timestamp(300), Timestamp(5000), 10)
        .await
        .unwrap();
    assert_eq!(
        ids(&after),
        vec![a2.id, b_later.id],
        "a3 still waits for a2"
    );
    // A dead delivery no longer holds back the ones behind it.
    store
        .record_delivery_attempt(
            a2.id,
            "srv",
            DeliveryAttempt::Dead {
                error: "refused".into(),
            },
            Timestamp(310),
        )
        .await
        .unwrap();
    let last = store
        .claim_deliveries("srv", Timestamp(320), Timestamp(5000), 10)
        .await
        .unwrap();
    assert_eq!(ids(&last), vec![a3.id]);
}

/// Failed attempts count and carry their error; a dead delivery is never claimed, is listed
/// as dead, and goes back to pending with a fresh budget when retried by hand.
pub async fn failed_deliveries_retry_die_and_are_retried_by_hand(store: Store) {
    let task = running_task(&store, "s1", 1).await;
    let d = delivery(push("http://h/cb"), 1, 100);
    let other = delivery(github(), 2, 100);
    finish_with(&store, &task, 100, vec![d.clone(), other.clone()]).await;
    let claim = |at: i64| {
        let store = store.clone();
        async move {
            store
                .claim_deliveries("srv", Timestamp(at), Timestamp(at + 30), 10)
                .await
                .unwrap()
        }
    };
    assert_eq!(claim(100).await.len(), 2);
    store
        .record_delivery_attempt(other.id, "srv", DeliveryAttempt::Sent, Timestamp(101))
        .await
        .unwrap();
    let failed = store
        .record_delivery_attempt(
            d.id,
            "srv",
            DeliveryAttempt::Retry {
                error: "503 Service Unavailable 🙁".into(),
                retry_at: Timestamp(200),
            },
            Timestamp(101),
        )
        .await
        .unwrap();
    assert_eq!(failed.status, DeliveryStatus::Failed);
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.next_attempt_at, Timestamp(200));
    assert_eq!(
        failed.last_error.as_deref(),
        Some("503 Service Unavailable 🙁")
    );
    assert_eq!(failed.claim, None);
    assert_eq!(store.get_delivery(d.id).await.unwrap(), failed);
    assert_eq!(
        ids(&store
            .list_deliveries(Some(DeliveryStatus::Failed), Page::first(10))
            .await
            .unwrap()),
        vec![d.id]
    );
    assert_eq!(ids(&claim(200).await), vec![d.id]);
    let dead = store
        .record_delivery_attempt(
            d.id,
            "srv",
            DeliveryAttempt::Dead {
                error: "gave up after 2 attempts: 503".into(),
            },
            Timestamp(201),
        )
        .await
        .unwrap();
    assert_eq!((dead.status, dead.attempts), (DeliveryStatus::Dead, 2));
    assert!(claim(10_000).await.is_empty(), "dead is never claimed");
    assert_eq!(
        ids(&store
            .list_deliveries(Some(DeliveryStatus::Dead), Page::first(10))
            .await
            .unwrap()),
        vec![d.id]
    );
    // Settled deliveries take no more attempts.
    let late = store
        .record_delivery_attempt(d.id, "srv", DeliveryAttempt::Sent, Timestamp(202))
        .await
        .unwrap_err();
    assert_eq!(late.kind(), ErrorKind::Conflict);
    // Only dead ones are retried by hand.
    let not_dead = store
        .retry_delivery(other.id, Timestamp(300))
        .await
        .unwrap_err();
    assert_eq!(not_dead.kind(), ErrorKind::Conflict);
    let unknown = store
        .retry_delivery(DeliveryId(uuid_from(404)), Timestamp(300))
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    let unknown = store
        .record_delivery_attempt(
            DeliveryId(uuid_from(404)),
            "srv",
            DeliveryAttempt::Sent,
            Timestamp(1),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    let revived = store.retry_delivery(d.id, Timestamp(400)).await.unwrap();
    assert_eq!(revived.status, DeliveryStatus::Pending);
    assert_eq!(revived.attempts, 0, "a fresh budget");
    assert_eq!(revived.next_attempt_at, Timestamp(400));
    assert_eq!(revived.updated_at, Timestamp(400));
    assert_eq!(
        revived.last_error.as_deref(),
        Some("gave up after 2 attempts: 503"),
        "the last error is kept"
    );
    assert_eq!(store.get_delivery(d.id).await.unwrap(), revived);
    assert_eq!(
        store
            .retry_delivery(d.id, Timestamp(401))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Conflict
    );
    assert!(claim(399).await.is_empty());
    assert_eq!(ids(&claim(400).await), vec![d.id]);
    // Listing: all, by status, paged, in enqueue order.
    let all = all_deliveries(&store).await;
    assert_eq!(ids(&all), vec![d.id, other.id]);
    let page = store
        .list_deliveries(
            None,
            Page {
                limit: 1,
                offset: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(ids(&page), vec![other.id]);
    assert_eq!(
        ids(&store
            .list_deliveries(Some(DeliveryStatus::Sent), Page::first(10))
            .await
            .unwrap()),
        vec![other.id]
    );
    assert!(
        store
            .list_deliveries(Some(DeliveryStatus::Dead), Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Retention deletes the whole logs of tasks finished before the cutoff, oldest first, in
/// bounded batches; unfinished tasks and the task rows are never touched, and seqs go on.
pub async fn retention_deletes_whole_logs_of_finished_tasks_only(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let mut tasks = Vec::new();
    for n in 1..=6u128 {
        let t = store
            .create_task(new_task("s1", n, n as i64))
            .await
            .unwrap();
        store
            .append_logs(t.id, text_logs(&format!("t{n}-"), 10 * n as usize))
            .await
            .unwrap();
        tasks.push(t);
    }
    // 1 and 2 finished long ago (2 first), 3 finished recently, 4 runs, 5 waits for input,
    // 6 is pending.
    let finish = |i: usize, at: i64| {
        let store = store.clone();
        let id = tasks[i].id;
        async move {
            store
                .update_task(id, TaskStatus::Pending, TaskChange::to(TaskStatus::Running))
                .await
                .unwrap();
            store
                .update_task_and_append(
                    id,
                    TaskStatus::Running,
                    TaskChange::finish(TaskOutcome::completed("kept")).at(Timestamp(at)),
                    vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::completed(
                        "kept",
                    )))],
                )
                .await
                .unwrap();
        }
    };
    finish(0, 200).await;
    finish(1, 100).await;
    finish(2, 900).await;
    for (i, from, to) in [
        (3, TaskStatus::Pending, TaskStatus::Running),
        (4, TaskStatus::Pending, TaskStatus::Running),
        (4, TaskStatus::Running, TaskStatus::InputRequired),
    ] {
        store
            .update_task(tasks[i].id, from, TaskChange::to(to))
            .await
            .unwrap();
    }

    let deleted = store
        .delete_finished_logs(Timestamp(500), 1, Timestamp(7000))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        DeletedLogs {
            tasks: 1,
            events: 21
        },
        "task 2 (finished first): 20 events and its done"
    );
    assert!(
        store
            .read_logs(tasks[1].id, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.read_logs(tasks[0].id, 0, 100).await.unwrap().len(),
        11
    );
    let deleted = store
        .delete_finished_logs(Timestamp(500), 10, Timestamp(7001))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        DeletedLogs {
            tasks: 1,
            events: 11
        }
    );
    assert_eq!(
        store
            .delete_finished_logs(Timestamp(500), 10, Timestamp(7002))
            .await
            .unwrap(),
        DeletedLogs::default(),
        "nothing else finished before 500"
    );
    // The rows stay, stamped; everything else is as it was.
    let first = store.get_task(tasks[0].id).await.unwrap();
    assert_eq!(first.result.as_deref(), Some("kept"));
    assert_eq!(first.logs_deleted_at, Some(Timestamp(7001)));
    assert_eq!(
        store.get_task(tasks[1].id).await.unwrap().logs_deleted_at,
        Some(Timestamp(7000))
    );
    for (i, t) in tasks.iter().enumerate().skip(2) {
        let now = store.get_task(t.id).await.unwrap();
        assert_eq!(now.logs_deleted_at, None, "task {}", i + 1);
        let logs = all_logs(&store, t.id).await;
        let want = 10 * (i + 1) + usize::from(i == 2);
        assert_eq!(logs.len(), want, "task {}", i + 1);
    }
    // Seqs never repeat: an append after the deletion continues the numbering.
    let last = store
        .append_logs(tasks[0].id, text_logs("late", 1))
        .await
        .unwrap();
    assert_eq!(last, 12);
    // A cutoff in the future takes every finished task, never the unfinished ones.
    let deleted = store
        .delete_finished_logs(Timestamp(i64::MAX), 100, Timestamp(7003))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        DeletedLogs {
            tasks: 1,
            events: 31
        }
    );
    for t in &tasks[3..] {
        assert_eq!(store.get_task(t.id).await.unwrap().logs_deleted_at, None);
        assert!(!store.read_logs(t.id, 0, 1).await.unwrap().is_empty());
    }
    assert_eq!(
        store.list_sessions(Page::first(1)).await.unwrap()[0].task_count,
        6,
        "task rows are kept"
    );
}

/// Retention of deliveries: sent and dead ones last changed before the cutoff go, oldest
/// first, `limit` at a time; pending and failed ones stay whatever their age.
pub async fn settled_deliveries_are_deleted_by_age_open_ones_never(store: Store) {
    let task = running_task(&store, "s1", 1).await;
    let targets = ["http://h/1", "http://h/2", "http://h/3", "http://h/4"];
    let ds: Vec<NewDelivery> = targets
        .iter()
        .enumerate()
        .map(|(i, url)| delivery(push(url), i as u32, 100))
        .collect();
    finish_with(&store, &task, 100, ds.clone()).await;
    assert_eq!(
        store
            .claim_deliveries("srv", Timestamp(100), Timestamp(200), 10)
            .await
            .unwrap()
            .len(),
        4
    );
    let results = [
        (DeliveryAttempt::Sent, 110),
        (
            DeliveryAttempt::Dead {
                error: "410 Gone".into(),
            },
            120,
        ),
        (
            DeliveryAttempt::Retry {
                error: "timeout".into(),
                retry_at: Timestamp(10_000),
            },
            105,
        ),
        (DeliveryAttempt::Sent, 500),
    ];
    for (d, (attempt, at)) in ds.iter().zip(results) {
        store
            .record_delivery_attempt(d.id, "srv", attempt, Timestamp(at))
            .await
            .unwrap();
    }
    // ds[2] is failed (open) and ds[3] was sent after the cutoff.
    assert_eq!(
        store
            .delete_settled_deliveries(Timestamp(400), 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.get_delivery(ds[0].id).await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "the oldest settled one went first"
    );
    assert_eq!(
        store
            .delete_settled_deliveries(Timestamp(400), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .delete_settled_deliveries(Timestamp(400), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(ids(&all_deliveries(&store).await), vec![ds[2].id, ds[3].id]);
    assert_eq!(
        store
            .delete_settled_deliveries(Timestamp(i64::MAX), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ids(&all_deliveries(&store).await),
        vec![ds[2].id],
        "open ones stay"
    );
}

/// A working store is ready; its size, when it can tell, grows with what it holds; compaction
/// runs and frees no more than it could.
pub async fn readiness_size_and_compaction(store: Store) {
    store.check_ready().await.expect("a fresh store is ready");
    let before = store.store_size().await.unwrap();
    let task = session_with_task(&store, "s1", 1).await;
    // Incompressible text (PostgreSQL compresses large values).
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'!' + (seed % 90) as u8)
            })
            .collect()
    };
    for _ in 0..32 {
        let text = noise(64 * 1024);
        store
            .append_logs(task.id, vec![NewTaskLog::now(TaskEvent::text(text))])
            .await
            .unwrap();
    }
    store.check_ready().await.expect("still ready");
    let after = store.store_size().await.unwrap();
    assert_eq!(before.is_some(), after.is_some());
    if let (Some(before), Some(after)) = (before, after) {
        assert!(after.reclaimable_bytes <= after.bytes);
        assert!(
            after.bytes >= before.bytes + 1024 * 1024,
            "2 MiB of logs show in the size: {before:?} → {after:?}"
        );
    }
    store
        .update_task(
            task.id,
            TaskStatus::Pending,
            TaskChange::to(TaskStatus::Canceled),
        )
        .await
        .unwrap();
    store
        .delete_finished_logs(Timestamp(i64::MAX), 10, Timestamp::now())
        .await
        .unwrap();
    let grown = store.store_size().await.unwrap();
    let freed = store.compact().await.unwrap();
    let compacted = store.store_size().await.unwrap();
    if let (Some(grown), Some(compacted)) = (grown, compacted) {
        assert!(freed <= grown.bytes);
        assert!(compacted.reclaimable_bytes <= compacted.bytes);
    }
    store.check_ready().await.expect("ready after compaction");
}
