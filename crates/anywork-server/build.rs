//! Links the `anywork-server` binary so that less of it is resident at rest, on GNU/Linux.
//!
//! **Packed relative relocations (`DT_RELR`).** The binary is position-independent, so at
//! every start the dynamic loader reads its whole relocation table and patches each pointer
//! in its read-only-after-relocation data. With classic `RELA` entries (24 bytes each) that
//! table was 1.2 MiB for the default build, read in full at start and so resident for the
//! server's life; `RELR` encodes the same relative relocations as bitmaps in a few KiB
//! (docs/benchmarks.md, "Server RSS idle"). Needs glibc 2.36 or later at run time (Debian 12,
//! the images' base) and a linker that knows the flag (LLD 15+, GNU ld 2.38+): a probe links
//! an empty program with it (and, when the build is for the machine it runs on, runs it, so a
//! build host whose loader predates `DT_RELR` does not get a binary that crashes at start),
//! and the flag is passed only when that works. `ANYWORK_PACK_RELOCS=off` never passes it.
//! `tests/binary_layout.rs` checks the linked binary against what this script decided
//! (`ANYWORK_BUILD_PACK_RELOCS`: `on`, `off` or `refused`).
//!
//! **Start-up code first (`symbol-order.txt`).** The page cache maps the binary in folios of
//! up to 128 KiB, so every function start-up runs makes its whole 128 KiB window resident:
//! spread over a 23 MiB text segment, that was 11–14 MiB of code at rest. The committed
//! `symbol-order.txt` names the functions the server runs from exec through a first chat
//! (static driver) and the local set-up's start-up (the README's first command), and LLD's
//! `--symbol-ordering-file` links them first, side by side (docs/benchmarks.md, "Session 15").
//! The names carry crate hashes that change with the compiler, the dependencies' versions
//! and features, and the profile (`lto`, `codegen-units`, `debug`…; not with the checkout's
//! path, nor with `RUSTFLAGS`), so the list holds the names of the shipped release profile
//! and of the benchmarks' `LTO=false`/16-unit one; in another build most names are missing
//! and skipped (`--no-warn-symbol-ordering`): the build works, only the gain is lost.
//! `tests/symbol_order.rs` fails when the dependencies or the compiler moved on from the
//! ones the list was made with; `scripts/rss-startup/order.sh` makes it again.
//!
//! The flag is passed only when the linker takes it: a probe links an empty program with the
//! same target, `RUSTFLAGS` and configured linker (`rustc` 1.90+ links with its own LLD on
//! `x86_64-unknown-linux-gnu`; GNU ld, the default elsewhere, and `-C linker-features=-lld`
//! do not know the flag, and the probe then fails, so nothing is passed).
//! `ANYWORK_SYMBOL_ORDERING_FILE=/abs/path` uses another list; `ANYWORK_SYMBOL_ORDERING_FILE=off`
//! (or empty) none.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PACK_RELOCS: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    // For tests/symbol_order.rs: the compiler the list's names must come from.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    if let Ok(out) = Command::new(&rustc).arg("-V").output() {
        let version = String::from_utf8_lossy(&out.stdout);
        println!("cargo::rustc-env=ANYWORK_BUILD_RUSTC={}", version.trim());
    }
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" {
        return;
    }
    println!("cargo::rerun-if-env-changed=ANYWORK_PACK_RELOCS");
    let pack = match std::env::var_os("ANYWORK_PACK_RELOCS").as_deref() {
        Some(v) if v.is_empty() || v == "off" => "off",
        _ if linker_takes(&[PACK_RELOCS.to_owned()], true) => "on",
        _ => {
            println!(
                "cargo::warning=not linked with {PACK_RELOCS}: the linker refused it or the \
                 program it made did not run (glibc before 2.36?); the idle server keeps a \
                 megabyte more resident"
            );
            "refused"
        }
    };
    println!("cargo::rustc-env=ANYWORK_BUILD_PACK_RELOCS={pack}");
    let base: &[&str] = if pack == "on" { &[PACK_RELOCS] } else { &[] };
    for flag in base {
        println!("cargo::rustc-link-arg-bins={flag}");
    }
    println!("cargo::rerun-if-env-changed=ANYWORK_SYMBOL_ORDERING_FILE");
    let chosen = std::env::var_os("ANYWORK_SYMBOL_ORDERING_FILE");
    let file = match chosen.as_deref() {
        Some(f) if f.is_empty() || f == "off" => return,
        Some(f) => PathBuf::from(f),
        None => {
            let dir =
                std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
            Path::new(&dir).join("symbol-order.txt")
        }
    };
    println!("cargo::rerun-if-changed={}", file.display());
    let flags = [
        format!("-Wl,--symbol-ordering-file={}", file.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    let with_base: Vec<String> = base
        .iter()
        .map(|f| f.to_string())
        .chain(flags.iter().cloned())
        .collect();
    if !file.is_file() || !linker_takes(&with_base, false) {
        if chosen.is_some() {
            println!(
                "cargo::warning=ANYWORK_SYMBOL_ORDERING_FILE={} not used: not a file, or the \
                 linker is not LLD",
                file.display()
            );
        }
        return;
    }
    for flag in flags {
        println!("cargo::rustc-link-arg-bins={flag}");
    }
}

/// Whether linking an empty program for the target, with the package's `RUSTFLAGS` and
/// configured linker, succeeds with `link_args` added (with `run`: and, when the target is
/// the host, whether that program then runs).
fn linker_takes(link_args: &[String], run: bool) -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let source = out.join("linker_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut probe = Command::new(rustc);
    probe
        .arg("--crate-type=bin")
        .arg("--crate-name=linker_probe")
        .arg("-o")
        .arg(out.join("linker_probe"))
        .arg(&source);
    if let Ok(target) = std::env::var("TARGET") {
        probe.arg("--target").arg(target);
    }
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
    if let Some(linker) = std::env::var_os("RUSTC_LINKER") {
        probe.arg("-C").arg({
            let mut arg = std::ffi::OsString::from("linker=");
            arg.push(linker);
            arg
        });
    }
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        probe.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    for arg in link_args {
        probe.arg(format!("-Clink-arg={arg}"));
    }
    let linked = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !linked || !run || std::env::var_os("HOST") != std::env::var_os("TARGET") {
        return linked;
    }
    Command::new(out.join("linker_probe"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
