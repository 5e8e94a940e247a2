//! The cases of task claims: one running task per session, in FIFO order, across claimers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anywork_core::{
    Claim, ErrorKind, NewTaskLog, Task, TaskChange, TaskEvent, TaskId, TaskOutcome, TaskStatus,
    Timestamp,
};

use super::{Store, new_session, new_task, sid};

fn claim_change(owner: &str) -> TaskChange {
    TaskChange::to(TaskStatus::Running)
        .worker(format!("w-{owner}"))
        .lease(owner, Timestamp(i64::MAX / 2))
}

fn running_event() -> Vec<NewTaskLog> {
    vec![NewTaskLog::now(TaskEvent::Status {
        status: TaskStatus::Running,
    })]
}

fn id_of(claim: &Claim) -> (&'static str, TaskId) {
    match claim {
        Claim::Claimed(t, _) => ("claimed", t.id),
        Claim::Busy(t) => ("busy", t.id),
        Claim::NotFirst(t) => ("not_first", t.id),
        Claim::NotPending(t) => ("not_pending", t.id),
        _ => ("other", TaskId::generate()),
    }
}

async fn claim(store: &Store, task: &Task, owner: &str) -> Claim {
    store
        .claim_task(task.id, claim_change(owner), running_event(), Vec::new())
        .await
        .expect("claim")
}

/// A claim starts a session's oldest pending task, with its event, only while no task of the
/// session is running or waiting for input; otherwise it changes nothing and says why.
pub async fn claims_start_the_oldest_task_of_a_free_session(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    store.create_session(new_session("s2", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 10)).await.unwrap();
    let b = store.create_task(new_task("s1", 2, 20)).await.unwrap();
    let c = store.create_task(new_task("s2", 3, 30)).await.unwrap();
    let ids = |tasks: Vec<Task>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(store.claimable(10).await.unwrap()), vec![a.id, c.id]);
    assert_eq!(ids(store.claimable(1).await.unwrap()), vec![a.id]);

    // b is not first: a is older.
    assert_eq!(
        id_of(&claim(&store, &b, "srv-1").await),
        ("not_first", a.id)
    );
    assert_eq!(
        store.get_task(b.id).await.unwrap().status,
        TaskStatus::Pending
    );

    // a starts, with the lease, the worker and its event.
    let Claim::Claimed(started, last) = claim(&store, &a, "srv-1").await else {
        panic!("a is claimed");
    };
    assert_eq!(started.status, TaskStatus::Running);
    assert_eq!(started.lease.as_ref().unwrap().owner, "srv-1");
    assert_eq!(started.worker_id.as_deref(), Some("w-srv-1"));
    assert!(started.started_at.is_some());
    assert_eq!(last, 1);
    assert_eq!(store.get_task(a.id).await.unwrap(), started);
    let logs = store.read_logs(a.id, 0, 10).await.unwrap();
    assert_eq!(logs.len(), 1);
    assert!(matches!(
        logs[0].event,
        TaskEvent::Status {
            status: TaskStatus::Running
        }
    ));

    // While a runs (or waits for input), b waits; s2 is not held up.
    assert_eq!(id_of(&claim(&store, &b, "srv-2").await), ("busy", a.id));
    assert_eq!(
        id_of(&claim(&store, &a, "srv-2").await),
        ("not_pending", a.id)
    );
    assert_eq!(ids(store.claimable(10).await.unwrap()), vec![c.id]);
    store
        .update_task(
            a.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
        )
        .await
        .unwrap();
    assert_eq!(id_of(&claim(&store, &b, "srv-2").await), ("busy", a.id));
    assert_eq!(id_of(&claim(&store, &c, "srv-2").await), ("claimed", c.id));
    store
        .update_task(
            a.id,
            TaskStatus::InputRequired,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    assert_eq!(ids(store.claimable(10).await.unwrap()), vec![b.id]);
    assert_eq!(id_of(&claim(&store, &b, "srv-2").await), ("claimed", b.id));
    assert!(store.claimable(10).await.unwrap().is_empty());

    // What a claim refuses.
    let bad = store
        .claim_task(
            b.id,
            TaskChange::to(TaskStatus::Running),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput, "{bad}");
    let gone = store
        .claim_task(
            TaskId::generate(),
            claim_change("srv-1"),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
}

/// A claim refused both ways (an active task, and an older pending one) tells the active
/// task; without an active task it tells the oldest pending one, whatever the order the
/// session's tasks are listed in.
pub async fn an_active_task_is_told_before_an_older_pending_one(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    // `running` was accepted last, the two pending ones before it; `late` is the newest.
    let older = store.create_task(new_task("s1", 1, 5)).await.unwrap();
    let oldest = store.create_task(new_task("s1", 2, 1)).await.unwrap();
    let running = store.create_task(new_task("s1", 3, 9)).await.unwrap();
    let late = store.create_task(new_task("s1", 4, 20)).await.unwrap();
    store
        .update_task(
            running.id,
            TaskStatus::Pending,
            claim_change("srv-0").at(Timestamp(9)),
        )
        .await
        .unwrap();
    assert_eq!(
        id_of(&claim(&store, &late, "srv-1").await),
        ("busy", running.id)
    );
    assert_eq!(
        id_of(&claim(&store, &older, "srv-1").await),
        ("busy", running.id)
    );
    let lean = store
        .claim_task_lean(late.id, claim_change("srv-1"), running_event(), Vec::new())
        .await
        .unwrap();
    assert!(
        matches!(&lean, Claim::Busy(t) if t.id == running.id),
        "{lean:?}"
    );

    store
        .update_task(
            running.id,
            TaskStatus::Running,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    assert_eq!(
        id_of(&claim(&store, &late, "srv-1").await),
        ("not_first", oldest.id)
    );
    assert_eq!(
        id_of(&claim(&store, &older, "srv-1").await),
        ("not_first", oldest.id)
    );
}

/// Two claimers racing over the same sessions (as two servers do): every task starts exactly
/// once, in its session's order, and never while another task of its session runs.
pub async fn concurrent_claimers_start_one_task_per_session(store: Store) {
    concurrent_claimers(store, false).await;
}

/// [`concurrent_claimers_start_one_task_per_session`] with
/// [`claim_task_lean`](anywork_core::TaskStore::claim_task_lean).
pub async fn concurrent_lean_claimers_start_one_task_per_session(store: Store) {
    concurrent_claimers(store, true).await;
}

async fn concurrent_claimers(store: Store, lean: bool) {
    const SESSIONS: usize = 4;
    const PER_SESSION: usize = 6;
    let mut n = 0u128;
    for s in 0..SESSIONS {
        store
            .create_session(new_session(&format!("c{s}"), 1))
            .await
            .unwrap();
    }
    // Interleaved creation, so that sessions' tasks are mixed in time.
    for i in 0..PER_SESSION {
        for s in 0..SESSIONS {
            n += 1;
            store
                .create_task(new_task(&format!("c{s}"), n, (i * SESSIONS + s) as i64))
                .await
                .unwrap();
        }
    }
    let total = SESSIONS * PER_SESSION;
    // (session, task) in the order claims succeeded.
    let started: Arc<Mutex<Vec<(String, TaskId)>>> = Arc::default();
    let claimers: Vec<_> = ["srv-a", "srv-b"]
        .into_iter()
        .map(|owner| {
            let (store, started) = (store.clone(), started.clone());
            tokio::spawn(async move {
                let mut rounds = 0;
                while started.lock().unwrap().len() < total {
                    rounds += 1;
                    assert!(rounds < 10_000, "the claimers make no progress");
                    let candidates = store.claimable(100).await.expect("claimable");
                    for task in candidates {
                        let t = if lean {
                            let claimed = store
                                .claim_task_lean(
                                    task.id,
                                    claim_change(owner),
                                    running_event(),
                                    Vec::new(),
                                )
                                .await
                                .expect("lean claim");
                            let Claim::Claimed((), _) = claimed else {
                                continue;
                            };
                            task
                        } else {
                            let Claim::Claimed(t, _) = claim(&store, &task, owner).await else {
                                continue;
                            };
                            t
                        };
                        let active = store
                            .tasks_by_session(&t.session_id, anywork_core::Page::first(100))
                            .await
                            .unwrap()
                            .into_iter()
                            .filter(|o| {
                                matches!(o.status, TaskStatus::Running | TaskStatus::InputRequired)
                            })
                            .count();
                        assert_eq!(active, 1, "one running task in {}", t.session_id);
                        started
                            .lock()
                            .unwrap()
                            .push((t.session_id.to_string(), t.id));
                        tokio::task::yield_now().await;
                        store
                            .update_task(
                                t.id,
                                TaskStatus::Running,
                                TaskChange::finish(TaskOutcome::completed("ok")),
                            )
                            .await
                            .expect("finish");
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for c in claimers {
        c.await.expect("claimer");
    }
    let started = started.lock().unwrap().clone();
    assert_eq!(started.len(), total, "every task started once");
    let mut seen = std::collections::HashSet::new();
    assert!(
        started.iter().all(|(_, id)| seen.insert(*id)),
        "a task started twice"
    );
    let mut per_session: HashMap<String, Vec<TaskId>> = HashMap::new();
    for (s, id) in started {
        per_session.entry(s).or_default().push(id);
    }
    for (s, ids) in per_session {
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id.0);
        assert_eq!(ids, sorted, "session {s} ran in order");
    }
}

/// Taking over an expired lease is a compare-and-set on the lease too: it loses to the
/// owner's renewal that came first, and of two servers taking it over, one wins.
pub async fn taking_over_an_expired_lease_loses_to_a_renewal(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 1)).await.unwrap();
    let Claim::Claimed(a, _) = store
        .claim_task(
            a.id,
            TaskChange::to(TaskStatus::Running).lease("srv-1", Timestamp(100)),
            Vec::new(),
            Vec::new(),
        )
        .await
        .unwrap()
    else {
        panic!("claimed");
    };
    let expired = a.lease.clone();
    // The owner renews before the recovery's write lands: the recovery loses.
    store
        .renew_lease(a.id, "srv-1", Timestamp(300))
        .await
        .unwrap();
    let take_over =
        || TaskChange::finish(TaskOutcome::failed("its server stopped")).if_lease(expired.clone());
    let lost = store
        .update_task(a.id, TaskStatus::Running, take_over())
        .await
        .unwrap_err();
    assert_eq!(lost.kind(), ErrorKind::Conflict, "{lost}");
    assert_eq!(
        store.get_task(a.id).await.unwrap().status,
        TaskStatus::Running
    );
    // With the lease as read, two servers race: one wins.
    let current = store.get_task(a.id).await.unwrap().lease;
    let attempts: Vec<_> = (0..2)
        .map(|_| {
            let (store, lease) = (store.clone(), current.clone());
            tokio::spawn(async move {
                store
                    .update_task_and_append(
                        a.id,
                        TaskStatus::Running,
                        TaskChange::finish(TaskOutcome::failed("its server stopped"))
                            .if_lease(lease),
                        vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::failed(
                            "its server stopped",
                        )))],
                    )
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for a in attempts {
        match a.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.kind(), ErrorKind::Conflict, "{e}"),
        }
    }
    assert_eq!(wins, 1);
    let logs = store.read_logs(a.id, 0, 10).await.unwrap();
    assert_eq!(logs.len(), 1, "one done: {logs:?}");
}

/// `append_logs_while_active` appends while the task is pending, running or waiting for
/// input, and never after its end: a run appending while another server ends the task (a
/// cancel) either lands before the `done` or is refused with `Conflict`, so the log ends at
/// its one `done`.
pub async fn a_finished_task_takes_no_more_events(store: Store) {
    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 1)).await.unwrap();
    let text = |s: &str| vec![NewTaskLog::now(TaskEvent::text(s))];
    assert_eq!(
        store
            .append_logs_while_active(a.id, text("waiting"))
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        claim(&store, &a, "srv-1").await,
        Claim::Claimed(..)
    ));
    assert_eq!(
        store
            .append_logs_while_active(a.id, Vec::new())
            .await
            .unwrap(),
        2,
        "an empty append reads the last seq"
    );
    // One appender goes on while another server cancels the task.
    let appender = {
        let store = store.clone();
        tokio::spawn(async move {
            // Until refused: the end lands while this goes on.
            let mut i = 0u64;
            loop {
                let event = NewTaskLog::now(TaskEvent::text(format!("e{i}")));
                match store.append_logs_while_active(a.id, vec![event]).await {
                    Ok(_) => tokio::task::yield_now().await,
                    Err(e) => return e,
                }
                i += 1;
            }
        })
    };
    tokio::task::yield_now().await;
    store
        .update_task_and_append(
            a.id,
            TaskStatus::Running,
            TaskChange::finish(TaskOutcome::canceled()),
            vec![NewTaskLog::now(TaskEvent::Done(TaskOutcome::canceled()))],
        )
        .await
        .unwrap();
    let refused = appender.await.unwrap();
    assert_eq!(refused.kind(), ErrorKind::Conflict, "{refused}");
    let mut logs = Vec::new();
    loop {
        let page = store.read_logs(a.id, logs.len() as u64, 500).await.unwrap();
        if page.is_empty() {
            break;
        }
        logs.extend(page);
    }
    let seqs: Vec<u64> = logs.iter().map(|l| l.seq).collect();
    assert_eq!(
        seqs,
        (1..=logs.len() as u64).collect::<Vec<_>>(),
        "gap-free"
    );
    let dones = logs
        .iter()
        .filter(|l| matches!(l.event, TaskEvent::Done(_)))
        .count();
    assert_eq!(dones, 1);
    assert!(
        matches!(logs.last().map(|l| &l.event), Some(TaskEvent::Done(_))),
        "the done is last"
    );
    // Over: refused, also empty, and nothing lands.
    for logs in [text("late"), Vec::new()] {
        let e = store
            .append_logs_while_active(a.id, logs)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    }
    assert!(
        store
            .read_logs(a.id, seqs.len() as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let ghost = store
        .append_logs_while_active(TaskId::generate(), text("x"))
        .await
        .unwrap_err();
    assert_eq!(ghost.kind(), ErrorKind::NotFound, "{ghost}");
}

/// The idle reaper's hold: taken only on a session with no task pending, running or waiting
/// for input, and no live hold of another owner; told with the status of the session's tasks
/// until its owner lets go or it runs out.
pub async fn the_reaper_holds_only_idle_sessions(store: Store) {
    let (now, until) = (Timestamp(1_000), Timestamp(61_000));
    let err = store
        .hold_idle_session(&sid("nobody"), "reaper-a", now, until)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    store.create_session(new_session("s1", 1)).await.unwrap();
    let a = store.create_task(new_task("s1", 1, 1)).await.unwrap();
    assert_eq!(
        store.task_status_for_start(a.id).await.unwrap(),
        (TaskStatus::Pending, None)
    );
    // Pending, running, waiting for input: the session needs its worker.
    assert!(
        !store
            .hold_idle_session(&a.session_id, "reaper-a", now, until)
            .await
            .unwrap()
    );
    let Claim::Claimed(a, _) = claim(&store, &a, "srv-1").await else {
        panic!("claim")
    };
    assert!(
        !store
            .hold_idle_session(&a.session_id, "reaper-a", now, until)
            .await
            .unwrap()
    );
    let a = store
        .update_task(
            a.id,
            TaskStatus::Running,
            TaskChange::to(TaskStatus::InputRequired),
        )
        .await
        .unwrap();
    assert!(
        !store
            .hold_idle_session(&a.session_id, "reaper-a", now, until)
            .await
            .unwrap()
    );
    store
        .update_task(
            a.id,
            TaskStatus::InputRequired,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    assert_eq!(
        store.task_status_for_start(a.id).await.unwrap(),
        (TaskStatus::Canceled, None),
        "nothing held yet"
    );

    // Idle: held, and told with the session's tasks.
    assert!(
        store
            .hold_idle_session(&a.session_id, "reaper-a", now, until)
            .await
            .unwrap()
    );
    assert_eq!(
        store.task_status_for_start(a.id).await.unwrap(),
        (TaskStatus::Canceled, Some(until))
    );
    // A task may still be created meanwhile; its runner reads the hold.
    let b = store.create_task(new_task("s1", 2, 2)).await.unwrap();
    assert_eq!(
        store.task_status_for_start(b.id).await.unwrap(),
        (TaskStatus::Pending, Some(until))
    );
    store
        .update_task(
            b.id,
            TaskStatus::Pending,
            TaskChange::finish(TaskOutcome::canceled()),
        )
        .await
        .unwrap();
    // Another owner waits for the end of a live hold; the owner extends its own.
    assert!(
        !store
            .hold_idle_session(
                &a.session_id,
                "reaper-b",
                Timestamp(60_999),
                Timestamp(99_000)
            )
            .await
            .unwrap()
    );
    let longer = Timestamp(71_000);
    assert!(
        store
            .hold_idle_session(&a.session_id, "reaper-a", now, longer)
            .await
            .unwrap()
    );
    assert_eq!(
        store.task_status_for_start(b.id).await.unwrap(),
        (TaskStatus::Canceled, Some(longer))
    );
    // Only the owner lets go.
    store
        .release_idle_hold(&a.session_id, "reaper-b")
        .await
        .unwrap();
    assert_eq!(
        store.task_status_for_start(b.id).await.unwrap().1,
        Some(longer)
    );
    store
        .release_idle_hold(&a.session_id, "reaper-a")
        .await
        .unwrap();
    assert_eq!(store.task_status_for_start(b.id).await.unwrap().1, None);
    store
        .release_idle_hold(&a.session_id, "reaper-a")
        .await
        .unwrap();

    // A hold that ran out (its reaper died) is anybody's to take.
    assert!(
        store
            .hold_idle_session(&a.session_id, "reaper-a", now, until)
            .await
            .unwrap()
    );
    assert!(
        store
            .hold_idle_session(&a.session_id, "reaper-b", until, Timestamp(120_000))
            .await
            .unwrap()
    );
    assert_eq!(
        store.task_status_for_start(a.id).await.unwrap().1,
        Some(Timestamp(120_000))
    );
    let err = store
        .task_status_for_start(TaskId::generate())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A hold and a task created at the same moment never miss each other: either the hold is
/// refused (it saw the task), or the task's runner, reading after the task was stored, sees
/// the hold. Otherwise a reaper could stop the worker a new task has just been given.
pub async fn a_hold_and_a_new_task_never_miss_each_other(store: Store) {
    const ROUNDS: u128 = 40;
    let (now, until) = (Timestamp(1_000), Timestamp(61_000));
    let mut held = 0;
    for n in 1..=ROUNDS {
        let session = format!("race{n}");
        store
            .create_session(new_session(&session, 1))
            .await
            .unwrap();
        let reaper = {
            let store = store.clone();
            let id = sid(&session);
            tokio::spawn(async move {
                store
                    .hold_idle_session(&id, "reaper", now, until)
                    .await
                    .expect("hold")
            })
        };
        let runner = {
            let store = store.clone();
            tokio::spawn(async move {
                let task = store
                    .create_task(new_task(&session, n, 2))
                    .await
                    .expect("create");
                store.task_status_for_start(task.id).await.expect("read")
            })
        };
        let got_hold = reaper.await.expect("reaper");
        let (status, hold) = runner.await.expect("runner");
        assert_eq!(status, TaskStatus::Pending);
        if got_hold {
            held += 1;
            assert_eq!(hold, Some(until), "round {n}: the runner missed the hold");
        } else {
            assert_eq!(hold, None, "round {n}: refused, yet a hold is told");
        }
    }
    // Not asserted (the scheduler decides), but worth seeing when the case is run alone.
    eprintln!("{held} of {ROUNDS} holds came before their task");
}
