//! The `anywork-server` binary as linked: on GNU/Linux its relative relocations are packed
//! (`DT_RELR`, see build.rs), so that the loader does not read a megabyte of `RELA` entries
//! at every start, which then stayed resident (docs/benchmarks.md, "Server RSS idle").

#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// `PT_DYNAMIC`, `DT_NULL`, `DT_RELASZ`, `DT_RELR` (the ELF constants).
const PT_DYNAMIC: u32 = 2;
const DT_NULL: i64 = 0;
const DT_RELASZ: i64 = 8;
const DT_RELR: i64 = 36;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The dynamic section's entries (tag, value) of a little-endian 64-bit ELF file.
fn dynamic_entries(elf: &[u8]) -> Vec<(i64, u64)> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(
        (elf[4], elf[5]),
        (2, 1),
        "not a little-endian 64-bit ELF file"
    );
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 0x20) as usize,
        u16_at(elf, 0x36) as usize,
        u16_at(elf, 0x38) as usize,
    );
    let dynamic = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(elf, ph) == PT_DYNAMIC)
        .expect("no PT_DYNAMIC: not a dynamically linked binary");
    let (offset, size) = (
        u64_at(elf, dynamic + 8) as usize,
        u64_at(elf, dynamic + 32) as usize,
    );
    elf[offset..offset + size]
        .chunks_exact(16)
        .map(|e| (u64_at(e, 0) as i64, u64_at(e, 8)))
        .take_while(|&(tag, _)| tag != DT_NULL)
        .collect()
}

/// What the build script decided: `on` (linked with `-z pack-relative-relocs`), `off`
/// (`ANYWORK_PACK_RELOCS=off`) or `refused` (the linker, or the probe program it made, failed).
const PACK_RELOCS: &str = env!("ANYWORK_BUILD_PACK_RELOCS");

#[test]
fn the_server_binary_packs_its_relative_relocations() {
    assert_ne!(
        PACK_RELOCS, "refused",
        "build.rs could not link and run a program with -z pack-relative-relocs (a linker \
         without it, or glibc before 2.36): the server binary keeps its 1.2 MiB RELA table"
    );
    let elf = std::fs::read(env!("CARGO_BIN_EXE_anywork-server")).unwrap();
    let entries = dynamic_entries(&elf);
    let relr = entries.iter().any(|&(tag, _)| tag == DT_RELR);
    // What stays in RELA are the few relocations RELR cannot express (symbol-based ones):
    // 4.5 KiB for the release build, against 1.2 MiB before.
    let rela = entries
        .iter()
        .find(|&&(tag, _)| tag == DT_RELASZ)
        .map_or(0, |&(_, size)| size);
    if PACK_RELOCS == "off" {
        // The opt-out is honoured: the classic table, no RELR.
        assert!(!relr, "DT_RELR although ANYWORK_PACK_RELOCS=off");
        assert!(rela >= 256 * 1024, "RELA table of only {rela} bytes");
        return;
    }
    assert!(
        relr,
        "no DT_RELR: the binary was linked without -z pack-relative-relocs"
    );
    assert!(rela < 256 * 1024, "RELA table of {rela} bytes");
}
