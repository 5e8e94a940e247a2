//! Agent Skills (`<ws>/.claude/skills/*/SKILL.md`) and the system prompt.

use std::fs;
use std::path::Path;

/// Largest `SKILL.md`, `SOUL.md` or `AGENTS.md` read.
const MAX_DOC_BYTES: u64 = 256 * 1024;
/// Most skills listed.
const MAX_SKILLS: usize = 200;

/// The base of the system prompt.
pub const BASE_PROMPT: &str = "\
You are an AI agent working for a user inside a private workspace folder. You can read and \
write files and run shell commands there with your tools; paths are relative to the \
workspace. Work step by step, use tools when they help, and finish with a short, direct \
answer. If you need information only the user has, ask with the ask_user tool.";

/// One skill found in the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    /// Its name (front matter `name:`, else the folder name).
    pub name: String,
    /// Its description (front matter `description:`).
    pub description: String,
    /// The body of `SKILL.md` after the front matter.
    pub body: String,
}

/// Reads a text file of at most [`MAX_DOC_BYTES`], following no symbolic link at the end.
fn read_doc(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_DOC_BYTES {
        return None;
    }
    fs::read_to_string(path).ok()
}

/// Splits `---` front matter from the body and reads its `name:` and `description:` lines.
pub fn parse_skill_md(text: &str) -> (Option<String>, Option<String>, String) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("---") {
        return (None, None, text.to_owned());
    }
    let mut name = None;
    let mut description = None;
    let mut consumed = 0usize;
    let mut closed = false;
    for line in text.lines().skip(1) {
        consumed += 1;
        if line.trim() == "---" {
            closed = true;
            break;
        }
        let unquote = |v: &str| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            v.to_owned()
        };
        if let Some(v) = line.strip_prefix("name:") {
            name = Some(unquote(v)).filter(|v| !v.is_empty());
        } else if let Some(v) = line.strip_prefix("description:") {
            description = Some(unquote(v)).filter(|v| !v.is_empty());
        }
    }
    if !closed {
        return (None, None, text.to_owned());
    }
    let body: Vec<&str> = text.lines().skip(consumed + 1).collect();
    (name, description, body.join("\n").trim().to_owned())
}

/// The skills of a workspace, sorted by name.
pub fn scan(workspace: &Path) -> Vec<Skill> {
    let dir = workspace.join(".claude").join("skills");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut skills = Vec::new();
    for entry in entries.flatten() {
        if skills.len() >= MAX_SKILLS {
            break;
        }
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(text) = read_doc(&entry.path().join("SKILL.md")) else {
            continue;
        };
        let (name, description, body) = parse_skill_md(&text);
        skills.push(Skill {
            name: name.unwrap_or(folder),
            description: description.unwrap_or_default(),
            body,
        });
    }
    skills.sort_by(|a, b| a.name.cmp(&b.name));
    skills.dedup_by(|a, b| a.name == b.name);
    skills
}

/// The system prompt: [`BASE_PROMPT`], `SOUL.md`, `AGENTS.md` and the skills list.
pub fn system_prompt(workspace: &Path, skills: &[Skill]) -> String {
    let mut prompt = BASE_PROMPT.to_owned();
    prompt.push_str(&format!("\n\nWorkspace folder: {}", workspace.display()));
    for file in ["SOUL.md", "AGENTS.md"] {
        if let Some(text) = read_doc(&workspace.join(file)).filter(|t| !t.trim().is_empty()) {
            prompt.push_str(&format!("\n\n<{file}>\n{}\n</{file}>", text.trim()));
        }
    }
    if !skills.is_empty() {
        prompt.push_str(
            "\n\n# Skills\nThese skills are available. When one fits the task, load its \
             instructions with the skill tool first, then follow them.\n",
        );
        for skill in skills {
            prompt.push_str(&format!("- {}: {}\n", skill.name, skill.description));
        }
    }
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter() {
        let (n, d, b) =
            parse_skill_md("---\nname: greet\ndescription: \"Say hi\"\n---\nBody\nmore");
        assert_eq!(n.as_deref(), Some("greet"));
        assert_eq!(d.as_deref(), Some("Say hi"));
        assert_eq!(b, "Body\nmore");
        let (n, _, b) = parse_skill_md("no front matter");
        assert!(n.is_none());
        assert_eq!(b, "no front matter");
        let (n, _, _) = parse_skill_md("---\nname: x\nunclosed");
        assert!(n.is_none());
    }
}
