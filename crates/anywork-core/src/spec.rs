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
        if self.is_name_only() {
            return Err(Error::invalid_input(format!(
                "skill {:?} is given by name only and was not resolved to its files: install it \
                 in the server's skills directory ({0}/SKILL.md) or send it inline with `content`",
                self.name
            )));
        }
        if self.content.is_empty() && !self.files.contains_key("SKILL.md") {
            return Err(Error::invalid_input(format!(
                "skill {:?} has no SKILL.md: set `content` or files[\"SKILL.md\"]",
                self.name
            )));
        }
        Ok(())
    }

    /// A reference to the skill `name`, to be resolved from a skills directory by the caller
    /// (see [`SkillRef`]): no content and no files.
    pub fn named(name: impl Into<String>) -> Self {
        Self::new(name, "")
    }

    /// Whether this is only a name (no content, no files): a [`SkillRef::Name`] that nobody
    /// resolved yet. [`validate`](Self::validate) refuses it.
    pub fn is_name_only(&self) -> bool {
        self.content.is_empty() && self.files.is_empty()
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
    /// `type` in `.mcp.json`; `transport` in the original AnyWork's list form.
    #[serde(
        rename = "type",
        alias = "transport",
        default,
        skip_serializing_if = "Option::is_none"
    )]
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
        if raw.kind.is_none() && raw.command.is_none() && raw.url.is_none() {
            // `{}` (or `{"name": "docs"}` in the list form): a catalog entry by name.
            return Ok(McpServerConfig::catalog_ref());
        }
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
            "http" | "sse" | "streamable-http" | "streamable_http" => {
                let url = raw.url.filter(|u| !u.is_empty()).ok_or_else(|| {
                    Error::invalid_input(format!("an MCP {kind} server needs a `url`"))
                })?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Error::invalid_input(format!(
                        "MCP server url {url:?} must start with http:// or https://"
                    )));
                }
                let headers = raw.headers;
                Ok(if kind == "sse" {
                    McpServerConfig::Sse { url, headers }
                } else {
                    McpServerConfig::Http { url, headers }
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
        if c.is_catalog_ref() {
            return empty();
        }
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

impl McpServerConfig {
    /// A reference to the server's MCP catalog entry of the same name (see
    /// [`McpAccess`](crate::mcp_catalog::McpAccess)): what a request sends as `{}` in the map
    /// form, `"name"` or `{"name": "…"}` in the list form. Serialized as `{}`; never sent to a
    /// worker (the dispatcher replaces it with the entry or refuses the request).
    pub fn catalog_ref() -> Self {
        McpServerConfig::Stdio {
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    /// Whether this is a [`catalog_ref`](Self::catalog_ref).
    pub fn is_catalog_ref(&self) -> bool {
        matches!(self, McpServerConfig::Stdio { command, args, env } if command.is_empty() && args.is_empty() && env.is_empty())
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

/// A skill as a request names it: by name (`"code-review"`, resolved by the server from its
/// skills directory) or inline (`{"name", "content", "files"}`), the two forms the original
/// AnyWork's clients send.
///
/// A [`SkillRef::Name`] becomes a name-only [`SkillSpec`] ([`SkillSpec::named`]) so that it
/// fits `Vec<SkillSpec>` fields; whoever accepts the request replaces those with the resolved
/// skills ([`TaskRequest::resolve_skills`](crate::TaskRequest::resolve_skills)) before
/// [`SkillSpec::validate`] runs, which refuses an unresolved one with a clear message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SkillRef {
    /// A skill known to the server by this name.
    Name(String),
    /// A skill sent whole.
    Inline(SkillSpec),
}

impl SkillRef {
    /// The skill's name.
    pub fn name(&self) -> &str {
        match self {
            SkillRef::Name(n) => n,
            SkillRef::Inline(s) => &s.name,
        }
    }
}

impl From<SkillRef> for SkillSpec {
    fn from(r: SkillRef) -> Self {
        match r {
            SkillRef::Name(name) => SkillSpec::named(name),
            SkillRef::Inline(spec) => spec,
        }
    }
}

impl<'de> Deserialize<'de> for SkillRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Inline(SkillSpec),
        }
        use serde::de::Error as _;
        match Raw::deserialize(d).map_err(|_| {
            D::Error::custom(
                "a skill is a name (\"code-review\") or an object {\"name\", \"content\", \"files\"}",
            )
        })? {
            Raw::Name(name) => {
                validate_name("skill name", &name).map_err(D::Error::custom)?;
                Ok(SkillRef::Name(name))
            }
            Raw::Inline(spec) => Ok(SkillRef::Inline(spec)),
        }
    }
}

/// Deserializes `skills` in every form a client of the original AnyWork sends: a list of
/// names and/or inline objects, `[]` or `null`. Names become name-only [`SkillSpec`]s (see
/// [`SkillRef`]). Use as `#[serde(default, deserialize_with = "deserialize_skills_any")]`.
pub fn deserialize_skills_any<'de, D>(d: D) -> std::result::Result<Vec<SkillSpec>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let refs: Option<Vec<SkillRef>> = Option::deserialize(d)?;
    Ok(refs
        .unwrap_or_default()
        .into_iter()
        .map(SkillSpec::from)
        .collect())
}

/// Deserializes `mcp_servers` in every form clients send: the original AnyWork's list
/// (`[{"name", "transport": "stdio", "command", "args", "env"}]`,
/// `[{"name", "transport": "http", "url", "headers"}]`), the `.mcp.json` map by name
/// (`{"calc": {"command": …}}`), `[]`, `{}` or `null`. A name listed twice is refused. Use as
/// `#[serde(default, deserialize_with = "deserialize_mcp_servers_any")]`.
pub fn deserialize_mcp_servers_any<'de, D>(d: D) -> std::result::Result<McpServers, D::Error>
where
    D: serde::Deserializer<'de>,
{
    d.deserialize_any(McpServersVisitor)
}

/// One entry of the list form: a name and the server's fields.
#[derive(Deserialize)]
struct NamedMcpObject {
    name: String,
    #[serde(flatten)]
    raw: RawMcp,
}

/// An entry of the list form: a catalog name, or an object with a `name`.
enum NamedMcp {
    Name(String),
    Object(NamedMcpObject),
}

impl<'de> Deserialize<'de> for NamedMcp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(name) => Ok(NamedMcp::Name(name)),
            other => serde_json::from_value(other)
                .map(NamedMcp::Object)
                .map_err(D::Error::custom),
        }
    }
}

struct McpServersVisitor;

impl<'de> serde::de::Visitor<'de> for McpServersVisitor {
    type Value = McpServers;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "MCP servers as a list [{\"name\", \"transport\", ...}], a map {name: config}, or null",
        )
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<McpServers, E> {
        Ok(McpServers::new())
    }

    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<McpServers, E> {
        Ok(McpServers::new())
    }

    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<McpServers, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<McpServers, A::Error> {
        let mut servers = McpServers::new();
        while let Some((name, config)) = map.next_entry::<String, McpServerConfig>()? {
            if servers.insert(name.clone(), config).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "MCP server {name:?} is given twice"
                )));
            }
        }
        Ok(servers)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<McpServers, A::Error> {
        use serde::de::Error as _;
        let mut servers = McpServers::new();
        while let Some(entry) = seq.next_element::<NamedMcp>()? {
            let entry = match entry {
                NamedMcp::Object(o) => o,
                NamedMcp::Name(name) => NamedMcpObject {
                    name,
                    raw: McpServerConfig::catalog_ref().into(),
                },
            };
            validate_name("MCP server name", &entry.name).map_err(A::Error::custom)?;
            let config = McpServerConfig::try_from(entry.raw)
                .map_err(|e| A::Error::custom(format!("MCP server {:?}: {e}", entry.name)))?;
            if servers.insert(entry.name.clone(), config).is_some() {
                return Err(A::Error::custom(format!(
                    "MCP server {:?} is listed twice",
                    entry.name
                )));
            }
        }
        Ok(servers)
    }
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

    #[derive(Debug, Deserialize)]
    struct Req {
        #[serde(default, deserialize_with = "deserialize_skills_any")]
        skills: Vec<SkillSpec>,
        #[serde(default, deserialize_with = "deserialize_mcp_servers_any")]
        mcp_servers: McpServers,
    }

    fn req(v: serde_json::Value) -> std::result::Result<Req, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn mcp_servers_come_in_every_form_the_original_sends() {
        let expected = McpServers::from([
            (
                "github".to_owned(),
                McpServerConfig::Stdio {
                    command: "npx".into(),
                    args: vec!["-y".into(), "server-github".into()],
                    env: BTreeMap::from([("TOKEN".into(), "t".into())]),
                },
            ),
            (
                "docs".to_owned(),
                McpServerConfig::Http {
                    url: "https://docs.example/mcp".into(),
                    headers: BTreeMap::from([("Authorization".into(), "Bearer x".into())]),
                },
            ),
        ]);
        let list = req(json!({"mcp_servers": [
            {"name": "github", "transport": "stdio", "command": "npx",
             "args": ["-y", "server-github"], "env": {"TOKEN": "t"}},
            {"name": "docs", "transport": "http", "url": "https://docs.example/mcp",
             "headers": {"Authorization": "Bearer x"}}
        ]}))
        .unwrap();
        assert_eq!(list.mcp_servers, expected);
        let map = req(json!({"mcp_servers": {
            "github": {"command": "npx", "args": ["-y", "server-github"], "env": {"TOKEN": "t"}},
            "docs": {"type": "http", "url": "https://docs.example/mcp",
                     "headers": {"Authorization": "Bearer x"}}
        }}))
        .unwrap();
        assert_eq!(map.mcp_servers, expected);
        for empty in [json!([]), json!({}), json!(null)] {
            assert!(
                req(json!({"mcp_servers": empty}))
                    .unwrap()
                    .mcp_servers
                    .is_empty()
            );
        }
        assert!(req(json!({})).unwrap().mcp_servers.is_empty());
        let streamable = req(json!({"mcp_servers": [
            {"name": "s", "transport": "streamable-http", "url": "http://127.0.0.1:1/mcp"}]}))
        .unwrap();
        assert!(matches!(
            streamable.mcp_servers["s"],
            McpServerConfig::Http { .. }
        ));
    }

    #[test]
    fn bad_mcp_lists_say_what_is_wrong() {
        for (v, needle) in [
            (
                json!([{"name": "a", "command": "x"}, {"name": "a", "command": "y"}]),
                "twice",
            ),
            (json!([{"command": "x"}]), "name"),
            (json!([{"name": "../x", "command": "x"}]), "MCP server name"),
            (json!([{"name": "a", "transport": "stdio"}]), "command"),
            (
                json!([{"name": "a", "transport": "ws", "url": "ws://x"}]),
                "unknown MCP server type",
            ),
            (json!("github"), "MCP servers as a list"),
            (json!(3), "MCP servers as a list"),
        ] {
            let err = req(json!({"mcp_servers": v})).unwrap_err().to_string();
            assert!(err.contains(needle), "{v}: {err}");
        }
    }

    #[test]
    fn skills_are_names_or_inline_objects() {
        let r = req(json!({"skills": ["code-review",
            {"name": "greet", "content": "---\nname: greet\n---\nSay hi"}]}))
        .unwrap();
        assert_eq!(r.skills.len(), 2);
        assert!(r.skills[0].is_name_only());
        assert_eq!(r.skills[0].name, "code-review");
        let err = r.skills[0].validate().unwrap_err().to_string();
        assert!(
            err.contains("code-review") && err.contains("skills directory"),
            "{err}"
        );
        assert!(!r.skills[1].is_name_only());
        assert!(r.skills[1].validate().is_ok());
        for empty in [json!([]), json!(null)] {
            assert!(req(json!({"skills": empty})).unwrap().skills.is_empty());
        }
        for bad in [json!(["../etc"]), json!([3]), json!("code-review")] {
            assert!(req(json!({"skills": bad})).is_err(), "{bad}");
        }
        let refs: Vec<SkillRef> = serde_json::from_value(json!(["a", {"name": "b"}])).unwrap();
        assert_eq!(refs[0], SkillRef::Name("a".into()));
        assert_eq!(refs[1].name(), "b");
        assert_eq!(serde_json::to_value(&refs[0]).unwrap(), json!("a"));
    }
}
