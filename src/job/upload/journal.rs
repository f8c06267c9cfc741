//! The upload's record in the job folder (`.work/<id>/.upload`), so a job killed at any step
//! resumes the same multipart upload, recognises a completion that happened before the crash,
//! or aborts what it cannot use.
//!
//! JSON lines, each fsynced before the job relies on it: a header written just after
//! `CreateMultipartUpload` (the upload id, the plan's fingerprint), one line per finished part,
//! and a `completing` line (every part, the checksums) just before `CompleteMultipartUpload`.
//! A kill between the create and the header leaves an upload nobody records: the orphan sweep
//! ([`super::sweep`]) aborts it after its grace period.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::super::{JobContext, JobError};
use crate::output::s3::{DonePart, S3Output, multipart_etag};

/// The record's name in the job folder.
pub const FILE: &str = ".upload";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Header {
        fingerprint: String,
        upload_id: String,
        url: String,
    },
    Part(DonePart),
    Completing(Completing),
}

/// What the completion was about to publish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completing {
    pub parts: Vec<DonePart>,
    pub crc64nvme: Option<String>,
    pub blake3: Option<String>,
    /// Filled in from the store when the completion is recognised.
    #[serde(default)]
    pub etag: String,
}

/// An open record, appended to as the upload goes.
pub struct Journal {
    file: File,
}

impl Journal {
    /// A new record for upload `upload_id` (replacing any older one), durable when this returns.
    pub fn create(
        path: &Path,
        fingerprint: &str,
        upload_id: &str,
        url: &str,
    ) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let mut j = Self { file };
        j.write(&Line::Header {
            fingerprint: fingerprint.to_owned(),
            upload_id: upload_id.to_owned(),
            url: url.to_owned(),
        })?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(j)
    }

    fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: OpenOptions::new().append(true).open(path)?,
        })
    }

    fn write(&mut self, line: &Line) -> std::io::Result<()> {
        let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        text.push('\n');
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()
    }

    /// Record a finished part.
    pub fn part(&mut self, part: &DonePart) -> std::io::Result<()> {
        self.write(&Line::Part(part.clone()))
    }

    /// Record what the completion is about to publish.
    pub fn completing(
        &mut self,
        parts: &[DonePart],
        crc64nvme: Option<&str>,
        blake3: Option<&str>,
    ) -> std::io::Result<()> {
        self.write(&Line::Completing(Completing {
            parts: parts.to_vec(),
            crc64nvme: crc64nvme.map(str::to_owned),
            blake3: blake3.map(str::to_owned),
            etag: String::new(),
        }))
    }
}

/// What a job finds of an earlier run's upload.
pub enum Resume {
    /// Nothing usable (none recorded, or it was aborted here): create a new upload.
    Fresh,
    /// The recorded upload is still open: these parts are in the store with the recorded ETags.
    Upload {
        id: String,
        parts: Vec<DonePart>,
        file: Journal,
    },
    /// The recorded completion happened: the object at the key is the one it published.
    Completed(Completing),
}

/// The upload id recorded at `path`, if any (the orphan sweep's notion of "owned").
pub fn recorded_upload(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let first = text.lines().next()?;
    match serde_json::from_str(first).ok()? {
        Line::Header { upload_id, .. } => Some(upload_id),
        _ => None,
    }
}

/// Look at the record at `path` and the store: resume the upload when the plan's
/// `fingerprint` is the recorded one, recognise a completion, or abort what cannot be used.
pub fn resume(
    path: &Path,
    fingerprint: &str,
    out: &S3Output,
    rt: &tokio::runtime::Handle,
    ctx: &JobContext,
) -> Result<Resume, JobError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Resume::Fresh);
    };
    let store = |f: crate::output::s3::StoreFailure, action| {
        JobError::Output(f.into_output(&out.url, action))
    };
    // A torn last line (a kill mid-write) is not relied on: its part is redone.
    let lines: Vec<Line> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut it = lines.into_iter();
    let Some(Line::Header {
        fingerprint: recorded,
        upload_id,
        url,
    }) = it.next()
    else {
        let _ = std::fs::remove_file(path);
        return Ok(Resume::Fresh);
    };
    let mut parts = Vec::new();
    let mut completing = None;
    for line in it {
        match line {
            Line::Part(p) => parts.push(p),
            Line::Completing(c) => completing = Some(c),
            Line::Header { .. } => {}
        }
    }
    if recorded != fingerprint || url != out.url {
        // The sources (or the rule) changed since: that upload's parts are not this output's.
        tracing::info!(job_id = %ctx.job_id, upload_id = %upload_id, "the plan changed since the recorded upload: aborting it");
        if let Some((bucket, key)) = url
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
        {
            let client = out.client();
            rt.block_on(crate::output::s3::abort(client, bucket, key, &upload_id))
                .map_err(|f| store(f, "AbortMultipartUpload"))?;
        }
        let _ = std::fs::remove_file(path);
        return Ok(Resume::Fresh);
    }
    let listed = match rt.block_on(out.list_parts(&upload_id)) {
        Err(f) if f.code == crate::output::s3::UNREADABLE => {
            tracing::warn!(job_id = %ctx.job_id, upload_id = %upload_id, "the store's ListParts answer cannot be read: trusting the recorded parts (the completion checks their ETags)");
            let recorded = completing
                .as_ref()
                .map(|c| c.parts.clone())
                .unwrap_or_else(|| parts.clone());
            Some(recorded)
        }
        listed => listed.map_err(|f| store(f, "ListParts"))?,
    };
    match listed {
        None => {
            // The upload is gone: completed before the crash, or aborted.
            if let Some(mut c) = completing
                && let Some(want) = multipart_etag(&c.parts)
                && let Some(head) = rt
                    .block_on(out.head(&out.key))
                    .map_err(|f| store(f, "HEAD"))?
                && head.etag.as_deref() == Some(want.as_str())
            {
                c.etag = want;
                return Ok(Resume::Completed(c));
            }
            let _ = std::fs::remove_file(path);
            Ok(Resume::Fresh)
        }
        Some(in_store) => {
            // Only parts the store holds under the very ETag recorded are kept.
            let recorded = completing.map(|c| c.parts).unwrap_or(parts);
            let kept = recorded
                .into_iter()
                .filter(|p| {
                    in_store
                        .iter()
                        .any(|s| s.number == p.number && s.etag == p.etag)
                })
                .collect();
            let file = Journal::open(path).map_err(JobError::Journal)?;
            Ok(Resume::Upload {
                id: upload_id,
                parts: kept,
                file,
            })
        }
    }
}
