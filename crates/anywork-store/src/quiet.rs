//! What an idle one-process store need not look at again: a server polls the store for work
//! (claimable tasks each second, due deliveries each second, expired leases, settled
//! deliveries and the store's size now and then), and on an idle server every one of those
//! looks finds nothing. Each look that found nothing, where nothing can turn up without a
//! write, is kept with the store's [`Mark`]; until the mark moves the same look answers
//! "nothing" without a read, so an idle store opens no connection and its writer's and
//! readers' connections close ([`SqliteOptions::idle_close`](crate::SqliteOptions::idle_close)).
//!
//! The mark is the count of the writer's rounds that changed something: every write of the
//! store goes through its writer, and one process uses a SQLite file (docs/scaling.md; a
//! second server on the same `DB_DIR` is warned about at start, and its writes are not seen
//! here until this store writes too). The WAL file cannot stand in for other processes' writes:
//! the last connection to close deletes it, and a write transaction that changes no row may
//! still add a frame.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anywork_core::StoreSize;

/// A look that can come back empty for as long as nothing is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    /// `claimable`: a function of the rows alone.
    Claimable,
    /// `claim_deliveries`, when no delivery is open (none can fall due by time alone).
    Deliveries,
    /// `expired_leases`, when no active task has a lease (none can expire by time alone).
    Leases,
    /// `delete_settled_deliveries`, when no delivery is settled (none can age by time alone).
    Settled,
}

const LOOKS: usize = 4;

/// Where the store stood: nothing was written while it stays the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark(u64);

/// The looks that found nothing, and the database's pages last measured, each with its
/// [`Mark`].
#[derive(Debug)]
pub(crate) struct Quiet {
    /// Rounds of the writer that changed rows (a commit that wrote a row besides the
    /// readiness heartbeat, a maintenance statement).
    changes: AtomicU64,
    nothing: Mutex<[Option<Mark>; LOOKS]>,
    size: Mutex<Option<(Mark, StoreSize)>>,
}

impl Quiet {
    pub(crate) fn new() -> Self {
        Self {
            changes: AtomicU64::new(0),
            nothing: Mutex::new([None; LOOKS]),
            size: Mutex::new(None),
        }
    }

    /// Counts a round of the writer that changed something.
    pub(crate) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// The writer's rounds that changed something so far.
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Where the store stands now: taken before a look, so that a write during the look
    /// moves the mark past it.
    pub(crate) fn mark(&self) -> Mark {
        Mark(self.changes())
    }

    /// The mark to look from, or `None` when `look` found nothing at the mark the store
    /// still stands at: it would find nothing again.
    pub(crate) fn look(&self, look: Look) -> Option<Mark> {
        let now = self.mark();
        (lock(&self.nothing)[look as usize] != Some(now)).then_some(now)
    }

    /// `look`, begun at `at`, found nothing, and nothing can turn up without a write.
    pub(crate) fn found_nothing(&self, look: Look, at: Mark) {
        lock(&self.nothing)[look as usize] = Some(at);
    }

    /// The pages (in use, free) measured at a mark the store still stands at.
    pub(crate) fn size(&self, now: Mark) -> Option<StoreSize> {
        (*lock(&self.size)).and_then(|(at, size)| (at == now).then_some(size))
    }

    /// The pages (in use, free) measured at `at`.
    pub(crate) fn measured(&self, at: Mark, size: StoreSize) {
        *lock(&self.size) = Some((at, size));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
