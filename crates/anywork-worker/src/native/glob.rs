//! A small glob matcher for `list_files` and `grep`: `*`, `?`, `[abc]`, `[a-z]`, `[!a]`,
//! `{a,b}` and `**` (any number of folders), matched against `/`-separated relative paths.

/// A compiled pattern (its brace alternatives, each split into segments).
#[derive(Debug, Clone)]
pub struct Glob {
    alternatives: Vec<Vec<String>>,
}

/// Most brace alternatives a pattern may expand to.
const MAX_ALTERNATIVES: usize = 64;

impl Glob {
    /// Compiles `pattern`; a leading `./` is ignored.
    pub fn new(pattern: &str) -> Glob {
        let pattern = pattern.trim().trim_start_matches("./");
        let alternatives = expand_braces(pattern)
            .into_iter()
            .map(|p| {
                p.split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_owned)
                    .collect()
            })
            .collect();
        Glob { alternatives }
    }

    /// Whether the relative path `path` (segments separated by `/`) matches.
    pub fn matches(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        self.alternatives.iter().any(|alt| {
            let alt: Vec<&str> = alt.iter().map(String::as_str).collect();
            match_segments(&alt, &segments)
        })
    }

    /// Whether the pattern has only one segment (then it is matched against file names).
    pub fn is_name_only(&self) -> bool {
        self.alternatives.iter().all(|a| a.len() <= 1)
    }
}

/// Expands the first `{a,b}` group, recursively.
fn expand_braces(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('{') else {
        return vec![pattern.to_owned()];
    };
    let Some(close_rel) = pattern[open..].find('}') else {
        return vec![pattern.to_owned()];
    };
    let close = open + close_rel;
    let (head, inner, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let mut out = Vec::new();
    for choice in inner.split(',') {
        for rest in expand_braces(tail) {
            if out.len() >= MAX_ALTERNATIVES {
                return out;
            }
            out.push(format!("{head}{choice}{rest}"));
        }
    }
    out
}

fn match_segments(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                match_segment(first, segment) && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

/// Matches one path segment against one pattern segment (no `/` involved).
pub fn match_segment(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = match_class(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; returns whether it matched and
/// the index after `]`, or `None` when the class is not closed.
fn match_class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("**/*.rs");
        assert!(g.matches("a.rs"));
        assert!(g.matches("src/x/a.rs"));
        assert!(!g.matches("src/a.rsx"));
        assert!(Glob::new("*.rs").matches("a.rs"));
        assert!(!Glob::new("*.rs").matches("src/a.rs"));
        assert!(Glob::new("src/**").matches("src/a/b"));
        assert!(Glob::new("files/*.{txt,md}").matches("files/a.md"));
        assert!(Glob::new("f?le[0-9].txt").matches("file7.txt"));
        assert!(!Glob::new("file[!0-9].txt").matches("file7.txt"));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
        assert!(Glob::new("[").matches("["));
    }
}
