//! The rule's `allow.urls`: which URLs its manifests may name.
//!
//! Parsed and validated with the rules file (config stays plain data: this module needs nothing
//! from the sources that consume it). [`UrlPolicy::check`] compares a *parsed* URL with the
//! entries: same scheme, same host, same port (defaults filled in) and the entry's path segments
//! as a prefix of the URL's, segment by segment — so `https://a.example` never admits
//! `https://a.example.evil.net` and `https://a.example/logs` never admits
//! `https://a.example/logs-secret`. The sources check every redirect hop again, and guard the
//! addresses a name resolves to (`source::policy`).

use std::collections::HashSet;

use url::Url;

use crate::redact::Redacted;

/// A refused URL or address; becomes `source_not_allowed`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// One `allow.urls` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prefix {
    scheme: String,
    host: String,
    port: Option<u16>,
    segments: Vec<String>,
}

/// The rule's `allow.urls`, parsed when the rules file is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// The entries as written (for messages and for comparing rules across a reload).
    entries: Vec<String>,
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
        Ok(Self {
            entries: entries.to_vec(),
            prefixes,
        })
    }

    /// The entries as the rules file wrote them.
    pub fn entries(&self) -> &[String] {
        &self.entries
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
    if let Some((_, key)) = bucket_and_key(url)
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

/// Split `s3://bucket/key` into bucket and (percent-decoded) key.
pub fn bucket_and_key(url: &Url) -> Option<(String, String)> {
    let bucket = url.host_str()?.to_owned();
    let key = percent_encoding::percent_decode_str(url.path().strip_prefix('/')?)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> UrlPolicy {
        UrlPolicy::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn s3_urls() {
        let url = Url::parse("s3://bucket/a/b%20c.bin").unwrap();
        assert_eq!(
            bucket_and_key(&url),
            Some(("bucket".into(), "a/b c.bin".into()))
        );
        let url = Url::parse("s3://bucket/").unwrap();
        assert_eq!(bucket_and_key(&url), None);
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
}
