//! What the per-session drivers (Docker, Kubernetes) share: names derived from session ids,
//! one creation at a time per session, readiness through the worker's `/health`, and the idle
//! clock the reaper reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anywork_core::worker_api::{HEALTH_PATH, SECRET_HEADER, SESSIONS_PATH, WorkerHealth};
use anywork_core::{Error, ErrorKind, Result, SessionId, WorkerEndpoint};
use tokio::sync::OwnedMutexGuard;

/// A name fragment for `session_id` that container, volume, pod and label syntaxes all accept:
/// up to 24 lowercase alphanumerics and dashes from the id, then a dash and 12 hex digits of a
/// stable hash of the whole id (so ids that differ only in case or punctuation do not collide).
/// 37 characters at most; starts and ends with an alphanumeric.
pub fn session_slug(session_id: &SessionId) -> String {
    let mut slug = String::with_capacity(37);
    for c in session_id.as_str().chars() {
        if slug.len() == 24 {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    let hash = fnv1a64(session_id.as_str().as_bytes()) & 0xffff_ffff_ffff;
    if slug.is_empty() {
        format!("s-{hash:012x}")
    } else {
        format!("{slug}-{hash:012x}")
    }
}

/// FNV-1a, 64 bits: stable across processes and Rust versions (unlike `DefaultHasher`).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One lock per session: whoever holds it may create, adopt or remove that session's worker,
/// so concurrent `get_worker` calls for one session create one worker.
#[derive(Debug, Default)]
pub struct SessionLocks {
    locks: Mutex<HashMap<SessionId, Arc<tokio::sync::Mutex<()>>>>,
}

impl SessionLocks {
    /// Waits for `session_id`'s lock.
    pub async fn lock(&self, session_id: &SessionId) -> OwnedMutexGuard<()> {
        let m = lock(&self.locks)
            .entry(session_id.clone())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// Forgets the locks nobody holds or waits for (call now and then, e.g. from the reaper).
    pub fn prune(&self) {
        lock(&self.locks).retain(|_, m| Arc::strong_count(m) > 1);
    }
}

/// When each session last asked for its worker.
#[derive(Debug, Default)]
pub struct IdleClock {
    last_used: Mutex<HashMap<SessionId, Instant>>,
}

impl IdleClock {
    /// `session_id` uses its worker now.
    pub fn touch(&self, session_id: &SessionId) {
        lock(&self.last_used).insert(session_id.clone(), Instant::now());
    }

    /// How long `session_id` has not used its worker; a session never seen (a worker adopted
    /// after a restart) starts its clock now.
    pub fn idle_for(&self, session_id: &SessionId) -> Duration {
        lock(&self.last_used)
            .entry(session_id.clone())
            .or_insert_with(Instant::now)
            .elapsed()
    }

    /// `session_id` has no worker any more.
    pub fn forget(&self, session_id: &SessionId) {
        lock(&self.last_used).remove(session_id);
    }
}

/// Asks workers for `GET /health` (with their secret, so that they tell their busy sessions),
/// each request bounded by a timeout.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    client: reqwest::Client,
    timeout: Duration,
}

impl HealthCheck {
    /// Health checks that each give up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self { client, timeout })
    }

    /// The health of the worker at `endpoint`, or `None` if it does not answer in time or not
    /// with a 2xx and a health document.
    pub async fn check(&self, endpoint: &WorkerEndpoint) -> Option<WorkerHealth> {
        let mut request = self
            .client
            .get(format!("{}{HEALTH_PATH}", endpoint.base_url));
        if let Some(secret) = &endpoint.secret {
            request = request.header(SECRET_HEADER, secret.expose());
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// Polls `endpoint`'s `/health` until it answers, for at most `within`.
    pub async fn wait_ready(
        &self,
        endpoint: &WorkerEndpoint,
        within: Duration,
    ) -> Result<WorkerHealth> {
        let base_url = &endpoint.base_url;
        let deadline = Instant::now() + within;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(health) = self.check(endpoint).await {
                return Ok(health);
            }
            if Instant::now() + pause > deadline {
                // The address goes to the log only: this message reaches clients.
                tracing::warn!(%base_url, "a new worker did not answer GET {HEALTH_PATH} in time");
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the new worker did not answer GET {HEALTH_PATH} within {:.1} s \
                         (each try {:.1} s)",
                        within.as_secs_f64(),
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// Whether the workers' environment names a model: a key for the Claude Code or native
/// executor (`ANTHROPIC_API_KEY`, `API_KEY`, …) or the built-in demo. `where_to_set` tells
/// where the variables come from for this driver.
pub fn model_setup<'a>(
    vars: impl IntoIterator<Item = &'a str>,
    where_to_set: &str,
) -> anywork_core::SetupCheck {
    const KEYS: [&str; 5] = [
        "ANTHROPIC_API_KEY",
        "API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "DEMO",
    ];
    let found: Vec<&str> = vars.into_iter().filter(|v| KEYS.contains(v)).collect();
    if found.is_empty() {
        anywork_core::SetupCheck::problem(
            "model",
            format!(
                "no model is configured for the workers: every task will fail. Set \
                 ANTHROPIC_API_KEY (Claude Code or the native executor), or API_KEY with \
                 API_BASE_URL and MODEL (any OpenAI-compatible API), {where_to_set}"
            ),
        )
    } else {
        anywork_core::SetupCheck::ok("model", format!("workers get {}", found.join(", ")))
    }
}

/// `DELETE /sessions/:id` on the worker at `endpoint` (with its secret): the worker deletes
/// the session's whole workspace. `Conflict` while a task runs in it, `NotFound` when the worker
/// has no such route, `Unauthorized` when it refuses the secret.
pub async fn delete_session_workspace(
    client: &reqwest::Client,
    endpoint: &WorkerEndpoint,
    session_id: &SessionId,
) -> Result<()> {
    let mut url = reqwest::Url::parse(&endpoint.base_url)
        .map_err(|e| Error::internal(format!("worker URL {}: {e}", endpoint.base_url)))?;
    url.path_segments_mut()
        .map_err(|()| Error::internal(format!("worker URL {} has no path", endpoint.base_url)))?
        .pop_if_empty()
        .push(SESSIONS_PATH.trim_start_matches('/'))
        .push(session_id.as_str());
    let mut request = client.delete(url);
    if let Some(secret) = &endpoint.secret {
        request = request.header(SECRET_HEADER, secret.expose());
    }
    let response = request.send().await.map_err(|e| {
        Error::unavailable(format!(
            "worker {} did not answer DELETE /sessions/:id: {e}",
            endpoint.worker_id
        ))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let kind = match status.as_u16() {
        409 => ErrorKind::Conflict,
        404 | 405 => ErrorKind::NotFound,
        401 | 403 => ErrorKind::Unauthorized,
        _ => ErrorKind::Unavailable,
    };
    Err(Error::new(
        kind,
        format!(
            "worker {} answered DELETE /sessions/{session_id} with {status}: {}",
            endpoint.worker_id,
            body.chars().take(300).collect::<String>()
        ),
    ))
}

/// Whether an idle worker may be stopped: idle past `ttl` both in this driver's clock
/// (`idle_for`) and by the worker's own account (its `/health`'s `idle_ms`: another
/// server may have used it since this one did), no busy task for its session in the
/// dispatcher's view (`busy`), and its `/health` (when it answers) reports no busy session.
pub fn may_reap(
    session_id: &SessionId,
    idle_for: Duration,
    ttl: Duration,
    busy: &[SessionId],
    health: Option<&WorkerHealth>,
) -> bool {
    let worker_idle = health
        .and_then(|h| h.idle_ms)
        .map_or(Duration::MAX, Duration::from_millis);
    idle_for.min(worker_idle) >= ttl
        && !busy.contains(session_id)
        && health.is_none_or(|h| h.busy_sessions.is_empty())
}

/// How long ago `at` was, an RFC 3339 UTC time as container engines write it
/// (`2026-11-25T11:00:00.123456789Z`); `None` if it does not parse or lies ahead.
pub fn age_of_rfc3339(at: &str, now: std::time::SystemTime) -> Option<Duration> {
    let rest = at.strip_suffix('Z')?;
    let (date, time) = rest.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(str::parse::<i64>);
    let (h, m, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from 1970-01-01 to the date (proleptic Gregorian calendar).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()?;
    let then = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    now.duration_since(then).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    #[test]
    fn slugs_are_valid_names_and_do_not_collide() {
        let ids = [
            "Web_123",
            "web-123",
            "owner/repo#12",
            "OWNER/REPO#12",
            "---",
            "a".repeat(128).as_str(),
            "019a7c2e-7f1b-7d3a-9c1e-3f2b1a0c9d8e",
        ]
        .map(sid);
        let slugs: Vec<String> = ids.iter().map(session_slug).collect();
        for s in &slugs {
            assert!(s.len() <= 37, "{s}");
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
            assert!(s.starts_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
            assert!(s.ends_with(|c: char| c.is_ascii_alphanumeric()), "{s}");
        }
        let unique: std::collections::HashSet<_> = slugs.iter().collect();
        assert_eq!(unique.len(), slugs.len(), "{slugs:?}");
        assert_eq!(session_slug(&sid("owner/repo#12")), slugs[2], "stable");
        assert!(slugs[2].starts_with("owner-repo-12-"));
    }

    #[test]
    fn busy_or_recent_workers_are_not_reaped() {
        let s = sid("s1");
        let ttl = Duration::from_secs(60);
        let idle = Duration::from_secs(61);
        let health = |busy: Vec<SessionId>| WorkerHealth {
            status: "ok".into(),
            version: "0".into(),
            executor: "native".into(),
            busy_sessions: busy,
            idle_ms: None,
        };
        assert!(may_reap(&s, idle, ttl, &[], None));
        assert!(may_reap(
            &s,
            idle,
            ttl,
            &[sid("other")],
            Some(&health(vec![]))
        ));
        assert!(!may_reap(&s, Duration::from_secs(59), ttl, &[], None));
        assert!(!may_reap(&s, idle, ttl, std::slice::from_ref(&s), None));
        assert!(!may_reap(
            &s,
            idle,
            ttl,
            &[],
            Some(&health(vec![s.clone()]))
        ));
        // Another server used the worker 10 s ago: not idle, whatever this driver's clock says.
        let used_elsewhere = WorkerHealth {
            idle_ms: Some(10_000),
            ..health(vec![])
        };
        assert!(!may_reap(&s, idle, ttl, &[], Some(&used_elsewhere)));
        let idle_everywhere = WorkerHealth {
            idle_ms: Some(61_000),
            ..health(vec![])
        };
        assert!(may_reap(&s, idle, ttl, &[], Some(&idle_everywhere)));
        // The worker's word does not make a worker this driver just handed out reapable.
        assert!(!may_reap(
            &s,
            Duration::from_secs(1),
            ttl,
            &[],
            Some(&idle_everywhere)
        ));
    }

    #[tokio::test]
    async fn one_creator_per_session_at_a_time() {
        let locks = Arc::new(SessionLocks::default());
        let guard = locks.lock(&sid("a")).await;
        // Another session is not blocked.
        let _b = locks.lock(&sid("b")).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(&sid("a")).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(guard);
        waiter.await.unwrap();
        locks.prune();
        assert_eq!(lock(&locks.locks).len(), 1, "only b's lock is still held");
    }

    #[tokio::test]
    async fn wait_ready_says_what_failed_but_not_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let check = HealthCheck::new(Duration::from_millis(100)).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let e = check
            .wait_ready(&WorkerEndpoint::new("w", &url), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        // The message reaches clients: it says what failed, the URL stays in the log.
        assert!(e.to_string().contains("did not answer GET /health"), "{e}");
        assert!(!e.to_string().contains(&url), "{e}");
    }

    #[test]
    fn rfc3339_ages() {
        use std::time::{Duration, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_764_068_400); // 2025-11-25T11:00:00Z
        assert_eq!(
            age_of_rfc3339("2025-11-25T10:59:30Z", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            age_of_rfc3339("2025-11-25T10:59:59.75Z", now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            age_of_rfc3339("2024-02-29T11:00:00.000000000Z", now),
            Some(Duration::from_secs(635 * 86_400))
        );
        assert_eq!(
            age_of_rfc3339("1970-01-01T00:00:00Z", UNIX_EPOCH),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "2025-11-25 11:00:00Z",
            "2025-11-25T11:00:00",
            "2025-13-01T00:00:00Z",
            "2025-11-25T11:00:00.x1Z",
            "0001-01-01T00:00:00Z", // the engine's "never started": before 1970
            "2025-11-25T11:00:01Z", // ahead of now
        ] {
            assert_eq!(age_of_rfc3339(bad, now), None, "{bad}");
        }
    }
}
