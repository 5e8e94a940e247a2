//! Session workspaces on disk.
//!
//! The worker's root (`WORKSPACE_DIR`) holds the worker-level defaults `SOUL.md` and
//! `AGENTS.md`, and one directory per session, named by [`encode_session_id`]:
//!
//! ```text
//! <root>/SOUL.md                      default persona, copied into new sessions
//! <root>/AGENTS.md                    default instructions, copied into new sessions
//! <root>/<encoded session id>/
//!     SOUL.md  AGENTS.md  .mcp.json
//!     sessions/history.jsonl          the worker's conversation history (see [`crate::history`])
//!     files/                          the agent's working files
//!     skills/NAME/SKILL.md            skills, for executors that read `skills/`
//!     .claude/skills/NAME/SKILL.md    skills, where Claude Code looks for them
//! ```
//!
//! Every path the worker creates or writes below the root is checked one component at a
//! time with `symlink_metadata`: a symbolic link anywhere on the way is refused with
//! [`ErrorKind::InvalidInput`](anywork_core::ErrorKind::InvalidInput), so an agent that
//! plants a link cannot make the worker write outside the workspace. Files are written
//! atomically (a temporary file in the same folder, then a rename).
//!
//! Only the worker's user may look in: the root and every folder the worker creates are
//! created with mode 0700 (an existing root or session folder that is more open is narrowed
//! to 0700 when used), and the files it writes (`SOUL.md`, `.mcp.json` with its servers'
//! `env`, the history) with mode 0600.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anywork_core::spec::{McpServers, validate_mcp_servers};
use anywork_core::{Error, Result, SessionId, SkillSpec};
use serde::{Deserialize, Serialize};

use crate::history::HistoryMessage;

/// File name of the persona file.
pub const SOUL_FILE: &str = "SOUL.md";
/// File name of the agent instructions file.
pub const AGENTS_FILE: &str = "AGENTS.md";
/// File name of the MCP server configuration, as Claude Code reads it.
pub const MCP_FILE: &str = ".mcp.json";
/// Folder of the worker's conversation history inside a session workspace.
pub const SESSIONS_DIR: &str = "sessions";
/// How much of the end of `history.jsonl` is read to find the last message.
const HISTORY_TAIL_BYTES: u64 = 256 * 1024;

/// The task of the last whole message in `tail` when it is a user message: a turn that was
/// never answered.
fn unanswered_turn(tail: &[u8]) -> Option<anywork_core::TaskId> {
    let text = String::from_utf8_lossy(tail);
    let last = text
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .find_map(|l| serde_json::from_str::<HistoryMessage>(l).ok())?;
    (last.role == crate::history::Role::User).then_some(last.task_id)
}

/// Name of the history file inside [`SESSIONS_DIR`].
pub const HISTORY_FILE: &str = "history.jsonl";
/// Folder of the agent's working files inside a session workspace.
pub const FILES_DIR: &str = "files";
/// Folder of skills inside a session workspace (also written below `.claude/`).
pub const SKILLS_DIR: &str = "skills";

/// The persona written to `<root>/SOUL.md` when it is missing (the server's default too).
pub const DEFAULT_SOUL: &str = anywork_core::worker_api::DEFAULT_SOUL;

/// The instructions written to `<root>/AGENTS.md` when it is missing.
pub const DEFAULT_AGENTS: &str = anywork_core::worker_api::DEFAULT_AGENTS;

/// Most files listed by [`Workspace::list_files`]; the listing says when it stopped early.
pub const MAX_LISTED_FILES: usize = 10_000;
/// Deepest folder nesting [`Workspace::list_files`] descends into.
const MAX_LIST_DEPTH: usize = 64;
/// Longest percent-encoded session directory name before the compact form is used.
const MAX_ENCODED_LEN: usize = 180;

/// One of the two editable Markdown files of a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkspaceDoc {
    /// `SOUL.md`: the agent's persona.
    Soul,
    /// `AGENTS.md`: instructions for the agent.
    Agents,
}

impl WorkspaceDoc {
    /// The file name (`SOUL.md`, `AGENTS.md`).
    pub fn file_name(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => SOUL_FILE,
            WorkspaceDoc::Agents => AGENTS_FILE,
        }
    }

    /// The name used in URLs (`soul`, `agents`), parsed back; `None` for anything else.
    pub fn from_slug(slug: &str) -> Option<Self> {
        match slug {
            "soul" => Some(WorkspaceDoc::Soul),
            "agents" => Some(WorkspaceDoc::Agents),
            _ => None,
        }
    }

    /// The text the worker-level file gets when it is missing.
    pub fn default_text(self) -> &'static str {
        match self {
            WorkspaceDoc::Soul => DEFAULT_SOUL,
            WorkspaceDoc::Agents => DEFAULT_AGENTS,
        }
    }
}

/// One file of a session's `files/` folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to `files/`, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch (0 when unknown).
    pub modified: i64,
}

/// The files of a session, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListing {
    /// The regular files found (symbolic links are not listed).
    pub files: Vec<FileEntry>,
    /// Whether the listing stopped at [`MAX_LISTED_FILES`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The directory name of a session's workspace: injective and safe as one path segment.
///
/// Every byte outside `[A-Za-z0-9_-]` is percent-encoded (`owner/repo#12` →
/// `owner%2Frepo%2312`), so names never contain `.` or `/` and cannot clash with the
/// worker-level files. Ids whose encoding would exceed 180 bytes are written instead as `~`
/// followed by the unpadded URL-safe base64 of the id; percent-encoded names never contain
/// `~`, so the two forms cannot collide.
pub fn encode_session_id(session: &SessionId) -> String {
    let id = session.as_str();
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
    if out.len() <= MAX_ENCODED_LEN {
        out
    } else {
        format!("~{}", base64_url(id.as_bytes()))
    }
}

fn base64_url(bytes: &[u8]) -> String {
    base64_encode(
        bytes,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        false,
    )
}

/// Base64 of `bytes` in `alphabet` (standard or URL-safe), `=`-padded when `pad`.
pub(crate) fn base64_encode(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 0x3F) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// The worker's workspace root and every operation on session workspaces.
///
/// Methods do blocking file I/O; call them from `spawn_blocking` in async code.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    /// Serializes [`Workspace::prepare`] calls per session (they rename and delete that
    /// session's skill folders); sessions prepare in parallel.
    prepare_locks: Arc<Mutex<HashMap<SessionId, Arc<Mutex<()>>>>>,
}

impl Workspace {
    /// A workspace rooted at `root` (nothing is created until [`init`](Self::init) or first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            prepare_locks: Arc::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workspace directory of `session` (it may not exist yet).
    pub fn session_dir(&self, session: &SessionId) -> PathBuf {
        self.root.join(encode_session_id(session))
    }

    /// Creates the root (mode 0700, with its missing parents) or narrows an existing one to
    /// 0700.
    fn create_root(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| io_error("cannot create the workspace root", &self.root, e))?;
        private_dir(&self.root)
    }

    /// Creates the root and the worker-level `SOUL.md` and `AGENTS.md` if they are missing.
    pub fn init(&self) -> Result<()> {
        self.create_root()?;
        for doc in [WorkspaceDoc::Soul, WorkspaceDoc::Agents] {
            self.default_doc(doc)?;
        }
        Ok(())
    }

    /// The worker-level text of `doc`, created with its default text when missing.
    fn default_doc(&self, doc: WorkspaceDoc) -> Result<String> {
        if let Some(text) = read_nofollow(&self.root, &[doc.file_name()])? {
            return Ok(text);
        }
        self.create_root()?;
        write_new_atomic(&self.root, doc.file_name(), doc.default_text().as_bytes())?;
        Ok(read_nofollow(&self.root, &[doc.file_name()])?
            .unwrap_or_else(|| doc.default_text().to_owned()))
    }

    /// Creates the workspace of `session` if needed: its folders, and `SOUL.md` and
    /// `AGENTS.md` copied from the worker-level defaults. Returns its directory.
    pub fn ensure_session(&self, session: &SessionId) -> Result<PathBuf> {
        self.ensure_session_seeded(session, None, None)
    }

    /// [`ensure_session`](Self::ensure_session), where a missing `SOUL.md` / `AGENTS.md` of
    /// the session starts as `soul` / `agents` when given (the server's defaults) instead of
    /// the worker-level files. A session that has its own keeps it.
    pub fn ensure_session_seeded(
        &self,
        session: &SessionId,
        soul: Option<&str>,
        agents: Option<&str>,
    ) -> Result<PathBuf> {
        let ws = self.ensure_session_dirs(session)?;
        for doc in [WorkspaceDoc::Soul, WorkspaceDoc::Agents] {
            let path = ws.join(doc.file_name());
            if !check_file_slot(&path)? {
                let seed = match doc {
                    WorkspaceDoc::Soul => soul,
                    WorkspaceDoc::Agents => agents,
                };
                let text = match seed {
                    Some(text) => text.to_owned(),
                    None => self.default_doc(doc)?,
                };
                write_new_atomic(&ws, doc.file_name(), text.as_bytes())?;
            }
        }
        Ok(ws)
    }

    /// The folders of `session`'s workspace, created if needed, without its `SOUL.md` and
    /// `AGENTS.md` (which [`ensure_session_seeded`](Self::ensure_session_seeded) adds later,
    /// from the server's defaults when it has some). Returns its directory.
    pub fn ensure_session_dirs(&self, session: &SessionId) -> Result<PathBuf> {
        self.create_root()?;
        let ws = ensure_dirs(&self.root, &[&encode_session_id(session)])?;
        private_dir(&ws)?;
        for dirs in [
            &[SESSIONS_DIR][..],
            &[FILES_DIR],
            &[SKILLS_DIR],
            &[".claude", SKILLS_DIR],
        ] {
            ensure_dirs(&ws, dirs)?;
        }
        Ok(ws)
    }

    /// Sets up `session` for a run, replacing what the previous call set up.
    ///
    /// Everything is validated before anything is written: skill names and file paths
    /// ([`SkillSpec::validate`], plus no duplicate names and no path that is both a file and a
    /// folder) and MCP server names. Then each skill is written to both
    /// `.claude/skills/NAME/` and `skills/NAME/` (a skill folder is replaced as a whole),
    /// skills not named here are removed from both folders, `.mcp.json` is written as
    /// `{"mcpServers": {...}}` (removed when `mcp_servers` is empty), and `soul`, when given,
    /// overwrites the session's `SOUL.md`. Calling it twice with the same arguments leaves the
    /// same files. Returns the session's directory.
    pub fn prepare(
        &self,
        session: &SessionId,
        skills: &[SkillSpec],
        mcp_servers: &McpServers,
        soul: Option<&str>,
    ) -> Result<PathBuf> {
        self.prepare_seeded(session, skills, mcp_servers, soul, None, None)
    }

    /// [`prepare`](Self::prepare) for a session whose missing `SOUL.md` / `AGENTS.md` start
    /// as `default_soul` / `default_agents` when given (the server's defaults; see
    /// [`ensure_session_seeded`](Self::ensure_session_seeded)). Nothing is written when the
    /// request is refused.
    pub fn prepare_seeded(
        &self,
        session: &SessionId,
        skills: &[SkillSpec],
        mcp_servers: &McpServers,
        soul: Option<&str>,
        default_soul: Option<&str>,
        default_agents: Option<&str>,
    ) -> Result<PathBuf> {
        validate_skills(skills)?;
        validate_mcp_servers(mcp_servers)?;
        let session_lock = {
            let mut locks = self
                .prepare_locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Forget the locks of sessions nobody is preparing.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(session.clone()).or_default().clone()
        };
        let _serial = session_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let ws = self.ensure_session_seeded(session, default_soul, default_agents)?;
        let skill_roots = [
            ensure_dirs(&ws, &[".claude", SKILLS_DIR])?,
            ensure_dirs(&ws, &[SKILLS_DIR])?,
        ];
        // Refuse links before changing anything.
        for root in &skill_roots {
            for skill in skills {
                check_entry_slot(&root.join(&skill.name))?;
            }
        }
        check_file_slot(&ws.join(MCP_FILE))?;
        check_file_slot(&ws.join(SOUL_FILE))?;

        for root in &skill_roots {
            sync_skills(root, skills)?;
        }
        if mcp_servers.is_empty() {
            remove_file_if_present(&ws.join(MCP_FILE))?;
        } else {
            let doc = serde_json::json!({ "mcpServers": mcp_servers });
            let mut bytes = serde_json::to_vec_pretty(&doc)
                .map_err(|e| Error::internal(format!("cannot encode {MCP_FILE}: {e}")))?;
            bytes.push(b'\n');
            write_atomic(&ws, MCP_FILE, &bytes)?;
        }
        if let Some(soul) = soul {
            write_atomic(&ws, SOUL_FILE, soul.as_bytes())?;
        }
        Ok(ws)
    }

    /// The text of `doc`: the worker-level default when `session` is `None` (created when
    /// missing), else the session's copy (the default when the session has none yet).
    pub fn read_doc(&self, session: Option<&SessionId>, doc: WorkspaceDoc) -> Result<String> {
        if let Some(session) = session {
            let dir = encode_session_id(session);
            if let Some(text) = read_nofollow(&self.root, &[&dir, doc.file_name()])? {
                return Ok(text);
            }
        }
        self.default_doc(doc)
    }

    /// Replaces `doc`: the worker-level default when `session` is `None`, else the session's
    /// copy (creating the session's workspace if needed).
    pub fn write_doc(
        &self,
        session: Option<&SessionId>,
        doc: WorkspaceDoc,
        content: &str,
    ) -> Result<()> {
        let dir = match session {
            Some(session) => self.ensure_session(session)?,
            None => {
                self.init()?;
                self.root.clone()
            }
        };
        write_atomic(&dir, doc.file_name(), content.as_bytes())
    }

    /// The regular files below the session's `files/` folder, recursively, sorted by path.
    /// Symbolic links are neither listed nor followed. Unknown sessions have no files.
    pub fn list_files(&self, session: &SessionId) -> Result<FileListing> {
        let base = self.session_dir(session);
        for path in [&base, &base.join(FILES_DIR)] {
            match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(path)),
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(FileListing::default()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(FileListing::default());
                }
                Err(e) => return Err(io_error("cannot read", path, e)),
            }
        }
        let mut listing = FileListing::default();
        let mut stack = vec![(base.join(FILES_DIR), String::new(), 0usize)];
        'walk: while let Some((dir, prefix, depth)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot list folder");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth + 1 < MAX_LIST_DEPTH {
                        stack.push((entry.path(), rel, depth + 1));
                    }
                } else if meta.is_file() {
                    if listing.files.len() >= MAX_LISTED_FILES {
                        listing.truncated = true;
                        break 'walk;
                    }
                    let modified = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                        .unwrap_or(0);
                    listing.files.push(FileEntry {
                        path: rel,
                        size: meta.len(),
                        modified,
                    });
                }
            }
        }
        listing.files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(listing)
    }

    /// Appends one message to the session's `sessions/history.jsonl`, creating the session's
    /// workspace if needed. A torn last line (from a crash mid-write) is closed first.
    pub fn append_history(&self, session: &SessionId, message: &HistoryMessage) -> Result<()> {
        let ws = self.ensure_session(session)?;
        let dir = ensure_dirs(&ws, &[SESSIONS_DIR])?;
        let path = dir.join(HISTORY_FILE);
        check_file_slot(&path)?;
        let mut line = serde_json::to_vec(message)
            .map_err(|e| Error::internal(format!("cannot encode a history message: {e}")))?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("cannot open", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error("cannot read", &path, e))?
            .len();
        if len > 0 {
            // Read the tail: the last byte (a torn line?) and the last whole message.
            let tail_len = len.min(HISTORY_TAIL_BYTES);
            let mut tail = vec![0u8; tail_len as usize];
            file.seek(SeekFrom::Start(len - tail_len))
                .and_then(|_| file.read_exact(&mut tail))
                .map_err(|e| io_error("cannot read", &path, e))?;
            if tail.last() != Some(&b'\n') {
                line.insert(0, b'\n');
            }
            if message.role == crate::history::Role::User
                && let Some(open) = unanswered_turn(&tail)
            {
                // The previous turn never got its answer (the worker stopped mid-run): say so
                // in the history, so that it does not read as two instructions in a row.
                let mut marker =
                    serde_json::to_vec(&HistoryMessage::interrupted(open)).map_err(|e| {
                        Error::internal(format!("cannot encode a history message: {e}"))
                    })?;
                marker.push(b'\n');
                let first_newline = usize::from(line.first() == Some(&b'\n'));
                line.splice(first_newline..first_newline, marker);
            }
        }
        file.write_all(&line)
            .map_err(|e| io_error("cannot append to", &path, e))
    }

    /// Deletes the whole workspace of `session` (its `SOUL.md`, `AGENTS.md`, `.mcp.json`,
    /// history, skills and files); `false` when it had none. The folder's name comes from
    /// [`encode_session_id`], so no id reaches outside the root; a symbolic link planted in
    /// its place is removed, never followed.
    pub fn delete_session(&self, session: &SessionId) -> Result<bool> {
        let dir = self.session_dir(session);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("cannot read", &dir, e)),
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&dir)
                    .map_err(|e| io_error("cannot delete the session workspace", &dir, e))?;
                Ok(true)
            }
            Ok(_) => {
                fs::remove_file(&dir)
                    .map_err(|e| io_error("cannot delete the session workspace", &dir, e))?;
                Ok(true)
            }
        }
    }

    /// The session's history, oldest first; lines that do not parse (such as a torn last line)
    /// are skipped. Unknown sessions have an empty history.
    pub fn history(&self, session: &SessionId) -> Result<Vec<HistoryMessage>> {
        let dir = encode_session_id(session);
        let Some(text) = read_nofollow(&self.root, &[&dir, SESSIONS_DIR, HISTORY_FILE])? else {
            return Ok(Vec::new());
        };
        Ok(crate::history::parse_history(&text))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn validate_skills(skills: &[SkillSpec]) -> Result<()> {
    let mut names = BTreeSet::new();
    for skill in skills {
        skill.validate()?;
        if !names.insert(skill.name.as_str()) {
            return Err(Error::invalid_input(format!(
                "skill {:?} is given twice",
                skill.name
            )));
        }
        let mut paths: BTreeSet<&str> = skill.files.keys().map(String::as_str).collect();
        paths.insert("SKILL.md");
        for path in &paths {
            for (i, _) in path.match_indices('/') {
                let folder = &path[..i];
                if paths.contains(folder) {
                    return Err(Error::invalid_input(format!(
                        "skill {:?}: {folder:?} is both a file and a folder",
                        skill.name
                    )));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Skill folders

/// Makes `root` hold exactly the folders of `skills`.
fn sync_skills(root: &Path, skills: &[SkillSpec]) -> Result<()> {
    for skill in skills {
        let staging = root.join(format!(".staging-{}-{}", skill.name, unique_suffix()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| io_error("cannot create", &staging, e))?;
        if let Err(e) = write_skill(&staging, skill) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        if let Err(e) = swap_in(&staging, &root.join(&skill.name)) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    }
    let keep: BTreeSet<&str> = skills.iter().map(|s| s.name.as_str()).collect();
    let entries = fs::read_dir(root).map_err(|e| io_error("cannot list", root, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", root, e))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| keep.contains(n)) {
            continue;
        }
        remove_entry(&entry.path())?;
    }
    Ok(())
}

fn write_skill(dir: &Path, skill: &SkillSpec) -> Result<()> {
    write_atomic(dir, "SKILL.md", skill.skill_md().as_bytes())?;
    for (path, content) in &skill.files {
        if path == "SKILL.md" {
            continue;
        }
        let segs: Vec<&str> = path.split('/').collect();
        let Some((file, parents)) = segs.split_last() else {
            continue;
        };
        let parent = ensure_dirs(dir, parents)?;
        write_atomic(&parent, file, content.as_bytes())?;
    }
    Ok(())
}

/// Puts the folder `staging` at `dest`, replacing what is there.
fn swap_in(staging: &Path, dest: &Path) -> Result<()> {
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot read", dest, e)),
        Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(dest)),
        Ok(m) if m.is_dir() => {
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = dest.with_file_name(format!(".old-{name}-{}", unique_suffix()));
            fs::rename(dest, &old).map_err(|e| io_error("cannot move", dest, e))?;
            fs::rename(staging, dest).map_err(|e| io_error("cannot move into", dest, e))?;
            return fs::remove_dir_all(&old).map_err(|e| io_error("cannot remove", &old, e));
        }
        Ok(_) => fs::remove_file(dest).map_err(|e| io_error("cannot remove", dest, e))?,
    }
    fs::rename(staging, dest).map_err(|e| io_error("cannot move into", dest, e))
}

/// Removes a file, a link (not its target) or a whole folder (without following links).
fn remove_entry(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| io_error("cannot remove", path, e))
}

// ---------------------------------------------------------------------------------------------
// Link-refusing file primitives

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::storage(format!("{what} {}: {e}", path.display())).with_source(e)
}

fn symlink_refused(path: &Path) -> Error {
    Error::invalid_input(format!(
        "{} is a symbolic link; the worker does not follow links inside a workspace",
        path.display()
    ))
}

/// Creates `base/segs[0]/segs[1]/...` one component at a time; refuses links and files on the way.
pub(crate) fn ensure_dirs(base: &Path, segs: &[&str]) -> Result<PathBuf> {
    let mut path = base.to_path_buf();
    for seg in segs {
        path.push(seg);
        ensure_dir(&path)?;
    }
    Ok(path)
}

fn ensure_dir(path: &Path) -> Result<()> {
    for _ in 0..2 {
        match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(path)),
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(Error::invalid_input(format!(
                    "{} exists and is not a folder",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match fs::DirBuilder::new().mode(0o700).create(path) {
                    Ok(()) => return Ok(()),
                    // Created concurrently: look again.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_error("cannot create", path, e)),
                }
            }
            Err(e) => return Err(io_error("cannot read", path, e)),
        }
    }
    Err(Error::storage(format!(
        "{} keeps changing while it is created",
        path.display()
    )))
}

/// Narrows the folder `path` (not a link) to mode 0700 if group or others have any access.
fn private_dir(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| io_error("cannot read", path, e))?;
    if meta.file_type().is_symlink() {
        return Err(symlink_refused(path));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("cannot make private (mode 0700)", path, e))?;
        tracing::info!(path = %path.display(), "workspace folder narrowed to mode 0700");
    }
    Ok(())
}

/// Checks a file path about to be replaced: absent (`false`) or a regular file (`true`);
/// links and folders are refused.
fn check_file_slot(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(path)),
        Ok(m) if m.is_dir() => Err(Error::invalid_input(format!(
            "{} is a folder, not a file",
            path.display()
        ))),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error("cannot read", path, e)),
    }
}

/// Checks a folder entry about to be replaced: anything but a link.
fn check_entry_slot(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(path)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot read", path, e)),
    }
}

fn remove_file_if_present(path: &Path) -> Result<()> {
    if check_file_slot(path)? {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot remove", path, e)),
        }
    }
    Ok(())
}

/// Reads `base/segs...` as text without following links below `base`; `None` when a
/// component is missing.
fn read_nofollow(base: &Path, segs: &[&str]) -> Result<Option<String>> {
    let mut path = base.to_path_buf();
    for (i, seg) in segs.iter().enumerate() {
        path.push(seg);
        let last = i + 1 == segs.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(&path)),
            Ok(m) if last && !m.is_file() => {
                return Err(Error::invalid_input(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
            Ok(m) if !last && !m.is_dir() => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read", &path, e)),
        }
    }
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", &path, e)),
    }
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos}", std::process::id())
}

/// Writes a new temporary file beside `dir/name` and returns its path; with `sync`, on disk
/// before this returns.
fn write_temp(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            if sync { f.sync_all() } else { Ok(()) }
        });
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(io_error("cannot write", &tmp, e))
        }
    }
}

/// Replaces `dir/name` with `bytes` atomically; refuses when `dir/name` is a link or folder.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let dest = dir.join(name);
    check_file_slot(&dest)?;
    let tmp = write_temp(dir, name, bytes, true)?;
    fs::rename(&tmp, &dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error("cannot write", &dest, e)
    })
}

/// Creates `dir/name` with `bytes` atomically unless it exists; returns whether it wrote.
/// Used for copies of default texts only, so not synced: a copy lost to a power cut is at
/// worst empty, which reads as no text (and a sync per new session stalls its first run).
fn write_new_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<bool> {
    let dest = dir.join(name);
    if check_file_slot(&dest)? {
        return Ok(false);
    }
    let tmp = write_temp(dir, name, bytes, false)?;
    // A hard link fails when `dest` exists, so a concurrent writer is never overwritten.
    let result = match fs::hard_link(&tmp, &dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        // File systems without hard links: fall back to a plain rename.
        Err(_) => fs::rename(&tmp, &dest)
            .map(|()| true)
            .map_err(|e| io_error("cannot write", &dest, e)),
    };
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use anywork_core::{ErrorKind, McpServerConfig};
    use std::collections::BTreeMap;

    fn read_tree(dir: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                match fs::symlink_metadata(entry.path()) {
                    Ok(m) if m.is_dir() => stack.push((entry.path(), rel)),
                    Ok(m) if m.is_file() => {
                        let text = fs::read(entry.path())
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default();
                        out.insert(rel, text);
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    fn skill(name: &str, files: &[(&str, &str)]) -> SkillSpec {
        SkillSpec {
            name: name.into(),
            content: format!("---\nname: {name}\n---\nbody of {name}"),
            files: files
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn encoding_is_safe_and_injective() {
        assert_eq!(encode_session_id(&sid("abc-DEF_9")), "abc-DEF_9");
        assert_eq!(
            encode_session_id(&sid("owner/repo#12")),
            "owner%2Frepo%2312"
        );
        assert_eq!(encode_session_id(&sid("..")), "%2E%2E");
        assert_eq!(encode_session_id(&sid("SOUL.md")), "SOUL%2Emd");
        assert_ne!(
            encode_session_id(&sid("a%2F")),
            encode_session_id(&sid("a/"))
        );
        let long = sid(&"/".repeat(128));
        let enc = encode_session_id(&long);
        assert!(enc.starts_with('~') && enc.len() <= 255, "{enc}");
        assert_ne!(enc, encode_session_id(&sid(&"/".repeat(127))));
        for id in [
            "a",
            "x/y",
            &"#".repeat(60),
            &"#".repeat(61),
            &"z".repeat(128),
        ] {
            let enc = encode_session_id(&sid(id));
            assert!(enc.len() <= 255);
            assert!(
                enc.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"%_-~".contains(&b))
            );
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_are_private_and_state_files_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        // A root that already exists, open to everyone, is narrowed; a new one is created so.
        let open_root = tmp.path().join("open");
        fs::create_dir(&open_root).unwrap();
        fs::set_permissions(&open_root, fs::Permissions::from_mode(0o755)).unwrap();
        let new_root = tmp.path().join("new").join("root");
        for root in [&open_root, &new_root] {
            let ws = Workspace::new(root);
            ws.init().unwrap();
            assert_eq!(mode_of(root), 0o700, "{}", root.display());
            let mut servers = McpServers::new();
            servers.insert(
                "calc".into(),
                serde_json::from_value(serde_json::json!({"command": "calc", "env": {"T": "x"}}))
                    .unwrap(),
            );
            let session = sid("s-1");
            let dir = ws
                .prepare(&session, &[skill("greet", &[])], &servers, Some("soul"))
                .unwrap();
            ws.append_history(
                &session,
                &HistoryMessage::user(anywork_core::TaskId::generate(), "hi"),
            )
            .unwrap();
            for sub in [
                "",
                "sessions",
                "files",
                "skills",
                ".claude",
                ".claude/skills",
            ] {
                assert_eq!(mode_of(&dir.join(sub)), 0o700, "{sub:?}");
            }
            for file in [
                "SOUL.md",
                "AGENTS.md",
                ".mcp.json",
                "sessions/history.jsonl",
            ] {
                assert_eq!(mode_of(&dir.join(file)), 0o600, "{file}");
            }
            assert_eq!(mode_of(&root.join("SOUL.md")), 0o600);
        }
    }

    /// Issue 15, item 7: a turn the worker never answered (it was killed mid-run) is marked
    /// as interrupted when the next turn starts, so the history never shows two user
    /// instructions in a row; answered turns and torn lines are left as they are.
    #[test]
    fn an_unanswered_turn_is_marked_interrupted_when_the_next_one_starts() {
        use crate::history::{INTERRUPTED, Role};
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        ws.init().unwrap();
        let session = sid("s-7");
        let (t1, t2, t3) = (
            anywork_core::TaskId::generate(),
            anywork_core::TaskId::generate(),
            anywork_core::TaskId::generate(),
        );
        ws.append_history(&session, &HistoryMessage::user(t1, "first"))
            .unwrap();
        let mut answer = HistoryMessage::interrupted(t1);
        answer.status = Some(anywork_core::TaskStatus::Completed);
        answer.error = None;
        answer.content = "answered".into();
        ws.append_history(&session, &answer).unwrap();
        ws.append_history(&session, &HistoryMessage::user(t2, "delete the files"))
            .unwrap();
        // The worker dies here, mid-write of something: a torn line.
        let path = ws.session_dir(&session).join("sessions/history.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"role\":\"assis").unwrap();
        drop(f);
        ws.append_history(&session, &HistoryMessage::user(t3, "what time is it?"))
            .unwrap();
        let history = ws.history(&session).unwrap();
        let roles: Vec<Role> = history.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::User
            ],
            "{history:?}"
        );
        assert_eq!(history[3].task_id, t2);
        assert_eq!(history[3].status, Some(anywork_core::TaskStatus::Failed));
        assert_eq!(history[3].error.as_deref(), Some(INTERRUPTED));
        assert_eq!(history[4].content, "what time is it?");
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_url(b""), "");
        assert_eq!(base64_url(b"f"), "Zg");
        assert_eq!(base64_url(b"fo"), "Zm8");
        assert_eq!(base64_url(b"foo"), "Zm9v");
        assert_eq!(base64_url(b"foob"), "Zm9vYg");
        assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn session_gets_layout_and_default_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let dir = ws.ensure_session(&sid("s/1")).unwrap();
        assert_eq!(dir, tmp.path().join("s%2F1"));
        for sub in ["sessions", "files", "skills", ".claude/skills"] {
            assert!(dir.join(sub).is_dir(), "{sub}");
        }
        assert_eq!(
            fs::read_to_string(tmp.path().join("SOUL.md")).unwrap(),
            DEFAULT_SOUL
        );
        assert_eq!(
            fs::read_to_string(dir.join("SOUL.md")).unwrap(),
            DEFAULT_SOUL
        );
        // A changed default is copied into new sessions only.
        ws.write_doc(None, WorkspaceDoc::Soul, "new soul").unwrap();
        assert_eq!(
            ws.read_doc(Some(&sid("s/1")), WorkspaceDoc::Soul).unwrap(),
            DEFAULT_SOUL
        );
        ws.ensure_session(&sid("s2")).unwrap();
        assert_eq!(
            ws.read_doc(Some(&sid("s2")), WorkspaceDoc::Soul).unwrap(),
            "new soul"
        );
    }

    #[test]
    fn prepare_replaces_previous_state() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let s = sid("s");
        let mcp: McpServers = BTreeMap::from([(
            "calc".to_string(),
            McpServerConfig::Stdio {
                command: "python3".into(),
                args: vec!["calc.py".into()],
                env: BTreeMap::new(),
            },
        )]);
        let a = skill("a", &[("scripts/run.sh", "echo a"), ("old.txt", "x")]);
        let b = skill("b", &[]);
        let dir = ws
            .prepare(&s, &[a.clone(), b], &mcp, Some("my soul"))
            .unwrap();
        for root in [".claude/skills", "skills"] {
            let tree = read_tree(&dir.join(root).join("a"));
            assert_eq!(tree["SKILL.md"], a.content);
            assert_eq!(tree["scripts/run.sh"], "echo a");
            assert!(dir.join(root).join("b/SKILL.md").is_file());
        }
        let mcp_json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(MCP_FILE)).unwrap()).unwrap();
        assert_eq!(mcp_json["mcpServers"]["calc"]["command"], "python3");
        assert_eq!(fs::read_to_string(dir.join(SOUL_FILE)).unwrap(), "my soul");

        let a2 = skill("a", &[("scripts/run.sh", "echo a2")]);
        for _ in 0..2 {
            ws.prepare(&s, std::slice::from_ref(&a2), &McpServers::new(), None)
                .unwrap();
            for root in [".claude/skills", "skills"] {
                let names: Vec<String> = fs::read_dir(dir.join(root))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(names, vec!["a".to_string()]);
                let tree = read_tree(&dir.join(root).join("a"));
                assert_eq!(tree.len(), 2, "{tree:?}");
                assert_eq!(tree["scripts/run.sh"], "echo a2");
            }
            assert!(!dir.join(MCP_FILE).exists());
            assert_eq!(fs::read_to_string(dir.join(SOUL_FILE)).unwrap(), "my soul");
        }
    }

    #[test]
    fn prepare_validates_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let s = sid("s");
        let cases = [
            vec![skill("../x", &[])],
            vec![skill("a/b", &[])],
            vec![skill("ok", &[("../escape", "x")])],
            vec![skill("ok", &[("/etc/passwd", "x")])],
            vec![skill("ok", &[("SKILL.md/x", "x")])],
            vec![skill("ok", &[("d", "x"), ("d/e", "y")])],
            vec![skill("ok", &[]), skill("ok", &[])],
        ];
        for skills in cases {
            let err = ws
                .prepare(&s, &skills, &McpServers::new(), None)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{skills:?}");
        }
        assert!(!ws.session_dir(&s).exists());
    }

    #[cfg(unix)]
    #[test]
    fn links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let s = sid("s");
        let dir = ws.ensure_session(&s).unwrap();
        fs::remove_dir_all(dir.join("skills")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("skills")).unwrap();
        let err = ws
            .prepare(&s, &[skill("a", &[])], &McpServers::new(), None)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.message().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        fs::remove_file(dir.join("skills")).unwrap();
        fs::remove_file(dir.join(SOUL_FILE)).unwrap();
        let target = outside.path().join("soul");
        std::os::unix::fs::symlink(&target, dir.join(SOUL_FILE)).unwrap();
        assert!(ws.write_doc(Some(&s), WorkspaceDoc::Soul, "x").is_err());
        assert!(ws.read_doc(Some(&s), WorkspaceDoc::Soul).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn files_are_listed_recursively() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let s = sid("s");
        assert!(ws.list_files(&s).unwrap().files.is_empty());
        let dir = ws.ensure_session(&s).unwrap();
        fs::create_dir_all(dir.join("files/sub/deeper")).unwrap();
        fs::write(dir.join("files/a.txt"), "hello").unwrap();
        fs::write(dir.join("files/sub/deeper/b.bin"), [0u8; 10]).unwrap();
        let listing = ws.list_files(&s).unwrap();
        let got: Vec<(&str, u64)> = listing
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.size))
            .collect();
        assert_eq!(got, vec![("a.txt", 5), ("sub/deeper/b.bin", 10)]);
        assert!(listing.files[0].modified > 1_600_000_000_000);
        assert!(!listing.truncated);
    }
}
