//! The HTTP client the GitHub and Slack channels share, and the one mapping of their answers
//! to [`ErrorKind`]s: network errors, 5xx and 429 (or GitHub's exhausted rate limit) are
//! retryable, with the server's `Retry-After` kept in [`Error::retry_after`]; other 4xx are
//! final. No token ever appears in an error.

use std::time::Duration;

use anywork_core::{Error, ErrorKind};
use reqwest::header::HeaderMap;

/// A client with timeouts suited to chat APIs.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .user_agent(concat!("anywork/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// The error of a request that got no answer.
pub fn network_error(service: &str, what: &str, e: &reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Unavailable
    };
    // reqwest's Display includes the URL, never headers: no token leaks here.
    Error::new(
        kind,
        format!("{service} could not be reached ({what}): {e}; it will be tried again"),
    )
}

/// The wait a response asks for: `Retry-After` in seconds, else (GitHub) the time until
/// `x-ratelimit-reset` when `x-ratelimit-remaining` is 0.
pub fn retry_after(headers: &HeaderMap, now: i64) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(secs) = get("retry-after").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs));
    }
    if get("x-ratelimit-remaining") == Some("0") {
        let reset: i64 = get("x-ratelimit-reset")?.parse().ok()?;
        return Some(Duration::from_secs(
            reset.saturating_sub(now).max(1).unsigned_abs(),
        ));
    }
    None
}

/// The error for an HTTP status that is not a success. `detail` is the API's own message
/// (never a secret); `auth_hint` says which setting to check on 401/403.
pub fn status_error(
    service: &str,
    what: &str,
    status: u16,
    headers: &HeaderMap,
    detail: &str,
    auth_hint: &str,
    now: i64,
) -> Error {
    let wait = retry_after(headers, now);
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {}", crate::text::truncate(detail, 300, "…"))
    };
    let (kind, next) = match status {
        429 => (
            ErrorKind::RateLimited,
            "it will be tried again later".to_owned(),
        ),
        403 if wait.is_some() => (
            ErrorKind::RateLimited,
            "it will be tried again later".to_owned(),
        ),
        500..=599 => (ErrorKind::Unavailable, "it will be tried again".to_owned()),
        401 | 403 => (ErrorKind::Unauthorized, auth_hint.to_owned()),
        404 => (
            ErrorKind::NotFound,
            "check that the target still exists and that the credentials can see it".to_owned(),
        ),
        408 => (ErrorKind::Timeout, "it will be tried again".to_owned()),
        _ => (
            ErrorKind::InvalidInput,
            "this request will not be sent again".to_owned(),
        ),
    };
    let mut e = Error::new(
        kind,
        format!("{service} answered {status} to {what}{detail}; {next}"),
    );
    if let Some(w) = wait {
        e = e.with_retry_after(w);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn statuses_map_to_kinds_a_retry_loop_can_use() {
        let e = status_error(
            "X",
            "POST /a",
            429,
            &headers(&[("retry-after", "7")]),
            "",
            "",
            0,
        );
        assert_eq!(e.kind(), ErrorKind::RateLimited);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(e.is_retryable());
        let e = status_error(
            "GitHub",
            "POST /a",
            403,
            &headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1030"),
            ]),
            "API rate limit exceeded",
            "",
            1000,
        );
        assert_eq!(e.kind(), ErrorKind::RateLimited);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
        let e = status_error(
            "X",
            "POST /a",
            403,
            &HeaderMap::new(),
            "nope",
            "check X_TOKEN",
            0,
        );
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        assert!(e.to_string().contains("check X_TOKEN") && !e.is_retryable());
        for (status, kind, retry) in [
            (500, ErrorKind::Unavailable, true),
            (503, ErrorKind::Unavailable, true),
            (401, ErrorKind::Unauthorized, false),
            (404, ErrorKind::NotFound, false),
            (422, ErrorKind::InvalidInput, false),
            (400, ErrorKind::InvalidInput, false),
        ] {
            let e = status_error("X", "GET /b", status, &HeaderMap::new(), "", "", 0);
            assert_eq!((e.kind(), e.is_retryable()), (kind, retry), "{status}");
        }
    }
}
