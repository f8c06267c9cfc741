//! S3 (and S3-compatible) sources through aws-sdk-s3.
//!
//! Credentials and region come from the standard AWS chain (environment, profile, instance
//! role); the rule's `s3:` section may set endpoint, region and path-style addressing. The
//! endpoint is the administrator's choice, so the URL address policy does not apply to it: what
//! `allow.urls` restricts is which buckets and keys a manifest may name. The SDK's own retries are
//! off: the shared loop in [`super::remote`] retries HTTP and S3 alike, with the rule's settings.

use std::ops::Range;

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::{ArchiveStatus, StorageClass};

use super::SourceError;
use super::remote::{Body, Failure, Version};
use crate::config::{RemoteConfig, S3Config};

/// Why no S3 client could be set up: configuration, not the network, so it is never retried.
#[derive(Debug, thiserror::Error)]
pub enum S3Setup {
    #[error("no AWS credentials found (looked for {0})")]
    NoCredentials(String),
    #[error(
        "no AWS region: set s3.region in the rule, AWS_REGION, or region in the profile of \
         ~/.aws/config"
    )]
    NoRegion,
    #[error("AWS credentials could not be loaded: {0}")]
    Credentials(String),
}

/// A rule's S3 client.
pub struct S3Client {
    client: aws_sdk_s3::Client,
}

impl S3Client {
    /// Load the AWS configuration chain (async: profile files, maybe IMDS for credentials) and
    /// resolve credentials once, so that a missing one fails here, at once, in one line.
    pub async fn new(s3: Option<&S3Config>, settings: &RemoteConfig) -> Result<Self, S3Setup> {
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
        if shared.region().is_none() {
            return Err(S3Setup::NoRegion);
        }
        let provider = shared
            .credentials_provider()
            .ok_or_else(|| S3Setup::NoCredentials(chain_looked_at()))?;
        if let Err(e) = provider.provide_credentials().await {
            return Err(match e {
                CredentialsError::CredentialsNotLoaded(_) => {
                    S3Setup::NoCredentials(chain_looked_at())
                }
                // Display only: the SDK's Debug output runs to kilobytes.
                other => S3Setup::Credentials(one_line(&other)),
            });
        }
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s3.is_some_and(|c| c.path_style))
            .build();
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(config),
        })
    }

    /// The SDK client, for the rule's S3 outputs (`output::s3`): the output lives in the store
    /// of the rule's sources.
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
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
            return Err(Failure::Permanent(SourceError::LengthMismatch {
                what: what.to_owned(),
                wanted: len,
                got: u64::try_from(n).unwrap_or(0),
            }));
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

/// What the default credential chain looked at, in its order, with the names in effect here.
fn chain_looked_at() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let credentials =
        var("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|| "~/.aws/credentials".into());
    let config = var("AWS_CONFIG_FILE").unwrap_or_else(|| "~/.aws/config".into());
    let imds = if var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        "instance role (disabled)"
    } else {
        "instance role"
    };
    format!(
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile {profile} in {credentials} and \
         {config}, web identity, container role, {imds}"
    )
}

/// An error and its causes on one line, without the SDK's Debug dumps.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let text = super::remote::describe(e).replace('\n', " ");
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
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
    R: std::fmt::Debug + HasStatus + 'static,
{
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
                _ => remote(what, format!("HTTP {status} {code}: {}", one_line(&e))),
            }
        }
        SdkError::ConstructionFailure(_) => remote(what, one_line(&e)),
        _ => Failure::Transient(one_line(&e)),
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
