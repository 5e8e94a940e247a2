//! Markdown as agents write it → Slack's `mrkdwn`: `&`, `<`, `>` escaped (Slack requires it),
//! `**bold**` → `*bold*`, `~~strike~~` → `~strike~`, `[text](url)` → `<url|text>`, headings
//! → bold lines, `- item` → `• item`, and code fences without their language tag. Code
//! (fenced or inline) is only escaped.

/// Escapes the three characters Slack reserves.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes [`escape`] (what Slack sends in event texts).
pub fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Converts Markdown to `mrkdwn`.
pub fn from_markdown(md: &str) -> String {
    let mut out = String::with_capacity(md.len() + 16);
    let mut in_fence = false;
    for line in md.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let trimmed = body.trim_start();
        if trimmed.starts_with("```") {
            in_fence = !in_fence;
            out.push_str("```");
        } else if in_fence {
            out.push_str(&escape(body));
        } else if let Some(h) = heading(trimmed) {
            out.push('*');
            out.push_str(&inline(h));
            out.push('*');
        } else if let Some(item) = trimmed
            .strip_prefix("- ")
            .or_else(|| trimmed.strip_prefix("* "))
        {
            out.push_str(&body[..body.len() - trimmed.len()]);
            out.push_str("• ");
            out.push_str(&inline(item));
        } else {
            out.push_str(&inline(body));
        }
        out.push_str(nl);
    }
    out
}

fn heading(line: &str) -> Option<&str> {
    let hashes = line.bytes().take_while(|&b| b == b'#').count();
    if (1..=6).contains(&hashes) {
        line[hashes..].strip_prefix(' ').map(str::trim)
    } else {
        None
    }
}

/// One line outside code fences: inline code kept, the rest converted.
fn inline(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for (i, part) in line.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        if i % 2 == 1 {
            out.push_str(&escape(part));
        } else {
            out.push_str(&emphasis(&links(part)));
        }
    }
    out
}

/// `[text](url)` → `<url|text>`; everything else escaped.
fn links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let parsed = after.find("](").and_then(|close| {
            let text = &after[..close];
            let tail = &after[close + 2..];
            let end = tail.find(')')?;
            let url = &tail[..end];
            let ok = (url.starts_with("http://")
                || url.starts_with("https://")
                || url.starts_with("mailto:"))
                && !url.contains([' ', '|', '<', '>'])
                && !text.contains(['[', ']']);
            ok.then(|| (text, url, open + 1 + close + 2 + end + 1))
        });
        match parsed {
            Some((text, url, consumed)) => {
                out.push_str(&escape(&rest[..open]));
                out.push('<');
                out.push_str(&url.replace('&', "&amp;"));
                out.push('|');
                out.push_str(&escape(text));
                out.push('>');
                rest = &rest[consumed..];
            }
            None => {
                out.push_str(&escape(&rest[..open + 1]));
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(&escape(rest));
    out
}

fn emphasis(s: &str) -> String {
    s.replace("**", "*").replace("~~", "~")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_mrkdwn() {
        assert_eq!(from_markdown("**bold** and ~~old~~"), "*bold* and ~old~");
        assert_eq!(
            from_markdown("see [the docs](https://x.dev/a?b=1&c=2)"),
            "see <https://x.dev/a?b=1&amp;c=2|the docs>"
        );
        assert_eq!(
            from_markdown("## Plan\n- one\n  * two"),
            "*Plan*\n• one\n  • two"
        );
        assert_eq!(
            from_markdown("a < b && c > d"),
            "a &lt; b &amp;&amp; c &gt; d"
        );
        assert_eq!(
            from_markdown("```rust\nlet x = a<b && **c**;\n```\ndone"),
            "```\nlet x = a&lt;b &amp;&amp; **c**;\n```\ndone"
        );
        assert_eq!(from_markdown("use `a**b` here"), "use `a**b` here");
        assert_eq!(
            from_markdown("[x](javascript:alert)"),
            "[x](javascript:alert)"
        );
        assert_eq!(from_markdown("[unclosed"), "[unclosed");
        assert_eq!(from_markdown("日本 **語**\n"), "日本 *語*\n");
        assert_eq!(unescape("a &lt;b&gt; &amp;amp;"), "a <b> &amp;");
    }
}
