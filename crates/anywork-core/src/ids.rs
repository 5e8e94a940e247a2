//! Identifiers and timestamps.

use std::fmt;
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
        Self(Uuid::now_v7().to_string())
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
        Self(Uuid::now_v7())
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
}
