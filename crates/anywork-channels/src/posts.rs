//! What the GitHub and Slack channels post for a task, and how they find it again so that
//! every hook and `deliver` is idempotent.
//!
//! Each post is marked with its task id and [`PostKind`] (a hidden HTML comment on GitHub,
//! message metadata on Slack). Before posting, a channel looks for its latest post of the
//! task, first in memory ([`Memo`]), else on the platform (after a restart, or when a
//! response was lost): a placeholder or an earlier result is edited rather than a second
//! message posted.

use std::collections::HashMap;
use std::sync::Mutex;

use anywork_core::{InputKind, InputRequest, Task, TaskId, TaskOutcome, TaskStatus};

/// What a post of the channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostKind {
    /// The "working…" placeholder (and its progress updates).
    Status,
    /// A question the task asks.
    Question,
    /// The final answer.
    Result,
}

impl PostKind {
    /// The name in markers.
    pub fn as_str(self) -> &'static str {
        match self {
            PostKind::Status => "status",
            PostKind::Question => "question",
            PostKind::Result => "result",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "status" => Some(PostKind::Status),
            "question" => Some(PostKind::Question),
            "result" => Some(PostKind::Result),
            _ => None,
        }
    }
}

/// One post of a task, found again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own<Id> {
    /// The platform's id (a comment id, a message `ts`).
    pub id: Id,
    /// What it is.
    pub kind: PostKind,
    /// For questions: the request id asked.
    pub request: Option<String>,
}

/// The latest post of each task this process made or found, so that progress updates do not
/// search the platform each time. Bounded; a miss only costs a search.
pub struct Memo<Id> {
    map: Mutex<HashMap<TaskId, Own<Id>>>,
}

impl<Id> Default for Memo<Id> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<Id: Clone> Memo<Id> {
    const CAP: usize = 10_000;

    /// The remembered latest post of `task`.
    pub fn get(&self, task: TaskId) -> Option<Own<Id>> {
        self.lock().get(&task).cloned()
    }

    /// Remembers `own` as the latest post of `task`.
    pub fn set(&self, task: TaskId, own: Own<Id>) {
        let mut map = self.lock();
        if map.len() >= Self::CAP && !map.contains_key(&task) {
            map.clear();
        }
        map.insert(task, own);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Own<Id>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `on_started` posts a placeholder unless the task's latest post is one already (or the
/// result): after a question, work resumes below the answer.
pub fn needs_placeholder<Id>(latest: Option<&Own<Id>>) -> bool {
    matches!(
        latest,
        None | Some(Own {
            kind: PostKind::Question,
            ..
        })
    )
}

/// The post `deliver` edits into the answer: the latest, if it is the placeholder or an
/// earlier attempt at the result; `None` posts a new message (below a question and its
/// answer, or when nothing was posted).
pub fn result_target<Id>(latest: Option<&Own<Id>>) -> Option<&Id> {
    match latest {
        Some(own) if own.kind != PostKind::Question => Some(&own.id),
        _ => None,
    }
}

/// Whether the question `request_id` is already the latest post.
pub fn question_posted<Id>(latest: Option<&Own<Id>>, request_id: &str) -> bool {
    matches!(latest, Some(own) if own.kind == PostKind::Question
        && own.request.as_deref() == Some(request_id))
}

/// A request id as it may appear in a marker: `[A-Za-z0-9._-]`, at most 100 characters;
/// anything else is dropped (the question is then found by kind only).
pub fn marker_safe(request_id: &str) -> Option<&str> {
    let ok = !request_id.is_empty()
        && request_id.len() <= 100
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(request_id)
}

/// The placeholder's text.
pub const WORKING: &str = "⏳ Working on it…";

/// How a finished task reads, in Markdown-ish text each channel adapts: a headline for
/// failures and cancels, else the answer.
pub fn outcome_text(outcome: &TaskOutcome) -> String {
    match outcome.status {
        TaskStatus::Completed => match outcome.result.as_deref().map(str::trim) {
            Some(r) if !r.is_empty() => r.to_owned(),
            _ => "✅ Done (the agent gave no text answer).".to_owned(),
        },
        TaskStatus::Canceled => "⏹️ The task was canceled.".to_owned(),
        _ => format!(
            "❌ The task failed: {}",
            outcome
                .error
                .as_deref()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or("no reason was given")
        ),
    }
}

/// A one-line footer: task id, turns, cost.
pub fn footer(task: &Task, outcome: &TaskOutcome) -> String {
    let mut parts = vec![format!("AnyWork task {}", task.id)];
    if outcome.num_turns > 0 {
        parts.push(format!(
            "{} turn{}",
            outcome.num_turns,
            if outcome.num_turns == 1 { "" } else { "s" }
        ));
    }
    if let Some(cost) = outcome.cost_usd.filter(|c| *c > 0.0) {
        parts.push(format!("${cost:.4}"));
    }
    parts.join(" · ")
}

/// The question as posted: the prompt, the options, and how to answer.
pub fn question_text(request: &InputRequest, answer_hint: &str) -> String {
    let mut text = match request.kind {
        InputKind::Permission => {
            let tool = request.tool_name.as_deref().unwrap_or("a tool");
            let mut t = format!("🔐 The agent asks to use {tool}.");
            if !request.prompt.trim().is_empty() {
                t.push_str("\n\n");
                t.push_str(request.prompt.trim());
            }
            if let Some(input) = &request.input {
                let json = serde_json::to_string_pretty(input).unwrap_or_default();
                t.push_str("\n\n```\n");
                t.push_str(&crate::text::truncate(&json, 2000, "\n…"));
                t.push_str("\n```");
            }
            t.push_str("\n\nAnswer yes to allow it, or no to deny it");
            t
        }
        _ => {
            let mut t = format!("❓ {}", request.prompt.trim());
            if !request.options.is_empty() {
                t.push_str("\n\nOptions: ");
                t.push_str(&request.options.join(" · "));
            }
            t.push_str("\n\nAnswer");
            t
        }
    };
    text.push(' ');
    text.push_str(answer_hint);
    text.push('.');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(kind: PostKind, request: Option<&str>) -> Own<u64> {
        Own {
            id: 7,
            kind,
            request: request.map(str::to_owned),
        }
    }

    #[test]
    fn the_latest_post_decides_between_editing_and_posting() {
        assert!(needs_placeholder::<u64>(None));
        assert!(needs_placeholder(Some(&own(PostKind::Question, Some("r")))));
        assert!(!needs_placeholder(Some(&own(PostKind::Status, None))));
        assert!(!needs_placeholder(Some(&own(PostKind::Result, None))));
        assert_eq!(result_target(Some(&own(PostKind::Status, None))), Some(&7));
        assert_eq!(result_target(Some(&own(PostKind::Result, None))), Some(&7));
        assert_eq!(result_target(Some(&own(PostKind::Question, None))), None);
        assert_eq!(result_target::<u64>(None), None);
        assert!(question_posted(
            Some(&own(PostKind::Question, Some("r"))),
            "r"
        ));
        assert!(!question_posted(
            Some(&own(PostKind::Question, Some("r"))),
            "s"
        ));
        assert!(!question_posted(Some(&own(PostKind::Status, None)), "r"));
    }

    #[test]
    fn request_ids_in_markers_are_plain() {
        assert_eq!(marker_safe("toolu_01.A-b"), Some("toolu_01.A-b"));
        assert_eq!(marker_safe("a -->"), None);
        assert_eq!(marker_safe(""), None);
        assert_eq!(marker_safe(&"a".repeat(101)), None);
    }

    #[test]
    fn outcomes_read_as_people_expect() {
        let mut o = TaskOutcome::completed("42");
        assert_eq!(outcome_text(&o), "42");
        o.result = Some("  ".into());
        assert!(outcome_text(&o).contains("no text answer"));
        let mut failed = TaskOutcome::completed("x");
        failed.status = TaskStatus::Failed;
        failed.error = Some("worker lost".into());
        assert_eq!(outcome_text(&failed), "❌ The task failed: worker lost");
        failed.status = TaskStatus::Canceled;
        assert!(outcome_text(&failed).contains("canceled"));
    }
}
