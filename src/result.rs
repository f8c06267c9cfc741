//! The result document of a job and the stable error kinds of the spec.
//!
//! Every module reports failures in its own typed error; [`crate::job::JobError::kind`] is the one
//! place where those errors become one of the [`ErrorKind`] strings users and scripts match on.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The stable error kinds of `SPEC.md`. Their snake_case names are part of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidManifest,
    SourceNotAllowed,
    SourceNotFound,
    SourceNotRegular,
    SourceReadFailed,
    SourceChanged,
    SourceArchived,
    RemoteFailed,
    SizeMismatch,
    ChecksumMismatch,
    OutputNotAllowed,
    OutputExists,
    TooLarge,
    NoSpace,
    Cancelled,
    Internal,
}

impl ErrorKind {
    /// The spec's string for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidManifest => "invalid_manifest",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::SourceNotFound => "source_not_found",
            Self::SourceNotRegular => "source_not_regular",
            Self::SourceReadFailed => "source_read_failed",
            Self::SourceChanged => "source_changed",
            Self::SourceArchived => "source_archived",
            Self::RemoteFailed => "remote_failed",
            Self::SizeMismatch => "size_mismatch",
            Self::ChecksumMismatch => "checksum_mismatch",
            Self::OutputNotAllowed => "output_not_allowed",
            Self::OutputExists => "output_exists",
            Self::TooLarge => "too_large",
            Self::NoSpace => "no_space",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the job published its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
}

/// The error part of a failed result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultError {
    pub kind: ErrorKind,
    pub message: String,
    /// Number (1-based, in manifest order across `sources` then `source_lists`) of the source at
    /// fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_index: Option<u64>,
    /// Every refusal found, when all were looked for (`concatd plan`); the first is the one
    /// `kind`, `message` and `source_index` describe. Runs stop at the first and leave it empty.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub problems: Vec<Problem>,
}

/// One refusal of a job, as `error.problems` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source_index: Option<u64>,
}

impl ResultError {
    /// The error of a failed result listing `problems` (at least one), led by the first.
    pub fn from_problems(problems: Vec<Problem>) -> Option<Self> {
        let first = problems.first()?.clone();
        Some(Self {
            kind: first.kind,
            message: first.message,
            source_index: first.source_index,
            problems,
        })
    }
}

/// Which job a result is about: the part every result has, succeeded or failed.
#[derive(Debug, Clone)]
pub struct ResultHead {
    pub rule: String,
    pub manifest: String,
    pub job_id: String,
    pub write_mode: Option<String>,
}

/// When a job ran. Formatted as RFC 3339 (milliseconds, UTC) in one place: [`JobResult`]'s
/// constructors.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub started: SystemTime,
    pub finished: SystemTime,
    /// Measured on a monotonic clock where the caller has one (it may differ from
    /// `finished - started` when the wall clock jumps).
    pub duration: Duration,
}

impl Timing {
    /// A job that started at `started` and ends now.
    pub fn until_now(started: SystemTime) -> Self {
        let finished = SystemTime::now();
        Self {
            started,
            finished,
            duration: finished.duration_since(started).unwrap_or_default(),
        }
    }
}

/// What a succeeded job published.
#[derive(Debug, Clone)]
pub struct Published {
    pub output: String,
    pub size: u64,
    pub blake3: String,
    pub sources: u64,
}

/// What a succeeded job with an S3 output published.
#[derive(Debug, Clone)]
pub struct PublishedS3 {
    /// `s3://bucket/key`.
    pub url: String,
    pub size: u64,
    pub blake3: Option<String>,
    pub sources: u64,
    pub etag: String,
    pub crc64nvme: Option<String>,
    pub copied_bytes: u64,
    pub uploaded_bytes: u64,
}

/// An RFC 3339 UTC timestamp with milliseconds, the form of every time in a result.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The result JSON of the spec: printed by `once`, written beside the manifest by the daemon.
/// Fields may be added, never removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub status: Status,
    pub rule: String,
    pub manifest: String,
    pub job_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blake3: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sources: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub write_mode: Option<String>,
    /// S3 outputs: the object's ETag.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub etag: Option<String>,
    /// S3 outputs: the full-object CRC64NVME (base64) the store checked, when it was knowable.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crc64nvme: Option<String>,
    /// S3 outputs: bytes copied inside the store (`UploadPartCopy`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub copied_bytes: Option<u64>,
    /// S3 outputs: bytes uploaded through this host.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uploaded_bytes: Option<u64>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ResultError>,
}

impl JobResult {
    /// The result of a job that published its output.
    pub fn published(head: ResultHead, timing: Timing, done: Published) -> Self {
        Self {
            output: Some(done.output),
            size: Some(done.size),
            blake3: Some(done.blake3),
            sources: Some(done.sources),
            ..Self::bare(head, timing, Status::Succeeded, None)
        }
    }

    /// The result of a job that completed an S3 output: `blake3` only when it is known (every
    /// byte hashed on its way, or read back).
    pub fn uploaded(head: ResultHead, timing: Timing, done: PublishedS3) -> Self {
        Self {
            output: Some(done.url),
            size: Some(done.size),
            blake3: done.blake3,
            sources: Some(done.sources),
            etag: Some(done.etag),
            crc64nvme: done.crc64nvme,
            copied_bytes: Some(done.copied_bytes),
            uploaded_bytes: Some(done.uploaded_bytes),
            ..Self::bare(head, timing, Status::Succeeded, None)
        }
    }

    /// The result of a job that failed with `error`.
    pub fn failed(head: ResultHead, timing: Timing, error: ResultError) -> Self {
        Self::bare(head, timing, Status::Failed, Some(error))
    }

    fn bare(head: ResultHead, timing: Timing, status: Status, error: Option<ResultError>) -> Self {
        Self {
            status,
            rule: head.rule,
            manifest: head.manifest,
            job_id: head.job_id,
            output: None,
            size: None,
            blake3: None,
            sources: None,
            write_mode: head.write_mode,
            etag: None,
            crc64nvme: None,
            copied_bytes: None,
            uploaded_bytes: None,
            started_at: rfc3339(timing.started),
            finished_at: rfc3339(timing.finished),
            duration_ms: timing.duration.as_millis() as u64,
            error,
        }
    }

    /// True when the job published its output.
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded
    }

    /// The exit code of `once` and `submit --wait` for this result.
    pub fn exit_code(&self) -> i32 {
        if self.succeeded() { 0 } else { 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_spec_strings() {
        for kind in [
            ErrorKind::InvalidManifest,
            ErrorKind::NoSpace,
            ErrorKind::SourceNotRegular,
        ] {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
    }

    #[test]
    fn constructors_format_times_and_problems() {
        let head = ResultHead {
            rule: "r".into(),
            manifest: "m.json".into(),
            job_id: "j".into(),
            write_mode: None,
        };
        let started = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let timing = Timing {
            started,
            finished: started + Duration::from_millis(5),
            duration: Duration::from_millis(5),
        };
        let problem = |n| Problem {
            kind: ErrorKind::SourceNotFound,
            message: format!("source {n}"),
            source_index: Some(n),
        };
        let error = ResultError::from_problems(vec![problem(2), problem(5)]).unwrap();
        let r = JobResult::failed(head, timing, error);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["started_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["finished_at"], "2023-11-14T22:13:20.128Z");
        assert_eq!(v["duration_ms"], 5);
        assert_eq!(v["error"]["source_index"], 2);
        assert_eq!(v["error"]["problems"][1]["source_index"], 5);
        assert!(ResultError::from_problems(Vec::new()).is_none());
    }
}
