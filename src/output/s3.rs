//! The S3 face of an output: one multipart upload, published by `CompleteMultipartUpload` (readers
//! never see a partial object) or aborted.
//!
//! Every call names the store's answer in one line (`HTTP 412 PreconditionFailed`), never the
//! SDK's debug dump. Retries are the caller's (`job::upload`), with the rule's settings, because
//! only the caller knows whether a part's body can be sent again.

use std::time::Duration;

use aws_sdk_s3::config::StalledStreamProtectionConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
};

use super::OutputError;
use crate::config::S3Root;

/// Longest key S3 takes, in bytes; the `.b3` sidecar's key must fit too.
pub const MAX_KEY: usize = 1024;

/// The full key of `output` (the manifest's `output`) under `root`: relative, no empty, `.` or
/// `..` segments, no control characters, and short enough that `<key>.b3` is a key too.
pub fn key_for(root: &S3Root, output: &str) -> Result<String, OutputError> {
    let refuse = |reason: &str| OutputError::NotAllowed {
        output: output.escape_debug().to_string(),
        reason: reason.to_owned(),
    };
    if output.is_empty() {
        return Err(refuse("it is empty"));
    }
    if output.starts_with('/') {
        return Err(refuse("it must be relative to the rule's output_root"));
    }
    if output
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(refuse(
            "an S3 output key may not have empty, '.' or '..' segments",
        ));
    }
    if output.chars().any(char::is_control) {
        return Err(refuse("it holds control characters"));
    }
    let key = format!("{}{output}", root.prefix);
    if key.len() + ".b3".len() > MAX_KEY {
        return Err(refuse(&format!(
            "the key would be {} bytes; S3 takes at most {MAX_KEY} with its .b3",
            key.len()
        )));
    }
    Ok(key)
}

/// The code of a [`StoreFailure`] whose answer was 200 but could not be read.
pub const UNREADABLE: &str = "UnreadableAnswer";

/// What the store answered to a call that failed.
#[derive(Debug, Clone)]
pub struct StoreFailure {
    /// HTTP status, when the store answered at all.
    pub status: Option<u16>,
    /// The store's error code (`NoSuchUpload`, `PreconditionFailed`, …), or empty.
    pub code: String,
    /// The whole failure on one line.
    pub text: String,
}

impl StoreFailure {
    fn of<E, R>(e: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus + 'static,
    {
        match &e {
            SdkError::ServiceError(se) => {
                let status = se.raw().status();
                let code = se.err().code().unwrap_or_default().to_owned();
                let msg = match se.err().message() {
                    Some(m) => m.to_owned(),
                    // No code nor message: say what the SDK saw (an unparsable answer, say).
                    None if code.is_empty() => one_line(&e),
                    None => String::new(),
                };
                Self {
                    status: Some(status),
                    text: format!("HTTP {status} {code} {msg}").trim().to_owned(),
                    code,
                }
            }
            _ => Self {
                status: None,
                code: String::new(),
                text: one_line(&e),
            },
        }
    }

    /// Worth another attempt: no answer, a timeout, throttling or the store's own trouble.
    pub fn transient(&self) -> bool {
        match self.status {
            None => true,
            Some(s) => matches!(s, 408 | 429 | 500..=599),
        }
    }

    /// The output error of this failure during `action` on `url`.
    pub fn into_output(self, url: &str, action: &'static str) -> OutputError {
        OutputError::Store {
            url: url.to_owned(),
            action,
            reason: self.text,
        }
    }
}

fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let text = crate::source::remote::describe(e).replace('\n', " ");
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// The HTTP status of a raw SDK response.
pub trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

/// An existing object, as HEAD saw it.
#[derive(Debug, Clone)]
pub struct Head {
    pub etag: Option<String>,
    pub size: u64,
    /// The store's full-object CRC64NVME (base64), when it keeps one.
    pub crc64nvme: Option<String>,
}

/// A finished part: what the completion lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DonePart {
    pub number: u32,
    pub etag: String,
    /// The part's CRC64NVME (base64) as the store computed it, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64nvme: Option<String>,
}

/// A multipart upload in progress under a prefix.
#[derive(Debug, Clone)]
pub struct InProgress {
    pub key: String,
    pub upload_id: String,
    /// Seconds since the epoch, when the store says.
    pub initiated: Option<i64>,
}

/// One object of a rule's store that an output lands at.
pub struct S3Output {
    client: aws_sdk_s3::Client,
    stall: Duration,
    pub bucket: String,
    pub key: String,
    /// `s3://bucket/key`, for messages and the result.
    pub url: String,
}

impl S3Output {
    /// `stall`: how long an uploaded part's body may bring no byte (a slow source) before the
    /// request is called stalled — the rule's `remote.idle_timeout`, not the SDK's 5 s.
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, key: &str, stall: Duration) -> Self {
        Self {
            client,
            stall,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            url: format!("s3://{bucket}/{key}"),
        }
    }

    /// The SDK client the output uses.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The object now at `key` (checksum mode on), or `None`.
    pub async fn head(&self, key: &str) -> Result<Option<Head>, StoreFailure> {
        head_object(&self.client, &self.bucket, key, None).await
    }

    /// CreateMultipartUpload; with `full_crc`, the upload carries a full-object CRC64NVME that
    /// the completion states and the store checks.
    pub async fn create(&self, full_crc: bool) -> Result<String, StoreFailure> {
        let mut call = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/octet-stream");
        if full_crc {
            call = call
                .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
                .checksum_type(ChecksumType::FullObject);
        }
        let out = call.send().await.map_err(StoreFailure::of)?;
        out.upload_id().map(str::to_owned).ok_or(StoreFailure {
            status: None,
            code: String::new(),
            text: "CreateMultipartUpload returned no upload id".into(),
        })
    }

    /// UploadPart of `len` bytes streamed from `body` (the SDK adds a CRC64NVME trailer when
    /// `crc` is set, which the store checks against the bytes it received).
    pub async fn upload_part(
        &self,
        upload_id: &str,
        number: u32,
        len: u64,
        body: ByteStream,
        crc: bool,
    ) -> Result<DonePart, StoreFailure> {
        let mut call = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(len as i64)
            .body(body);
        if crc {
            call = call.checksum_algorithm(ChecksumAlgorithm::Crc64Nvme);
        }
        let stall = StalledStreamProtectionConfig::enabled()
            .grace_period(self.stall)
            .build();
        let out = call
            .customize()
            .config_override(aws_sdk_s3::config::Builder::new().stalled_stream_protection(stall))
            .send()
            .await
            .map_err(StoreFailure::of)?;
        Ok(DonePart {
            number,
            etag: out.e_tag().unwrap_or_default().to_owned(),
            crc64nvme: out.checksum_crc64_nvme().map(str::to_owned),
        })
    }

    /// UploadPartCopy of `range` of `bucket/key`, pinned to the ETag seen at planning (and the
    /// version id, when the bucket is versioned).
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_part_copy(
        &self,
        upload_id: &str,
        number: u32,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        range: std::ops::Range<u64>,
        if_match: Option<&str>,
    ) -> Result<DonePart, StoreFailure> {
        let encoded: String = percent_encoding::utf8_percent_encode(key, KEY_SET).collect();
        let mut source = format!("{bucket}/{encoded}");
        if let Some(v) = version_id {
            source.push_str(&format!("?versionId={v}"));
        }
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .copy_source(source)
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(if_match.map(str::to_owned))
            .send()
            .await
            .map_err(StoreFailure::of)?;
        let result = out.copy_part_result();
        Ok(DonePart {
            number,
            etag: result
                .and_then(|r| r.e_tag())
                .unwrap_or_default()
                .to_owned(),
            crc64nvme: result
                .and_then(|r| r.checksum_crc64_nvme())
                .map(str::to_owned),
        })
    }

    /// CompleteMultipartUpload of `parts` (in order). Without `overwrite` it is conditional
    /// (`If-None-Match: *`): a store that has the key answers 412 and publishes nothing.
    /// `crc64nvme`: the full-object checksum the store must find. Returns the object's ETag.
    pub async fn complete(
        &self,
        upload_id: &str,
        parts: &[DonePart],
        overwrite: bool,
        crc64nvme: Option<&str>,
    ) -> Result<String, StoreFailure> {
        let parts_done = parts;
        let parts = parts
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number as i32)
                    .e_tag(&p.etag)
                    .set_checksum_crc64_nvme(crc64nvme.and(p.crc64nvme.clone()))
                    .build()
            })
            .collect();
        let mut call = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if !overwrite {
            call = call.if_none_match("*");
        }
        if let Some(crc) = crc64nvme {
            call = call
                .checksum_crc64_nvme(crc)
                .checksum_type(ChecksumType::FullObject);
        }
        match call.send().await {
            Ok(out) => Ok(out.e_tag().unwrap_or_default().to_owned()),
            Err(e) => {
                let f = StoreFailure::of(e);
                // An answer lost on the way (a dropped connection) or one the SDK cannot read
                // (moto's XML root is CompleteMultipartUploadResponse, not …Result): the
                // completion may have happened. It did if the key now holds the object these
                // parts make, recognised by its multipart ETag.
                if (f.status == Some(200) || f.status.is_none())
                    && let Some(want) = multipart_etag(parts_done)
                    && let Ok(Some(head)) = self.head(&self.key).await
                    && head.etag.as_deref() == Some(want.as_str())
                {
                    return Ok(want);
                }
                Err(f)
            }
        }
    }

    /// AbortMultipartUpload; an upload already gone counts as aborted.
    pub async fn abort(&self, upload_id: &str) -> Result<(), StoreFailure> {
        abort(&self.client, &self.bucket, &self.key, upload_id).await
    }

    /// ListParts: the parts the store holds for `upload_id`, `None` when the upload is gone.
    pub async fn list_parts(&self, upload_id: &str) -> Result<Option<Vec<DonePart>>, StoreFailure> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.take())
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    let f = StoreFailure::of(e);
                    if f.status == Some(404) || f.code == "NoSuchUpload" {
                        return Ok(None);
                    }
                    if f.status == Some(200) {
                        // The upload exists but its listing cannot be read (moto's XML root is
                        // ListPartsResponse): say so, and let the caller trust its own record —
                        // the completion checks every part's ETag anyway (InvalidPart).
                        return Err(StoreFailure {
                            code: UNREADABLE.into(),
                            ..f
                        });
                    }
                    return Err(f);
                }
            };
            for p in out.parts() {
                parts.push(DonePart {
                    number: p.part_number().unwrap_or(0) as u32,
                    etag: p.e_tag().unwrap_or_default().to_owned(),
                    crc64nvme: p.checksum_crc64_nvme().map(str::to_owned),
                });
            }
            match (out.is_truncated(), out.next_part_number_marker()) {
                (Some(true), Some(m)) => marker = Some(m.to_owned()),
                _ => return Ok(Some(parts)),
            }
        }
    }

    /// PutObject of a small body at `key` (the `.b3` sidecar).
    pub async fn put_small(&self, key: &str, body: Vec<u8>) -> Result<(), StoreFailure> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("text/plain")
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(StoreFailure::of)?;
        Ok(())
    }

    /// DeleteObject of `key`.
    pub async fn delete(&self, key: &str) -> Result<(), StoreFailure> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(StoreFailure::of)?;
        Ok(())
    }
}

/// HeadObject of `bucket/key` (that version, if given) with checksum mode on, or `None`.
pub async fn head_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    version_id: Option<&str>,
) -> Result<Option<Head>, StoreFailure> {
    let got = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .set_version_id(version_id.map(str::to_owned))
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await;
    match got {
        Ok(out) => Ok(Some(Head {
            etag: out.e_tag().map(str::to_owned),
            size: out
                .content_length()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0),
            crc64nvme: out
                .checksum_crc64_nvme()
                .filter(|_| out.checksum_type() != Some(&ChecksumType::Composite))
                .map(str::to_owned),
        })),
        Err(e) => {
            let f = StoreFailure::of(e);
            if f.status == Some(404) {
                Ok(None)
            } else {
                Err(f)
            }
        }
    }
}

/// AbortMultipartUpload of `upload_id` at `bucket/key`; a 404 (already gone) is success.
pub async fn abort(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), StoreFailure> {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = StoreFailure::of(e);
            if f.status == Some(404) || f.code == "NoSuchUpload" {
                Ok(())
            } else {
                Err(f)
            }
        }
    }
}

/// ListMultipartUploads under `prefix` of `bucket`, every page.
pub async fn list_uploads(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<InProgress>, StoreFailure> {
    let mut all = Vec::new();
    let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
    loop {
        let out = client
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(prefix)
            .set_key_marker(key_marker.take())
            .set_upload_id_marker(id_marker.take())
            .send()
            .await
            .map_err(StoreFailure::of)?;
        for u in out.uploads() {
            if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                all.push(InProgress {
                    key: key.to_owned(),
                    upload_id: id.to_owned(),
                    initiated: u.initiated().map(|t| t.secs()),
                });
            }
        }
        if out.is_truncated() == Some(true) && out.next_key_marker().is_some() {
            key_marker = out.next_key_marker().map(str::to_owned);
            id_marker = out.next_upload_id_marker().map(str::to_owned);
        } else {
            return Ok(all);
        }
    }
}

/// The ETag S3 gives an object completed from `parts`: the MD5 of the parts' MD5s, a dash, and
/// the number of parts. `None` when a part's ETag is not a plain MD5 (some stores use others).
pub fn multipart_etag(parts: &[DonePart]) -> Option<String> {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for p in parts {
        let hex = p.etag.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        let mut raw = [0u8; 16];
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        all.update(raw);
    }
    let digest = all.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("\"{hex}-{}\"", parts.len()))
}

/// Characters of a key escaped in `x-amz-copy-source` (everything but unreserved and `/`).
const KEY_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests;
