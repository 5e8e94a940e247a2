//! GitHub App authentication: an RS256 JWT signed with the app's private key (ring), traded
//! for an installation access token, cached until shortly before it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anywork_core::{Error, Result};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::json;

/// A GitHub App's private key, parsed once.
#[derive(Clone)]
pub struct AppKey(Arc<RsaKeyPair>);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppKey(<private>)")
    }
}

impl AppKey {
    /// Parses the PEM GitHub gives (`BEGIN RSA PRIVATE KEY`, PKCS#1) or a PKCS#8 one. A
    /// value with literal `\n` sequences and no line breaks (a PEM squeezed into one
    /// environment variable) is accepted too.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let unescaped;
        let pem = if !pem.contains('\n') && pem.contains("\\n") {
            unescaped = pem.replace("\\n", "\n");
            unescaped.as_str()
        } else {
            pem
        };
        let bad = || {
            Error::invalid_input(
                "the GitHub App private key is not an RSA private key in PEM form: use the \
                 .pem file GitHub generated for the app (GITHUB_APP_PRIVATE_KEY_FILE)",
            )
        };
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad())?;
        let pair = match &der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => return Err(bad()),
        }
        .map_err(|e| {
            Error::invalid_input(format!(
                "the GitHub App private key was refused ({e}): use the .pem file GitHub \
                 generated for the app"
            ))
        })?;
        Ok(Self(Arc::new(pair)))
    }

    /// The JWT that authenticates as the app: issued 60 s in the past (clock drift), valid
    /// for 9 minutes (GitHub allows 10). `app_id` is the numeric app id or the client id.
    pub fn jwt(&self, app_id: &str, now: i64) -> Result<String> {
        let iss = match app_id.parse::<u64>() {
            Ok(n) => json!(n),
            Err(_) => json!(app_id),
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = json!({"iat": now - 60, "exp": now + 540, "iss": iss});
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0u8; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| Error::internal("signing the GitHub App JWT failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// Installation tokens by installation id, with their expiry (Unix seconds).
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<u64, (String, i64)>>,
}

impl TokenCache {
    /// A token is refreshed when it has less than this left.
    pub const MARGIN_SECS: i64 = 300;

    /// The cached token of `installation`, if it is good for a while yet.
    pub fn get(&self, installation: u64, now: i64) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(&installation)
            .filter(|(_, exp)| *exp - Self::MARGIN_SECS > now)
            .map(|(t, _)| t.clone())
    }

    /// Caches `token` until `expires_at`.
    pub fn put(&self, installation: u64, token: String, expires_at: i64) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(installation, (token, expires_at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_not_rsa_pem_are_refused_with_advice() {
        for bad in [
            "",
            "hello",
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        ] {
            let e = AppKey::from_pem(bad).unwrap_err();
            assert!(e.to_string().contains(".pem"), "{e}");
        }
    }

    #[test]
    fn tokens_are_reused_until_close_to_expiry() {
        let c = TokenCache::default();
        c.put(1, "t".into(), 1000);
        assert_eq!(c.get(1, 600).as_deref(), Some("t"));
        assert_eq!(c.get(1, 700), None);
        assert_eq!(c.get(2, 0), None);
    }
}
