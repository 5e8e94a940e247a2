//! Maps and sets keyed by [`TaskId`], hashed with foldhash rather than the standard SipHash.
//!
//! The dispatcher's runs, the hub's task channels and the hook queues are looked up several
//! times per task; SipHash-1-3 of a 16-byte id cost ≈ 200 instructions a lookup, foldhash a
//! few dozen. SipHash's guarantee (an adversary who chooses the keys cannot make them collide)
//! is not needed here: the keys are ids of stored tasks, which servers make
//! ([`TaskId::generate`]: a UUID v7 whose 74 random bits no client chooses), and each map still
//! gets a random seed (foldhash's `RandomState`). Maps whose keys clients may choose (session
//! ids, names) keep SipHash.

use std::collections::{HashMap, HashSet};

use anywork_core::TaskId;

/// The hasher of [`TaskMap`] and [`TaskSet`]: seeded per map from a per-process random seed.
pub(crate) type TaskIdHasher = foldhash::fast::RandomState;

/// A map keyed by task id (make one with `TaskMap::default()`).
pub(crate) type TaskMap<V> = HashMap<TaskId, V, TaskIdHasher>;

/// A set of task ids (make one with `TaskSet::default()`).
pub(crate) type TaskSet = HashSet<TaskId, TaskIdHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shrink::Shrink;

    #[test]
    fn a_task_map_finds_inserts_and_removes_every_id() {
        let ids: Vec<TaskId> = (0..10_000).map(|_| TaskId::generate()).collect();
        let mut map: TaskMap<usize> = TaskMap::default();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(map.insert(*id, i), None);
        }
        assert_eq!(map.len(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(map.get(id), Some(&i));
        }
        assert_eq!(map.get(&TaskId::generate()), None);
        for id in &ids[..9_990] {
            assert!(map.remove(id).is_some());
        }
        map.shrink_when_sparse();
        assert_eq!(map.len(), 10);
        assert!(map.capacity() < 1_000, "capacity {}", map.capacity());
        for (i, id) in ids.iter().enumerate().skip(9_990) {
            assert_eq!(map.get(id), Some(&i));
        }
        let set: TaskSet = ids.iter().copied().collect();
        assert_eq!(set.len(), ids.len());
        assert!(ids.iter().all(|id| set.contains(id)));
    }

    #[test]
    fn ids_made_in_the_same_millisecond_spread_over_the_buckets() {
        use std::hash::BuildHasher;
        // Ids made back to back share their timestamp; their hashes must still differ in the
        // low bits (the bucket) and the top 7 (hashbrown's tag).
        let hasher = TaskIdHasher::default();
        let hashes: Vec<u64> = (0..4_096)
            .map(|_| hasher.hash_one(TaskId::generate()))
            .collect();
        let buckets: HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            buckets.len() > 900,
            "{} of 1024 buckets used",
            buckets.len()
        );
        assert_eq!(tags.len(), 128, "{} of 128 tags used", tags.len());
    }
}
