//! [`McpCatalog`]: the MCP servers an operator offers (`MCP_SERVERS_FILE`), and
//! [`McpAccess`], the rule that decides which MCP servers a request may ask for.
//!
//! A request (WebSocket chat, `POST /api/tasks`, a webhook) must not start programs on the
//! server's machine: it names catalog entries, and only the operator decides what those run.
//! An entry's secret values (`env` of a stdio server, `headers` of an HTTP one) may come from
//! the environment (`{"env": "VAR"}`) or a file (`{"file": "/run/secrets/x"}`); they are read
//! when the task is dispatched ([`McpCatalog::resolve`]) and never stored: a task row holds
//! the entry's [stored form](McpCatalog::stored_form), whose values are all
//! [`McpCatalog::REDACTED`].
//!
//! Pure: reading a variable or a file is the caller's [`SecretReader`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::spec::{McpServerConfig, McpServers, validate_name};

/// One value of a catalog entry's `env` or `headers`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SecretValue {
    /// A literal value, kept in the catalog file.
    Plain(String),
    /// The value of an environment variable of the server, read at dispatch time.
    Env {
        /// The variable's name.
        env: String,
    },
    /// The content of a file (trailing newlines removed), read at dispatch time.
    File {
        /// The file's path.
        file: PathBuf,
    },
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretValue::Plain(_) => f.write_str("Plain(<redacted>)"),
            SecretValue::Env { env } => write!(f, "Env({env})"),
            SecretValue::File { file } => write!(f, "File({})", file.display()),
        }
    }
}

/// Reads [`SecretValue::Env`] and [`SecretValue::File`] values (the environment, the file
/// system); its errors must name the variable or file, never a value.
pub trait SecretReader {
    /// The value of `value` (a plain value is returned as is).
    fn read(&self, value: &SecretValue) -> Result<String>;
}

impl<F: Fn(&SecretValue) -> Result<String>> SecretReader for F {
    fn read(&self, value: &SecretValue) -> Result<String> {
        self(value)
    }
}

/// One catalog entry, spelled like `.mcp.json` (`type` defaults to `stdio`, or `http` with a
/// `url`), with [`SecretValue`]s in `env` and `headers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogServer {
    /// `stdio`, `http` or `sse`.
    #[serde(rename = "type", alias = "transport", default)]
    kind: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, SecretValue>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, SecretValue>,
}

impl CatalogServer {
    /// The config with every value read by `reader` (or replaced by `redact`).
    fn config(
        &self,
        mut value: impl FnMut(&SecretValue) -> Result<String>,
    ) -> Result<McpServerConfig> {
        let mut raw = serde_json::Map::new();
        if let Some(kind) = &self.kind {
            raw.insert("type".into(), kind.clone().into());
        }
        if let Some(command) = &self.command {
            raw.insert("command".into(), command.clone().into());
        }
        if !self.args.is_empty() {
            raw.insert("args".into(), self.args.clone().into());
        }
        if let Some(url) = &self.url {
            raw.insert("url".into(), url.clone().into());
        }
        let mut read = |values: &BTreeMap<String, SecretValue>| -> Result<serde_json::Value> {
            let mut out = serde_json::Map::new();
            for (k, v) in values {
                out.insert(k.clone(), value(v)?.into());
            }
            Ok(out.into())
        };
        raw.insert("env".into(), read(&self.env)?);
        raw.insert("headers".into(), read(&self.headers)?);
        serde_json::from_value(raw.into()).map_err(|e| Error::invalid_input(e.to_string()))
    }
}

/// The operator's MCP servers by name. `Debug` shows no plain value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpCatalog {
    servers: BTreeMap<String, CatalogServer>,
}

impl McpCatalog {
    /// What a stored task holds instead of each `env` / `headers` value of a catalog entry.
    pub const REDACTED: &'static str = "<from the MCP catalog>";

    /// An empty catalog: requests may name no server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a catalog file: `{"mcpServers": {name: entry}}` (as `.mcp.json`) or
    /// `{name: entry}`. Every entry is checked now (names, types, URLs), so that a bad file
    /// stops the server at start with the reason.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid_input(format!("the MCP catalog is not JSON: {e}")))?;
        let servers = match value.get("mcpServers") {
            Some(inner) => inner.clone(),
            None => value,
        };
        let servers: BTreeMap<String, CatalogServer> = serde_json::from_value(servers)
            .map_err(|e| {
                Error::invalid_input(format!(
                    "the MCP catalog must map names to servers ({{\"name\": {{\"command\", \"args\", \"env\"}} or {{\"url\", \"headers\"}}}}): {e}"
                ))
            })?;
        let catalog = Self { servers };
        for (name, server) in &catalog.servers {
            validate_name("MCP server name", name)
                .map_err(|e| Error::invalid_input(format!("MCP catalog: {e}")))?;
            if server.command.is_none() && server.url.is_none() {
                return Err(Error::invalid_input(format!(
                    "MCP catalog entry {name:?} needs a `command` (stdio) or a `url` (http)"
                )));
            }
            server
                .config(|_| Ok(Self::REDACTED.to_owned()))
                .map_err(|e| Error::invalid_input(format!("MCP catalog entry {name:?}: {e}")))?;
        }
        Ok(catalog)
    }

    /// Adds an entry.
    pub fn insert(&mut self, name: impl Into<String>, server: CatalogServer) {
        self.servers.insert(name.into(), server);
    }

    /// Whether `name` is an entry.
    pub fn contains(&self, name: &str) -> bool {
        self.servers.contains_key(name)
    }

    /// The entries' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.servers.keys().map(String::as_str)
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The entry `name` as a stored task holds it: every `env` / `headers` value replaced by
    /// [`REDACTED`](Self::REDACTED).
    pub fn stored_form(&self, name: &str) -> Option<McpServerConfig> {
        let server = self.servers.get(name)?;
        server.config(|_| Ok(Self::REDACTED.to_owned())).ok()
    }

    /// The entry `name` with its values read by `reader`, for the worker only.
    pub fn resolve(&self, name: &str, reader: &dyn SecretReader) -> Result<McpServerConfig> {
        let server = self.servers.get(name).ok_or_else(|| {
            Error::invalid_input(format!("MCP server {name:?} is not in the MCP catalog"))
        })?;
        server
            .config(|v| reader.read(v))
            .map_err(|e| Error::new(e.kind(), format!("MCP server {name:?}: {}", e.message())))
    }

    /// Every secret value of the catalog, read by `reader` (unreadable ones skipped), so that
    /// a caller can redact them from what it shows.
    pub fn secret_values(&self, reader: &dyn SecretReader) -> Vec<String> {
        self.servers
            .values()
            .flat_map(|s| s.env.values().chain(s.headers.values()))
            .filter_map(|v| reader.read(v).ok())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

/// Which MCP servers a request may ask for: catalog entries always; anything else only
/// when the operator allows it (stdio commands: `ALLOW_REQUEST_MCP_COMMANDS=1`; HTTP
/// servers: when their URL passes the outbound policy, checked by the caller with the URLs
/// [`admit`](Self::admit) returns).
#[derive(Debug, Clone, Default)]
pub struct McpAccess {
    /// The operator's servers.
    pub catalog: McpCatalog,
    /// Whether a request may start its own stdio command (off by default).
    pub allow_request_commands: bool,
}

impl McpAccess {
    /// Checks a request's servers and replaces each that names a catalog entry (a name-only
    /// reference, or any entry whose name is in the catalog) by its
    /// [stored form](McpCatalog::stored_form). Returns the URLs of the request's own HTTP
    /// servers, which the caller checks against its outbound policy.
    pub fn admit(&self, servers: &mut McpServers) -> Result<Vec<(String, String)>> {
        let mut urls = Vec::new();
        for (name, config) in servers.iter_mut() {
            if let Some(stored) = self.catalog.stored_form(name) {
                *config = stored;
                continue;
            }
            match config {
                c if c.is_catalog_ref() => {
                    return Err(Error::invalid_input(format!(
                        "MCP server {name:?} is not in the server's MCP catalog (MCP_SERVERS_FILE); {}",
                        self.known()
                    )));
                }
                McpServerConfig::Stdio { command, .. } if !self.allow_request_commands => {
                    return Err(Error::invalid_input(format!(
                        "MCP server {name:?}: a request may not start a command ({command:?}); name an \
                         entry of the server's MCP catalog (MCP_SERVERS_FILE) instead — {}; an operator \
                         may allow request commands with ALLOW_REQUEST_MCP_COMMANDS=1",
                        self.known()
                    )));
                }
                McpServerConfig::Stdio { .. } => {}
                McpServerConfig::Http { url, .. } | McpServerConfig::Sse { url, .. } => {
                    urls.push((name.clone(), url.clone()));
                }
            }
        }
        Ok(urls)
    }

    fn known(&self) -> String {
        if self.catalog.is_empty() {
            "the catalog is empty".to_owned()
        } else {
            format!(
                "known: {}",
                self.catalog.names().collect::<Vec<_>>().join(", ")
            )
        }
    }

    /// The servers a worker gets: every catalog entry (by name) read with `reader`, the rest
    /// as they are. Catalog references left unresolved fail with the reason.
    pub fn resolve(&self, servers: &McpServers, reader: &dyn SecretReader) -> Result<McpServers> {
        let mut out = McpServers::new();
        for (name, config) in servers {
            let config = if self.catalog.contains(name) {
                self.catalog.resolve(name, reader)?
            } else if config.is_catalog_ref() {
                return Err(Error::invalid_input(format!(
                    "MCP server {name:?} is not in the server's MCP catalog (MCP_SERVERS_FILE) any more"
                )));
            } else {
                config.clone()
            };
            out.insert(name.clone(), config);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> McpCatalog {
        McpCatalog::from_json(
            &json!({"mcpServers": {
                "calc": {"command": "python3", "args": ["calc.py"], "env": {"TOKEN": {"env": "CALC_TOKEN"}, "MODE": "fast"}},
                "docs": {"type": "http", "url": "https://docs.example/mcp", "headers": {"Authorization": {"file": "/run/secrets/docs"}}}
            }})
            .to_string(),
        )
        .unwrap()
    }

    fn reader(v: &SecretValue) -> Result<String> {
        match v {
            SecretValue::Plain(p) => Ok(p.clone()),
            SecretValue::Env { env } if env == "CALC_TOKEN" => Ok("s3cret".into()),
            SecretValue::Env { env } => Err(Error::invalid_input(format!("{env} is not set"))),
            SecretValue::File { .. } => Ok("Bearer filed".into()),
        }
    }

    #[test]
    fn stored_form_holds_no_value_and_resolve_reads_them() {
        let c = catalog();
        let stored = serde_json::to_string(&c.stored_form("calc").unwrap()).unwrap();
        assert!(
            !stored.contains("s3cret") && !stored.contains("fast"),
            "{stored}"
        );
        assert!(stored.contains("python3"), "{stored}");
        let resolved = c.resolve("calc", &reader).unwrap();
        let McpServerConfig::Stdio { env, .. } = resolved else {
            panic!()
        };
        assert_eq!(env["TOKEN"], "s3cret");
        assert_eq!(env["MODE"], "fast");
        let McpServerConfig::Http { headers, .. } = c.resolve("docs", &reader).unwrap() else {
            panic!()
        };
        assert_eq!(headers["Authorization"], "Bearer filed");
        assert!(!format!("{c:?}").contains("fast"));
    }

    #[test]
    fn requests_name_entries_and_raw_commands_are_refused() {
        let access = McpAccess {
            catalog: catalog(),
            allow_request_commands: false,
        };
        let mut servers: McpServers = serde_json::from_value(json!({
            "calc": {"command": "sh", "args": ["-c", "id"]},
            "docs": {},
            "other": {"type": "http", "url": "https://mcp.example/x"}
        }))
        .unwrap();
        let urls = access.admit(&mut servers).unwrap();
        assert_eq!(urls, vec![("other".into(), "https://mcp.example/x".into())]);
        // The request's own command for a catalog name is replaced by the catalog's.
        assert!(
            matches!(&servers["calc"], McpServerConfig::Stdio { command, .. } if command == "python3")
        );
        let mut raw: McpServers =
            serde_json::from_value(json!({"evil": {"command": "sh", "args": ["-c", "id"]}}))
                .unwrap();
        let err = access.admit(&mut raw).unwrap_err();
        assert!(
            err.message().contains("ALLOW_REQUEST_MCP_COMMANDS"),
            "{err}"
        );
        assert!(err.message().contains("calc, docs"), "{err}");
        let mut unknown: McpServers = serde_json::from_value(json!({"nope": {}})).unwrap();
        let err = access.admit(&mut unknown).unwrap_err();
        assert!(
            err.message().contains("not in the server's MCP catalog"),
            "{err}"
        );
        let open = McpAccess {
            catalog: McpCatalog::new(),
            allow_request_commands: true,
        };
        assert!(open.admit(&mut raw).is_ok());
    }

    #[test]
    fn resolve_fails_naming_the_variable_not_a_value() {
        let mut c = catalog();
        c.insert(
            "broken",
            serde_json::from_value(json!({"command": "x", "env": {"K": {"env": "MISSING"}}}))
                .unwrap(),
        );
        let access = McpAccess {
            catalog: c,
            allow_request_commands: false,
        };
        let mut servers: McpServers = serde_json::from_value(json!({"broken": {}})).unwrap();
        access.admit(&mut servers).unwrap();
        let err = access.resolve(&servers, &reader).unwrap_err();
        assert!(err.message().contains("MISSING"), "{err}");
    }

    #[test]
    fn bad_catalogs_are_refused_with_the_reason() {
        for (text, needle) in [
            ("nope", "not JSON"),
            (r#"{"x y": {"command": "a"}}"#, "MCP server name"),
            (r#"{"a": {"type": "http"}}"#, "url"),
            (r#"{"a": {}}"#, "needs a `command`"),
            (r#"{"a": {"command": "a", "extra": 1}}"#, "unknown field"),
        ] {
            let err = McpCatalog::from_json(text).unwrap_err();
            assert!(err.message().contains(needle), "{text}: {err}");
        }
    }
}
