//! Text helpers of the GitHub and Slack channels: trigger mentions, truncation.

/// Cuts `text` to at most `max_bytes` bytes on a character boundary, adding `note` (which
/// counts towards the limit) when it cut anything.
pub fn truncate(text: &str, max_bytes: usize, note: &str) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes.saturating_sub(note.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

/// Keeps the last `max_bytes` bytes of `text` (on a character boundary), with `…` before
/// when it cut anything: the end of an answer still being written.
pub fn tail(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut start = text.len() - max_bytes;
    while start < text.len() && !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Whether `c` can be part of a handle (`@anywork-bot` is not `@anywork`).
fn handle_char(c: char) -> bool {
    c.is_alphanumeric() || c == '-' || c == '_'
}

/// The byte ranges of `trigger` in `text` that count as a mention: case-insensitive, not
/// glued to a longer handle, outside fenced code blocks and quoted (`>`) lines, so that
/// quoting an earlier request does not run it again.
pub fn mention_ranges(text: &str, trigger: &str) -> Vec<std::ops::Range<usize>> {
    let mut found = Vec::new();
    if trigger.is_empty() {
        return found;
    }
    let mut in_fence = false;
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
        } else if !in_fence && !trimmed.starts_with('>') {
            let mut from = 0;
            while let Some(pos) = find_ascii_ci(&line[from..], trigger) {
                let start = from + pos;
                let end = start + trigger.len();
                let before_ok = line[..start]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !handle_char(c));
                let after_ok = line[end..].chars().next().is_none_or(|c| !handle_char(c));
                if before_ok && after_ok {
                    found.push(line_start + start..line_start + end);
                }
                from = end;
            }
        }
        line_start += line.len();
    }
    found
}

/// Case-insensitive (ASCII) search of `needle` in `hay`, at char boundaries.
fn find_ascii_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.len() > h.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| {
        hay.is_char_boundary(i)
            && hay.is_char_boundary(i + n.len())
            && h[i..i + n.len()].eq_ignore_ascii_case(n)
    })
}

/// `text` without its mentions of `trigger`, trimmed.
pub fn strip_mentions(text: &str, trigger: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in mention_ranges(text, trigger) {
        out.push_str(&text[last..r.start]);
        last = r.end;
    }
    out.push_str(&text[last..]);
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_whole_handles_outside_code_and_quotes() {
        let t = "@anywork";
        assert_eq!(mention_ranges("hey @AnyWork, look", t), vec![(4..12)]);
        assert!(mention_ranges("@anywork-bot look", t).is_empty());
        assert!(mention_ranges("mail me@anywork.dev", t).is_empty());
        assert!(mention_ranges("> @anywork do it\nthanks", t).is_empty());
        assert!(mention_ranges("```\n@anywork\n```\n", t).is_empty());
        assert_eq!(mention_ranges("```\nx\n```\n@anywork go", t).len(), 1);
        assert_eq!(mention_ranges("(@anywork) and @anywork.", t).len(), 2);
        assert_eq!(mention_ranges("é@anywork", t).len(), 0);
        assert_eq!(mention_ranges("日本 @anywork 語", t).len(), 1);
        assert!(mention_ranges("anything", "").is_empty());
        assert_eq!(strip_mentions("@anywork please review", t), "please review");
        assert_eq!(strip_mentions("  @anywork  ", t), "");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("hello", 10, "…"), "hello");
        assert_eq!(truncate("héllo wörld", 8, "…"), "héll…");
        assert!(truncate(&"日".repeat(100), 50, " [cut]").len() <= 50);
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("日本語", 4), "…語");
    }
}
