//! The workspace's pass-through `TaskStore` wrappers forward every method of the trait.
//!
//! A wrapper that forgets a method compiles (the trait gives it a default) and then runs the
//! default, not the wrapped store's own: a fault-injection test or a benchmark through it
//! would exercise code the server never runs (this happened with `search_sessions` and
//! `usage_totals`). The check reads the sources: the trait's methods from anywork-core, each
//! wrapper's `impl` block from its file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("the workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    let path = workspace().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The body of the block that starts on the first line containing `header`: every line up to
/// the one that closes it at the header's indentation.
fn block<'a>(source: &'a str, header: &str) -> Vec<&'a str> {
    let mut lines = source.lines();
    let first = lines
        .by_ref()
        .find(|l| l.contains(header))
        .unwrap_or_else(|| panic!("no line with {header:?}"));
    let indent = first.len() - first.trim_start().len();
    let end = format!("{}}}", " ".repeat(indent));
    lines.take_while(|l| *l != end).collect()
}

/// The names of the `async fn`s declared directly in a block (at its first indentation).
fn methods(body: &[&str]) -> BTreeSet<String> {
    let indent = body
        .iter()
        .find(|l| l.trim_start().starts_with("async fn "))
        .map(|l| l.len() - l.trim_start().len())
        .expect("a block with methods");
    body.iter()
        .filter(|l| l.len() - l.trim_start().len() == indent)
        .filter_map(|l| l.trim_start().strip_prefix("async fn "))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn the_reader_finds_the_traits_methods() {
    let trait_methods = methods(&block(
        &read("crates/anywork-core/src/store.rs"),
        "pub trait TaskStore",
    ));
    // Required and defaulted methods alike.
    for m in [
        "create_session",
        "claim_task",
        "search_sessions",
        "usage_totals",
    ] {
        assert!(
            trait_methods.contains(m),
            "{m} not found: {trait_methods:?}"
        );
    }
    assert!(trait_methods.len() > 30, "{trait_methods:?}");
}

#[test]
fn every_pass_through_wrapper_forwards_every_method() {
    let trait_methods = methods(&block(
        &read("crates/anywork-core/src/store.rs"),
        "pub trait TaskStore",
    ));
    let wrappers = [
        (
            "crates/anywork-test/src/faulty_store.rs",
            "impl TaskStore for FaultyStore",
        ),
        (
            "crates/anywork-bench/src/server.rs",
            "impl TaskStore for Instrumented",
        ),
    ];
    let mut missing = Vec::new();
    for (file, header) in wrappers {
        let forwarded = methods(&block(&read(file), header));
        for m in trait_methods.difference(&forwarded) {
            missing.push(format!("{file}: `{header}` does not forward `{m}`"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
