//! How a worker container gets its secret and the model keys without `docker inspect`
//! showing them: as files in its workspace volume, copied in (`PUT /containers/{id}/archive`,
//! what `docker cp` does) after the container is created and before it starts. The container's
//! environment only names the files (`WORKER_SECRET_FILE`, `WORKER_ENV_FILE`). A server that
//! adopts a running container (after a restart, or another server beside it) reads the secret
//! back the same way.

use anywork_core::Result;
use anywork_core::worker_api::WorkerSecret;

/// The file (in the workspace volume) holding the worker's secret.
pub const SECRET_FILE: &str = ".anywork-worker-secret";
/// The file (in the workspace volume) holding the secret variables, as a JSON object.
pub const ENV_FILE: &str = ".anywork-worker-env.json";

/// Whether the worker variable `name` holds a secret: it then goes to [`ENV_FILE`] instead of
/// the container's environment.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL"]
        .iter()
        .any(|word| upper.contains(word))
}

/// The uid and gid of a `DOCKER_USER` such as `10001:10001` (`None` for names).
fn numeric_user(user: &str) -> Option<(u32, u32)> {
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// A tar archive of `files` (name, content), each owned by `user` when it is numeric and
/// readable by it alone (else readable by all: the container has no other user).
pub fn archive(files: &[(&str, &[u8])], user: &str) -> Vec<u8> {
    let (uid, gid, mode) = match numeric_user(user) {
        Some((u, g)) => (u, g, 0o400),
        None => (0, 0, 0o444),
    };
    let mut out = Vec::new();
    for (name, content) in files {
        let mut header = [0u8; 512];
        let put = |h: &mut [u8; 512], at: usize, field: &[u8]| {
            h[at..at + field.len()].copy_from_slice(field);
        };
        put(&mut header, 0, name.as_bytes());
        put(&mut header, 100, format!("{mode:07o}\0").as_bytes());
        put(&mut header, 108, format!("{uid:07o}\0").as_bytes());
        put(&mut header, 116, format!("{gid:07o}\0").as_bytes());
        put(
            &mut header,
            124,
            format!("{:011o}\0", content.len()).as_bytes(),
        );
        put(&mut header, 136, format!("{:011o}\0", 0).as_bytes());
        header[156] = b'0';
        put(&mut header, 257, b"ustar\x0000");
        // The checksum counts its own field as spaces.
        put(&mut header, 148, b"        ");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(content);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// The content of the first regular file in a tar archive (extension headers skipped).
pub fn first_file(tar: &[u8]) -> Option<Vec<u8>> {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|b| *b == 0) {
            return None;
        }
        let size_field = std::str::from_utf8(&header[124..136]).ok()?;
        let size = usize::from_str_radix(size_field.trim_matches(['\0', ' ']), 8).ok()?;
        let start = at + 512;
        let end = start.checked_add(size)?;
        if matches!(header[156], b'0' | 0) {
            return tar.get(start..end).map(<[u8]>::to_vec);
        }
        at = start + size.next_multiple_of(512);
    }
    None
}

/// The secret in a downloaded [`SECRET_FILE`] archive.
pub fn secret_from_archive(tar: &[u8]) -> Result<WorkerSecret> {
    let content = first_file(tar).ok_or_else(|| {
        anywork_core::Error::invalid_input("the worker's secret file is not in the archive")
    })?;
    WorkerSecret::new(String::from_utf8_lossy(&content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_round_trip_and_are_owned_by_the_worker_user() {
        let tar = archive(&[("a", b"first"), ("b", b"second")], "10001:10001");
        assert_eq!(tar.len() % 512, 0);
        assert_eq!(first_file(&tar).as_deref(), Some(&b"first"[..]));
        assert_eq!(&tar[100..107], b"0000400");
        assert_eq!(&tar[108..115], format!("{:07o}", 10001).as_bytes());
        // The checksum is the one tar computes.
        let mut h = tar[..512].to_vec();
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        assert_eq!(&tar[148..154], format!("{sum:06o}").as_bytes());
        assert_eq!(&archive(&[("a", b"x")], "worker")[100..107], b"0000444");
    }

    #[test]
    fn extension_headers_are_skipped() {
        let mut tar = archive(&[("pax", b"path=x\n")], "1:1");
        tar[156] = b'x';
        let rest = archive(&[("s", b"0123456789abcdef")], "1:1");
        tar.truncate(1024);
        tar.extend_from_slice(&rest);
        let s = secret_from_archive(&tar).unwrap();
        assert_eq!(s.expose(), "0123456789abcdef");
    }

    #[test]
    fn keys_are_secret_names() {
        for name in [
            "API_KEY",
            "ANTHROPIC_API_KEY",
            "GITHUB_TOKEN",
            "DB_PASSWORD",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["MODEL", "API_BASE_URL", "EXECUTOR", "RUST_LOG"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
