//! Conformance cases of [`TaskStore::create_task_claimed`]: a new task stored already
//! claimed (`running`, with its worker, lease, events and deliveries) when it is its
//! session's turn and the reaper does not hold the session, else stored `pending` exactly as
//! `create_task` stores it. Part of [`store_conformance`](super), run by
//! [`store_conformance_tests!`](crate::store_conformance_tests).

use anywork_core::{Claim, DeliveryTarget, NewDelivery};

use super::*;

fn claim_change(owner: &str, at: i64) -> TaskChange {
    TaskChange::to(TaskStatus::Running)
        .at(Timestamp(at))
        .worker(format!("w-{owner}"))
        .lease(owner, Timestamp(at + 1000))
}

fn running() -> Vec<NewTaskLog> {
    vec![NewTaskLog::now(TaskEvent::Status {
        status: TaskStatus::Running,
    })]
}

fn push(n: u32) -> NewDelivery {
    NewDelivery::new(
        DeliveryTarget::Push {
            url: format!("https://hooks.example/{n}"),
            authorization: None,
            events: vec!["working".into()],
        },
        json!({ "n": n }),
    )
}

async fn create_claimed(
    store: &Store,
    new: NewTask,
    change: TaskChange,
    deliveries: Vec<NewDelivery>,
) -> (Task, Option<u64>) {
    store
        .create_task_claimed(new, change, running(), deliveries)
        .await
        .expect("create_task_claimed")
}

/// On a free session the task is stored claimed in the one write: the row is the new task
/// with the claim applied (running, worker, lease, start time), its event is seq 1, its
/// deliveries are enqueued, and the session is touched as `create_task` touches it.
pub async fn a_new_task_of_a_free_session_is_created_claimed(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let new = new_task("s1", 1, 10);
    let change = claim_change("srv-1", 10);
    let delivery = push(1);
    let (task, last) =
        create_claimed(&store, new.clone(), change.clone(), vec![delivery.clone()]).await;
    assert_eq!(last, Some(1));
    let mut want = new.into_task();
    change.apply(&mut want).expect("the change applies");
    assert_eq!(
        task, want,
        "the answer is the new task with the claim applied"
    );
    assert_eq!(store.get_task(task.id).await.unwrap(), want, "as stored");
    assert_eq!(task.status, TaskStatus::Running);
    assert_eq!(task.worker_id.as_deref(), Some("w-srv-1"));
    assert_eq!(task.lease.as_ref().map(|l| l.owner.as_str()), Some("srv-1"));
    assert_eq!(task.started_at, Some(Timestamp(10)));
    let logs = store.read_logs(task.id, 0, 10).await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(
        logs[0].event,
        TaskEvent::Status {
            status: TaskStatus::Running
        }
    );
    assert_eq!(
        store.get_delivery(delivery.id).await.unwrap().task_id,
        task.id
    );
    assert_eq!(
        store.get_session(&sid("s1")).await.unwrap().last_active,
        Timestamp(10)
    );
    // It holds its session as a claimed task does: the next one is not claimed.
    let (next, last) = create_claimed(
        &store,
        new_task("s1", 2, 20),
        claim_change("srv-1", 20),
        Vec::new(),
    )
    .await;
    assert_eq!(last, None);
    assert_eq!(next.status, TaskStatus::Pending);
}

/// When it is not the session's turn (a task of the session runs, or an older one is
/// pending) the task is stored `pending` as `create_task` stores it: no event, no delivery,
/// and it is claimed later as any pending task.
pub async fn a_new_task_that_must_wait_is_created_pending(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    store.create_session(new_session("s2", 1)).await.unwrap();
    // s1: a runs.
    let a = store.create_task(new_task("s1", 1, 10)).await.unwrap();
    let claimed = store
        .claim_task_lean(a.id, claim_change("srv-1", 11), running(), Vec::new())
        .await
        .unwrap();
    assert!(matches!(claimed, Claim::Claimed((), 1)), "{claimed:?}");
    let delivery = push(2);
    let new = new_task("s1", 2, 20);
    let (b, last) = create_claimed(
        &store,
        new.clone(),
        claim_change("srv-2", 20),
        vec![delivery.clone()],
    )
    .await;
    assert_eq!(last, None, "a runs");
    assert_eq!(b, new.into_task(), "stored as create_task stores it");
    assert_eq!(store.get_task(b.id).await.unwrap(), b);
    assert!(store.read_logs(b.id, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store.get_delivery(delivery.id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // s2: an older task is pending (accepted elsewhere, not started yet).
    let c = store.create_task(new_task("s2", 3, 30)).await.unwrap();
    let (d, last) = create_claimed(
        &store,
        new_task("s2", 4, 40),
        claim_change("srv-1", 40),
        Vec::new(),
    )
    .await;
    assert_eq!(last, None, "c is older");
    assert_eq!(store.task_status(d.id).await.unwrap(), TaskStatus::Pending);
    // c goes first, then d is claimed as usual.
    let first = store
        .claim_task_lean(d.id, claim_change("srv-1", 41), running(), Vec::new())
        .await
        .unwrap();
    assert!(
        matches!(first, Claim::NotFirst(ref t) if t.id == c.id),
        "{first:?}"
    );
    let claimed = store
        .claim_task_lean(c.id, claim_change("srv-1", 42), running(), Vec::new())
        .await
        .unwrap();
    assert!(matches!(claimed, Claim::Claimed((), 1)), "{claimed:?}");
}

/// A session the idle reaper holds (its worker being stopped) gets its new task `pending`:
/// its runner waits for the hold to end before it asks for a worker. Once the hold is
/// released the next new task is created claimed.
pub async fn a_new_task_of_a_held_session_is_created_pending(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let now = Timestamp::now();
    let until = now.plus_millis(60_000);
    assert!(
        store
            .hold_idle_session(&sid("s1"), "reaper-a", now, until)
            .await
            .unwrap()
    );
    let (a, last) = create_claimed(
        &store,
        new_task("s1", 1, 10),
        claim_change("srv-1", 10),
        Vec::new(),
    )
    .await;
    assert_eq!(last, None, "held");
    assert_eq!(
        store.task_status_for_start(a.id).await.unwrap(),
        (TaskStatus::Pending, Some(until))
    );
    store
        .update_task(
            a.id,
            TaskStatus::Pending,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    store
        .release_idle_hold(&sid("s1"), "reaper-a")
        .await
        .unwrap();
    let (b, last) = create_claimed(
        &store,
        new_task("s1", 2, 20),
        claim_change("srv-1", 20),
        Vec::new(),
    )
    .await;
    assert_eq!(last, Some(1), "released");
    assert_eq!(store.task_status(b.id).await.unwrap(), TaskStatus::Running);
}

/// The errors of `create_task` (nothing stored) and of a claim's change (`InvalidInput`).
pub async fn create_task_claimed_refuses_as_create_task_does(store: Store) {
    let unknown = store
        .create_task_claimed(
            new_task("nobody", 1, 10),
            claim_change("srv-1", 10),
            running(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    store.create_session(new_session("s1", 1)).await.unwrap();
    let (a, _) = create_claimed(
        &store,
        new_task("s1", 1, 10),
        claim_change("srv-1", 10),
        Vec::new(),
    )
    .await;
    let again = store
        .create_task_claimed(
            new_task("s1", 1, 20),
            claim_change("srv-1", 20),
            running(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Conflict, "{again}");
    assert_eq!(
        store.read_logs(a.id, 0, 10).await.unwrap().len(),
        1,
        "a is untouched"
    );
    let not_a_claim = store
        .create_task_claimed(
            new_task("s1", 2, 30),
            TaskChange::to(TaskStatus::Running),
            running(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(not_a_claim.kind(), ErrorKind::InvalidInput, "{not_a_claim}");
    assert_eq!(
        store
            .get_task(new_task("s1", 2, 30).id)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound,
        "nothing stored"
    );
}

/// A task of a session deleted since it was last seen (what a dispatcher that skips the
/// session's read before a chat relies on): `create_task` and `create_task_claimed` answer
/// `NotFound` as for a session that never was, and store nothing — no task, no event, no
/// delivery, and the session stays gone.
pub async fn a_task_of_a_deleted_session_is_refused_not_found(store: Store) {
    store.create_session(new_session("gone", 1)).await.unwrap();
    let (first, _) = create_claimed(
        &store,
        new_task("gone", 1, 10),
        claim_change("srv-1", 10),
        vec![push(1)],
    )
    .await;
    store.delete_session(&sid("gone")).await.unwrap();
    let deliveries = store.list_deliveries(None, Page::first(10)).await.unwrap();
    let plain = store
        .create_task(new_task("gone", 2, 20))
        .await
        .unwrap_err();
    assert_eq!(plain.kind(), ErrorKind::NotFound, "{plain}");
    let claimed = store
        .create_task_claimed(
            new_task("gone", 3, 30),
            claim_change("srv-1", 30),
            running(),
            vec![push(3)],
        )
        .await
        .unwrap_err();
    assert_eq!(claimed.kind(), ErrorKind::NotFound, "{claimed}");
    for n in [1, 2, 3] {
        assert_eq!(
            store
                .get_task(new_task("gone", n, 0).id)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound,
            "task {n}"
        );
        assert!(
            store
                .read_logs(new_task("gone", n, 0).id, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(first.id, new_task("gone", 1, 0).id);
    assert_eq!(
        store.list_deliveries(None, Page::first(10)).await.unwrap(),
        deliveries,
        "no delivery enqueued"
    );
    assert_eq!(
        store.get_session(&sid("gone")).await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "not created again"
    );
    assert!(
        store
            .tasks_by_session(&sid("gone"), Page::first(10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// `create_session_with_task_claimed`: the session and its first task in one write, the
/// task stored claimed (running, worker, lease, its event at seq 1, its deliveries) and the
/// session as `create_session_with_task` stores it; the task holds its session as a claimed
/// task does. A taken session id or task id is a `Conflict` that stores nothing (no session,
/// no task, no event, no delivery); a change that is not a claim's is `InvalidInput`.
pub async fn a_new_sessions_first_task_is_created_claimed(store: Store) {
    let session = new_session("first", 1);
    let new = new_task("first", 1, 10);
    let change = claim_change("srv-1", 10);
    let delivery = push(1);
    let (made, task, last) = store
        .create_session_with_task_claimed(
            session.clone(),
            new.clone(),
            change.clone(),
            running(),
            vec![delivery.clone()],
        )
        .await
        .expect("create_session_with_task_claimed");
    assert_eq!(last, Some(1));
    let mut want = new.into_task();
    change.apply(&mut want).expect("the change applies");
    assert_eq!(task, want, "the new task with the claim applied");
    assert_eq!(store.get_task(task.id).await.unwrap(), want, "as stored");
    assert_eq!(made, store.get_session(&sid("first")).await.unwrap());
    assert_eq!(made.last_active, Timestamp(10));
    assert_eq!(made.title, session.title);
    let logs = store.read_logs(task.id, 0, 10).await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(
        logs[0].event,
        TaskEvent::Status {
            status: TaskStatus::Running
        }
    );
    assert_eq!(
        store.get_delivery(delivery.id).await.unwrap().task_id,
        task.id
    );
    let (next, last) = create_claimed(
        &store,
        new_task("first", 2, 20),
        claim_change("srv-1", 20),
        Vec::new(),
    )
    .await;
    assert_eq!(last, None, "the first task holds its session");
    assert_eq!(next.status, TaskStatus::Pending);

    // Refusals store nothing.
    let deliveries = store.list_deliveries(None, Page::first(10)).await.unwrap();
    let taken_session = store
        .create_session_with_task_claimed(
            new_session("first", 2),
            new_task("first", 3, 30),
            claim_change("srv-1", 30),
            running(),
            vec![push(3)],
        )
        .await
        .unwrap_err();
    assert_eq!(taken_session.kind(), ErrorKind::Conflict, "{taken_session}");
    let taken_task = store
        .create_session_with_task_claimed(
            new_session("second", 2),
            new_task("second", 1, 30),
            claim_change("srv-1", 30),
            running(),
            vec![push(4)],
        )
        .await
        .unwrap_err();
    assert_eq!(taken_task.kind(), ErrorKind::Conflict, "{taken_task}");
    let not_a_claim = store
        .create_session_with_task_claimed(
            new_session("third", 2),
            new_task("third", 5, 30),
            TaskChange::to(TaskStatus::Running),
            running(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(not_a_claim.kind(), ErrorKind::InvalidInput, "{not_a_claim}");
    for s in ["second", "third"] {
        assert_eq!(
            store.get_session(&sid(s)).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "session {s}"
        );
    }
    for n in [3, 5] {
        assert_eq!(
            store
                .get_task(new_task("x", n, 0).id)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound,
            "task {n}"
        );
    }
    assert_eq!(
        store.read_logs(task.id, 0, 10).await.unwrap().len(),
        1,
        "the first task is untouched"
    );
    assert_eq!(
        store.list_deliveries(None, Page::first(10)).await.unwrap(),
        deliveries,
        "no delivery enqueued"
    );
}
