//! [`OutboundPolicy`]: which addresses AnyWork may connect to when a request chose the URL
//! (a push notification, a webhook's `callback_url`, an HTTP MCP server).
//!
//! A request must not turn the server into a proxy into its own network (SSRF). By default
//! only `https` is allowed, and an address is refused when it is loopback, unspecified,
//! private (RFC 1918, IPv6 unique local), link-local (which holds the cloud metadata
//! endpoints such as `169.254.169.254`), shared (CGNAT, `100.64.0.0/10`), multicast,
//! broadcast, reserved, documentation or benchmarking space — also when it hides inside an
//! IPv6 form (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`).
//! Operators that need an internal receiver list it in an allow-list of hosts or networks.
//!
//! The check is pure: callers resolve names themselves and pass every resolved address to
//! [`OutboundPolicy::check_addr`] at connection time (so a name that resolves to loopback,
//! or a redirect to one, is refused too), and check the URL's scheme and literal host with
//! [`OutboundPolicy::check_target`] before sending and on every redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::error::{Error, Result};

/// A network in CIDR form (`10.0.0.0/8`, `fd00::/8`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this network (IPv4 networks also match IPv4-mapped IPv6).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_input(format!(
                "{s:?} is not an address or a network like 10.0.0.0/8"
            ))
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

fn prefix_match(net: &[u8], ip: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if net[..full] != ip[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (net[full] & mask) == (ip[full] & mask)
}

/// The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), or the address itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let seg = v6.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if seg[..5] == [0; 5] && seg[5] == 0xffff {
        return Some(tail); // ::ffff:a.b.c.d
    }
    if seg[..6] == [0; 6] && !(seg[6] == 0 && seg[7] <= 1) {
        return Some(tail); // ::a.b.c.d (deprecated IPv4-compatible)
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0; 4] {
        return Some(tail); // 64:ff9b::/96 NAT64
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    }
    None
}

/// Why an address is not public, or `None` when it is.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_unspecified() || a == 0 {
                Some("an unspecified address")
            } else if v4.is_private() {
                Some("a private address")
            } else if v4.is_link_local() {
                Some("a link-local address (cloud metadata lives there)")
            } else if a == 100 && (64..128).contains(&b) {
                Some("a shared (CGNAT) address")
            } else if v4.is_multicast() || v4.is_broadcast() || a >= 240 {
                Some("a multicast, broadcast or reserved address")
            } else if v4.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
                Some("a documentation or benchmarking address")
            } else if a == 192 && b == 0 && c == 0 {
                Some("an IETF protocol address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("an unspecified address")
            } else if (seg[0] & 0xfe00) == 0xfc00 {
                Some("a private (unique local) address")
            } else if (seg[0] & 0xffc0) == 0xfe80 || (seg[0] & 0xffc0) == 0xfec0 {
                Some("a link-local address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
                Some("a documentation address")
            } else if seg[0] == 0x0100 && seg[1..4] == [0; 3] {
                Some("a discard-only address")
            } else {
                None
            }
        }
    }
}

/// Which outbound targets a request may choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundPolicy {
    allow_http: bool,
    allow_hosts: Vec<String>,
    allow_nets: Vec<IpNet>,
}

impl Default for OutboundPolicy {
    /// `https` only, public addresses only, no allow-list.
    fn default() -> Self {
        Self::strict()
    }
}

impl OutboundPolicy {
    /// `https` only, public addresses only, no allow-list.
    pub fn strict() -> Self {
        Self {
            allow_http: false,
            allow_hosts: Vec::new(),
            allow_nets: Vec::new(),
        }
    }

    /// Any scheme of `http`/`https`, any address: for tests and trusted set-ups only.
    pub fn allow_all() -> Self {
        Self {
            allow_http: true,
            allow_hosts: vec!["*".into()],
            allow_nets: vec![
                "0.0.0.0/0".parse().expect("net"),
                "::/0".parse().expect("net"),
            ],
        }
    }

    /// Also allows plain `http://` targets.
    pub fn with_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// Allows one host name whatever it resolves to: `hooks.internal`, or `*.internal` for
    /// every name below `internal`, or `*` for every name.
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        self.allow_hosts.push(
            host.into()
                .trim()
                .trim_end_matches('.')
                .to_ascii_lowercase(),
        );
        self
    }

    /// Allows every address in `net`.
    pub fn allow_net(mut self, net: IpNet) -> Self {
        self.allow_nets.push(net);
        self
    }

    /// Adds the entries of a comma-separated allow-list: networks (`10.1.0.0/16`,
    /// `127.0.0.1`) and host names (`hooks.internal`, `*.corp`).
    pub fn allow_list(mut self, list: &str) -> Result<Self> {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let looks_like_net = item.contains('/') || item.parse::<IpAddr>().is_ok();
            if looks_like_net {
                self.allow_nets.push(item.parse()?);
            } else if item == "*"
                || item
                    .trim_start_matches("*.")
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                self = self.allow_host(item);
            } else {
                return Err(Error::invalid_input(format!(
                    "outbound allow-list entry {item:?} is neither a network (10.0.0.0/8) nor a host name"
                )));
            }
        }
        Ok(self)
    }

    /// Whether plain `http` is allowed.
    pub fn allows_http(&self) -> bool {
        self.allow_http
    }

    /// Whether `host` is on the operator's allow-list (then any address it resolves to is
    /// allowed, and it need not be resolved to be checked).
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.iter().any(|pattern| {
            pattern == "*"
                || *pattern == host
                || pattern
                    .strip_prefix("*.")
                    .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
        })
    }

    /// Checks a URL's scheme and host before connecting (and again on each redirect).
    /// `host` is the URL's host as the HTTP client parsed it (IPv6 without brackets or with).
    /// An address literal is checked here; a name is checked when it resolves.
    pub fn check_target(&self, what: &str, scheme: &str, host: &str) -> Result<()> {
        match scheme {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Error::invalid_input(format!(
                    "{what}: plain http is not allowed; use https (an operator may allow http with ALLOW_HTTP_CALLBACKS=1)"
                )));
            }
            other => {
                return Err(Error::invalid_input(format!(
                    "{what}: scheme {other:?} is not allowed; use https"
                )));
            }
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() {
            return Err(Error::invalid_input(format!("{what}: the URL has no host")));
        }
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.check_addr(what, bare, ip),
            Err(_) => Ok(()),
        }
    }

    /// Checks one address a target resolved to, right before connecting to it.
    pub fn check_addr(&self, what: &str, host: &str, ip: IpAddr) -> Result<()> {
        if self.host_allowed(host) || self.allow_nets.iter().any(|net| net.contains(ip)) {
            return Ok(());
        }
        match non_public_reason(ip) {
            None => Ok(()),
            Some(reason) => Err(Error::invalid_input(format!(
                "{what}: {host} is {reason} ({ip}); requests may only reach public addresses \
                 (an operator may allow this one with OUTBOUND_ALLOW={host})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_loopback_link_local_and_hidden_forms_are_not_public() {
        for s in [
            "127.0.0.1",
            "127.5.6.7",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(non_public_reason(ip(s)).is_some(), "{s} must not be public");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(non_public_reason(ip(s)), None, "{s} is public");
        }
    }

    #[test]
    fn strict_policy_refuses_http_other_schemes_and_private_literals() {
        let p = OutboundPolicy::strict();
        assert!(p.check_target("push", "https", "example.com").is_ok());
        let err = p.check_target("push", "http", "example.com").unwrap_err();
        assert!(err.message().contains("ALLOW_HTTP_CALLBACKS"), "{err}");
        assert!(p.check_target("push", "file", "x").is_err());
        assert!(p.check_target("push", "gopher", "x").is_err());
        let err = p
            .check_target("push", "https", "169.254.169.254")
            .unwrap_err();
        assert!(err.message().contains("link-local"), "{err}");
        assert!(p.check_target("push", "https", "[::1]").is_err());
        assert!(
            p.check_target("push", "https", "[::ffff:10.0.0.1]")
                .is_err()
        );
        assert!(p.check_target("push", "https", "").is_err());
        // A name is checked when it resolves.
        assert!(
            p.check_addr("push", "evil.example", ip("127.0.0.1"))
                .is_err()
        );
        assert!(
            p.check_addr("push", "good.example", ip("93.184.216.34"))
                .is_ok()
        );
    }

    #[test]
    fn allow_list_opens_named_hosts_and_networks_only() {
        let p = OutboundPolicy::strict()
            .with_http(true)
            .allow_list("10.1.0.0/16, hooks.internal, *.corp, 127.0.0.1")
            .unwrap();
        assert!(p.check_target("push", "http", "10.1.2.3").is_ok());
        assert!(p.check_target("push", "http", "10.2.0.1").is_err());
        assert!(
            p.check_addr("push", "hooks.internal", ip("10.9.9.9"))
                .is_ok()
        );
        assert!(
            p.check_addr("push", "HOOKS.internal.", ip("10.9.9.9"))
                .is_ok()
        );
        assert!(p.check_addr("push", "a.b.corp", ip("192.168.0.1")).is_ok());
        assert!(p.check_addr("push", "corp", ip("192.168.0.1")).is_err());
        assert!(
            p.check_addr("push", "evil.example", ip("127.0.0.1"))
                .is_ok()
        );
        assert!(
            p.check_addr("push", "evil.example", ip("127.0.0.2"))
                .is_err()
        );
        assert!(OutboundPolicy::strict().allow_list("not a host!").is_err());
        assert!(OutboundPolicy::strict().allow_list("10.0.0.0/33").is_err());
    }

    #[test]
    fn networks_match_by_prefix() {
        let net: IpNet = "172.16.0.0/12".parse().unwrap();
        assert!(net.contains(ip("172.20.1.1")));
        assert!(!net.contains(ip("172.32.0.1")));
        assert!(net.contains(ip("::ffff:172.16.0.5")));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
    }
}
