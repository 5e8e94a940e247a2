//! Figures of a process from `/proc` (Linux). The server binary as a process of its own is
//! [`crate::server::ServerProcess`].

use std::time::Duration;

use anyhow::Context;

/// User + system CPU time of process `pid` (a number, or `self`), all its threads, those that
/// ended included (`/proc/PID/stat` fields 14 and 15, in clock ticks).
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')').context("bad /proc/PID/stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (from 1).
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // /proc counts in USER_HZ, 100 on Linux whatever the kernel's own tick.
    Ok(Duration::from_millis(ticks * 10))
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// RssAnon of `pid` in KiB: the resident anonymous memory (heap, stacks), without the pages of
/// the binary and libraries that are mapped from files (shared page cache, which the kernel
/// maps in batches around each page a program touches).
pub fn rss_anon_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "RssAnon")
}

/// A `… kB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// Context switches of all live threads of `pid` so far: (voluntary, involuntary), from each
/// `/proc/PID/task/TID/status` (a thread that has ended takes its count with it).
pub fn context_switches(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut voluntary, mut involuntary) = (0, 0);
    for thread in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(thread?.path().join("status")) else {
            continue; // the thread has just ended
        };
        for line in status.lines() {
            if let Some(n) = line.strip_prefix("voluntary_ctxt_switches:") {
                voluntary += n.trim().parse::<u64>()?;
            } else if let Some(n) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                involuntary += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok((voluntary, involuntary))
}

/// Threads of `pid` now.
pub fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Raises this process's open-file limit to its hard limit (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft)
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_anonymous_part_of_the_rss_is_read_apart() {
        let pid = std::process::id();
        // Touch memory of our own so that there is an anonymous part to see.
        let held = std::hint::black_box(vec![1u8; 8 << 20]);
        let (rss, anon) = (rss_kib(pid).unwrap(), rss_anon_kib(pid).unwrap());
        assert!(anon >= 8 * 1024, "RssAnon {anon} KiB with 8 MiB held");
        assert!(anon <= rss, "RssAnon {anon} KiB above VmRSS {rss} KiB");
        assert!(status_kib(pid, "NoSuchField").is_err());
        drop(held);
    }
}
