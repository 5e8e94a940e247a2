//! Identifiers and timestamps.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The id of a session: an opaque, non-empty string of at most 128 visible ASCII characters.
///
/// Sessions made by AnyWork get a UUID; channels may choose readable ids (`wh-1a2b3c4d`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl SessionId {
    /// The longest id accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// A fresh random id (a UUID v7, so ids sort roughly by creation).
    pub fn generate() -> Self {
        Self(new_v7().to_string())
    }

    /// Checks `id` and wraps it; refuses empty, over-long or non-printable ids.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(Error::invalid_input(format!(
                "session id must be 1 to {} characters long",
                Self::MAX_LEN
            )));
        }
        if !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid_input(
                "session id may only contain visible ASCII characters (no spaces)",
            ));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl From<SessionId> for String {
    fn from(value: SessionId) -> Self {
        value.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SessionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// The id of a task: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// A fresh id.
    pub fn generate() -> Self {
        Self(new_v7())
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for TaskId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| Error::invalid_input(format!("task id {s:?} is not a UUID: {e}")))
    }
}

/// A fresh UUID v7 (RFC 9562): 48 bits of Unix milliseconds, a 42-bit counter, 32 random bits.
///
/// Laid out as `uuid`'s `Uuid::now_v7` lays them (its counter in `rand_a` and the top of
/// `rand_b`, reseeded at random each millisecond and counted up within it), so the ids of
/// this process are unique and strictly increasing, also when the clock steps back (the
/// last millisecond is kept until the clock passes it). What differs is where the random
/// bits come from: `uuid` without its `fast-rng` feature asks the OS for 16 bytes for every
/// id (a `getrandom` syscall per task), this draws them from a keyed pseudo-random function
/// — std's [`RandomState`] (SipHash-1-3 under a 128-bit key the OS gave once per process)
/// of the id's millisecond and counter, which no two ids of the process share. Without the
/// key, the counter's start in a millisecond and the 32 low bits cannot be told from
/// random; as with `uuid`'s, ids made in one millisecond follow each other by counting.
pub fn new_v7() -> Uuid {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    static CLOCK: Mutex<V7Clock> = Mutex::new(V7Clock { ms: 0, counter: 0 });
    let key = KEY.get_or_init(RandomState::new);
    let draw = |ms: u64, counter: u64, purpose: u8| key.hash_one((ms, counter, purpose));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (ms, counter) = CLOCK
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .next(now, |ms| draw(ms, 0, V7_RESEED));
    v7_of(ms, counter, draw(ms, counter, V7_TAIL) as u32)
}

/// The width of a v7 id's counter (as `uuid`'s).
const V7_COUNTER_BITS: u32 = 42;
/// A reseeded counter keeps its top bit clear: room for 2^41 ids in its millisecond.
const V7_RESEED_MASK: u64 = (1 << (V7_COUNTER_BITS - 1)) - 1;
/// The pseudo-random function's inputs for a counter's seed and for an id's low bits.
const V7_RESEED: u8 = 0;
const V7_TAIL: u8 = 1;

/// The millisecond and counter of the last v7 id made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V7Clock {
    ms: u64,
    counter: u64,
}

impl V7Clock {
    /// The millisecond and counter of the next id at the clock's reading `now`: a fresh
    /// millisecond reseeds the counter with `seed(ms)`; otherwise (the same millisecond, or
    /// the clock behind the last id's) the counter goes on from the last, and when it runs
    /// past its 42 bits the id takes the next millisecond, reseeded.
    fn next(&mut self, now: u64, seed: impl Fn(u64) -> u64) -> (u64, u64) {
        if now > self.ms {
            self.ms = now;
            self.counter = seed(now) & V7_RESEED_MASK;
        } else {
            self.counter += 1;
            if self.counter >> V7_COUNTER_BITS != 0 {
                self.ms += 1;
                self.counter = seed(self.ms) & V7_RESEED_MASK;
            }
        }
        (self.ms, self.counter)
    }
}

/// The v7 id of millisecond `ms`, counter `counter` (42 bits) and random `tail`.
fn v7_of(ms: u64, counter: u64, tail: u32) -> Uuid {
    let ms = u128::from(ms) & ((1 << 48) - 1);
    let counter = u128::from(counter) & ((1 << V7_COUNTER_BITS) - 1);
    let rand_a = counter >> 30; // the counter's top 12 bits
    let rand_b = ((counter & ((1 << 30) - 1)) << 32) | u128::from(tail); // 62 bits
    Uuid::from_u128((ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
}

/// A point in time: milliseconds since the Unix epoch, UTC.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time of the system clock.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch (the unit of the original AnyWork's API).
    pub fn as_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked() {
        assert!(SessionId::new("owner/repo#12").is_ok());
        assert!(SessionId::new("").is_err());
        assert!(SessionId::new("has space").is_err());
        assert!(SessionId::new("x".repeat(129)).is_err());
        assert!(serde_json::from_str::<SessionId>("\"\"").is_err());
    }

    #[test]
    fn task_ids_parse_and_sort_by_creation() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<TaskId>().unwrap(), a);
        assert_eq!(
            "nope".parse::<TaskId>().unwrap_err().kind(),
            crate::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn v7_ids_carry_their_version_variant_and_millisecond() {
        let before = Timestamp::now().as_millis() as u64;
        let id = new_v7();
        let after = Timestamp::now().as_millis() as u64;
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let ms = (id.as_u128() >> 80) as u64;
        assert!(
            (before..=after).contains(&ms),
            "{before} <= {ms} <= {after}"
        );
        // `uuid` reads the same millisecond back.
        let (secs, nanos) = id.get_timestamp().expect("a v7 timestamp").to_unix();
        assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, ms);
        // A task id is one, in the text form clients know.
        let task = TaskId::generate().to_string();
        assert_eq!(task.len(), 36);
        assert_eq!(&task[14..15], "7");
        assert!(SessionId::generate().as_str().parse::<TaskId>().is_ok());
    }

    #[test]
    fn v7_ids_are_unique_and_increasing_across_threads() {
        let per_thread: Vec<Vec<Uuid>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..20_000).map(|_| new_v7()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ids in &per_thread {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per thread");
        }
        let all: std::collections::HashSet<Uuid> = per_thread.iter().flatten().copied().collect();
        assert_eq!(all.len(), 80_000, "no id made twice");
    }

    #[test]
    fn v7_ids_low_bits_and_counter_seeds_are_not_a_sequence() {
        let ids: Vec<u128> = (0..2_000).map(|_| new_v7().as_u128()).collect();
        // The 32 low bits: random per id, not counted.
        let tails: std::collections::HashSet<u32> = ids.iter().map(|&id| id as u32).collect();
        assert!(tails.len() > 1_990, "{} distinct of 2000", tails.len());
        let steps = ids
            .windows(2)
            .filter(|w| (w[1] as u32).wrapping_sub(w[0] as u32) == 1);
        assert!(steps.count() < 5);
    }

    #[test]
    fn a_v7_clock_counts_within_a_millisecond_and_never_goes_back() {
        let seed = |ms: u64| ms * 1_000 + u64::MAX / 2; // top bits set: the mask must clear them
        let mut clock = V7Clock { ms: 0, counter: 0 };
        let first = clock.next(100, seed);
        assert_eq!(first, (100, seed(100) & V7_RESEED_MASK));
        assert!(first.1 < 1 << 41);
        assert_eq!(clock.next(100, seed), (100, first.1 + 1));
        // The clock stepped back: the last millisecond goes on counting.
        assert_eq!(clock.next(90, seed), (100, first.1 + 2));
        // A later millisecond reseeds.
        assert_eq!(clock.next(101, seed), (101, seed(101) & V7_RESEED_MASK));
        // A counter at its last value: the next id takes the next millisecond.
        clock.counter = (1 << V7_COUNTER_BITS) - 1;
        assert_eq!(clock.next(101, seed), (102, seed(102) & V7_RESEED_MASK));
        let ids = [
            v7_of(101, (1 << V7_COUNTER_BITS) - 1, u32::MAX),
            v7_of(102, 0, 0),
        ];
        assert!(ids[0] < ids[1]);
    }

    #[test]
    fn a_v7_id_lays_out_its_fields() {
        let id = v7_of(0x0123_4567_89ab, 0x2aa_5555_5555, 0xdead_beef);
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id.to_string(), "01234567-89ab-7aa9-9555-5555deadbeef");
    }
}
