//! Connections to URLs a request chose (push notifications, webhook callbacks, HTTP MCP
//! servers) under an [`OutboundPolicy`]: the scheme and a literal address are checked before
//! sending and on every redirect, and every address a name resolves to is checked before
//! connecting (the HTTP client's resolver refuses the name otherwise), so that neither a name
//! resolving to loopback nor a redirect to an internal address gets through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anywork_core::{Error, OutboundPolicy, Result, SecretValue};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

/// A resolver that refuses a name when an address it resolves to is not allowed.
struct PolicyResolver {
    policy: Arc<OutboundPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs = resolve_checked(&policy, "outbound request", name.as_str())
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The addresses of `host`, each allowed by `policy` (an error naming the first that is not).
async fn resolve_checked(
    policy: &OutboundPolicy,
    what: &str,
    host: &str,
) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| Error::invalid_input(format!("{what}: cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::invalid_input(format!(
            "{what}: {host} resolves to no address"
        )));
    }
    for addr in &addrs {
        policy.check_addr(what, host, addr.ip())?;
    }
    Ok(addrs)
}

/// An HTTP client for request-chosen URLs: every resolved address and every redirect is
/// checked against `policy`.
pub(crate) fn checked_client(policy: OutboundPolicy, timeout: Duration) -> Result<reqwest::Client> {
    let policy = Arc::new(policy);
    let redirect_policy = policy.clone();
    reqwest::Client::builder()
        .timeout(timeout)
        .dns_resolver(Arc::new(PolicyResolver { policy }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let url = attempt.url();
            match redirect_policy.check_target(
                "redirect",
                url.scheme(),
                url.host_str().unwrap_or(""),
            ) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e.message().to_owned()),
            }
        }))
        .build()
        .map_err(|e| Error::internal(format!("HTTP client: {e}")))
}

/// Checks a request-chosen URL now: its scheme, its host (a literal address, or every address
/// the name resolves to). For a clear `400` when the request comes in; the connection itself
/// is checked again by [`checked_client`].
pub(crate) async fn check_url(policy: &OutboundPolicy, what: &str, url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Error::invalid_input(format!("{what}: {url:?} is not a URL: {e}")))?;
    let host = parsed.host_str().unwrap_or("");
    policy.check_target(what, parsed.scheme(), host)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_err() && !policy.host_allowed(bare) {
        resolve_checked(policy, what, bare).await?;
    }
    Ok(())
}

/// Reads MCP catalog secrets from the server's environment and files. Errors name the
/// variable or the file, never a value.
pub(crate) fn read_secret(value: &SecretValue) -> Result<String> {
    match value {
        SecretValue::Plain(v) => Ok(v.clone()),
        SecretValue::Env { env } => std::env::var(env).map_err(|_| {
            Error::invalid_input(format!(
                "the environment variable {env} (named by the MCP catalog) is not set"
            ))
        }),
        SecretValue::File { file } => std::fs::read_to_string(file)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| {
                Error::invalid_input(format!(
                    "cannot read {} (named by the MCP catalog): {}",
                    file.display(),
                    e.kind()
                ))
            }),
    }
}
