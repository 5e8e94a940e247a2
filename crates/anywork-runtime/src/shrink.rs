//! Giving back the room of a collection that emptied after a burst.
//!
//! A `HashMap`, `HashSet` or `VecDeque` keeps its largest capacity until it is dropped: the
//! dispatcher's maps of runs and session queues, the hub's task channels and the notice
//! watchers grew to 16,384 slots at 10,000 sessions running at once and kept them, idle, for
//! the server's life. [`Shrink::shrink_when_sparse`], called after removing entries, gives the
//! room back once at most a quarter of it is used (to twice what is used, so that a collection
//! that shrinks and grows around the same size does not reallocate at every removal), and
//! leaves small collections alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Capacity kept whatever the length: below it, shrinking saves too little to be worth a
/// reallocation.
pub(crate) const KEEP: usize = 64;

/// The capacity to shrink to, if `capacity` is sparse for `len`.
fn shrunk(len: usize, capacity: usize) -> Option<usize> {
    (capacity > KEEP && len.saturating_mul(4) <= capacity).then(|| len.saturating_mul(2))
}

/// A collection that can give back room it no longer uses.
pub(crate) trait Shrink {
    /// Shrinks the collection if at most a quarter of its capacity (and more than [`KEEP`]) is
    /// used. O(len) when it shrinks, which it does only after its length fell by half or more
    /// since it last grew or shrank.
    fn shrink_when_sparse(&mut self);
}

impl<K: Eq + Hash, V, S: BuildHasher> Shrink for HashMap<K, V, S> {
    fn shrink_when_sparse(&mut self) {
        if let Some(to) = shrunk(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

impl<T: Eq + Hash, S: BuildHasher> Shrink for HashSet<T, S> {
    fn shrink_when_sparse(&mut self) {
        if let Some(to) = shrunk(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

impl<T> Shrink for VecDeque<T> {
    fn shrink_when_sparse(&mut self) {
        if let Some(to) = shrunk(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

impl<T> Shrink for Vec<T> {
    fn shrink_when_sparse(&mut self) {
        if let Some(to) = shrunk(self.len(), self.capacity()) {
            self.shrink_to(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_that_empties_gives_its_room_back() {
        let mut map: HashMap<u64, [u8; 32]> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 32]);
        }
        assert!(map.capacity() >= 10_000);
        for i in 0..10_000 {
            map.remove(&i);
            map.shrink_when_sparse();
        }
        assert!(map.is_empty());
        assert!(
            map.capacity() <= KEEP,
            "an empty map kept room for {} entries",
            map.capacity()
        );
    }

    #[test]
    fn a_map_keeps_room_for_what_it_holds() {
        let mut map: HashMap<u64, u64> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, i);
        }
        // A thousand left: room for at most a few thousand, at least for them.
        for i in 1_000..10_000 {
            map.remove(&i);
            map.shrink_when_sparse();
        }
        assert_eq!(map.len(), 1_000);
        assert!(map.capacity() >= 1_000);
        assert!(map.capacity() <= 4_000, "kept {}", map.capacity());
        assert!((0..1_000).all(|i| map[&i] == i));
    }

    #[test]
    fn small_or_busy_collections_are_left_alone() {
        let mut map: HashMap<u64, u64> = (0..KEEP as u64 / 2).map(|i| (i, i)).collect();
        let capacity = map.capacity();
        assert!(capacity <= KEEP);
        map.clear();
        map.shrink_when_sparse();
        assert_eq!(map.capacity(), capacity, "a small map reallocated");

        let mut set: HashSet<u64> = (0..1_000).collect();
        // Half used: no reallocation (the room of removed entries stays until the next
        // growth, so the capacity reported drops a little, not by half).
        set.retain(|i| i % 2 == 0);
        set.shrink_when_sparse();
        assert!(set.capacity() > 1_500, "shrank to {}", set.capacity());
    }

    #[test]
    fn queues_and_vectors_shrink_too() {
        let mut queue: VecDeque<u64> = (0..10_000).collect();
        while queue.len() > 10 {
            queue.pop_front();
            queue.shrink_when_sparse();
        }
        assert!(queue.capacity() <= KEEP, "kept {}", queue.capacity());
        assert_eq!(
            queue.iter().copied().collect::<Vec<_>>(),
            (9_990..10_000).collect::<Vec<_>>()
        );

        let mut vec: Vec<u64> = (0..10_000).collect();
        vec.truncate(0);
        vec.shrink_when_sparse();
        assert_eq!(vec.capacity(), 0);
    }
}
