//! The one error type of AnyWork's libraries.

use std::fmt;
use std::time::Duration;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The session, task or worker named does not exist.
    NotFound,
    /// The thing exists already, or changed since it was read (a compare-and-set lost).
    Conflict,
    /// A task status change that the state machine does not allow.
    InvalidTransition,
    /// The caller's input is malformed or out of bounds; sending it again will not help.
    InvalidInput,
    /// A backend (database, worker, container engine, model API) cannot be reached now.
    Unavailable,
    /// Something took longer than its limit.
    Timeout,
    /// A backend refused for a limit or quota (HTTP 429, container quota).
    RateLimited,
    /// The operation was canceled.
    Canceled,
    /// The caller is not allowed (failed webhook signature, wrong credentials).
    Unauthorized,
    /// A backend answered in a way that breaks its contract.
    Protocol,
    /// A storage backend failed for a reason other than the above.
    Storage,
    /// A bug or an unexpected state inside AnyWork.
    Internal,
}

impl ErrorKind {
    /// A short stable name, e.g. for JSON error codes (`not_found`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidTransition => "invalid_transition",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Canceled => "canceled",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Storage => "storage",
            ErrorKind::Internal => "internal",
        }
    }

    /// The HTTP status an API answers with for this kind: the one place this mapping is
    /// made, for the worker's and the server's APIs alike.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict | ErrorKind::InvalidTransition | ErrorKind::Canceled => 409,
            ErrorKind::InvalidInput => 400,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::RateLimited => 429,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Protocol => 502,
            ErrorKind::Storage | ErrorKind::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a [`kind`](Error::kind) to match on, a message for people, and an optional cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    retry_after: Option<Duration>,
}

/// `Result` with AnyWork's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message that says what to do next.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
            retry_after: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::RateLimited
        )
    }

    /// Records how long the backend asked to wait before the next try (HTTP `Retry-After`).
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// How long the backend asked to wait before trying again, when it said so (a 429's or
    /// 503's `Retry-After`). A retry loop waits at least this long.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// [`ErrorKind::Unauthorized`].
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }

    /// [`ErrorKind::Storage`].
    pub fn storage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Storage, message)
    }

    /// [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::invalid_input(format!("invalid JSON: {e}")).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_kinds() {
        assert!(Error::unavailable("db down").is_retryable());
        assert!(Error::new(ErrorKind::RateLimited, "429").is_retryable());
        assert!(!Error::not_found("no task").is_retryable());
        assert!(!Error::invalid_input("bad").is_retryable());
    }

    #[test]
    fn retry_after_is_carried() {
        let e = Error::new(ErrorKind::RateLimited, "429").with_retry_after(Duration::from_secs(7));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(e.is_retryable());
        assert_eq!(Error::unavailable("x").retry_after(), None);
        assert_eq!(Error::unauthorized("x").kind(), ErrorKind::Unauthorized);
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::other("disk");
        let e = Error::storage("write failed").with_source(io);
        assert_eq!(e.to_string(), "write failed");
        assert_eq!(std::error::Error::source(&e).unwrap().to_string(), "disk");
    }
}
