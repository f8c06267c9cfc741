//! The job's S3 path: an output built inside the object store by one multipart upload.
//!
//! Planning ([`plan`], part of the job's planning phase, so `concatd plan` shows it): every
//! `s3://` source of the rule (its store is the output's) becomes a copyable segment, whole or
//! ranged; runs of other sources become one uploaded segment; [`parts::plan_parts`] decides the
//! parts. Running ([`run`]): create the upload (or resume the one a crashed run recorded, see
//! [`journal`]), run copy parts as server-side `UploadPartCopy` calls in parallel, stream uploaded
//! parts from the sources with BLAKE3 and CRC64NVME computed as the bytes pass, complete (under
//! `If-None-Match: *` unless overwrite), and abort the upload on any failure.
//!
//! Memory: at most `remote.parallel` parts in flight, each holding at most [`BODY_CHUNKS`] chunks
//! of [`CHUNK`] bytes queued for its body, so `parallel × 4 MiB` (16 MiB by default), whatever
//! the part or output size. A part is never staged on disk.

mod body;
pub mod journal;
mod layout;
mod parts_run;
mod sweep;

pub use layout::{Rec, S3Job, SegFrom, plan};
pub use sweep::{EVERY as SWEEP_EVERY, sweep_orphans};

use std::sync::Arc;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use super::{JobContext, JobError, Plan, Planned, Prepared, Refusals};
use crate::config::{Rule, Verify};
use crate::manifest::Manifest;
use crate::output::OutputError;
use crate::output::s3::{DonePart, S3Output, StoreFailure};
use crate::source::Sources;
use journal::{Journal, Resume};
use parts_run::{Flags, parts_then_complete};

/// Bytes read from the sources per step of an uploaded part (and per queued body chunk).
pub const CHUNK: usize = 1 << 20;
/// Chunks queued per part body: the memory bound above.
pub const BODY_CHUNKS: usize = 4;

/// The planning phase of an S3 output: the key checked, every source planned (and kept, to
/// build the parts from), the parts planned. Whether the key exists is asked by the run, just
/// before it creates the upload (and the completion is conditional).
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare<'a>(
    rule: &Rule,
    job_id: &str,
    root: &crate::config::S3Root,
    manifest: Manifest,
    overwrite: bool,
    refusals: Refusals,
    cancel: Option<&'a AtomicBool>,
    observe: &mut dyn FnMut(&Planned),
) -> Result<Prepared<'a>, Vec<JobError>> {
    let mut problems: Vec<JobError> = Vec::new();
    // Checked first so that it is refused before any source is planned (`layout::plan` derives
    // the key again, past the point where it can fail).
    if let Err(e) = crate::output::s3::key_for(root, &manifest.output) {
        let e = JobError::Output(e);
        if refusals == Refusals::First {
            return Err(vec![e]);
        }
        problems.push(e);
    }
    let sources = match Sources::with_cancel(rule, cancel) {
        Ok(sources) => sources,
        Err(source) => {
            problems.push(JobError::Sources { source });
            return Err(problems);
        }
    };
    let mut recs = Vec::new();
    let mut keep = |p: &Planned| {
        recs.push(Rec {
            number: p.number,
            location: p.spec.location.clone(),
            offset: p.offset,
            len: p.len,
            out_start: p.output_offset,
            pin: p.probe.pin,
        });
        observe(p);
    };
    let plan = super::plan::build(
        &manifest,
        &sources,
        rule.max_output_size,
        refusals,
        // Kept in memory: the S3 planner holds every source's location anyway.
        None,
        &mut keep,
    );
    let plan = match plan {
        Ok(plan) => plan,
        Err(more) => {
            problems.extend(more);
            return Err(problems);
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let job = layout::plan(root, &manifest.output, recs, &sources).map_err(|e| vec![e])?;
    // `concatd plan` says what a run would find at the key (a run asks again just before it
    // creates the upload, and completes conditionally).
    if refusals == Refusals::All && !overwrite {
        let (clients, s3) = store_clients(&job, &sources).map_err(|e| vec![e])?;
        let out = S3Output::new(
            s3.sdk().clone(),
            &job.bucket,
            &job.key,
            rule.remote.idle_timeout,
        );
        let sidecar = rule.checksum_file && wants_hash(rule, &manifest, &job, plan.total);
        refuse_existing(&out, clients.rt(), &job, sidecar).map_err(|e| vec![e])?;
    }
    tracing::info!(
        job_id = %job_id, sources = plan.count(), bytes = plan.total, output = %job.url,
        parts = job.parts.parts.len(), copied_bytes = job.parts.copied_bytes,
        uploaded_bytes = job.parts.uploaded_bytes, "planned"
    );
    Ok(Prepared {
        manifest,
        target: None,
        output: PathBuf::from(&job.url),
        overwrite,
        sources,
        plan,
        s3: Some(job),
    })
}

/// Whether the job learns its output's BLAKE3: every byte passes through the host, or the rule
/// or the manifest asks for it (which reads the copied bytes back).
fn wants_hash(rule: &crate::config::Rule, manifest: &Manifest, job: &S3Job, total: u64) -> bool {
    rule.verify == Verify::ReadBack
        || manifest.expect.blake3.is_some()
        || job.parts.uploaded_bytes == total
}

/// `output_exists` when an object is at the output's key, or at its `.b3` when the job will
/// write one (`sidecar`): what a run checks before it creates the upload, and `concatd plan`
/// reports. (Only an early refusal: the conditional completion holds against a racing writer.)
fn refuse_existing(
    out: &S3Output,
    rt: &tokio::runtime::Handle,
    job: &S3Job,
    sidecar: bool,
) -> Result<(), JobError> {
    let head = |key: &str| {
        rt.block_on(out.head(key))
            .map_err(|f| JobError::Output(f.into_output(&job.url, "HEAD")))
    };
    let url = if head(&job.key)?.is_some() {
        job.url.clone()
    } else if sidecar && head(&format!("{}.b3", job.key))?.is_some() {
        format!("{}.b3", job.url)
    } else {
        return Ok(());
    };
    Err(OutputError::Exists { path: url.into() }.into())
}

/// The clients of the output's store (the rule's, shared with its `s3://` sources).
fn store_clients(
    job: &S3Job,
    sources: &Sources,
) -> Result<
    (
        Arc<crate::source::clients::Clients>,
        Arc<crate::source::s3::S3Client>,
    ),
    JobError,
> {
    let setup = |source| JobError::Sources { source };
    let clients = sources.clients(&job.url).map_err(setup)?;
    let s3 = clients.s3(&job.url).map_err(setup)?;
    Ok((clients, s3))
}

/// The result of a job that completed its S3 output, and its log line.
pub(super) fn result(
    job_id: &str,
    head: crate::result::ResultHead,
    timing: crate::result::Timing,
    done: Uploaded,
    size: u64,
    sources: u64,
) -> crate::result::JobResult {
    tracing::info!(
        job_id = %job_id, manifest = %head.manifest, output = %done.url,
        bytes = size, sources, etag = %done.etag, copied_bytes = done.copied_bytes,
        uploaded_bytes = done.uploaded_bytes, ms = timing.duration.as_millis() as u64,
        "published"
    );
    let done = crate::result::PublishedS3 {
        url: done.url,
        size,
        blake3: done.blake3.map(|h| h.to_hex().to_string()),
        sources,
        etag: done.etag,
        crc64nvme: done.crc64nvme,
        copied_bytes: done.copied_bytes,
        uploaded_bytes: done.uploaded_bytes,
    };
    crate::result::JobResult::uploaded(head, timing, done)
}

/// What a completed S3 output is.
pub struct Uploaded {
    pub url: String,
    pub etag: String,
    pub crc64nvme: Option<String>,
    pub blake3: Option<blake3::Hash>,
    pub copied_bytes: u64,
    pub uploaded_bytes: u64,
}

/// Run a planned S3 output to completion (see the module's documentation).
pub fn run(
    ctx: &JobContext,
    job: &S3Job,
    plan: &Plan,
    manifest: &Manifest,
    sources: &Sources,
    overwrite: bool,
) -> Result<Uploaded, JobError> {
    let rule = ctx.rule;
    let (clients, s3) = store_clients(job, sources)?;
    let out = Arc::new(S3Output::new(
        s3.sdk().clone(),
        &job.bucket,
        &job.key,
        rule.remote.idle_timeout,
    ));
    let rt = clients.rt().clone();
    let store = |f: StoreFailure, action| JobError::Output(f.into_output(&job.url, action));
    let total = plan.total;
    let want_hash = wants_hash(rule, manifest, job, total);
    let crc_wanted = job.crc_knowable();
    let fingerprint = job.fingerprint(plan);
    let journal_path = ctx.pieces.map(|p| p.with_file_name(journal::FILE));
    let sidecar_key = format!("{}.b3", job.key);
    tracing::info!(
        job_id = %ctx.job_id, output = %job.url, parts = job.parts.parts.len(),
        copied_bytes = job.parts.copied_bytes, uploaded_bytes = job.parts.uploaded_bytes,
        crc64nvme = crc_wanted, blake3 = want_hash, "s3 plan"
    );

    // A run of this job before a crash may have recorded an upload: resume it, recognise its
    // completion, or abort it.
    let mut journal = None;
    let mut done: Vec<Option<DonePart>> = vec![None; job.parts.parts.len()];
    let mut upload_id = None;
    if let Some(path) = &journal_path {
        match journal::resume(path, &fingerprint, &out, &rt, ctx)? {
            Resume::Completed(c) => {
                tracing::info!(job_id = %ctx.job_id, output = %job.url, etag = %c.etag, "the upload completed before a restart: recognised by its ETag");
                let up = Uploaded {
                    url: job.url.clone(),
                    etag: c.etag,
                    crc64nvme: c.crc64nvme,
                    blake3: c.blake3.and_then(|h| blake3::Hash::from_hex(h).ok()),
                    copied_bytes: job.parts.copied_bytes,
                    uploaded_bytes: job.parts.uploaded_bytes,
                };
                // The crash may have come before the sidecar was written.
                put_sidecar(rule, job, &sidecar_key, &out, &rt, &up)?;
                return Ok(up);
            }
            Resume::Upload { id, parts, file } => {
                tracing::info!(job_id = %ctx.job_id, upload_id = %id, kept_parts = parts.len(), "resuming the recorded upload");
                for p in parts {
                    if let Some(slot) = done.get_mut(p.number as usize - 1) {
                        *slot = Some(p);
                    }
                }
                upload_id = Some(id);
                journal = Some(file);
            }
            Resume::Fresh => {}
        }
    }
    if upload_id.is_none() && !overwrite {
        refuse_existing(&out, &rt, job, rule.checksum_file && want_hash)?;
    }
    let id = match upload_id {
        Some(id) => id,
        None => {
            let id = rt
                .block_on(out.create(crc_wanted))
                .map_err(|f| store(f, "CreateMultipartUpload"))?;
            tracing::info!(job_id = %ctx.job_id, upload_id = %id, "upload created");
            if let Some(path) = &journal_path {
                match Journal::create(path, &fingerprint, &id, &job.url) {
                    Ok(j) => journal = Some(j),
                    Err(e) => {
                        let _ = rt.block_on(out.abort(&id));
                        return Err(JobError::Journal(e));
                    }
                }
            }
            crate::crash::point("s3-created");
            id
        }
    };
    let outcome = parts_then_complete(
        ctx,
        job,
        manifest,
        sources,
        &out,
        &rt,
        &id,
        &mut done,
        journal.as_mut(),
        Flags {
            want_hash,
            crc_wanted,
            overwrite,
        },
    );
    match outcome {
        Ok(mut up) => {
            put_sidecar(rule, job, &sidecar_key, &out, &rt, &up)?;
            up.url = job.url.clone();
            tracing::info!(job_id = %ctx.job_id, output = %job.url, etag = %up.etag, "upload completed");
            Ok(up)
        }
        Err(e) => {
            // No failure leaves an upload billing: abort it (and forget it, so a rerun starts
            // afresh rather than resuming an aborted upload).
            match rt.block_on(out.abort(&id)) {
                Ok(()) => tracing::info!(job_id = %ctx.job_id, upload_id = %id, "upload aborted"),
                Err(f) => {
                    tracing::warn!(job_id = %ctx.job_id, upload_id = %id, error = %f.text, "could not abort the upload; the orphan sweep will")
                }
            }
            if let Some(path) = &journal_path {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// The `<key>.b3` object (b3sum format, like a local sidecar), when the rule wants one and the
/// output's BLAKE3 is known. Written after the completion: an object store has no rename that
/// would publish both at once, so a reader may see the object a moment before its `.b3`. When
/// the BLAKE3 is not known (bytes copied inside the store, `verify: auto`), an earlier `<key>.b3`
/// is deleted instead: it would describe other bytes.
fn put_sidecar(
    rule: &crate::config::Rule,
    job: &S3Job,
    sidecar_key: &str,
    out: &S3Output,
    rt: &tokio::runtime::Handle,
    up: &Uploaded,
) -> Result<(), JobError> {
    if !rule.checksum_file {
        return Ok(());
    }
    let Some(hash) = &up.blake3 else {
        return rt
            .block_on(out.delete(sidecar_key))
            .map_err(|f| JobError::Output(f.into_output(&job.url, "DeleteObject of the .b3")));
    };
    let name = job.key.rsplit('/').next().unwrap_or(&job.key);
    let line = crate::checksum::sidecar_line(hash, name);
    rt.block_on(out.put_small(sidecar_key, line.into_bytes()))
        .map_err(|f| JobError::Output(f.into_output(&job.url, "PutObject of the .b3")))
}
