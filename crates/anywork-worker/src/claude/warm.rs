//! Warm processes: a session's CLI kept up between its tasks (see the
//! [module documentation](super#warm-processes)).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::process::{Proc, kill_group};

/// Most entries of `.claude/` looked at for the fingerprint.
const MAX_FINGERPRINT_ENTRIES: usize = 2000;
/// Files larger than this are fingerprinted by size and modification time only.
const MAX_HASHED_FILE: u64 = 1024 * 1024;

/// What a warm process was started with: when it changes, the process is not reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint {
    /// Hash of the system prompt, `.mcp.json`, `CLAUDE.md` and the `.claude/` tree.
    content: u64,
    /// Device and inode of the workspace folder (a purged and re-created session is another).
    dir: (u64, u64),
}

/// Fingerprint of `workspace` for a process started with `system_prompt`.
pub(super) fn fingerprint(workspace: &Path, system_prompt: Option<&str>) -> Fingerprint {
    let mut hasher = DefaultHasher::new();
    system_prompt.hash(&mut hasher);
    for name in [".mcp.json", "CLAUDE.md"] {
        hash_entry(&workspace.join(name), &mut hasher);
    }
    let mut budget = MAX_FINGERPRINT_ENTRIES;
    hash_tree(&workspace.join(".claude"), &mut hasher, &mut budget);
    Fingerprint {
        content: hasher.finish(),
        dir: dir_id(workspace).unwrap_or_default(),
    }
}

fn dir_id(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::symlink_metadata(path).ok()?;
    meta.is_dir().then(|| (meta.dev(), meta.ino()))
}

/// One file, link or folder's identity and content (links are not followed).
fn hash_entry(path: &Path, hasher: &mut DefaultHasher) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        0u8.hash(hasher);
        return;
    };
    if meta.is_symlink() {
        1u8.hash(hasher);
        fs::read_link(path).ok().hash(hasher);
    } else if meta.is_file() && meta.len() <= MAX_HASHED_FILE {
        2u8.hash(hasher);
        fs::read(path).ok().hash(hasher);
    } else {
        3u8.hash(hasher);
        (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.mode()).hash(hasher);
    }
}

fn hash_tree(dir: &Path, hasher: &mut DefaultHasher, budget: &mut usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = dir.join(&name);
        name.hash(hasher);
        hash_entry(&path, hasher);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            hash_tree(&path, hasher, budget);
        }
    }
}

/// A process waiting for its session's next task.
pub(super) struct Warm {
    pub(super) proc: Proc,
    pub(super) fingerprint: Fingerprint,
    /// The CLI session id of its conversation.
    pub(super) cli_session: Option<String>,
    since: Instant,
}

impl Warm {
    pub(super) fn new(proc: Proc, fingerprint: Fingerprint, cli_session: Option<String>) -> Self {
        Self {
            proc,
            fingerprint,
            cli_session,
            since: Instant::now(),
        }
    }
}

/// Counters of the warm pool, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmStats {
    /// CLI processes started.
    pub started: u64,
    /// Tasks that ran in a warm process.
    pub reused: u64,
    /// Warm processes released (idle window over, cap, changed workspace, shutdown).
    pub released: u64,
    /// Processes idle right now, waiting for their session's next task.
    pub idle: usize,
    /// Processes running a task right now.
    pub running: usize,
    /// Spare processes started ahead of their session's first task.
    pub spares: u64,
    /// Tasks that ran in a spare process.
    pub spares_used: u64,
}

#[derive(Default)]
struct State {
    idle: HashMap<PathBuf, Warm>,
    running: usize,
}

/// The warm processes of one executor.
pub(super) struct Pool {
    idle_for: Duration,
    max: usize,
    state: Mutex<State>,
    reaper: AtomicBool,
    started: AtomicU64,
    reused: AtomicU64,
    released: AtomicU64,
    spares: AtomicU64,
    spares_used: AtomicU64,
}

impl Pool {
    pub(super) fn new(idle_for: Duration, max: usize) -> Arc<Self> {
        Arc::new(Self {
            idle_for,
            max,
            state: Mutex::new(State::default()),
            reaper: AtomicBool::new(false),
            started: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            released: AtomicU64::new(0),
            spares: AtomicU64::new(0),
            spares_used: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enabled(&self) -> bool {
        self.max > 0 && !self.idle_for.is_zero()
    }

    pub(super) fn stats(&self) -> WarmStats {
        let state = self.lock();
        WarmStats {
            started: self.started.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            idle: state.idle.len(),
            running: state.running,
            spares: self.spares.load(Ordering::Relaxed),
            spares_used: self.spares_used.load(Ordering::Relaxed),
        }
    }

    /// A run begins: its warm process if there is a usable one for `workspace` (same
    /// fingerprint and conversation, still running), else `None` and room is made for a new
    /// process (the least recently used idle ones go past the cap). Counts the run as running
    /// until the guard drops.
    pub(super) fn begin(
        self: &Arc<Self>,
        workspace: &Path,
        fingerprint: Fingerprint,
        cli_session: Option<&str>,
    ) -> (Option<Proc>, Running) {
        let mut released = Vec::new();
        let reused = {
            let mut state = self.lock();
            state.running += 1;
            let reused = match state.idle.remove(workspace) {
                Some(mut warm) => {
                    let why = if warm.fingerprint != fingerprint {
                        Some("its skills, MCP servers, settings or prompt changed")
                    } else if warm.cli_session.as_deref() != cli_session {
                        Some("the session's conversation changed")
                    } else if !warm.proc.alive() {
                        Some("it exited")
                    } else {
                        None
                    };
                    match why {
                        None => Some(warm.proc),
                        Some(why) => {
                            released.push((warm, why));
                            None
                        }
                    }
                }
                None => None,
            };
            if reused.is_none() {
                self.evict_over_cap(&mut state, &mut released);
            }
            reused
        };
        for (warm, why) in released {
            self.release(warm, why);
        }
        let guard = Running {
            pool: self.clone(),
            counted: true,
        };
        match reused {
            Some(proc) => {
                if proc.spare && proc.turns == 0 {
                    self.spares_used.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.reused.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(pid = proc.pgid.as_raw(), "reusing a warm claude");
                (Some(proc), guard)
            }
            None => (None, guard),
        }
    }

    /// A new process was started.
    pub(super) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `warm` for `workspace`'s next task (its run no longer counts as running).
    /// Releases it when warm processes are off.
    fn keep(self: &Arc<Self>, workspace: PathBuf, warm: Warm) {
        if !self.enabled() {
            self.release(warm, "warm processes are off");
            return;
        }
        let mut released = Vec::new();
        {
            let mut state = self.lock();
            if let Some(old) = state.idle.insert(workspace, warm) {
                released.push((old, "a newer process of the session replaced it"));
            }
            self.evict_over_cap(&mut state, &mut released);
        }
        for (warm, why) in released {
            self.release(warm, why);
        }
        self.start_reaper();
    }

    /// Whether a spare may be started for `workspace`: warm processes are on, nothing waits
    /// for it yet, and one more process stays within the cap (a spare never pushes out a
    /// session's warm process).
    pub(super) fn has_room_for_spare(&self, workspace: &Path) -> bool {
        let state = self.lock();
        self.enabled()
            && !state.idle.contains_key(workspace)
            && state.idle.len() + state.running < self.max
    }

    /// Keeps `spare`, just started for `workspace`, for that workspace's first task; it is
    /// released if the room was taken meanwhile.
    pub(super) fn offer_spare(self: &Arc<Self>, workspace: PathBuf, spare: Warm) {
        self.spares.fetch_add(1, Ordering::Relaxed);
        let taken = {
            let mut state = self.lock();
            if state.idle.contains_key(&workspace) || state.idle.len() + state.running >= self.max {
                Some(spare)
            } else {
                state.idle.insert(workspace, spare);
                None
            }
        };
        match taken {
            Some(spare) => self.release(spare, "no room left for a spare"),
            None => self.start_reaper(),
        }
    }

    /// Whether `warm` processes should be kept at all.
    pub(super) fn keeps(&self) -> bool {
        self.enabled()
    }

    /// Takes the least recently used idle processes out while more than `max` are resident.
    fn evict_over_cap(&self, state: &mut State, out: &mut Vec<(Warm, &'static str)>) {
        while state.idle.len() + state.running > self.max && !state.idle.is_empty() {
            let Some(oldest) = state
                .idle
                .iter()
                .min_by_key(|(_, w)| w.since)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(warm) = state.idle.remove(&oldest) {
                out.push((warm, "too many resident processes (least recently used)"));
            }
        }
    }

    /// Ends `warm`'s process: stdin closed (it exits in milliseconds), then its group killed.
    fn release(&self, warm: Warm, why: &str) {
        self.released.fetch_add(1, Ordering::Relaxed);
        let mut proc = warm.proc;
        tracing::info!(pid = proc.pgid.as_raw(), "releasing a warm claude: {why}");
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    proc.reap().await;
                });
            }
            Err(_) => kill_group(proc.pgid),
        }
    }

    /// Releases what waited too long, exited, or whose workspace is gone or replaced.
    fn sweep(&self) {
        let mut released = Vec::new();
        {
            let mut state = self.lock();
            let expired: Vec<(PathBuf, &'static str)> = state
                .idle
                .iter_mut()
                .filter_map(|(ws, warm)| {
                    let why = if warm.since.elapsed() >= self.idle_for {
                        "idle window over"
                    } else if dir_id(ws) != Some(warm.fingerprint.dir) {
                        "its workspace was removed"
                    } else if !warm.proc.alive() {
                        "it exited"
                    } else {
                        return None;
                    };
                    Some((ws.clone(), why))
                })
                .collect();
            for (ws, why) in expired {
                if let Some(warm) = state.idle.remove(&ws) {
                    released.push((warm, why));
                }
            }
        }
        for (warm, why) in released {
            self.release(warm, why);
        }
    }

    /// One task per pool that sweeps it while it lives.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.reaper.store(false, Ordering::Release);
            return;
        };
        let tick = (self.idle_for / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let pool: Weak<Self> = Arc::downgrade(self);
        handle.spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, warm) in state.idle.drain() {
            // Synchronously: the runtime may be going away too.
            kill_group(warm.proc.pgid);
        }
    }
}

/// Counts a run as running until it [finishes](Running::finish) or drops.
pub(super) struct Running {
    pool: Arc<Pool>,
    counted: bool,
}

impl Running {
    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The run is over (before its `done` is sent, so that the next task sees the count).
    pub(super) fn finish(&mut self) {
        if std::mem::take(&mut self.counted) {
            let mut state = self.pool.lock();
            state.running = state.running.saturating_sub(1);
        }
    }

    /// The run is over and its process waits for `workspace`'s next task.
    pub(super) fn keep(&mut self, workspace: PathBuf, warm: Warm) {
        self.finish();
        self.pool.keep(workspace, warm);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_skills_mcp_and_prompt() {
        let ws = tempfile::tempdir().unwrap();
        let base = fingerprint(ws.path(), Some("soul"));
        assert_eq!(base, fingerprint(ws.path(), Some("soul")));
        assert_ne!(base, fingerprint(ws.path(), Some("other soul")));
        let skill = ws.path().join(".claude/skills/greet");
        fs::create_dir_all(&skill).unwrap();
        let with_dir = fingerprint(ws.path(), Some("soul"));
        assert_ne!(base, with_dir);
        fs::write(skill.join("SKILL.md"), "one").unwrap();
        let one = fingerprint(ws.path(), Some("soul"));
        assert_ne!(with_dir, one);
        fs::write(skill.join("SKILL.md"), "two").unwrap();
        let two = fingerprint(ws.path(), Some("soul"));
        assert_ne!(one, two);
        // The same content written again is the same.
        fs::write(skill.join("SKILL.md"), "two").unwrap();
        assert_eq!(two, fingerprint(ws.path(), Some("soul")));
        fs::write(ws.path().join(".mcp.json"), "{}").unwrap();
        assert_ne!(two, fingerprint(ws.path(), Some("soul")));
        // Working files do not count.
        let before = fingerprint(ws.path(), Some("soul"));
        fs::write(ws.path().join("notes.txt"), "x").unwrap();
        assert_eq!(before, fingerprint(ws.path(), Some("soul")));
    }
}
