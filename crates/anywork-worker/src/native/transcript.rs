//! The native executor's conversation, one JSON [`Message`] per line in
//! `<ws>/sessions/native-transcript.jsonl`, so the next task (even of a new executor after a
//! worker restart) continues it.
//!
//! Lines that do not parse (a torn last line after a crash) are skipped. Loading also repairs
//! what an interrupted run leaves: a tool call without a result gets an error result, results
//! without a call are dropped, and the conversation starts with a user message.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::model::{Message, Part, Role};

/// Folder of the transcript inside the workspace.
pub const DIR: &str = "sessions";
/// File name of the transcript.
pub const FILE: &str = "native-transcript.jsonl";
/// Most messages sent back to the model; older turns are left out.
pub const MAX_MESSAGES: usize = 1000;
/// What the assistant is made to have said after a turn that never finished (the worker
/// stopped mid-run), so that the next turn does not read as a second instruction on top of
/// the first and carry the unfinished one out again.
pub const TURN_INTERRUPTED: &str = "[This turn was interrupted before it finished: the \
     instruction above was not completed and will not be resumed. Do not carry it out unless \
     the user asks for it again.]";

/// The result given to a tool call that never got one.
pub const INTERRUPTED: &str = "the tool call was interrupted before it finished; no result";

/// Where the transcript of `workspace` lives.
pub fn path(workspace: &Path) -> PathBuf {
    workspace.join(DIR).join(FILE)
}

/// Refuses a symbolic link (the agent must not redirect the worker's writes).
fn not_a_link(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symbolic link",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// The conversation so far, repaired; empty when there is none.
pub fn load(workspace: &Path) -> Vec<Message> {
    let file = path(workspace);
    if not_a_link(&workspace.join(DIR)).is_err() || not_a_link(&file).is_err() {
        tracing::warn!(path = %file.display(), "transcript path is a symbolic link; starting afresh");
        return Vec::new();
    }
    let Ok(text) = fs::read_to_string(&file) else {
        return Vec::new();
    };
    let messages: Vec<Message> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    repair(messages)
}

/// Appends one message as a line (after a newline if a torn line ends the file).
pub fn append(workspace: &Path, message: &Message) -> io::Result<()> {
    let dir = workspace.join(DIR);
    not_a_link(&dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let file_path = dir.join(FILE);
    not_a_link(&file_path)?;
    let mut file = OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&file_path)?;
    let mut line = serde_json::to_string(message).map_err(io::Error::other)?;
    line.push('\n');
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            line.insert(0, '\n');
        }
    }
    file.write_all(line.as_bytes())?;
    file.flush()
}

/// Ends a conversation whose last turn never got its answer (it ends with a user message)
/// with [`TURN_INTERRUPTED`], before a new instruction is added.
pub fn close_unanswered_turn(messages: &mut Vec<Message>) {
    if messages.last().is_some_and(|m| m.role == Role::User) {
        messages.push(Message::assistant_text(TURN_INTERRUPTED));
    }
}

/// Whether `m` is a user message with text of its own (a clean place to start).
fn is_user_turn(m: &Message) -> bool {
    m.role == Role::User
        && m.content.iter().any(|p| matches!(p, Part::Text { .. }))
        && !m
            .content
            .iter()
            .any(|p| matches!(p, Part::ToolResult { .. }))
}

/// Makes a conversation the model APIs accept (see the module docs).
pub fn repair(mut messages: Vec<Message>) -> Vec<Message> {
    // Start at a user turn, keeping at most MAX_MESSAGES.
    let min_start = messages.len().saturating_sub(MAX_MESSAGES);
    let start = (min_start..messages.len())
        .find(|&i| is_user_turn(&messages[i]))
        .unwrap_or(messages.len());
    messages.drain(..start);

    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    let mut open_calls: Vec<String> = Vec::new();
    for mut message in messages {
        match message.role {
            Role::Assistant => {
                close_calls(&mut out, &mut open_calls);
                open_calls = message
                    .tool_uses()
                    .map(|(id, _, _)| id.to_owned())
                    .collect();
                if !message.content.is_empty() {
                    out.push(message);
                }
            }
            Role::User => {
                let new_turn = is_user_turn(&message);
                let answerable: HashSet<&String> = open_calls.iter().collect();
                let mut answered = Vec::new();
                message.content.retain(|p| match p {
                    Part::ToolResult { tool_use_id, .. } => {
                        let ok = answerable.contains(tool_use_id);
                        if ok {
                            answered.push(tool_use_id.clone());
                        }
                        ok
                    }
                    _ => true,
                });
                open_calls.retain(|id| !answered.contains(id));
                // Missing results go first, ahead of any text.
                let missing: Vec<Part> = open_calls.drain(..).map(interrupted).collect();
                let had_missing = !missing.is_empty();
                if had_missing {
                    message.content.splice(0..0, missing);
                }
                // A new instruction right after a turn that never got its answer (the
                // missing results just added, or a user message ending the conversation so
                // far): the unfinished turn is marked before it.
                if new_turn && (had_missing || out.last().is_some_and(|m| m.role == Role::User)) {
                    if had_missing {
                        let text = message
                            .content
                            .iter()
                            .filter(|p| !matches!(p, Part::ToolResult { .. }))
                            .cloned()
                            .collect();
                        message
                            .content
                            .retain(|p| matches!(p, Part::ToolResult { .. }));
                        out.push(message);
                        message = Message {
                            role: Role::User,
                            content: text,
                        };
                    }
                    out.push(Message::assistant_text(TURN_INTERRUPTED));
                }
                if !message.content.is_empty() {
                    out.push(message);
                }
            }
        }
    }
    close_calls(&mut out, &mut open_calls);
    out
}

fn interrupted(id: String) -> Part {
    Part::ToolResult {
        tool_use_id: id,
        content: INTERRUPTED.to_owned(),
        is_error: true,
    }
}

/// Answers still-open calls with a user message of error results.
fn close_calls(out: &mut Vec<Message>, open: &mut Vec<String>) {
    if open.is_empty() {
        return;
    }
    out.push(Message {
        role: Role::User,
        content: open.drain(..).map(interrupted).collect(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(id: &str) -> Message {
        Message {
            role: Role::Assistant,
            content: vec![Part::ToolUse {
                id: id.into(),
                name: "bash".into(),
                input: json!({}),
            }],
        }
    }

    #[test]
    fn dangling_calls_get_results_and_orphans_go() {
        let orphan = Message {
            role: Role::User,
            content: vec![Part::ToolResult {
                tool_use_id: "nope".into(),
                content: "x".into(),
                is_error: false,
            }],
        };
        let fixed = repair(vec![
            orphan.clone(),
            Message::user_text("hi"),
            call("a"),
            Message::user_text("next"),
            call("b"),
        ]);
        assert_eq!(fixed.len(), 7, "{fixed:?}");
        assert!(matches!(&fixed[1].content[0], Part::ToolUse { id, .. } if id == "a"));
        assert!(
            matches!(&fixed[2].content[0], Part::ToolResult { tool_use_id, is_error: true, .. } if tool_use_id == "a")
        );
        assert_eq!(fixed[2].content.len(), 1);
        // The turn cut off at its tool call is marked before the next instruction.
        assert_eq!(fixed[3].role, Role::Assistant);
        assert_eq!(fixed[3].text(), TURN_INTERRUPTED);
        assert_eq!(fixed[4].text(), "next");
        assert!(matches!(&fixed[5].content[0], Part::ToolUse { id, .. } if id == "b"));
        assert!(
            matches!(&fixed[6].content[0], Part::ToolResult { tool_use_id, .. } if tool_use_id == "b")
        );
        let fixed = repair(vec![Message::user_text("hi"), call("c")]);
        assert_eq!(fixed.len(), 3);
        assert_eq!(fixed[2].role, Role::User);
    }

    /// Issue 15, item 7: two instructions in a row (the first never answered: the worker was
    /// killed) are separated by a note that the first was interrupted, so the model does not
    /// carry it out again; a conversation that ends unanswered is closed the same way before
    /// the next instruction.
    #[test]
    fn an_unanswered_instruction_is_marked_interrupted() {
        let answered = Message::assistant_text("done");
        let fixed = repair(vec![
            Message::user_text("one"),
            answered.clone(),
            Message::user_text("delete everything"),
            Message::user_text("what time is it?"),
            answered.clone(),
        ]);
        let texts: Vec<String> = fixed.iter().map(Message::text).collect();
        assert_eq!(
            texts,
            [
                "one",
                "done",
                "delete everything",
                TURN_INTERRUPTED,
                "what time is it?",
                "done"
            ]
        );
        let mut open = repair(vec![Message::user_text("one"), Message::user_text("two")]);
        assert_eq!(open.len(), 3);
        close_unanswered_turn(&mut open);
        assert_eq!(open.len(), 4);
        assert_eq!(open[3].text(), TURN_INTERRUPTED);
        close_unanswered_turn(&mut open);
        assert_eq!(open.len(), 4, "an answered conversation is left alone");
    }

    #[test]
    fn torn_lines_are_skipped_and_appends_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &Message::user_text("one")).unwrap();
        let file = path(dir.path());
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"{\"role\":\"assis").unwrap();
        drop(f);
        assert_eq!(load(dir.path()).len(), 1);
        append(dir.path(), &Message::user_text("two")).unwrap();
        let loaded = load(dir.path());
        // "one" was never answered: marked so before "two".
        assert_eq!(loaded.len(), 3);
        assert_eq!(loaded[1].text(), TURN_INTERRUPTED);
        assert_eq!(loaded[2].text(), "two");
    }
}
