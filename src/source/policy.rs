//! Which URLs a rule may fetch, and which network addresses they may reach.
//!
//! Two guards, both needed:
//! - [`UrlPolicy::check`] (parsed with the rules file, in `config::urls`) compares a *parsed* URL
//!   with the rule's `allow.urls` entries; the HTTP client checks every redirect hop again.
//! - [`GuardedResolver`] is reqwest's DNS resolver: it refuses names that resolve to loopback,
//!   link-local, private or otherwise internal addresses, *at connect time*, on the addresses
//!   actually used — so a name that is public when checked and internal when connected (DNS
//!   rebinding) is refused too. Internal addresses are reachable only when an allow entry names
//!   them explicitly: an IP-literal entry (reqwest never resolves IP literals, and such a URL can
//!   only pass [`UrlPolicy::check`] by matching that very entry) or a `localhost` entry (loopback
//!   addresses only).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

pub use crate::config::urls::{Refused, UrlPolicy};

/// Whether an address is not on the public internet: loopback, link-local, private, shared
/// (CGNAT), unspecified, multicast, broadcast, documentation or benchmarking ranges.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal_v4(v4),
            None => internal_v6(v6),
        },
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b // NAT64, may map to internal IPv4
}

/// Keep the addresses `host` may connect to; refuse if none is left.
pub fn filter_addrs(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    named_internal: &HashSet<String>,
) -> Result<Vec<SocketAddr>, Refused> {
    let host = host.to_ascii_lowercase();
    let explicit = named_internal.contains(&host);
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for addr in addrs {
        let ip = addr.ip();
        let ok = !is_internal(ip) || (explicit && ip.to_canonical().is_loopback());
        if ok {
            kept.push(addr);
        } else {
            refused.push(ip);
        }
    }
    if kept.is_empty() {
        return Err(Refused(if refused.is_empty() {
            format!("{host} resolves to no address")
        } else {
            format!(
                "{host} resolves to internal address {} (loopback, link-local or private); \
                 allow it by naming it in allow.urls as an IP literal",
                refused
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }));
    }
    Ok(kept)
}

/// reqwest's DNS resolver for concatd: the system resolver, then [`filter_addrs`].
pub struct GuardedResolver {
    named_internal: Arc<HashSet<String>>,
}

impl GuardedResolver {
    pub fn new(policy: &UrlPolicy) -> Self {
        Self {
            named_internal: Arc::new(policy.named_internal_hosts()),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let named = self.named_internal.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = filter_addrs(&host, found, &named)?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> UrlPolicy {
        UrlPolicy::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn internal_ranges() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700::1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let none = HashSet::new();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 80);
        assert!(filter_addrs("evil.test", [at("10.0.0.1")], &none).is_err());
        assert!(filter_addrs("evil.test", [at("127.0.0.1")], &none).is_err());
        let kept = filter_addrs("mixed.test", [at("10.0.0.1"), at("93.184.216.34")], &none);
        assert_eq!(kept.unwrap(), vec![at("93.184.216.34")]);
        let local = policy(&["http://localhost:1/"]).named_internal_hosts();
        assert!(filter_addrs("localhost", [at("127.0.0.1")], &local).is_ok());
        assert!(filter_addrs("localhost", [at("10.0.0.1")], &local).is_err());
    }
}
