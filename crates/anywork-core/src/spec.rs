//! What a task asks its worker to set up: Agent Skills and MCP servers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An Agent Skill: a folder with a `SKILL.md` and optional extra files.
///
/// The worker writes it to `.claude/skills/<name>/SKILL.md` (and the extra files beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkillSpec {
    /// Folder name: 1 to 64 of `a-z`, `A-Z`, `0-9`, `-`, `_`, not starting with `-` or `_`.
    pub name: String,
    /// The body of `SKILL.md`, front matter included. Empty when `files` holds `SKILL.md`.
    #[serde(default)]
    pub content: String,
    /// Extra files by relative path (`scripts/run.sh`), as the original AnyWork sends them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

impl SkillSpec {
    /// A skill with just a `SKILL.md`.
    pub fn new(name: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            content: content.into(),
            files: BTreeMap::new(),
        }
    }

    /// Refuses names and paths that could leave the skill's folder.
    pub fn validate(&self) -> Result<()> {
        validate_name("skill name", &self.name)?;
        for path in self.files.keys() {
            validate_relative_path(path)
                .map_err(|e| Error::invalid_input(format!("skill {:?}: {e}", self.name)))?;
        }
        if self.content.is_empty() && !self.files.contains_key("SKILL.md") {
            return Err(Error::invalid_input(format!(
                "skill {:?} has no SKILL.md: set `content` or files[\"SKILL.md\"]",
                self.name
            )));
        }
        Ok(())
    }

    /// The `SKILL.md` text: `content`, or else `files["SKILL.md"]`.
    pub fn skill_md(&self) -> &str {
        if self.content.is_empty() {
            self.files.get("SKILL.md").map(String::as_str).unwrap_or("")
        } else {
            &self.content
        }
    }
}

/// Checks a name used as one path segment (skill or MCP server name).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with(['-', '_']);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "{what} {name:?} must be 1 to 64 characters of a-z, A-Z, 0-9, '-' or '_', not starting with '-' or '_'"
        )))
    }
}

/// Checks a relative path inside a folder: no absolute path, no `..`, no empty or `.` segment,
/// no backslash or NUL.
pub fn validate_relative_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid_input(format!("path {path:?} {why}")));
    if path.is_empty() || path.len() > 512 {
        return bad("must be 1 to 512 characters long");
    }
    if path.starts_with('/') {
        return bad("must be relative");
    }
    if path.contains(['\\', '\0']) {
        return bad("may not contain a backslash or NUL");
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("may not contain empty, '.' or '..' segments");
        }
    }
    Ok(())
}

/// One MCP server, spelled as Claude Code's `.mcp.json` spells it (`type` defaults to `stdio`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawMcp", into = "RawMcp")]
pub enum McpServerConfig {
    /// A child process speaking MCP on stdin/stdout.
    Stdio {
        /// Program to run.
        command: String,
        /// Its arguments.
        args: Vec<String>,
        /// Extra environment.
        env: BTreeMap<String, String>,
    },
    /// Streamable HTTP transport.
    Http {
        /// Endpoint URL.
        url: String,
        /// Extra request headers.
        headers: BTreeMap<String, String>,
    },
    /// The older HTTP + server-sent events transport.
    Sse {
        /// Endpoint URL.
        url: String,
        /// Extra request headers.
        headers: BTreeMap<String, String>,
    },
}

#[derive(Serialize, Deserialize)]
struct RawMcp {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

impl TryFrom<RawMcp> for McpServerConfig {
    type Error = Error;
    fn try_from(raw: RawMcp) -> Result<Self> {
        let kind = raw
            .kind
            .as_deref()
            .unwrap_or(if raw.url.is_some() && raw.command.is_none() {
                "http"
            } else {
                "stdio"
            });
        match kind {
            "stdio" => {
                let command = raw.command.filter(|c| !c.is_empty()).ok_or_else(|| {
                    Error::invalid_input("an MCP stdio server needs a non-empty `command`")
                })?;
                Ok(McpServerConfig::Stdio {
                    command,
                    args: raw.args,
                    env: raw.env,
                })
            }
            "http" | "sse" => {
                let url = raw.url.filter(|u| !u.is_empty()).ok_or_else(|| {
                    Error::invalid_input(format!("an MCP {kind} server needs a `url`"))
                })?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Error::invalid_input(format!(
                        "MCP server url {url:?} must start with http:// or https://"
                    )));
                }
                let headers = raw.headers;
                Ok(if kind == "http" {
                    McpServerConfig::Http { url, headers }
                } else {
                    McpServerConfig::Sse { url, headers }
                })
            }
            other => Err(Error::invalid_input(format!(
                "unknown MCP server type {other:?}: use \"stdio\", \"http\" or \"sse\""
            ))),
        }
    }
}

impl From<McpServerConfig> for RawMcp {
    fn from(c: McpServerConfig) -> Self {
        let empty = || RawMcp {
            kind: None,
            command: None,
            args: Vec::new(),
            env: BTreeMap::new(),
            url: None,
            headers: BTreeMap::new(),
        };
        match c {
            McpServerConfig::Stdio { command, args, env } => RawMcp {
                kind: Some("stdio".into()),
                command: Some(command),
                args,
                env,
                ..empty()
            },
            McpServerConfig::Http { url, headers } => RawMcp {
                kind: Some("http".into()),
                url: Some(url),
                headers,
                ..empty()
            },
            McpServerConfig::Sse { url, headers } => RawMcp {
                kind: Some("sse".into()),
                url: Some(url),
                headers,
                ..empty()
            },
        }
    }
}

/// MCP servers by name, as in `.mcp.json`'s `mcpServers` object.
pub type McpServers = BTreeMap<String, McpServerConfig>;

/// Checks every server name in `servers`.
pub fn validate_mcp_servers(servers: &McpServers) -> Result<()> {
    servers
        .keys()
        .try_for_each(|name| validate_name("MCP server name", name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mcp_json_round_trips_as_claude_code_spells_it() {
        let stdio: McpServerConfig =
            serde_json::from_value(json!({"command": "python3", "args": ["calc.py"]})).unwrap();
        assert_eq!(
            serde_json::to_value(&stdio).unwrap(),
            json!({"type": "stdio", "command": "python3", "args": ["calc.py"]})
        );
        let http: McpServerConfig = serde_json::from_value(
            json!({"type": "http", "url": "http://127.0.0.1:9/mcp", "headers": {"A": "b"}}),
        )
        .unwrap();
        assert!(matches!(http, McpServerConfig::Http { .. }));
        let sse: McpServerConfig =
            serde_json::from_value(json!({"type": "sse", "url": "https://x/sse"})).unwrap();
        assert!(matches!(sse, McpServerConfig::Sse { .. }));
    }

    #[test]
    fn bad_mcp_configs_are_refused_with_a_reason() {
        for (v, needle) in [
            (json!({"type": "stdio"}), "command"),
            (json!({"type": "http"}), "url"),
            (
                json!({"type": "ws", "url": "ws://x"}),
                "unknown MCP server type",
            ),
            (json!({"type": "http", "url": "file:///etc"}), "http://"),
        ] {
            let err = serde_json::from_value::<McpServerConfig>(v).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn skill_paths_cannot_escape() {
        let mut s = SkillSpec::new("greet", "---\nname: greet\n---\nSay hi");
        assert!(s.validate().is_ok());
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "a\\b", ""] {
            s.files = BTreeMap::from([(bad.to_string(), "x".to_string())]);
            assert!(s.validate().is_err(), "{bad:?} accepted");
        }
        for bad in ["..", "a/b", "-x", "", "x y"] {
            assert!(SkillSpec::new(bad, "body").validate().is_err(), "{bad:?}");
        }
        let only_files = SkillSpec {
            name: "f".into(),
            content: String::new(),
            files: BTreeMap::from([("SKILL.md".into(), "body".into())]),
        };
        assert!(only_files.validate().is_ok());
        assert_eq!(only_files.skill_md(), "body");
        assert!(SkillSpec::new("empty", "").validate().is_err());
    }
}
