//! This server's identity across restarts: the lease owner name of its previous run is kept
//! in `DB_DIR/server-instance`, so that after a crash the new run knows those leases are dead
//! and ends their tasks as interrupted at once instead of waiting for the leases to expire.
//! The file is locked (`flock`) while the server runs: a second server started on the same
//! folder gets no claim on the first one's tasks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

/// The file's name in `DB_DIR`.
pub const FILE_NAME: &str = "server-instance";

/// The claim on the data folder; holds the lock while it lives.
#[derive(Debug)]
pub struct Instance {
    /// The previous run's lease owner, dead since this process holds the lock.
    pub previous: Option<String>,
    _lock: Flock<File>,
}

/// Claims `dir` for a server whose lease owner is `owner`. `Ok(None)` when another running
/// server holds it.
pub fn claim(dir: &Path, owner: &str) -> anyhow::Result<Option<Instance>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create DB_DIR {}", dir.display()))?;
    let path = dir.join(FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    };
    let mut previous = String::new();
    lock.read_to_string(&mut previous)
        .with_context(|| format!("cannot read {}", path.display()))?;
    lock.set_len(0)?;
    lock.rewind()?;
    lock.write_all(owner.as_bytes())?;
    lock.sync_all()?;
    let previous = previous.trim();
    Ok(Some(Instance {
        previous: (!previous.is_empty() && previous != owner).then(|| previous.to_owned()),
        _lock: lock,
    }))
}
