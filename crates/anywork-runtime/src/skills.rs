//! Skills by name: a request may name a skill (`"skills": ["code-review"]`, as the original
//! AnyWork's clients do) instead of sending it whole. A [`SkillSource`] turns the name into
//! the skill's files before the task is stored; [`SkillsDir`] is the one that ships: a folder
//! (`SKILLS_DIR`) with one sub-folder per skill, each holding a `SKILL.md` whose front matter
//! has the skill's `name` and `description` (the Agent Skills format), plus any files beside
//! it.
//!
//! ```text
//! SKILLS_DIR/
//!   code-review/
//!     SKILL.md          ---\nname: code-review\ndescription: Reviews a diff…\n---\n…
//!     scripts/lint.sh
//! ```
//!
//! The dispatcher resolves the names of a request at intake (an unknown name or bad front
//! matter refuses the request, naming the skill and the folder looked in) and the name-only
//! default skills of channels the same way, at intake and again at run time.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anywork_core::spec::validate_name;
use anywork_core::{Error, ErrorKind, Result, SkillSpec};
use serde::Serialize;

/// A skill that can be asked for by name, as `GET /api/skills` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SkillInfo {
    /// Its name (the folder's).
    pub name: String,
    /// What it does, from its front matter.
    pub description: String,
}

/// A skill folder that cannot be used, with the reason (listed so that an operator sees it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InvalidSkill {
    /// The folder's name.
    pub name: String,
    /// Why it cannot be resolved.
    pub error: String,
}

/// What a [`SkillSource`] offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SkillCatalog {
    /// The skills that resolve, by name.
    pub skills: Vec<SkillInfo>,
    /// Folders that do not (bad front matter, too big, …).
    pub invalid: Vec<InvalidSkill>,
}

/// Resolves skill names to whole skills. Called off the async threads (it may read files).
pub trait SkillSource: Send + Sync + 'static {
    /// The skill `name` with all its files (`SKILL.md` included). `InvalidInput` naming the
    /// skill and where it was looked for when it is unknown or unusable.
    fn resolve(&self, name: &str) -> Result<SkillSpec>;

    /// What can be resolved, sorted by name.
    fn catalog(&self) -> Result<SkillCatalog>;
}

/// No skills by name: every name is refused, saying how to configure a skills directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSkills;

impl SkillSource for NoSkills {
    fn resolve(&self, name: &str) -> Result<SkillSpec> {
        Err(Error::invalid_input(format!(
            "skill {name:?} is asked for by name, but this server has no skills directory: set \
             SKILLS_DIR to a folder holding {name}/SKILL.md, or send the skill inline as \
             {{\"name\", \"content\"}}"
        )))
    }

    fn catalog(&self) -> Result<SkillCatalog> {
        Ok(SkillCatalog::default())
    }
}

/// Skills from a folder: `<root>/<name>/SKILL.md` and the files beside it. Symbolic links are
/// never followed, only UTF-8 text files are taken, and a skill is bounded in size and file
/// count.
#[derive(Debug, Clone)]
pub struct SkillsDir {
    root: PathBuf,
    max_bytes: u64,
    max_files: usize,
}

/// The longest `description` the Agent Skills format allows.
const MAX_DESCRIPTION: usize = 1024;

impl SkillsDir {
    /// Default bound of one skill's files, in bytes.
    pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
    /// Default bound of one skill's file count.
    pub const DEFAULT_MAX_FILES: usize = 200;

    /// Skills in `root`, with the default bounds. The folder is read at each resolve, so
    /// skills added later are found without a restart.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_files: Self::DEFAULT_MAX_FILES,
        }
    }

    /// Sets the bounds of one skill: total bytes and number of files.
    pub fn with_limits(mut self, max_bytes: u64, max_files: usize) -> Self {
        self.max_bytes = max_bytes;
        self.max_files = max_files.max(1);
        self
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn refuse(&self, name: &str, why: impl std::fmt::Display) -> Error {
        Error::invalid_input(format!(
            "skill {name:?} cannot be used: {why} (skills directory {})",
            self.root.display()
        ))
    }

    /// Reads the skill folder `name` whole.
    fn read(&self, name: &str) -> Result<SkillSpec> {
        validate_name("skill name", name)?;
        let dir = self.root.join(name);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(self.refuse(name, format!("{} is not a folder", dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::invalid_input(format!(
                    "unknown skill {name:?}: there is no {name}/SKILL.md in the skills directory \
                     {} (GET /api/skills lists the skills there)",
                    self.root.display()
                )));
            }
            Err(e) => return Err(self.refuse(name, format!("cannot read {}: {e}", dir.display()))),
        }
        let mut files = std::collections::BTreeMap::new();
        let mut total = 0u64;
        self.walk(name, &dir, "", &mut files, &mut total)?;
        let Some(skill_md) = files.get("SKILL.md") else {
            return Err(self.refuse(name, format!("{name}/SKILL.md is missing")));
        };
        let front = parse_front_matter(skill_md)
            .map_err(|why| self.refuse(name, format!("{name}/SKILL.md: {why}")))?;
        if front.name != name {
            return Err(self.refuse(
                name,
                format!(
                    "{name}/SKILL.md names the skill {:?}: the front matter's `name` must be the \
                     folder's name",
                    front.name
                ),
            ));
        }
        Ok(SkillSpec {
            name: name.to_owned(),
            content: String::new(),
            files,
        })
    }

    fn walk(
        &self,
        name: &str,
        dir: &Path,
        prefix: &str,
        files: &mut std::collections::BTreeMap<String, String>,
        total: &mut u64,
    ) -> Result<()> {
        let entries = fs::read_dir(dir)
            .map_err(|e| self.refuse(name, format!("cannot list {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| self.refuse(name, format!("cannot list {}: {e}", dir.display())))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                return Err(self.refuse(
                    name,
                    format!("a file name in {} is not UTF-8", dir.display()),
                ));
            };
            let rel = if prefix.is_empty() {
                file_name.to_owned()
            } else {
                format!("{prefix}/{file_name}")
            };
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)
                .map_err(|e| self.refuse(name, format!("cannot read {rel}: {e}")))?;
            if meta.file_type().is_symlink() {
                return Err(self.refuse(
                    name,
                    format!("{rel} is a symbolic link; a skill holds plain files only"),
                ));
            }
            if meta.is_dir() {
                self.walk(name, &path, &rel, files, total)?;
                continue;
            }
            if !meta.is_file() {
                return Err(self.refuse(name, format!("{rel} is not a plain file")));
            }
            anywork_core::spec::validate_relative_path(&rel)
                .map_err(|e| self.refuse(name, e.message()))?;
            if files.len() >= self.max_files {
                return Err(self.refuse(name, format!("it has more than {} files", self.max_files)));
            }
            *total = total.saturating_add(meta.len());
            if *total > self.max_bytes {
                return Err(self.refuse(
                    name,
                    format!("its files are larger than {} bytes", self.max_bytes),
                ));
            }
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            fs::File::open(&path)
                .and_then(|f| f.take(self.max_bytes + 1).read_to_end(&mut bytes))
                .map_err(|e| self.refuse(name, format!("cannot read {rel}: {e}")))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                self.refuse(
                    name,
                    format!("{rel} is not UTF-8 text; skills sent to workers hold text files only"),
                )
            })?;
            files.insert(rel, text);
        }
        Ok(())
    }
}

impl SkillSource for SkillsDir {
    fn resolve(&self, name: &str) -> Result<SkillSpec> {
        self.read(name)
    }

    fn catalog(&self) -> Result<SkillCatalog> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SkillCatalog::default());
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "cannot list the skills directory {}: {e}",
                        self.root.display()
                    ),
                ));
            }
        };
        let mut catalog = SkillCatalog::default();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match self.read(&name) {
                Ok(skill) => {
                    let description = parse_front_matter(skill.skill_md())
                        .map(|f| f.description)
                        .unwrap_or_default();
                    catalog.skills.push(SkillInfo { name, description });
                }
                Err(e) => catalog.invalid.push(InvalidSkill {
                    name,
                    error: e.message().to_owned(),
                }),
            }
        }
        catalog.skills.sort_by(|a, b| a.name.cmp(&b.name));
        catalog.invalid.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(catalog)
    }
}

/// The two fields of the Agent Skills front matter the server needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrontMatter {
    pub(crate) name: String,
    pub(crate) description: String,
}

/// Reads the front matter of a `SKILL.md`: a block between `---` lines at the very top, of
/// `key: value` lines (values plain or quoted, or a `|`/`>` block of indented lines). Only
/// `name` and `description` are required; other keys are ignored.
pub(crate) fn parse_front_matter(text: &str) -> std::result::Result<FrontMatter, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Err(
            "it does not start with a front matter block (a line `---`, then \
                    `name: …` and `description: …`, then `---`)"
                .into(),
        );
    }
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut closed = false;
    let mut block: Option<(String, bool, Vec<String>)> = None;
    for line in lines.by_ref() {
        if line.trim_end() == "---" {
            closed = true;
            break;
        }
        if let Some((_, _, body)) = block.as_mut()
            && (line.starts_with([' ', '\t']) || line.trim().is_empty())
        {
            body.push(line.trim().to_owned());
            continue;
        }
        if let Some((key, literal, body)) = block.take() {
            fields.push((key, join_block(&body, literal)));
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A nested value of a key we do not read (metadata, allowed-tools lists).
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("front matter line {line:?} is not `key: value`"));
        };
        let (key, value) = (key.trim().to_owned(), value.trim());
        match value {
            "|" | "|-" | "|+" => block = Some((key, true, Vec::new())),
            ">" | ">-" | ">+" => block = Some((key, false, Vec::new())),
            _ => fields.push((key, unquote(value)?)),
        }
    }
    if let Some((key, literal, body)) = block.take() {
        fields.push((key, join_block(&body, literal)));
    }
    if !closed {
        return Err("its front matter is not closed by a `---` line".into());
    }
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.trim().to_owned())
    };
    let name = get("name")
        .filter(|n| !n.is_empty())
        .ok_or("its front matter has no `name`")?;
    let description = get("description")
        .filter(|d| !d.is_empty())
        .ok_or("its front matter has no `description`")?;
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(format!(
            "its `description` is longer than {MAX_DESCRIPTION} characters"
        ));
    }
    Ok(FrontMatter { name, description })
}

fn join_block(lines: &[String], literal: bool) -> String {
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let joined = if literal {
        lines.join("\n")
    } else {
        lines.join(" ")
    };
    joined.trim().to_owned()
}

fn unquote(value: &str) -> std::result::Result<String, String> {
    for q in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(q) {
            return rest
                .strip_suffix(q)
                .map(|v| {
                    if q == '\'' {
                        v.replace("''", "'")
                    } else {
                        v.replace("\\\"", "\"").replace("\\\\", "\\")
                    }
                })
                .ok_or_else(|| format!("the value {value:?} has no closing quote"));
        }
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skill_md(name: &str, description: &str) -> String {
        format!("---\nname: {name}\ndescription: {description}\n---\n# {name}\nDo the thing.\n")
    }

    fn dir_with(skills: &[(&str, &[(&str, &str)])]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, files) in skills {
            for (path, content) in *files {
                let p = dir.path().join(name).join(path);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, content).unwrap();
            }
        }
        dir
    }

    /// A temporary folder without a tempfile dependency in the runtime.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "anywork-skills-{}",
                    anywork_core::TaskId::generate()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn front_matter_in_the_forms_skills_use() {
        let f = parse_front_matter(&skill_md("a", "Does a.")).unwrap();
        assert_eq!((f.name.as_str(), f.description.as_str()), ("a", "Does a."));
        let quoted =
            "---\nname: \"b\"\ndescription: 'It''s b: with a colon'\nlicense: MIT\n---\nbody";
        let f = parse_front_matter(quoted).unwrap();
        assert_eq!(
            (f.name.as_str(), f.description.as_str()),
            ("b", "It's b: with a colon")
        );
        let folded =
            "---\nname: c\ndescription: >\n  Line one\n  line two.\nmetadata:\n  k: v\n---\n";
        assert_eq!(
            parse_front_matter(folded).unwrap().description,
            "Line one line two."
        );
        for (bad, needle) in [
            ("no front matter", "does not start"),
            ("---\nname: a\ndescription: d\n", "not closed"),
            ("---\ndescription: d\n---\n", "no `name`"),
            ("---\nname: a\n---\n", "no `description`"),
            ("---\nname: a\ndescription: \"open\n---\n", "closing quote"),
            ("---\nname a\n---\n", "not `key: value`"),
        ] {
            let err = parse_front_matter(bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        let long = format!("---\nname: a\ndescription: {}\n---\n", "x".repeat(1025));
        assert!(parse_front_matter(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn a_skill_folder_resolves_with_its_files() {
        let dir = dir_with(&[(
            "code-review",
            &[
                ("SKILL.md", &skill_md("code-review", "Reviews diffs.")),
                ("scripts/lint.sh", "echo lint"),
            ],
        )]);
        let skills = SkillsDir::new(dir.path());
        let s = skills.resolve("code-review").unwrap();
        assert_eq!(s.name, "code-review");
        assert!(s.validate().is_ok());
        assert_eq!(s.files["scripts/lint.sh"], "echo lint");
        assert!(s.skill_md().contains("Reviews diffs."));
        let catalog = skills.catalog().unwrap();
        assert_eq!(
            catalog.skills,
            [SkillInfo {
                name: "code-review".into(),
                description: "Reviews diffs.".into()
            }]
        );
    }

    #[test]
    fn unknown_bad_and_unsafe_skills_are_refused_naming_skill_and_folder() {
        let dir = dir_with(&[
            ("wrong-name", &[("SKILL.md", &skill_md("other", "d"))]),
            ("no-front", &[("SKILL.md", "just text")]),
            ("no-md", &[("README.md", "x")]),
            (
                "big",
                &[
                    ("SKILL.md", &skill_md("big", "d")),
                    ("blob.txt", &"x".repeat(2000)),
                ],
            ),
        ]);
        fs::create_dir_all(dir.path().join("binary")).unwrap();
        fs::write(dir.path().join("binary/SKILL.md"), skill_md("binary", "d")).unwrap();
        fs::write(dir.path().join("binary/x.bin"), [0xff, 0x00]).unwrap();
        fs::create_dir_all(dir.path().join("linked")).unwrap();
        fs::write(dir.path().join("linked/SKILL.md"), skill_md("linked", "d")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("linked/passwd")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("linked"), dir.path().join("alias")).unwrap();
        let skills = SkillsDir::new(dir.path()).with_limits(1000, 10);
        let root = dir.path().display().to_string();
        for (name, needle) in [
            ("missing", "unknown skill \"missing\""),
            ("wrong-name", "must be the folder's name"),
            ("no-front", "front matter"),
            ("no-md", "SKILL.md is missing"),
            ("big", "larger than 1000 bytes"),
            ("binary", "not UTF-8"),
            ("linked", "symbolic link"),
            ("alias", "not a folder"),
            ("../etc", "skill name"),
        ] {
            let err = skills.resolve(name).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.message().contains(needle), "{name}: {err}");
            if name != "../etc" {
                assert!(err.message().contains(&root), "{name}: {err}");
                assert!(err.message().contains(name), "{name}: {err}");
            }
        }
        let catalog = skills.catalog().unwrap();
        assert!(catalog.skills.is_empty());
        let invalid: Vec<&str> = catalog.invalid.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            invalid,
            ["big", "binary", "linked", "no-front", "no-md", "wrong-name"]
        );
        assert!(
            SkillsDir::new(dir.path().join("none"))
                .catalog()
                .unwrap()
                .skills
                .is_empty()
        );
        let err = NoSkills.resolve("x").unwrap_err();
        assert!(err.message().contains("SKILLS_DIR"), "{err}");
    }
}
