//! What the SQLite writer and its checkpoints did, counted as they run: how long writes
//! waited for the writer, how long each group commit took, and each WAL checkpoint with its
//! time, so that a slow write can be put next to what held it up.
//! [`SqliteStore::writer_stats`](crate::SqliteStore::writer_stats) reads them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets of a [`Histogram`]: bucket `i` holds durations of `2^(i-1)` µs up to (not
/// including) `2^i` µs; bucket 0 under 1 µs; the last one everything from about 4 s.
pub const BUCKETS: usize = 24;

/// Checkpoints remembered with their times (the most recent ones).
const CHECKPOINTS_KEPT: usize = 4096;

/// Durations counted in power-of-two buckets of microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
        }
    }
}

impl Histogram {
    /// The bucket of `d`.
    fn bucket(d: Duration) -> usize {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }

    /// The end of bucket `i` (`2^i` µs).
    fn bound(i: usize) -> Duration {
        Duration::from_micros(1u64 << i)
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// An upper bound of the `q` quantile (0 ≤ q ≤ 1): the end of the bucket it falls in;
    /// zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        // The rank of the quantile, 1-based, as a whole number of samples.
        let rank = ((n as f64 * q.clamp(0.0, 1.0)).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bound(i);
            }
        }
        Self::bound(BUCKETS - 1)
    }

    /// How many durations were at least `d`, to the bucket: every duration of a bucket that
    /// starts at or after `d` (so `at_least(4 ms)` counts from 4.096 ms).
    pub fn at_least(&self, d: Duration) -> u64 {
        let from = Self::bucket(d);
        let from = if from > 0 && Self::bound(from - 1) < d {
            from + 1
        } else {
            from
        };
        self.counts.iter().skip(from).sum()
    }

    /// The counts added since `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut counts = [0; BUCKETS];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = self.counts[i].saturating_sub(earlier.counts[i]);
        }
        Histogram { counts }
    }
}

/// A [`Histogram`] that is counted into from several threads.
#[derive(Debug)]
pub(crate) struct AtomicHistogram([AtomicU64; BUCKETS]);

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl AtomicHistogram {
    pub(crate) fn record(&self, d: Duration) {
        self.0[Histogram::bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        Histogram {
            counts: std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)),
        }
    }
}

/// One WAL checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// When it started.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
    /// Whether the writer ran it (every write waited meanwhile), not the background task.
    pub by_writer: bool,
    /// The WAL's length then, in frames (pages); 0 if it failed.
    pub wal_frames: u64,
    /// How many of those frames are in the database file after it; 0 if it failed.
    pub checkpointed: u64,
}

/// What [`SqliteStore::writer_stats`](crate::SqliteStore::writer_stats) reports: counts since
/// the store was opened (take two and [`since`](Self::since) for an interval).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WriterStats {
    /// Writes the writer ran (group members and writes alone).
    pub writes: u64,
    /// Groups of writes the writer committed (a write alone counts as one).
    pub batches: u64,
    /// Calls the writes made to the writer connection's thread (sqlx runs each SQLite
    /// connection on a thread of its own: every call is a message to it and a wake-up of it,
    /// and one back), rollbacks after a failure included.
    pub calls: u64,
    /// From a write being queued to the writer to its group starting.
    pub queue_wait: Histogram,
    /// How long a group took, `BEGIN` to `COMMIT`, with no background checkpoint at the
    /// same time.
    pub batch_time: Histogram,
    /// How long a group took while a background checkpoint ran.
    pub batch_time_during_checkpoint: Histogram,
    /// Checkpoints the writer ran itself, between two groups.
    pub writer_checkpoints: u64,
    /// Writes queued before such a checkpoint ended that waited for it.
    pub writes_behind_checkpoint: u64,
    /// Checkpoints run in the background, on a read connection.
    pub background_checkpoints: u64,
    /// How long the writer's checkpoints took.
    pub writer_checkpoint_time: Histogram,
    /// How long the background checkpoints took.
    pub background_checkpoint_time: Histogram,
    /// The most recent checkpoints (up to 4,096), oldest first.
    pub checkpoints: Vec<Checkpoint>,
    /// Times the writer closed its connection after
    /// [`idle_close`](crate::SqliteOptions::idle_close) without work.
    pub idle_closes: u64,
}

impl WriterStats {
    /// What happened after `earlier` (a snapshot of the same store): the counts in between,
    /// and the checkpoints that started after its last one.
    pub fn since(&self, earlier: &WriterStats) -> WriterStats {
        let after = earlier.checkpoints.last().map(|c| c.at);
        WriterStats {
            writes: self.writes.saturating_sub(earlier.writes),
            batches: self.batches.saturating_sub(earlier.batches),
            calls: self.calls.saturating_sub(earlier.calls),
            queue_wait: self.queue_wait.since(&earlier.queue_wait),
            batch_time: self.batch_time.since(&earlier.batch_time),
            batch_time_during_checkpoint: self
                .batch_time_during_checkpoint
                .since(&earlier.batch_time_during_checkpoint),
            writer_checkpoints: self
                .writer_checkpoints
                .saturating_sub(earlier.writer_checkpoints),
            writes_behind_checkpoint: self
                .writes_behind_checkpoint
                .saturating_sub(earlier.writes_behind_checkpoint),
            background_checkpoints: self
                .background_checkpoints
                .saturating_sub(earlier.background_checkpoints),
            writer_checkpoint_time: self
                .writer_checkpoint_time
                .since(&earlier.writer_checkpoint_time),
            background_checkpoint_time: self
                .background_checkpoint_time
                .since(&earlier.background_checkpoint_time),
            checkpoints: self
                .checkpoints
                .iter()
                .filter(|c| after.is_none_or(|a| c.at > a))
                .copied()
                .collect(),
            idle_closes: self.idle_closes.saturating_sub(earlier.idle_closes),
        }
    }
}

/// The live counters behind [`WriterStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) writes: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) queue_wait: AtomicHistogram,
    pub(crate) batch_time: AtomicHistogram,
    pub(crate) batch_time_during_checkpoint: AtomicHistogram,
    pub(crate) writes_behind_checkpoint: AtomicU64,
    /// Background checkpoints started and ended: a group overlapped one when the two differ
    /// at its start, or the first moved while it ran.
    pub(crate) background_started: AtomicU64,
    pub(crate) background_ended: AtomicU64,
    pub(crate) idle_closes: AtomicU64,
    writer_checkpoint_time: AtomicHistogram,
    background_checkpoint_time: AtomicHistogram,
    checkpoints: Mutex<VecDeque<Checkpoint>>,
}

impl Counters {
    /// Records a checkpoint that started at `at` and has just ended with the WAL `frames`
    /// long, of which `frames.1` are checkpointed.
    pub(crate) fn checkpoint(&self, at: Instant, by_writer: bool, frames: (i64, i64)) {
        let took = at.elapsed();
        if by_writer {
            self.writer_checkpoint_time.record(took);
        } else {
            self.background_checkpoint_time.record(took);
        }
        let mut kept = self
            .checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() >= CHECKPOINTS_KEPT {
            kept.pop_front();
        }
        kept.push_back(Checkpoint {
            at,
            took,
            by_writer,
            wal_frames: u64::try_from(frames.0).unwrap_or(0),
            checkpointed: u64::try_from(frames.1).unwrap_or(0),
        });
    }

    pub(crate) fn snapshot(&self) -> WriterStats {
        let writer_checkpoint_time = self.writer_checkpoint_time.snapshot();
        let background_checkpoint_time = self.background_checkpoint_time.snapshot();
        WriterStats {
            writes: self.writes.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            queue_wait: self.queue_wait.snapshot(),
            batch_time: self.batch_time.snapshot(),
            batch_time_during_checkpoint: self.batch_time_during_checkpoint.snapshot(),
            writer_checkpoints: writer_checkpoint_time.count(),
            writes_behind_checkpoint: self.writes_behind_checkpoint.load(Ordering::Relaxed),
            background_checkpoints: background_checkpoint_time.count(),
            writer_checkpoint_time,
            background_checkpoint_time,
            checkpoints: self
                .checkpoints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .copied()
                .collect(),
            idle_closes: self.idle_closes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(durations: &[u64]) -> Histogram {
        let h = AtomicHistogram::default();
        for &us in durations {
            h.record(Duration::from_micros(us));
        }
        h.snapshot()
    }

    #[test]
    fn quantiles_are_bucket_ends() {
        let h = of(&[0, 1, 3, 100, 100, 100, 100, 100, 100, 5000]);
        assert_eq!(h.count(), 10);
        assert_eq!(h.quantile(0.1), Duration::from_micros(1));
        assert_eq!(h.quantile(0.5), Duration::from_micros(128));
        assert_eq!(h.quantile(1.0), Duration::from_micros(8192));
        assert_eq!(Histogram::default().quantile(0.99), Duration::ZERO);
    }

    #[test]
    fn at_least_counts_whole_buckets_from_the_bound() {
        let h = of(&[100, 3000, 4096, 5000, 9000, 10_000_000]);
        // 4096 µs starts a bucket: 4096, 5000 and 9000 and 10 s are counted, 3000 is not.
        assert_eq!(h.at_least(Duration::from_micros(4096)), 4);
        // 4 ms is inside the bucket 2048..4096: counting starts at 4096.
        assert_eq!(h.at_least(Duration::from_millis(4)), 4);
        assert_eq!(h.at_least(Duration::ZERO), 6);
        assert_eq!(h.at_least(Duration::from_secs(1)), 1);
        assert_eq!(h.at_least(Duration::from_secs(100)), 0);
    }

    #[test]
    fn since_subtracts_an_earlier_snapshot() {
        let c = Counters::default();
        c.queue_wait.record(Duration::from_micros(10));
        let t0 = Instant::now();
        c.checkpoint(t0, false, (10, 10));
        let before = c.snapshot();
        c.queue_wait.record(Duration::from_micros(10));
        c.queue_wait.record(Duration::from_millis(20));
        c.checkpoint(t0 + Duration::from_millis(1), true, (20, 12));
        let delta = c.snapshot().since(&before);
        assert_eq!(delta.queue_wait.count(), 2);
        assert_eq!(delta.queue_wait.at_least(Duration::from_millis(16)), 1);
        assert_eq!(delta.writer_checkpoints, 1);
        assert_eq!(delta.background_checkpoints, 0);
        assert_eq!(delta.checkpoints.len(), 1);
        assert!(delta.checkpoints[0].by_writer);
        assert_eq!(
            (
                delta.checkpoints[0].wal_frames,
                delta.checkpoints[0].checkpointed
            ),
            (20, 12)
        );
    }
}
