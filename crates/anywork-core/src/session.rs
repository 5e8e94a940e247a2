//! Sessions: one conversation with one agent workspace.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{SessionId, Timestamp};

/// The longest title accepted, in characters.
pub const MAX_TITLE_CHARS: usize = 500;

/// Checks a session title: at most [`MAX_TITLE_CHARS`] characters, no control characters
/// other than tab. Every store applies it, so a title that one backend takes, all take.
pub fn validate_title(title: &str) -> Result<()> {
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(Error::invalid_input(format!(
            "title is longer than {MAX_TITLE_CHARS} characters"
        )));
    }
    if title.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Error::invalid_input(
            "title may not contain control characters (newlines, NUL)",
        ));
    }
    Ok(())
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Id.
    pub id: SessionId,
    /// The channel that made it (`webchat`, `github`, ...).
    pub channel_type: String,
    /// A key unique within the channel that finds the session again (`owner/repo#12`).
    pub channel_key: Option<String>,
    /// Title shown in the sidebar.
    pub title: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last time a task was submitted or the session was touched.
    pub last_active: Timestamp,
}

/// A session as listed, with its task counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The session.
    #[serde(flatten)]
    pub session: Session,
    /// Tasks in the session.
    pub task_count: u64,
    /// Tasks that are pending, running or waiting for input.
    pub active_task_count: u64,
}

/// Cost and tokens summed over every stored task (all sessions): what the UI shows as the
/// total. Tasks without a known cost add nothing to `cost_usd`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Sessions stored.
    pub sessions: u64,
    /// Tasks stored, in any status.
    pub tasks: u64,
    /// Sum of the tasks' `cost_usd`, in US dollars.
    pub cost_usd: f64,
    /// Sum of the tasks' token counts.
    pub usage: crate::TokenUsage,
}

impl UsageTotals {
    /// Adds one task's cost and tokens (not its count).
    pub fn add_task(&mut self, task: &crate::Task) {
        self.tasks += 1;
        self.cost_usd += task.cost_usd.unwrap_or(0.0);
        self.usage.add(&task.usage);
    }
}

/// Makes `query` a SQL `LIKE` pattern that matches titles containing it literally: `\`, `%`
/// and `_` are escaped with `\` (use `ESCAPE '\'`), and it is wrapped in `%…%`.
pub fn like_contains_pattern(query: &str) -> String {
    let mut p = String::with_capacity(query.len() + 2);
    p.push('%');
    for c in query.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// Whether `title` contains `query`, ignoring case: the match every store's
/// [`search_sessions`](crate::TaskStore::search_sessions) makes (Unicode lowercase here;
/// SQLite folds ASCII letters only).
pub fn title_matches(title: &str, query: &str) -> bool {
    title.to_lowercase().contains(&query.to_lowercase())
}

/// What a store needs to create a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSession {
    /// Id to use.
    pub id: SessionId,
    /// The channel that makes it.
    pub channel_type: String,
    /// See [`Session::channel_key`].
    pub channel_key: Option<String>,
    /// Initial title.
    pub title: String,
    /// Creation time (also the first `last_active`).
    pub created_at: Timestamp,
}

impl NewSession {
    /// The title sessions start with, as in the original AnyWork.
    pub const DEFAULT_TITLE: &'static str = "New Chat";

    /// A session with a fresh id, the default title and no key, created now.
    pub fn new(channel_type: impl Into<String>) -> Self {
        Self {
            id: SessionId::generate(),
            channel_type: channel_type.into(),
            channel_key: None,
            title: Self::DEFAULT_TITLE.to_owned(),
            created_at: Timestamp::now(),
        }
    }

    /// Sets the channel key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.channel_key = Some(key.into());
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: SessionId) -> Self {
        self.id = id;
        self
    }

    /// The session as stored right after creation.
    pub fn into_session(self) -> Session {
        Session {
            id: self.id,
            channel_type: self.channel_type,
            channel_key: self.channel_key,
            title: self.title,
            created_at: self.created_at,
            last_active: self.created_at,
        }
    }
}

/// A window on a list: skip `offset` rows, return at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Most rows returned.
    pub limit: u32,
    /// Rows skipped.
    pub offset: u32,
}

impl Page {
    /// The first `limit` rows.
    pub fn first(limit: u32) -> Self {
        Self { limit, offset: 0 }
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::first(100)
    }
}
