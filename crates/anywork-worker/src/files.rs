//! The session's `files/` folder over the worker API: one file read or written (uploads), and
//! the whole folder as a zip. Paths are relative to `files/`, `/`-separated; empty, `.` and
//! `..` segments, backslashes and NUL are refused, and no symbolic link is followed.

use std::fs;
use std::io;
use std::path::PathBuf;

use anywork_core::{Error, Result, SessionId};

use crate::workspace::{FILES_DIR, Workspace};

/// Largest upload the worker takes into `files/` (25 MiB).
pub const MAX_UPLOAD_BYTES: usize = anywork_core::worker_api::MAX_UPLOAD_BYTES;

/// Largest `files/` folder put in one zip (256 MiB of file data).
pub const MAX_ZIP_BYTES: u64 = 256 * 1024 * 1024;

/// The checked segments of `path` (relative to `files/`).
pub fn segments(path: &str) -> Result<Vec<&str>> {
    let bad = |why: &str| {
        Err(Error::invalid_input(format!(
            "{path:?} is not a path inside files/: {why}"
        )))
    };
    if path.is_empty() || path.len() > 1024 {
        return bad("it must be 1 to 1024 characters");
    }
    if path.starts_with('/') {
        return bad("it must be relative");
    }
    let segs: Vec<&str> = path.split('/').collect();
    if segs.len() > 32 {
        return bad("it is nested too deep");
    }
    for seg in &segs {
        if seg.is_empty() || *seg == "." || *seg == ".." {
            return bad("empty, `.` and `..` segments are refused");
        }
        if seg.contains(['\\', '\0']) {
            return bad("backslashes and NUL are refused");
        }
    }
    Ok(segs)
}

fn not_found(path: &str) -> Error {
    Error::not_found(format!("no file {path:?} in the session's files/"))
}

/// The bytes of `files/<path>` of `session`. `NotFound` when it (or the session) is missing;
/// a link on the way is refused.
pub fn read_file(ws: &Workspace, session: &SessionId, path: &str) -> Result<Vec<u8>> {
    let segs = segments(path)?;
    let mut full: PathBuf = ws.session_dir(session).join(FILES_DIR);
    for dir in [ws.session_dir(session), full.clone()] {
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => return Err(link_refused(path)),
            Ok(m) if m.is_dir() => {}
            Ok(_) | Err(_) => return Err(not_found(path)),
        }
    }
    for (i, seg) in segs.iter().enumerate() {
        full.push(seg);
        let last = i + 1 == segs.len();
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => return Err(link_refused(path)),
            Ok(m) if last && !m.is_file() => {
                return Err(Error::invalid_input(format!(
                    "{path:?} is a folder, not a file"
                )));
            }
            Ok(m) if !last && !m.is_dir() => return Err(not_found(path)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(path)),
            Err(e) => return Err(Error::storage(format!("cannot read {path:?}: {e}"))),
        }
    }
    fs::read(&full).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => not_found(path),
        _ => Error::storage(format!("cannot read {path:?}: {e}")),
    })
}

fn link_refused(path: &str) -> Error {
    Error::invalid_input(format!(
        "{path:?} goes through a symbolic link; the worker does not follow links inside a workspace"
    ))
}

/// Writes `bytes` to `files/<path>` of `session` (creating its workspace and the folders on
/// the way, replacing a file there atomically). Links and folders in the way are refused.
pub fn write_file(ws: &Workspace, session: &SessionId, path: &str, bytes: &[u8]) -> Result<()> {
    let segs = segments(path)?;
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(Error::invalid_input(format!(
            "{path:?} is {} bytes; uploads are at most {MAX_UPLOAD_BYTES} bytes",
            bytes.len()
        )));
    }
    let dir = ws.ensure_session(session)?;
    let (name, parents) = segs.split_last().ok_or_else(|| not_found(path))?;
    let mut folders = vec![FILES_DIR];
    folders.extend_from_slice(parents);
    let dir = crate::workspace::ensure_dirs(&dir, &folders)?;
    crate::workspace::write_atomic(&dir, name, bytes)
}

/// The session's `files/` folder as a zip (stored, not compressed), paths as listed by
/// [`Workspace::list_files`]. `InvalidInput` past [`MAX_ZIP_BYTES`].
pub fn zip_files(ws: &Workspace, session: &SessionId) -> Result<Vec<u8>> {
    let listing = ws.list_files(session)?;
    let total: u64 = listing.files.iter().map(|f| f.size).sum();
    if total > MAX_ZIP_BYTES {
        return Err(Error::invalid_input(format!(
            "the session's files/ holds {total} bytes; a zip is made of at most {MAX_ZIP_BYTES}: \
             download the files one by one"
        )));
    }
    let mut zip = ZipWriter::default();
    for f in &listing.files {
        match read_file(ws, session, &f.path) {
            Ok(bytes) => zip.add(&f.path, &bytes),
            // Removed since the listing: left out.
            Err(e) if e.kind() == anywork_core::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(zip.finish())
}

/// A zip archive of stored entries, built in memory.
#[derive(Default)]
struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    entries: u16,
}

/// 1980-01-01 00:00, the earliest DOS date.
const DOS_DATE: u16 = 0x0021;
const DOS_TIME: u16 = 0;
/// Bit 11: names are UTF-8.
const UTF8_FLAG: u16 = 0x0800;

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) {
        let crc = crc32(data);
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let offset = u32::try_from(self.out.len()).unwrap_or(u32::MAX);
        let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        let name = &name.as_bytes()[..usize::from(name_len)];
        let o = &mut self.out;
        o.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        for v in [20u16, UTF8_FLAG, 0, DOS_TIME, DOS_DATE] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.extend_from_slice(&name_len.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        o.extend_from_slice(name);
        o.extend_from_slice(data);
        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        for v in [20u16, 20, UTF8_FLAG, 0, DOS_TIME, DOS_DATE] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        for v in [name_len, 0, 0, 0, 0] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name);
        self.entries = self.entries.saturating_add(1);
    }

    fn finish(mut self) -> Vec<u8> {
        let cd_offset = u32::try_from(self.out.len()).unwrap_or(u32::MAX);
        let cd_size = u32::try_from(self.central.len()).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        for v in [0u16, 0, self.entries, self.entries] {
            self.out.extend_from_slice(&v.to_le_bytes());
        }
        self.out.extend_from_slice(&cd_size.to_le_bytes());
        self.out.extend_from_slice(&cd_offset.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        self.out
    }
}

/// CRC-32 (IEEE), as zip wants it.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = 0xFFFF_FFFFu32;
    for b in data {
        crc = table[((crc ^ u32::from(*b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn traversal_and_odd_paths_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a\\b",
            "a/",
            "a\0b",
        ] {
            assert!(segments(bad).is_err(), "{bad:?}");
        }
        assert_eq!(segments("a/b c/d.txt").unwrap(), vec!["a", "b c", "d.txt"]);
    }

    #[test]
    fn files_round_trip_and_links_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path());
        let s = SessionId::new("s1").unwrap();
        write_file(&ws, &s, "notes/a.txt", b"hello").unwrap();
        assert_eq!(read_file(&ws, &s, "notes/a.txt").unwrap(), b"hello");
        write_file(&ws, &s, "notes/a.txt", b"again").unwrap();
        assert_eq!(read_file(&ws, &s, "notes/a.txt").unwrap(), b"again");
        let e = read_file(&ws, &s, "nope.txt").unwrap_err();
        assert_eq!(e.kind(), anywork_core::ErrorKind::NotFound);
        let files = ws.session_dir(&s).join(FILES_DIR);
        std::os::unix::fs::symlink("/etc", files.join("etc")).unwrap();
        assert!(read_file(&ws, &s, "etc/passwd").is_err());
        assert!(write_file(&ws, &s, "etc/evil", b"x").is_err());
        let zip = zip_files(&ws, &s).unwrap();
        assert_eq!(&zip[..4], b"PK\x03\x04");
        assert!(zip.windows(11).any(|w| w == b"notes/a.txt"));
    }
}
