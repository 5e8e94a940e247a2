//! Signature checks shared by the channels: HMAC-SHA256 over the raw body, compared in
//! constant time, and timestamp windows against replays. Nothing here logs or returns a
//! secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anywork_core::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Seconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = mac(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Checks `signature_hex` (64 hex digits, either case) against the HMAC-SHA256 of `parts`,
/// in constant time. `false` for anything malformed.
pub fn hmac_sha256_matches(key: &[u8], parts: &[&[u8]], signature_hex: &str) -> bool {
    let mut given = [0u8; 32];
    if signature_hex.len() != 64 || hex::decode_to_slice(signature_hex, &mut given).is_err() {
        return false;
    }
    let mut mac = mac(key);
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(&given).is_ok()
}

/// Compares two secrets in constant time, including their lengths (both are hashed first,
/// so the time taken says nothing about either).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    bool::from(ha.as_slice().ct_eq(hb.as_slice()))
}

/// Parses a Unix-seconds timestamp header and checks that it is within `window` of `now`
/// (either way, so that a clock a little ahead still works).
pub fn check_timestamp(
    value: Option<&str>,
    header: &str,
    now: i64,
    window: Duration,
) -> Result<i64> {
    let value = value.ok_or_else(|| Error::unauthorized(format!("missing {header} header")))?;
    let ts: i64 = value.trim().parse().map_err(|_| {
        Error::unauthorized(format!("{header} must be the request time in Unix seconds"))
    })?;
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    if ts.abs_diff(now) > window.unsigned_abs() {
        return Err(Error::unauthorized(format!(
            "{header} is more than {window} seconds away from this server's clock: a replay, \
             or a clock to fix (sign requests with the current time)"
        )));
    }
    Ok(ts)
}

/// Refuses a body larger than `max` before anything else looks at it.
pub fn check_size(body: &[u8], max: usize) -> Result<()> {
    if body.len() > max {
        return Err(Error::invalid_input(format!(
            "the body is {} bytes, more than the {max} this channel accepts",
            body.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_github_documentation_example_verifies() {
        // docs.github.com, "Validating webhook deliveries": test values.
        let key = b"It's a Secret to Everybody";
        let sig = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(hmac_sha256_matches(key, &[b"Hello, World!"], sig));
        assert!(hmac_sha256_matches(key, &[b"Hello, ", b"World!"], sig));
        assert!(hmac_sha256_matches(
            key,
            &[b"Hello, World!"],
            &sig.to_uppercase()
        ));
        assert!(!hmac_sha256_matches(key, &[b"Hello, World"], sig));
        assert!(!hmac_sha256_matches(
            b"It's a secret to everybody",
            &[b"Hello, World!"],
            sig
        ));
        assert!(!hmac_sha256_matches(key, &[b"Hello, World!"], &sig[..63]));
        assert!(!hmac_sha256_matches(key, &[b"Hello, World!"], ""));
        assert!(!hmac_sha256_matches(
            key,
            &[b"Hello, World!"],
            &"zz".repeat(32)
        ));
        assert_eq!(hex::encode(hmac_sha256(key, &[b"Hello, World!"])), sig);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"", b"a"));
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let w = Duration::from_secs(300);
        assert_eq!(check_timestamp(Some("1000"), "T", 1000, w).unwrap(), 1000);
        assert!(check_timestamp(Some("700"), "T", 1000, w).is_ok());
        assert!(check_timestamp(Some("1300"), "T", 1000, w).is_ok());
        for bad in [
            Some("699"),
            Some("1301"),
            Some("x"),
            Some(""),
            Some("1e3"),
            None,
        ] {
            let e = check_timestamp(bad, "T", 1000, w).unwrap_err();
            assert_eq!(e.kind(), anywork_core::ErrorKind::Unauthorized, "{bad:?}");
        }
        let far = i64::MIN.to_string();
        assert!(check_timestamp(Some(&far), "T", i64::MAX, w).is_err());
    }
}
