//! Links the `anywork-server` binary with packed relative relocations (`DT_RELR`) on GNU/Linux.
//!
//! The binary is position-independent, so at every start the dynamic loader reads its whole
//! relocation table and patches each pointer in its read-only-after-relocation data. With
//! classic `RELA` entries (24 bytes each) that table was 1.2 MiB for the default build, read
//! in full at start and so resident for the server's life; `RELR` encodes the same relative
//! relocations as bitmaps in a few KiB (docs/benchmarks.md, "Server RSS idle"). Needs glibc
//! 2.36 or later at run time (Debian 12, the images' base) and a linker that knows the flag
//! (LLD 15+, GNU ld 2.38+).
//!
//! Opt-in, for measuring: `ANYWORK_SYMBOL_ORDERING_FILE=/abs/path` links the functions it names
//! (mangled, one a line; `scripts/rss-startup/order.sh` makes it) first and together
//! (LLD's `--symbol-ordering-file`), so that start-up touches fewer pages of code. Not on by
//! default: the names carry crate hashes that change with dependencies, compiler and profile,
//! and GNU ld does not know the flag (docs/benchmarks.md, "Session 14").

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo::rerun-if-env-changed=ANYWORK_SYMBOL_ORDERING_FILE");
    if let Some(file) = std::env::var_os("ANYWORK_SYMBOL_ORDERING_FILE").filter(|f| !f.is_empty()) {
        let file = file.to_string_lossy();
        println!("cargo::rerun-if-changed={file}");
        println!("cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={file}");
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
