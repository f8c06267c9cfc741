//! HTTP(S) sources through reqwest (rustls).
//!
//! The client is built so that the allow policy cannot be bypassed: no proxy (a proxy would make
//! the connection, not us), the [`GuardedResolver`] as DNS resolver (addresses checked when
//! connecting), and no automatic redirects — [`HttpClient::send`] follows them itself, checking
//! every hop against `allow.urls`. Requests never ask for compression, so lengths are byte counts.

use std::ops::Range;
use std::sync::Arc;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::policy::{GuardedResolver, Refused, UrlPolicy};
use super::remote::{Body, Failure, Fetched, Version, describe};
use super::{Redacted, SourceError};
use crate::config::RemoteConfig;

/// Redirect hops followed per request.
const MAX_REDIRECTS: usize = 10;

/// The job's HTTP client and the policy it enforces.
pub struct HttpClient {
    client: reqwest::Client,
    policy: Arc<UrlPolicy>,
}

impl HttpClient {
    pub fn new(policy: Arc<UrlPolicy>, settings: &RemoteConfig) -> Result<Self, SourceError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver::new(&policy)))
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(settings.parallel.max(4))
            .user_agent(concat!("concatd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SourceError::Remote {
                what: "HTTP client".into(),
                reason: describe(&e),
            })?;
        Ok(Self { client, policy })
    }

    /// Send one request, following redirects that stay within `allow.urls`.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        what: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Failure> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let response = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .send()
                .await
                .map_err(|e| request_failure(what, &e))?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    permanent_remote(what, format!("{} without a Location", response.status()))
                })?;
            let next = url.join(location).map_err(|e| {
                let location = Redacted(location);
                permanent_remote(what, format!("bad redirect '{location}': {e}"))
            })?;
            self.policy.check_url(&next).map_err(|Refused(reason)| {
                Failure::Permanent(SourceError::NotAllowed {
                    what: what.to_owned(),
                    reason: format!("redirected to a URL that is not allowed: {reason}"),
                })
            })?;
            url = next;
        }
        Err(permanent_remote(
            what,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    /// HEAD: the size and the validators every later range is pinned to.
    pub async fn head(&self, url: &Url, what: &str) -> Result<Version, Failure> {
        let response = self.send(Method::HEAD, url, what, HeaderMap::new()).await?;
        let status = response.status();
        if matches!(status.as_u16(), 405 | 501) {
            return self.head_by_get(url, what).await;
        }
        if !status.is_success() {
            return Err(busy_or(status_failure(what, status), response.headers()));
        }
        let h = response.headers();
        // Read the header itself: for a HEAD, the body length reqwest reports is always 0.
        let size = text(h, header::CONTENT_LENGTH)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                permanent_remote(
                    what,
                    "the server reports no Content-Length, and concatd plans every byte before \
                     writing one: sources of unknown size are not supported"
                        .into(),
                )
            })?;
        let etag = text(h, header::ETAG).filter(|e| e.starts_with('"'));
        Ok(Version {
            size,
            etag,
            last_modified: text(h, header::LAST_MODIFIED),
            version_id: None,
        })
    }

    /// For servers without HEAD: `GET` of the first byte; the size is the total of its
    /// `Content-Range`.
    async fn head_by_get(&self, url: &Url, what: &str) -> Result<Version, Failure> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, header::RANGE, "bytes=0-0");
        let response = self.send(Method::GET, url, what, headers).await?;
        let status = response.status();
        let h = response.headers();
        let size = match status {
            StatusCode::PARTIAL_CONTENT => text(h, header::CONTENT_RANGE)
                .as_deref()
                .and_then(parse_content_range)
                .and_then(|(_, _, total)| total),
            // An empty object answers a range with 416 (nothing satisfies it).
            StatusCode::RANGE_NOT_SATISFIABLE => text(h, header::CONTENT_RANGE)
                .and_then(|v| v.strip_prefix("bytes */")?.parse().ok()),
            // A server that ignores Range sends the whole object: its length is the size (the
            // body is dropped unread, which closes the connection).
            StatusCode::OK => text(h, header::CONTENT_LENGTH).and_then(|v| v.parse().ok()),
            s if s.is_success() => None,
            s => return Err(busy_or(status_failure(what, s), h)),
        };
        let size = size.ok_or_else(|| {
            permanent_remote(
                what,
                "HEAD is not supported and a ranged GET reports no size: sources of unknown \
                 size are not supported"
                    .into(),
            )
        })?;
        Ok(Version {
            size,
            etag: text(h, header::ETAG).filter(|e| e.starts_with('"')),
            last_modified: text(h, header::LAST_MODIFIED),
            version_id: None,
        })
    }

    /// A ranged GET pinned to `version`; checks status, Content-Range and length. A server that
    /// ignores Range answers 200 with the whole object: that is accepted (`whole_object`), with
    /// the same validators and the object's full length.
    pub async fn get(
        &self,
        url: &Url,
        what: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<Fetched, Failure> {
        let mut headers = HeaderMap::new();
        let whole = range.start == 0 && range.end == version.size;
        insert(
            &mut headers,
            header::RANGE,
            &format!("bytes={}-{}", range.start, range.end - 1),
        );
        if let Some(etag) = &version.etag {
            insert(&mut headers, header::IF_MATCH, etag);
        } else if let Some(lm) = &version.last_modified {
            insert(&mut headers, header::IF_UNMODIFIED_SINCE, lm);
        }
        let response = self.send(Method::GET, url, what, headers).await?;
        let status = response.status();
        let h = response.headers();
        // Servers that ignore conditional headers are still caught by the validators they send.
        if let (Some(want), Some(got)) = (&version.etag, text(h, header::ETAG))
            && want != &got
        {
            return Err(changed(what, format!("ETag {want} became {got}")));
        }
        if let (None, Some(want), Some(got)) = (
            &version.etag,
            &version.last_modified,
            text(h, header::LAST_MODIFIED),
        ) && want != &got
        {
            return Err(changed(what, format!("Last-Modified {want} became {got}")));
        }
        let length = text(h, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let (start, end, total) = text(h, header::CONTENT_RANGE)
                    .as_deref()
                    .and_then(parse_content_range)
                    .ok_or_else(|| {
                        permanent_remote(what, "206 without a valid Content-Range".into())
                    })?;
                if let Some(now) = total.filter(|&t| t != version.size) {
                    return Err(Failure::Permanent(SourceError::SizeChanged {
                        what: what.to_owned(),
                        planned: version.size,
                        now,
                    }));
                }
                if (start, end) != (range.start, range.end) {
                    return Err(permanent_remote(
                        what,
                        format!(
                            "asked for bytes {}-{}, the server sent {}-{}",
                            range.start,
                            range.end - 1,
                            start,
                            end - 1
                        ),
                    ));
                }
            }
            StatusCode::OK => {
                if let Some(now) = length.filter(|&n| n != version.size) {
                    return Err(Failure::Permanent(SourceError::SizeChanged {
                        what: what.to_owned(),
                        planned: version.size,
                        now,
                    }));
                }
                return Ok(Fetched {
                    body: Body::Http(response),
                    whole_object: !whole,
                });
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(changed(what, "the planned range is no longer there".into()));
            }
            s => return Err(busy_or(status_failure(what, s), h)),
        }
        if let Some(len) = length
            && len != range.end - range.start
        {
            return Err(Failure::Permanent(SourceError::LengthMismatch {
                what: what.to_owned(),
                wanted: range.end - range.start,
                got: len,
            }));
        }
        Ok(Fetched {
            body: Body::Http(response),
            whole_object: false,
        })
    }
}

fn text(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

fn insert(h: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// `bytes START-LAST/TOTAL` → (start, end exclusive, total if known).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (start, last): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    // `last` may be u64::MAX: no end fits, the header is invalid (remote_failed).
    let end = last.checked_add(1)?;
    (last >= start).then_some((start, end, total))
}

/// A retryable failure becomes `Busy` when the server said how long to wait (`Retry-After` in
/// seconds; the HTTP-date form is treated as absent).
fn busy_or(failure: Failure, h: &HeaderMap) -> Failure {
    let retry_after = text(h, header::RETRY_AFTER).and_then(|v| v.parse::<u64>().ok());
    match (failure, retry_after) {
        (Failure::Transient(reason), Some(secs)) => Failure::Busy {
            reason,
            retry_after: std::time::Duration::from_secs(secs),
        },
        (f, _) => f,
    }
}

fn changed(what: &str, reason: String) -> Failure {
    Failure::Permanent(SourceError::Changed {
        what: what.to_owned(),
        reason,
    })
}

fn permanent_remote(what: &str, reason: String) -> Failure {
    Failure::Permanent(SourceError::Remote {
        what: what.to_owned(),
        reason,
    })
}

/// What an HTTP status means for a source: 404/410 not found, 412 changed, 408/429/5xx worth a
/// retry, anything else (401, 403, …) a remote failure naming the status.
pub fn status_failure(what: &str, status: StatusCode) -> Failure {
    let reason = format!("HTTP {status}");
    match status.as_u16() {
        404 | 410 => Failure::Permanent(SourceError::NotFound {
            what: what.to_owned(),
            reason,
        }),
        412 => changed(
            what,
            format!("{reason}: the object no longer matches its ETag"),
        ),
        408 | 429 | 500..=599 => Failure::Transient(reason),
        _ => permanent_remote(what, reason),
    }
}

/// Sort a failed request: a refused address is `source_not_allowed`; connection trouble and
/// timeouts are retried.
fn request_failure(what: &str, e: &reqwest::Error) -> Failure {
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(Refused(reason)) = c.downcast_ref::<Refused>() {
            return Failure::Permanent(SourceError::NotAllowed {
                what: what.to_owned(),
                reason: reason.clone(),
            });
        }
        cause = c.source();
    }
    if e.is_builder() {
        permanent_remote(what, describe(e))
    } else {
        Failure::Transient(describe(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 6, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn content_range_ending_at_u64_max_is_invalid_not_an_overflow() {
        assert_eq!(
            parse_content_range("bytes 0-18446744073709551615/18446744073709551615"),
            None
        );
        assert_eq!(parse_content_range("bytes 0-18446744073709551615/*"), None);
        assert_eq!(
            parse_content_range("bytes 0-18446744073709551614/*"),
            Some((0, u64::MAX, None))
        );
    }

    #[test]
    fn retry_after_seconds_become_a_wait_hint() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        let busy = busy_or(status_failure("u", StatusCode::TOO_MANY_REQUESTS), &h);
        assert!(matches!(busy, Failure::Busy { retry_after, .. } if retry_after.as_secs() == 2));
        let not_found = busy_or(status_failure("u", StatusCode::NOT_FOUND), &h);
        assert!(matches!(
            not_found,
            Failure::Permanent(SourceError::NotFound { .. })
        ));
        let h = HeaderMap::new();
        let plain = busy_or(status_failure("u", StatusCode::SERVICE_UNAVAILABLE), &h);
        assert!(matches!(plain, Failure::Transient(_)));
    }

    #[test]
    fn statuses() {
        let kind = |s: u16| match status_failure("u", StatusCode::from_u16(s).unwrap()) {
            Failure::Transient(_) | Failure::Busy { .. } => "retry",
            Failure::Permanent(SourceError::NotFound { .. }) => "not_found",
            Failure::Permanent(SourceError::Changed { .. }) => "changed",
            Failure::Permanent(SourceError::Remote { reason, .. }) => {
                assert!(reason.contains(&s.to_string()));
                "remote"
            }
            Failure::Permanent(_) => "other",
        };
        assert_eq!(kind(404), "not_found");
        assert_eq!(kind(412), "changed");
        assert_eq!(kind(503), "retry");
        assert_eq!(kind(429), "retry");
        assert_eq!(kind(403), "remote");
    }
}
