//! [`Backoff`] and the retries of calls that failed for a reason that may pass.

use std::time::Duration;

use anywork_core::{Error, ErrorKind, Result};

/// Retries of calls that failed for a reason that may pass (worker not up yet, connection
/// refused, 5xx). Build it with [`Backoff::new`] or start from [`Default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub initial: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
}

impl Backoff {
    /// `attempts` in all, waiting `initial` before the second, doubling up to `max`.
    pub fn new(attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            attempts,
            initial,
            max,
        }
    }

    /// One attempt, no retry.
    pub fn none() -> Self {
        Self::new(1, Duration::ZERO, Duration::ZERO)
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(5, Duration::from_millis(200), Duration::from_secs(5))
    }
}

/// Tries `call` again after retryable errors (and after a busy session's 409, which passes
/// when the worker's previous run ends).
pub(super) async fn retry<T, F, Fut>(policy: &Backoff, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    retry_if(policy, call, |e| {
        e.is_retryable() || e.kind() == ErrorKind::Conflict
    })
    .await
}

/// Calls `call` until it succeeds, fails with an error `again` refuses, or the attempts run
/// out, waiting as `policy` says between attempts.
pub(crate) async fn retry_if<T, F, Fut>(
    policy: &Backoff,
    mut call: F,
    again: impl Fn(&Error) -> bool,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < policy.attempts.max(1) && again(&e) => {
                tracing::debug!(attempt, error = %e, "retrying");
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff::new(10, Duration::from_millis(100), Duration::from_millis(500));
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(4), Duration::from_millis(500));
        assert_eq!(b.delay(40), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn retries_only_what_may_pass_and_only_as_often_as_allowed() {
        let policy = Backoff::new(3, Duration::from_millis(1), Duration::from_millis(1));
        let mut calls = 0;
        let r: Result<()> = retry(&policy, || {
            calls += 1;
            async { Err(Error::unavailable("down")) }
        })
        .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Unavailable);
        assert_eq!(calls, 3, "every attempt is made");
        let mut calls = 0;
        let r: Result<()> = retry(&policy, || {
            calls += 1;
            async { Err(Error::invalid_input("bad")) }
        })
        .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::InvalidInput);
        assert_eq!(calls, 1, "an error that cannot pass is not retried");
    }
}
