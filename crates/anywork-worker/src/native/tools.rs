//! The built-in tools, all confined to the workspace: `bash`, `read_file`, `write_file`,
//! `edit_file`, `list_files`, `grep`.
//!
//! Every path is resolved against the workspace and canonicalized (the part that exists; the
//! rest may not contain `..`), and must stay inside the canonical workspace, so `..`,
//! absolute paths and symbolic links cannot lead outside. A refused path is an `is_error`
//! tool result. `bash` runs with the workspace as its working directory in its own process
//! group, which is killed on timeout, on cancel and when the command ends (so no background
//! process outlives it); it is not otherwise sandboxed.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::glob::Glob;
use super::model::ToolDef;

/// Lines `read_file` returns when no `limit` is given.
const DEFAULT_READ_LINES: usize = 2000;
/// Most entries `list_files` lists.
const MAX_LISTED: usize = 1000;
/// Most matches `grep` reports.
const MAX_GREP_MATCHES: usize = 200;
/// Most directory entries one walk visits.
const MAX_WALK: usize = 200_000;
/// Largest file `grep` and `edit_file` look into.
const MAX_SCAN_BYTES: u64 = 10 * 1024 * 1024;
/// Longest a `bash` command may ask to run.
const MAX_BASH_TIMEOUT: Duration = Duration::from_secs(600);
/// Variables removed from `bash`'s environment (the model API keys).
const SECRET_VARS: &[&str] = &["ANTHROPIC_API_KEY", "API_KEY", "OPENAI_API_KEY"];

/// The answer of a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    /// Output text.
    pub content: String,
    /// Whether the tool failed.
    pub is_error: bool,
}

impl ToolOutcome {
    /// A successful answer.
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
        }
    }

    /// A failed answer.
    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, saying so.
pub(crate) fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let total = s.len();
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(&format!(
        "\n[output truncated: {total} bytes, showing the first {end}]"
    ));
}

/// Names of the built-in tools that touch files or run commands.
pub const BUILTIN_TOOLS: &[&str] = &[
    "bash",
    "read_file",
    "write_file",
    "edit_file",
    "list_files",
    "grep",
];

/// The definitions of the built-in tools.
pub fn definitions() -> Vec<ToolDef> {
    let def = |name: &str, description: &str, schema: Value| ToolDef {
        name: name.to_owned(),
        description: description.to_owned(),
        input_schema: schema,
    };
    vec![
        def(
            "bash",
            "Run a shell command with `bash -c` in the workspace folder. Returns stdout, stderr \
             and the exit code. Background processes are killed when the command ends.",
            json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line"},
                    "timeout": {"type": "integer", "description": "Time limit in seconds (max 600)"}
                },
                "required": ["command"]
            }),
        ),
        def(
            "read_file",
            "Read a text file of the workspace. Paths are relative to the workspace folder.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path, e.g. files/notes.md"},
                    "offset": {"type": "integer", "description": "First line to return (1-based)"},
                    "limit": {"type": "integer", "description": "How many lines to return"}
                },
                "required": ["path"]
            }),
        ),
        def(
            "write_file",
            "Write a text file in the workspace (replacing it if it exists); creates the \
             parent folders.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "File path, e.g. files/out.txt"},
                    "content": {"type": "string", "description": "The whole new content"}
                },
                "required": ["path", "content"]
            }),
        ),
        def(
            "edit_file",
            "Replace an exact string in a file. old_string must occur exactly once unless \
             replace_all is true.",
            json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "old_string": {"type": "string", "description": "Exact text to replace"},
                    "new_string": {"type": "string", "description": "Replacement text"},
                    "replace_all": {"type": "boolean", "description": "Replace every occurrence"}
                },
                "required": ["path", "old_string", "new_string"]
            }),
        ),
        def(
            "list_files",
            "List files matching a glob pattern (`*`, `?`, `[a-z]`, `{a,b}`, `**` for any \
             folders, e.g. `**/*.md`), relative to `path` (default: the workspace).",
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Glob, default **/*"},
                    "path": {"type": "string", "description": "Folder to list, default ."}
                }
            }),
        ),
        def(
            "grep",
            "Search files for a literal string; answers `path:line: text` lines.",
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Text to find (not a regex)"},
                    "path": {"type": "string", "description": "File or folder, default ."},
                    "glob": {"type": "string", "description": "Only files matching this glob, e.g. *.rs"},
                    "ignore_case": {"type": "boolean"}
                },
                "required": ["pattern"]
            }),
        ),
    ]
}

/// Runs the built-in tools inside one workspace.
#[derive(Debug, Clone)]
pub struct Builtins {
    root: PathBuf,
    bash_timeout: Duration,
    max_output: usize,
}

fn str_arg<'a>(input: &'a Value, key: &str) -> Result<&'a str, String> {
    input
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string argument `{key}`"))
}

fn opt_u64(input: &Value, key: &str) -> Option<u64> {
    let v = input.get(key)?;
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn opt_bool(input: &Value, key: &str) -> bool {
    match input.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

impl Builtins {
    /// Tools for the workspace `root`, which must exist (it is canonicalized).
    pub fn new(root: &Path, bash_timeout: Duration, max_output: usize) -> std::io::Result<Self> {
        Ok(Self {
            root: root.canonicalize()?,
            bash_timeout,
            max_output: max_output.max(1000),
        })
    }

    /// Resolves `raw` inside the workspace, or says why not.
    pub fn resolve(&self, raw: &str) -> Result<PathBuf, String> {
        resolve(&self.root, raw)
    }

    /// The path as shown to the model: relative to the workspace.
    fn show(&self, path: &Path) -> String {
        match path.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => path.to_string_lossy().into_owned(),
        }
    }

    /// Runs built-in tool `name`, or `None` when it is not one.
    pub async fn call(&self, name: &str, input: &Value) -> Option<ToolOutcome> {
        if !BUILTIN_TOOLS.contains(&name) {
            return None;
        }
        if !input.is_object() {
            return Some(ToolOutcome::error(format!(
                "the arguments of {name} must be a JSON object"
            )));
        }
        if name == "bash" {
            return Some(self.bash(input).await);
        }
        let this = self.clone();
        let name = name.to_owned();
        let input = input.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = match name.as_str() {
                "read_file" => this.read_file(&input),
                "write_file" => this.write_file(&input),
                "edit_file" => this.edit_file(&input),
                "list_files" => this.list_files(&input),
                _ => this.grep(&input),
            };
            match result {
                Ok(mut text) => {
                    cut(&mut text, this.max_output);
                    ToolOutcome::ok(text)
                }
                Err(e) => ToolOutcome::error(e),
            }
        })
        .await;
        Some(result.unwrap_or_else(|e| ToolOutcome::error(format!("the tool failed: {e}"))))
    }

    fn read_file(&self, input: &Value) -> Result<String, String> {
        let raw = str_arg(input, "path")?;
        let path = self.resolve(raw)?;
        if path.is_dir() {
            return Err(format!("{raw} is a folder; use list_files"));
        }
        let file = fs::File::open(&path).map_err(|e| format!("cannot read {raw}: {e}"))?;
        let offset = opt_u64(input, "offset").unwrap_or(1).max(1);
        let limit = opt_u64(input, "limit")
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX))
            .unwrap_or(DEFAULT_READ_LINES)
            .max(1);
        let mut reader = BufReader::new(file);
        let mut out = String::new();
        let mut line = Vec::new();
        let mut number: u64 = 0;
        let mut shown = 0usize;
        let mut more = false;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("cannot read {raw}: {e}"))?;
            if n == 0 {
                break;
            }
            if number == 0 && line.contains(&0) {
                return Err(format!("{raw} looks like a binary file"));
            }
            number += 1;
            if number < offset {
                continue;
            }
            if shown >= limit || out.len() > self.max_output {
                more = true;
                break;
            }
            out.push_str(&String::from_utf8_lossy(&line));
            shown += 1;
        }
        if number == 0 {
            return Ok(format!("({raw} is empty)"));
        }
        if shown == 0 {
            return Ok(format!("({raw} has only {number} lines)"));
        }
        if more {
            let last = offset + shown as u64 - 1;
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!(
                "[showing lines {offset}-{last}; more follow: use offset {} to read on]",
                last + 1
            ));
        }
        Ok(out)
    }

    fn write_file(&self, input: &Value) -> Result<String, String> {
        let raw = str_arg(input, "path")?;
        let content = str_arg(input, "content")?;
        let path = self.resolve(raw)?;
        if path == self.root || path.is_dir() {
            return Err(format!("{raw} is a folder"));
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create the folder of {raw}: {e}"))?;
        }
        // Resolve again now that the parents exist (a link may have appeared in between).
        let path = self.resolve(raw)?;
        fs::write(&path, content).map_err(|e| format!("cannot write {raw}: {e}"))?;
        Ok(format!(
            "wrote {} bytes to {}",
            content.len(),
            self.show(&path)
        ))
    }

    fn edit_file(&self, input: &Value) -> Result<String, String> {
        let raw = str_arg(input, "path")?;
        let old = str_arg(input, "old_string")?;
        let new = str_arg(input, "new_string")?;
        let all = opt_bool(input, "replace_all");
        if old.is_empty() {
            return Err("old_string must not be empty".to_owned());
        }
        let path = self.resolve(raw)?;
        let meta = fs::metadata(&path).map_err(|e| format!("cannot read {raw}: {e}"))?;
        if meta.len() > MAX_SCAN_BYTES {
            return Err(format!("{raw} is too large to edit ({} bytes)", meta.len()));
        }
        let text =
            fs::read_to_string(&path).map_err(|e| format!("cannot read {raw} as text: {e}"))?;
        let count = text.matches(old).count();
        if count == 0 {
            return Err(format!("old_string was not found in {raw}"));
        }
        if count > 1 && !all {
            return Err(format!(
                "old_string occurs {count} times in {raw}: add surrounding text to make it \
                 unique, or set replace_all"
            ));
        }
        let updated = if all {
            text.replace(old, new)
        } else {
            text.replacen(old, new, 1)
        };
        fs::write(&path, updated).map_err(|e| format!("cannot write {raw}: {e}"))?;
        Ok(format!(
            "replaced {count} occurrence{} in {}",
            if count == 1 { "" } else { "s" },
            self.show(&path)
        ))
    }

    fn list_files(&self, input: &Value) -> Result<String, String> {
        let base_raw = input.get("path").and_then(Value::as_str).unwrap_or(".");
        let base = self.resolve(base_raw)?;
        if !base.is_dir() {
            return Err(format!("{base_raw} is not a folder"));
        }
        let pattern = input
            .get("pattern")
            .and_then(Value::as_str)
            .filter(|p| !p.trim().is_empty())
            .unwrap_or("**/*");
        let glob = Glob::new(pattern);
        let mut found = Vec::new();
        let mut truncated = false;
        walk(&base, &mut |path, rel| {
            if glob.matches(rel) {
                if found.len() >= MAX_LISTED {
                    truncated = true;
                    return false;
                }
                found.push(self.show(path));
            }
            true
        });
        found.sort();
        if found.is_empty() {
            return Ok(format!(
                "no files match {pattern:?} in {}",
                self.show(&base)
            ));
        }
        let mut out = found.join("\n");
        if truncated {
            out.push_str(&format!("\n[stopped after {MAX_LISTED} files]"));
        }
        Ok(out)
    }

    fn grep(&self, input: &Value) -> Result<String, String> {
        let needle = str_arg(input, "pattern")?;
        if needle.is_empty() {
            return Err("pattern must not be empty".to_owned());
        }
        let ignore_case = opt_bool(input, "ignore_case");
        let needle_cmp = if ignore_case {
            needle.to_lowercase()
        } else {
            needle.to_owned()
        };
        let base_raw = input.get("path").and_then(Value::as_str).unwrap_or(".");
        let base = self.resolve(base_raw)?;
        let glob = input
            .get("glob")
            .and_then(Value::as_str)
            .filter(|g| !g.trim().is_empty())
            .map(Glob::new);
        let mut files = Vec::new();
        if base.is_file() {
            files.push(base.clone());
        } else if base.is_dir() {
            walk(&base, &mut |path, rel| {
                let keep = match &glob {
                    None => true,
                    Some(g) if g.is_name_only() => {
                        let name = rel.rsplit('/').next().unwrap_or(rel);
                        g.matches(name)
                    }
                    Some(g) => g.matches(rel),
                };
                if keep && path.is_file() {
                    files.push(path.to_path_buf());
                }
                true
            });
            files.sort();
        } else {
            return Err(format!("{base_raw} does not exist"));
        }
        let mut out = Vec::new();
        let mut truncated = false;
        'files: for file in &files {
            let Ok(meta) = fs::metadata(file) else {
                continue;
            };
            if meta.len() > MAX_SCAN_BYTES {
                continue;
            }
            let Ok(mut f) = fs::File::open(file) else {
                continue;
            };
            let mut bytes = Vec::new();
            if f.read_to_end(&mut bytes).is_err() || bytes.iter().take(8192).any(|b| *b == 0) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            for (i, line) in text.lines().enumerate() {
                let hit = if ignore_case {
                    line.to_lowercase().contains(&needle_cmp)
                } else {
                    line.contains(&needle_cmp)
                };
                if hit {
                    if out.len() >= MAX_GREP_MATCHES {
                        truncated = true;
                        break 'files;
                    }
                    let shown: String = line.chars().take(300).collect();
                    out.push(format!("{}:{}: {}", self.show(file), i + 1, shown));
                }
            }
        }
        if out.is_empty() {
            return Ok(format!("no matches for {needle:?}"));
        }
        let mut text = out.join("\n");
        if truncated {
            text.push_str(&format!("\n[stopped after {MAX_GREP_MATCHES} matches]"));
        }
        Ok(text)
    }

    async fn bash(&self, input: &Value) -> ToolOutcome {
        let command = match str_arg(input, "command") {
            Ok(c) => c,
            Err(e) => return ToolOutcome::error(e),
        };
        let timeout = opt_u64(input, "timeout")
            .map(Duration::from_secs)
            .unwrap_or(self.bash_timeout)
            .clamp(
                Duration::from_secs(1),
                MAX_BASH_TIMEOUT.max(self.bash_timeout),
            );
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg("-c")
            .arg(command)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for var in SECRET_VARS {
            cmd.env_remove(var);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return ToolOutcome::error(format!("cannot run bash: {e}")),
        };
        // Kills the whole group when this future ends or is dropped (cancel, timeout).
        let group = child.id().map(ProcessGroup);
        let limit = self.max_output;
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::spawn(read_limited(s, limit)));
        let stderr = child
            .stderr
            .take()
            .map(|s| tokio::spawn(read_limited(s, limit)));
        let status = tokio::time::timeout(timeout, child.wait()).await;
        drop(group); // the command ended or timed out: nothing of it may linger
        let collect = |handle: Option<tokio::task::JoinHandle<(Vec<u8>, usize)>>| async move {
            match handle {
                Some(h) => match tokio::time::timeout(Duration::from_secs(2), h).await {
                    Ok(Ok(r)) => r,
                    _ => (Vec::new(), 0),
                },
                None => (Vec::new(), 0),
            }
        };
        let (out, out_total) = collect(stdout).await;
        let (err, err_total) = collect(stderr).await;
        let mut text = String::from_utf8_lossy(&out).into_owned();
        if out_total > out.len() {
            text.push_str(&format!("\n[stdout truncated: {out_total} bytes]"));
        }
        if !err.is_empty() {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str("[stderr]\n");
            text.push_str(&String::from_utf8_lossy(&err));
            if err_total > err.len() {
                text.push_str(&format!("\n[stderr truncated: {err_total} bytes]"));
            }
        }
        let is_error = match status {
            Err(_) => {
                let _ = child.kill().await;
                text.push_str(&format!(
                    "\n[the command timed out after {} s and was killed]",
                    timeout.as_secs()
                ));
                true
            }
            Ok(Err(e)) => {
                text.push_str(&format!("\n[cannot wait for bash: {e}]"));
                true
            }
            Ok(Ok(status)) => match status.code() {
                Some(0) => false,
                Some(code) => {
                    text.push_str(&format!("\n[exit code {code}]"));
                    true
                }
                None => {
                    text.push_str("\n[killed by a signal]");
                    true
                }
            },
        };
        if text.trim().is_empty() {
            text = "(no output)".to_owned();
        }
        cut(&mut text, self.max_output.saturating_mul(2));
        ToolOutcome {
            content: text,
            is_error,
        }
    }
}

/// Kills a process group when dropped.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads everything, keeps the first `limit` bytes; returns them and the total length.
async fn read_limited(mut r: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, usize) {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total = total.saturating_add(n);
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, total)
}

/// Resolves `raw` against the canonical `root` and makes sure it stays inside.
pub fn resolve(root: &Path, raw: &str) -> Result<PathBuf, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("the path is empty".to_owned());
    }
    if trimmed.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    let requested = Path::new(trimmed);
    let joined = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    let components: Vec<Component<'_>> = joined.components().collect();
    // The longest prefix that exists (a dangling link counts: canonicalize then fails).
    let mut split = components.len();
    loop {
        let prefix: PathBuf = components[..split].iter().collect();
        if split == 0 || fs::symlink_metadata(&prefix).is_ok() {
            break;
        }
        split -= 1;
    }
    let prefix: PathBuf = components[..split].iter().collect();
    let mut resolved = if split == 0 {
        return Err(format!("{raw} is outside the workspace"));
    } else {
        prefix
            .canonicalize()
            .map_err(|e| format!("cannot resolve {raw}: {e}"))?
    };
    for component in &components[split..] {
        match component {
            Component::Normal(name) => resolved.push(name),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "{raw} uses '..' below a folder that does not exist"
                ));
            }
        }
    }
    if resolved.starts_with(root) {
        Ok(resolved)
    } else {
        Err(format!(
            "access denied: {raw} is outside the workspace (paths must stay inside it)"
        ))
    }
}

/// Walks `base` depth first without following links, skipping `.git`; calls `f` with each
/// entry's path and its `/`-separated path relative to `base` until `f` says stop.
fn walk(base: &Path, f: &mut dyn FnMut(&Path, &str) -> bool) {
    let mut stack = vec![(base.to_path_buf(), String::new(), 0usize)];
    let mut visited = 0usize;
    while let Some((dir, rel, depth)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for entry in entries {
            visited += 1;
            if visited > MAX_WALK {
                return;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if name != ".git" && depth < 64 {
                    subdirs.push((entry.path(), child_rel));
                }
                continue;
            }
            if !f(&entry.path(), &child_rel) {
                return;
            }
        }
        for (path, child_rel) in subdirs.into_iter().rev() {
            stack.push((path, child_rel, depth + 1));
        }
    }
}
