//! The committed linker symbol ordering file (`symbol-order.txt`, see build.rs) is made for
//! the tree as it is: its names carry crate hashes that change with the compiler and with
//! each crate's version and dependencies, and a stale list silently loses its gain (its names
//! are skipped at link time). Its header records what it was made with; these tests compare
//! that with the tree, without a release build. Regenerate with
//! `scripts/rss-startup/order.sh` (its header says how).

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn list() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The header's `# KEY: value` lines with this key.
fn header<'a>(list: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("# {key}: ");
    list.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect()
}

/// One `[[package]]` of Cargo.lock: (name, version) → the names and versions it depends on.
type Packages = BTreeMap<(String, String), Vec<Vec<String>>>;

/// A package being read: its name, version and dependencies so far.
type Reading = (Option<String>, Option<String>, Vec<Vec<String>>);

fn lock_packages(lock: &str) -> Packages {
    let mut out = Packages::new();
    let mut current: Option<Reading> = None;
    let mut in_deps = false;
    let mut finish = |p: Option<Reading>| {
        if let Some((Some(name), Some(version), deps)) = p {
            out.insert((name, version), deps);
        }
    };
    for line in lock.lines().map(str::trim) {
        if line == "[[package]]" {
            finish(current.take());
            current = Some((None, None, Vec::new()));
            in_deps = false;
        } else if let Some((name, version, deps)) = current.as_mut() {
            if in_deps {
                if line == "]" {
                    in_deps = false;
                } else {
                    let dep = line.trim_matches(|c| c == '"' || c == ',');
                    deps.push(dep.split(' ').take(2).map(str::to_owned).collect());
                }
            } else if let Some(v) = line.strip_prefix("name = ") {
                *name = Some(v.trim_matches('"').to_owned());
            } else if let Some(v) = line.strip_prefix("version = ") {
                *version = Some(v.trim_matches('"').to_owned());
            } else if line == "dependencies = [" {
                in_deps = true;
            }
        }
    }
    finish(current);
    out
}

/// What `scripts/rss-startup/lockdeps.py` prints: `root` and every package it depends on,
/// `name version: dependency names`, sorted.
fn closure(packages: &Packages, root: &str) -> Vec<String> {
    let find = |dep: &[String]| {
        let hits: Vec<_> = packages
            .keys()
            .filter(|(n, v)| *n == dep[0] && dep.get(1).is_none_or(|want| want == v))
            .collect();
        assert_eq!(hits.len(), 1, "Cargo.lock: {dep:?} matches {hits:?}");
        hits[0].clone()
    };
    let mut seen = BTreeSet::new();
    let mut todo = vec![find(&[root.to_owned()])];
    while let Some(key) = todo.pop() {
        if seen.insert(key.clone()) {
            todo.extend(packages[&key].iter().map(|d| find(d)));
        }
    }
    let mut lines: Vec<String> = seen
        .iter()
        .map(|key| {
            let mut deps: Vec<&str> = packages[key].iter().map(|d| d[0].as_str()).collect();
            deps.sort_unstable();
            format!("{} {}: {}", key.0, key.1, deps.join(" "))
                .trim_end()
                .to_owned()
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn the_symbol_order_was_made_with_this_compiler() {
    let list = list();
    assert_eq!(
        header(&list, "rustc"),
        [env!("ANYWORK_BUILD_RUSTC")],
        "symbol-order.txt was made with another compiler: its names' hashes are stale; \
         make it again with scripts/rss-startup/order.sh"
    );
}

#[test]
fn the_symbol_order_was_made_with_these_dependencies() {
    let list = list();
    let lock_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let lock = std::fs::read_to_string(&lock_path).unwrap();
    let now = closure(&lock_packages(&lock), "anywork-server");
    let then: Vec<String> = header(&list, "lock")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let gone: Vec<_> = then.iter().filter(|l| !now.contains(l)).collect();
    let new: Vec<_> = now.iter().filter(|l| !then.contains(l)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "symbol-order.txt was made with other dependencies (their names' hashes are stale): \
         make it again with scripts/rss-startup/order.sh; in the list, not in Cargo.lock: \
         {gone:?}; in Cargo.lock, not in the list: {new:?}"
    );
}

#[test]
fn the_symbol_order_names_the_start_up_functions() {
    let list = list();
    let names: BTreeSet<&str> = list
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // Start-up in both set-ups and a chat ran ≈ 4,000 functions of each profile's binary.
    assert!(names.len() > 2_000, "only {} names", names.len());
    // The entry point and SQLite's: C names, the same in every build, placed first too.
    for name in [
        "main",
        "sqlite3_open_v2",
        "sqlite3_prepare_v3",
        "sqlite3_step",
    ] {
        assert!(names.contains(name), "{name} is not in the list");
    }
}

#[test]
fn the_lock_closure_follows_dependencies() {
    let lock = r#"
[[package]]
name = "a"
version = "1.0.0"
dependencies = [
 "b",
 "c 2.0.0",
]

[[package]]
name = "b"
version = "0.1.0"

[[package]]
name = "c"
version = "1.0.0"

[[package]]
name = "c"
version = "2.0.0"
dependencies = [
 "b",
]

[[package]]
name = "unrelated"
version = "3.0.0"
"#;
    assert_eq!(
        closure(&lock_packages(lock), "a"),
        ["a 1.0.0: b c", "b 0.1.0:", "c 2.0.0: b"]
    );
}
