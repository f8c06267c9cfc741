//! The result document of a job and the stable error kinds of the spec.
//!
//! Every module reports failures in its own typed error; [`crate::job::JobError::kind`] is the one
//! place where those errors become one of the [`ErrorKind`] strings users and scripts match on.

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
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ResultError>,
}

impl JobResult {
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
}
