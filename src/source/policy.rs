//! Which URLs a rule may fetch, and which network addresses they may reach.
//!
//! Two guards, both needed:
//! - [`UrlPolicy::check`] compares a *parsed* URL with the rule's `allow.urls` entries: same scheme,
//!   same host, same port (defaults filled in) and the entry's path segments as a prefix of the
//!   URL's, segment by segment — so `https://a.example` never admits `https://a.example.evil.net`
//!   and `https://a.example/logs` never admits `https://a.example/logs-secret`. Every redirect hop
//!   is checked again.
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

use reqwest::Url;

use super::Redacted;

/// A refused URL or address; becomes `source_not_allowed`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// One `allow.urls` entry, parsed.
#[derive(Debug, Clone)]
struct Prefix {
    scheme: String,
    host: String,
    port: Option<u16>,
    segments: Vec<String>,
}

/// The rule's `allow.urls`, parsed once per job.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    prefixes: Vec<Prefix>,
}

impl UrlPolicy {
    /// Parse the allow entries; an entry that is not a URL is an error naming it.
    pub fn new(entries: &[String]) -> Result<Self, Refused> {
        let prefixes = entries
            .iter()
            .map(|e| {
                let url = Url::parse(e).map_err(|err| {
                    Refused(format!("allow.urls entry '{e}' is not a URL: {err}"))
                })?;
                let host = url
                    .host_str()
                    .ok_or_else(|| Refused(format!("allow.urls entry '{e}' has no host")))?;
                Ok(Prefix {
                    scheme: url.scheme().to_owned(),
                    host: host.to_ascii_lowercase(),
                    port: url.port_or_known_default(),
                    segments: segments(&url),
                })
            })
            .collect::<Result<_, Refused>>()?;
        Ok(Self { prefixes })
    }

    /// Parse `text` and check it against the allow entries.
    pub fn check(&self, text: &str) -> Result<Url, Refused> {
        let url = Url::parse(text).map_err(|e| Refused(format!("not a valid URL ({e})")))?;
        self.check_url(&url)?;
        Ok(url)
    }

    /// Check a parsed URL (also each redirect target) against the allow entries.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused(format!(
                "{}: URLs with user information are refused",
                Redacted(url.as_str())
            )));
        }
        path_is_plain(url)?;
        if url.scheme() == "s3" {
            s3_key_is_plain(url)?;
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let port = url.port_or_known_default();
        let path = segments(url);
        let admitted = self.prefixes.iter().any(|p| {
            p.scheme == url.scheme()
                && p.host == host
                && p.port == port
                && path.len() >= p.segments.len()
                && p.segments.iter().zip(&path).all(|(a, b)| a == b)
        });
        if admitted {
            Ok(())
        } else {
            Err(Refused(format!(
                "{} is not under any of the rule's allow.urls",
                Redacted(url.as_str())
            )))
        }
    }

    /// Host names whose internal (loopback) addresses are explicitly allowed: `localhost`
    /// entries. IP literals need no entry here because they are never resolved.
    pub fn named_internal_hosts(&self) -> HashSet<String> {
        self.prefixes
            .iter()
            .filter(|p| p.host == "localhost")
            .map(|p| p.host.clone())
            .collect()
    }
}

/// Servers differ in when they decode a path: one that decodes `%2F` (or `%5C`) before it
/// normalises `..` serves `/logs/..%2Fsecret` as `/secret`, outside an allowed `/logs/`. So for
/// every scheme an encoded separator, or a segment that decodes to `.` or `..`, is refused.
fn path_is_plain(url: &Url) -> Result<(), Refused> {
    let lower = url.path().to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(Refused(format!(
            "{}: an encoded '/' or '\\' (%2F, %5C) in the path is refused",
            Redacted(url.as_str())
        )));
    }
    let dotted = url.path().split('/').any(|segment| {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    });
    if dotted {
        return Err(Refused(format!(
            "{}: a '.' or '..' path segment is refused",
            Redacted(url.as_str())
        )));
    }
    Ok(())
}

/// An S3 key is the *decoded* path: a segment check on the encoded path would admit
/// `s3://bucket/prefix/..%2Fsecret` (one segment) whose key is `prefix/../secret`. Refuse an
/// encoded `/` in the path, and `.`/`..` segments in the decoded key.
fn s3_key_is_plain(url: &Url) -> Result<(), Refused> {
    if url.path().to_ascii_lowercase().contains("%2f") {
        return Err(Refused(format!(
            "{}: an encoded '/' (%2F) in an S3 key is refused",
            Redacted(url.as_str())
        )));
    }
    if let Some((_, key)) = super::s3::bucket_and_key(url)
        && key.split('/').any(|s| s == "." || s == "..")
    {
        return Err(Refused(format!(
            "{}: an S3 key with '.' or '..' segments is refused",
            Redacted(url.as_str())
        )));
    }
    Ok(())
}

/// Path segments without the empty one a trailing `/` leaves (`/logs/` and `/logs` name the same
/// folder prefix). The URL parser has already resolved `.`/`..` and their percent-encoded forms.
fn segments(url: &Url) -> Vec<String> {
    let mut out: Vec<String> = url
        .path_segments()
        .map(|s| s.map(str::to_owned).collect())
        .unwrap_or_default();
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    out
}

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
    fn host_must_match_exactly() {
        let p = policy(&["https://a.example"]);
        assert!(p.check("https://a.example/x").is_ok());
        assert!(p.check("https://A.EXAMPLE/x").is_ok());
        assert!(p.check("https://a.example.evil.net/x").is_err());
        assert!(p.check("https://evil.net/a.example").is_err());
        assert!(p.check("https://a.example@evil.net/").is_err());
        assert!(
            p.check("https://evil.net@a.example/").is_err(),
            "userinfo refused"
        );
        assert!(p.check("http://a.example/x").is_err(), "scheme");
    }

    #[test]
    fn ports_compare_with_defaults() {
        let p = policy(&["https://a.example/"]);
        assert!(p.check("https://a.example:443/x").is_ok());
        assert!(p.check("https://a.example:8443/x").is_err());
        let p = policy(&["http://127.0.0.1:8080/d/"]);
        assert!(p.check("http://127.0.0.1:8080/d/x").is_ok());
        assert!(p.check("http://127.0.0.1:8081/d/x").is_err());
        assert!(p.check("http://127.0.0.1/d/x").is_err());
    }

    #[test]
    fn s3_keys_with_encoded_slashes_or_dot_segments_are_refused() {
        let p = policy(&["s3://bucket/prefix/"]);
        assert!(p.check("s3://bucket/prefix/a.bin").is_ok());
        assert!(p.check("s3://bucket/prefix/a..b/.c").is_ok());
        for bad in [
            "s3://bucket/prefix/..%2Fsecret",
            "s3://bucket/prefix/..%2fsecret",
            "s3://bucket/prefix/a%2Fb.bin",
        ] {
            let e = p.check(bad).expect_err(bad);
            assert!(e.0.contains("encoded '/'"), "{bad}: {e}");
        }
        // Dot segments, plain or encoded, are resolved by the URL parser and leave the prefix.
        for bad in [
            "s3://bucket/prefix/%2e%2e/secret",
            "s3://bucket/prefix/../secret",
        ] {
            assert!(p.check(bad).is_err(), "{bad}");
        }
    }

    /// Regression: `/logs/..%2Fsecret` is one segment under `/logs/` for the parser, but
    /// `/secret` for a server that decodes `%2F` first (python's http.server served it).
    #[test]
    fn http_paths_with_encoded_separators_are_refused() {
        let p = policy(&["http://127.0.0.1:8080/logs/"]);
        assert!(p.check("http://127.0.0.1:8080/logs/a%20b.bin").is_ok());
        for bad in [
            "http://127.0.0.1:8080/logs/..%2Fsecret.txt",
            "http://127.0.0.1:8080/logs/..%2fsecret.txt",
            "http://127.0.0.1:8080/logs/..%5Csecret.txt",
            "https://127.0.0.1:8080/logs/x%2F..%2F..%2Fsecret",
        ] {
            assert!(p.check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_match_whole_segments() {
        let p = policy(&["https://a.example/logs"]);
        assert!(p.check("https://a.example/logs").is_ok());
        assert!(p.check("https://a.example/logs/2026/x.bin").is_ok());
        assert!(p.check("https://a.example/logs-secret").is_err());
        assert!(p.check("https://a.example/logs/../secret").is_err());
        assert!(p.check("https://a.example/logs/%2e%2e/secret").is_err());
        assert!(p.check("https://a.example/other").is_err());
        let p = policy(&["s3://bucket/prefix/"]);
        assert!(p.check("s3://bucket/prefix/e.bin").is_ok());
        assert!(p.check("s3://bucket/prefixx/e.bin").is_err());
        assert!(p.check("s3://bucket2/prefix/e.bin").is_err());
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
