//! What a run keeps in the session workspace: the remembered CLI session id, and the
//! `SOUL.md` / `AGENTS.md` of the system prompt.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anywork_core::{Error, Result};

use super::{SESSION_ID_FILE, SESSIONS_DIR};

/// Most bytes read from each of `SOUL.md` and `AGENTS.md` for the system prompt (one argument
/// may not exceed 128 KiB on Linux).
const MAX_PROMPT_FILE_BYTES: usize = 48 * 1024;

pub(super) fn ensure_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::invalid_input(format!(
            "`{}` exists and is not a directory",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().mode(0o700).create(path).map_err(|e| {
                Error::storage(format!("cannot create `{}`: {e}", path.display())).with_source(e)
            })
        }
        Err(e) => {
            Err(Error::storage(format!("cannot inspect `{}`: {e}", path.display())).with_source(e))
        }
    }
}

/// Whether `id` can be a CLI session id (it becomes a command-line argument).
pub(super) fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn session_id_path(workspace: &Path) -> PathBuf {
    workspace.join(SESSIONS_DIR).join(SESSION_ID_FILE)
}

/// The remembered CLI session id; `None` if missing, not a regular file or not valid.
pub(super) fn read_session_id(workspace: &Path) -> Option<String> {
    let path = session_id_path(workspace);
    let meta = fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 1024 {
        return None;
    }
    let text = fs::read_to_string(&path).ok()?;
    let id = text.trim();
    valid_session_id(id).then(|| id.to_owned())
}

/// Stores `id` atomically (a new temporary file, then a rename; links are not followed).
pub(super) fn write_session_id(workspace: &Path, id: &str) -> io::Result<()> {
    write_state_file(workspace, SESSION_ID_FILE, &format!("{id}\n"), true)
}

/// File (inside [`SESSIONS_DIR`]) with the CLI session's cumulative cost after the last run:
/// `<session id> <total_cost_usd>`.
const SESSION_COST_FILE: &str = "claude-session-cost";

/// The cumulative cost the CLI reported for `session` after its last run, if remembered.
pub(super) fn read_session_cost(workspace: &Path, session: &str) -> Option<f64> {
    let path = workspace.join(SESSIONS_DIR).join(SESSION_COST_FILE);
    let meta = fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > 1024 {
        return None;
    }
    let text = fs::read_to_string(&path).ok()?;
    let (id, cost) = text.trim().split_once(' ')?;
    (id == session).then(|| cost.parse().ok()).flatten()
}

/// Remembers `total` as `session`'s cumulative cost. Not synced to disk: it is written after
/// every turn, in the path of the task's `done`, and losing it to a crash only leaves the next
/// resumed task without a cost.
pub(super) fn write_session_cost(workspace: &Path, session: &str, total: f64) -> io::Result<()> {
    write_state_file(
        workspace,
        SESSION_COST_FILE,
        &format!("{session} {total}\n"),
        false,
    )
}

/// Writes `<ws>/sessions/<name>` atomically (a new 0600 temporary file, synced when `durable`,
/// then a rename; links are not followed).
fn write_state_file(workspace: &Path, name: &str, contents: &str, durable: bool) -> io::Result<()> {
    let dir = workspace.join(SESSIONS_DIR);
    if !fs::symlink_metadata(&dir)?.is_dir() {
        return Err(io::Error::other(format!(
            "`{}` is not a directory",
            dir.display()
        )));
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{name}.{}.{nanos}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

pub(super) fn forget_session_id(workspace: &Path) {
    match fs::remove_file(session_id_path(workspace)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot forget the Claude Code session id: {e}"),
    }
}

/// `SOUL.md` and then `AGENTS.md` of the workspace, for `--append-system-prompt`.
pub(super) fn system_prompt(workspace: &Path) -> Option<String> {
    let parts: Vec<String> = ["SOUL.md", "AGENTS.md"]
        .iter()
        .filter_map(|name| read_prompt_file(&workspace.join(name)))
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// The system prompt a task in `workspace` will have once its `SOUL.md` and `AGENTS.md`
/// exist: each the workspace's own when present, else the worker's default in `defaults`
/// (which a new session's workspace is given when the server sends none).
pub(super) fn spare_system_prompt(workspace: &Path, defaults: &Path) -> Option<String> {
    let parts: Vec<String> = ["SOUL.md", "AGENTS.md"]
        .iter()
        .filter_map(|name| {
            let own = workspace.join(name);
            if fs::symlink_metadata(&own).is_ok() {
                read_prompt_file(&own)
            } else {
                read_prompt_file(&defaults.join(name))
            }
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

/// A regular file's text (not through a link), at most [`MAX_PROMPT_FILE_BYTES`], without NULs.
fn read_prompt_file(path: &Path) -> Option<String> {
    if !fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_PROMPT_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let truncated = bytes.len() > MAX_PROMPT_FILE_BYTES;
    bytes.truncate(MAX_PROMPT_FILE_BYTES);
    let mut text = String::from_utf8_lossy(&bytes).replace('\0', "");
    if truncated {
        // Drop a possibly cut last character.
        text.pop();
        text.push_str("\n[truncated]");
    }
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked() {
        assert!(valid_session_id("9cac2560-04ac-45bc-beba-b00e1f4532d0"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("--model=x"));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id("../x"));
        let ws = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join(SESSIONS_DIR)).unwrap();
        assert_eq!(read_session_id(ws.path()), None);
        write_session_id(ws.path(), "abc-1").unwrap();
        assert_eq!(read_session_id(ws.path()).as_deref(), Some("abc-1"));
        forget_session_id(ws.path());
        assert_eq!(read_session_id(ws.path()), None);
    }
    #[test]
    fn prompt_files_are_bounded_and_not_followed() {
        let ws = tempfile::tempdir().unwrap();
        assert_eq!(system_prompt(ws.path()), None);
        fs::write(ws.path().join("SOUL.md"), "soul\0 text").unwrap();
        fs::write(
            ws.path().join("AGENTS.md"),
            "é".repeat(MAX_PROMPT_FILE_BYTES),
        )
        .unwrap();
        let prompt = system_prompt(ws.path()).unwrap();
        assert!(prompt.starts_with("soul text\n\n"));
        assert!(prompt.ends_with("[truncated]"));
        assert!(prompt.len() < 2 * MAX_PROMPT_FILE_BYTES);
        fs::remove_file(ws.path().join("SOUL.md")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", ws.path().join("SOUL.md")).unwrap();
        assert!(!system_prompt(ws.path()).unwrap().starts_with("soul"));
    }
}
