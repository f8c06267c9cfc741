//! S3 (and S3-compatible) sources through aws-sdk-s3.
//!
//! Credentials and region come from the standard AWS chain (environment, profile, instance
//! role); the rule's `s3:` section may set endpoint, region and path-style addressing. The
//! endpoint is the administrator's choice, so the URL address policy does not apply to it: what
//! `allow.urls` restricts is which buckets and keys a manifest may name. The SDK's own retries are
//! off: the shared loop in [`super::remote`] retries HTTP and S3 alike, with the rule's settings.

use std::ops::Range;

use aws_sdk_s3::config::{Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::types::{ArchiveStatus, StorageClass};

use super::SourceError;
use super::remote::{Body, Failure, Version};
use crate::config::{RemoteConfig, S3Config};

/// The job's S3 client.
pub struct S3Client {
    client: aws_sdk_s3::Client,
}

impl S3Client {
    /// Load the AWS configuration chain (async: profile files, maybe IMDS for credentials).
    pub async fn new(s3: Option<&S3Config>, settings: &RemoteConfig) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .read_timeout(settings.idle_timeout)
                    .build(),
            );
        if let Some(region) = s3.and_then(|c| c.region.clone()) {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint) = s3.and_then(|c| c.endpoint.clone()) {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s3.is_some_and(|c| c.path_style))
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(config),
        }
    }

    /// HeadObject: size, ETag and version; archived objects are refused here, before any byte.
    pub async fn head(&self, bucket: &str, key: &str, what: &str) -> Result<Version, Failure> {
        let out = self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_failure(what, e))?;
        let restored = out
            .restore()
            .is_some_and(|r| r.contains("ongoing-request=\"false\""));
        let archived_class = matches!(
            out.storage_class(),
            Some(StorageClass::Glacier | StorageClass::DeepArchive)
        );
        let archived_tier = matches!(
            out.archive_status(),
            Some(ArchiveStatus::ArchiveAccess | ArchiveStatus::DeepArchiveAccess)
        );
        if (archived_class || archived_tier) && !restored {
            let class = out
                .storage_class()
                .map(|c| c.as_str().to_owned())
                .or_else(|| out.archive_status().map(|a| a.as_str().to_owned()))
                .unwrap_or_default();
            return Err(Failure::Permanent(SourceError::Archived {
                what: what.to_owned(),
                class,
            }));
        }
        let size = out
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| remote(what, "HeadObject returned no Content-Length".into()))?;
        Ok(Version {
            size,
            etag: out.e_tag().map(str::to_owned),
            last_modified: None,
            version_id: out
                .version_id()
                .filter(|v| !v.is_empty() && *v != "null")
                .map(str::to_owned),
        })
    }

    /// GetObject of `range`, pinned by `If-Match` (and the version id when there is one).
    pub async fn get(
        &self,
        bucket: &str,
        key: &str,
        what: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<Body, Failure> {
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(version.etag.clone())
            .set_version_id(version.version_id.clone())
            .send()
            .await
            .map_err(|e| sdk_failure(what, e))?;
        if let (Some(want), Some(got)) = (&version.etag, out.e_tag())
            && want != got
        {
            return Err(Failure::Permanent(SourceError::Changed {
                what: what.to_owned(),
                reason: format!("ETag {want} became {got}"),
            }));
        }
        let len = range.end - range.start;
        if let Some(n) = out.content_length()
            && u64::try_from(n).ok() != Some(len)
        {
            return Err(remote(
                what,
                format!("Content-Length {n} for a range of {len} bytes"),
            ));
        }
        if let Some(cr) = out.content_range() {
            let want = format!("bytes {}-{}/{}", range.start, range.end - 1, version.size);
            if cr != want {
                return Err(remote(what, format!("asked for {want}, got {cr}")));
            }
        }
        Ok(Body::S3(out.body))
    }
}

fn remote(what: &str, reason: String) -> Failure {
    Failure::Permanent(SourceError::Remote {
        what: what.to_owned(),
        reason,
    })
}

/// Sort an SDK error like an HTTP status (404 not found, 412 changed, 5xx/429 retried, archived
/// objects by their error code); connection trouble and timeouts are retried.
fn sdk_failure<E, R>(what: &str, e: SdkError<E, R>) -> Failure
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let text = DisplayErrorContext(&e).to_string();
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status_code();
            let code = se.err().code().unwrap_or_default();
            match (status, code) {
                (_, "InvalidObjectState") => Failure::Permanent(SourceError::Archived {
                    what: what.to_owned(),
                    class: "archived (InvalidObjectState)".into(),
                }),
                (404, _) | (_, "NoSuchKey" | "NoSuchBucket" | "NotFound") => {
                    Failure::Permanent(SourceError::NotFound {
                        what: what.to_owned(),
                        reason: format!("HTTP {status} {code}"),
                    })
                }
                (412, _) => Failure::Permanent(SourceError::Changed {
                    what: what.to_owned(),
                    reason: "HTTP 412 Precondition Failed: the object no longer matches its ETag"
                        .into(),
                }),
                (408 | 429 | 500..=599, _) => Failure::Transient(format!("HTTP {status} {code}")),
                (403, _) => remote(what, format!("HTTP 403 Forbidden {code}")),
                _ => remote(what, format!("HTTP {status} {code}: {text}")),
            }
        }
        SdkError::ConstructionFailure(_) => remote(what, text),
        _ => Failure::Transient(text),
    }
}

/// The HTTP status of a raw SDK response.
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Split `s3://bucket/key` into bucket and (percent-decoded) key.
pub fn bucket_and_key(url: &reqwest::Url) -> Option<(String, String)> {
    let bucket = url.host_str()?.to_owned();
    let key = percent_decode(url.path().strip_prefix('/')?)?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let url = reqwest::Url::parse("s3://bucket/a/b%20c.bin").unwrap();
        assert_eq!(
            bucket_and_key(&url),
            Some(("bucket".into(), "a/b c.bin".into()))
        );
        let url = reqwest::Url::parse("s3://bucket/").unwrap();
        assert_eq!(bucket_and_key(&url), None);
    }
}
