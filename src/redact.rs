//! Credentials out of every URL we print.
//!
//! A URL may carry secrets: user information (`https://user:password@host/`) and signed query
//! strings (presigned S3 URLs' `X-Amz-Signature`/`X-Amz-Credential`, `sig`, `token`, …). Results,
//! logs and errors name sources by their URL, so every place that prints one goes through
//! [`redact`]: the password (or a lone user name, often a token) becomes `***`, and so does the
//! value of every query parameter that looks like a credential. The request itself still uses
//! the URL as written.

use std::borrow::Cow;
use std::fmt;

/// What replaces a secret.
const MASK: &str = "***";

/// `text` with the credentials of every URL in it masked. Works on any text (an error message
/// quoting a URL, a `Location` header, a manifest entry), not only a well-formed URL.
pub fn redact(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail.find(ends_url).unwrap_or(tail.len());
        redact_one(&tail[..end], &mut out);
        rest = &tail[end..];
    }
    out.push_str(rest);
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

/// Shows a URL (or any text) through [`redact`].
pub struct Redacted<'a>(pub &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.0))
    }
}

/// Characters that end a URL quoted in prose (`for url (http://…)`, `'http://…'`).
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | ')' | ']' | '}')
}

/// One URL after its `scheme://`: authority, then path, query and fragment.
fn redact_one(url: &str, out: &mut String) {
    let auth_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let (authority, rest) = url.split_at(auth_end);
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            // A lone user name is often a token (`https://TOKEN@host/`): masked whole.
            if let Some((user, _)) = userinfo.split_once(':') {
                out.push_str(user);
                out.push(':');
            }
            out.push_str(MASK);
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    let Some(q) = rest.find('?') else {
        out.push_str(rest);
        return;
    };
    out.push_str(&rest[..=q]);
    let query_and_fragment = &rest[q + 1..];
    let (query, fragment) = match query_and_fragment.find('#') {
        Some(h) => query_and_fragment.split_at(h),
        None => (query_and_fragment, ""),
    };
    for (i, param) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match param.split_once('=') {
            Some((name, value)) if secret_name(name) && !value.is_empty() => {
                out.push_str(name);
                out.push('=');
                out.push_str(MASK);
            }
            _ => out.push_str(param),
        }
    }
    out.push_str(fragment);
}

/// Query parameters whose value is a credential: presigned S3 and GCS URLs, Azure SAS, and the
/// usual names for tokens, keys and passwords.
fn secret_name(name: &str) -> bool {
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    const EXACT: [&str; 10] = [
        "sig",
        "key",
        "auth",
        "code",
        "pass",
        "pwd",
        "session",
        "sas",
        "jwt",
        "awsaccesskeyid",
    ];
    const CONTAINS: [&str; 8] = [
        "signature",
        "credential",
        "token",
        "secret",
        "password",
        "passwd",
        "apikey",
        "api_key",
    ];
    EXACT.contains(&name.as_str())
        || CONTAINS.iter().any(|c| name.contains(c))
        || name == "googleaccessid"
        || name.ends_with("-key")
        || name.ends_with("_key")
        || name == "x-amz-security-token"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_masked() {
        assert_eq!(
            redact("http://user:secret@host:8080/a/b"),
            "http://user:***@host:8080/a/b"
        );
        assert_eq!(
            redact("https://TOKEN@github.com/x"),
            "https://***@github.com/x"
        );
        assert_eq!(redact("https://u:p@q@h/"), "https://u:***@h/");
        assert_eq!(redact("http://host/a@b"), "http://host/a@b");
    }

    #[test]
    fn signed_query_values_are_masked() {
        assert_eq!(
            redact(
                "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=abc&X-Amz-Security-Token=t#frag"
            ),
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***&X-Amz-Security-Token=***#frag"
        );
        assert_eq!(
            redact("https://a.blob.core.windows.net/c/x?sv=2020&sig=S3CR3T&se=1"),
            "https://a.blob.core.windows.net/c/x?sv=2020&sig=***&se=1"
        );
        assert_eq!(
            redact("http://h/x?part=1&access_token=zz&Signature=q"),
            "http://h/x?part=1&access_token=***&Signature=***"
        );
        assert_eq!(redact("http://h/x?a=1&b"), "http://h/x?a=1&b");
    }

    #[test]
    fn urls_inside_prose() {
        assert_eq!(
            redact(
                "error sending request for url (http://u:pw@h/x?token=t): refused; see 'https://k@h2/'"
            ),
            "error sending request for url (http://u:***@h/x?token=***): refused; see 'https://***@h2/'"
        );
        assert!(matches!(redact("/srv/data/a.bin"), Cow::Borrowed(_)));
        assert!(matches!(redact("http://h/plain"), Cow::Borrowed(_)));
        assert_eq!(
            Redacted("s3://b/k?X-Amz-Signature=1").to_string(),
            "s3://b/k?X-Amz-Signature=***"
        );
    }
}
