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
mod sweep;

pub use sweep::{EVERY as SWEEP_EVERY, sweep_orphans};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use crc_fast::CrcAlgorithm;

use super::parts::{self, Limits, PartKind, PartPlan, Segment};
use super::{JobContext, JobError, Plan};
use crate::config::{S3Root, Verify};
use crate::manifest::{Location, Manifest};
use crate::output::OutputError;
use crate::output::s3::{DonePart, S3Output, StoreFailure, key_for, multipart_etag};
use crate::source::{Pin, PinDetail, Sources};
use journal::{Journal, Resume};

/// Bytes read from the sources per step of an uploaded part (and per queued body chunk).
pub const CHUNK: usize = 1 << 20;
/// Chunks queued per part body: the memory bound above.
pub const BODY_CHUNKS: usize = 4;

/// One source of an S3 output's job, as planning measured it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub number: u64,
    pub location: Location,
    /// Range taken of the source.
    pub offset: u64,
    pub len: u64,
    /// Where its bytes start in the output.
    pub out_start: u64,
    pub pin: Pin,
}

/// Where a segment's bytes come from.
#[derive(Debug, Clone)]
pub enum SegFrom {
    /// One `s3://` source (index into [`S3Job::recs`]), copyable inside the store.
    Copy {
        rec: usize,
        bucket: String,
        key: String,
        version_id: Option<String>,
        etag: Option<String>,
        /// The object's stored full-object CRC64NVME, when the whole object is taken.
        crc64nvme: Option<u64>,
    },
    /// Sources read through this host.
    Upload,
}

/// An S3 output's plan: where it lands and its parts.
#[derive(Debug)]
pub struct S3Job {
    pub bucket: String,
    pub key: String,
    /// `s3://bucket/key`.
    pub url: String,
    pub recs: Vec<Rec>,
    pub segments: Vec<Segment>,
    /// Output offset where each segment starts.
    pub seg_start: Vec<u64>,
    pub from: Vec<SegFrom>,
    pub parts: PartPlan,
}

impl S3Job {
    /// The sources whose bytes lie in the output range `[start, start + len)`, with the range
    /// of each taken: `(rec, offset in the source, length)`.
    pub fn sources_in(&self, start: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let end = start + len;
        let first = self.recs.partition_point(|r| r.out_start + r.len <= start);
        let mut out = Vec::new();
        for (i, r) in self.recs.iter().enumerate().skip(first) {
            if r.out_start >= end {
                break;
            }
            if r.len == 0 {
                continue;
            }
            let from = start.max(r.out_start);
            let to = end.min(r.out_start + r.len);
            out.push((i, r.offset + (from - r.out_start), to - from));
        }
        out
    }

    /// The full-object CRC64NVME of the output, if it can be known without reading copied bytes:
    /// every segment with copied bytes is copied whole, from an object whose stored checksum is
    /// known. `uploaded` gives an uploaded part's CRC by its index.
    fn full_crc(&self, uploaded: &dyn Fn(usize) -> Option<u64>) -> Option<u64> {
        let mut acc: Option<(u64, u64)> = None; // (crc, len) so far
        let mut push = |crc: u64, len: u64| {
            acc = Some(match acc {
                None => (crc, len),
                Some((a, alen)) => (
                    crc_fast::checksum_combine(CrcAlgorithm::Crc64Nvme, a, crc, len),
                    alen + len,
                ),
            });
        };
        let mut i = 0;
        while i < self.parts.parts.len() {
            let p = self.parts.parts[i];
            match p.kind {
                PartKind::Upload => {
                    push(uploaded(i)?, p.len);
                    i += 1;
                }
                PartKind::Copy { segment, offset } => {
                    // Consecutive copy parts of one segment must cover all of it.
                    let mut covered = p.len;
                    let mut j = i + 1;
                    while let Some(q) = self.parts.parts.get(j)
                        && matches!(q.kind, PartKind::Copy { segment: s, .. } if s == segment)
                    {
                        covered += q.len;
                        j += 1;
                    }
                    let SegFrom::Copy { crc64nvme, .. } = &self.from[segment] else {
                        return None;
                    };
                    if offset != 0 || covered != self.segments[segment].len {
                        return None;
                    }
                    push((*crc64nvme)?, covered);
                    i = j;
                }
            }
        }
        Some(acc.map_or(crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b""), |(c, _)| c))
    }

    /// Whether a full-object CRC64NVME can be known (asked before any byte is read).
    pub fn crc_knowable(&self) -> bool {
        self.full_crc(&|_| Some(0)).is_some()
    }

    /// What the bytes of the output and its parts follow from: the sources' fingerprint, the key
    /// and every part. A recorded upload is resumed only under the same one.
    pub fn fingerprint(&self, plan: &Plan) -> String {
        let mut h = blake3::Hasher::new();
        h.update(plan.fingerprint().as_bytes());
        h.update(self.url.as_bytes()).update(b"\0");
        for p in &self.parts.parts {
            h.update(&p.number.to_le_bytes())
                .update(&p.start.to_le_bytes())
                .update(&p.len.to_le_bytes());
            match p.kind {
                PartKind::Upload => h.update(b"u"),
                PartKind::Copy { segment, offset } => h
                    .update(b"c")
                    .update(&(segment as u64).to_le_bytes())
                    .update(&offset.to_le_bytes()),
            };
        }
        h.finalize().to_hex().to_string()
    }
}

/// Plan an S3 output for `output` under `root` from the planned sources `recs`.
pub fn plan(
    root: &S3Root,
    output: &str,
    recs: Vec<Rec>,
    sources: &Sources,
) -> Result<S3Job, JobError> {
    let key = key_for(root, output)?;
    let mut segments: Vec<Segment> = Vec::new();
    let mut seg_start = Vec::new();
    let mut from = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        if r.len == 0 {
            continue;
        }
        let copy = match &r.location {
            Location::Url(u) if u.starts_with("s3://") => s3_object(u).and_then(|(bucket, key)| {
                let Some(PinDetail::Remote(v)) = sources.describe(&r.location, r.pin) else {
                    return None;
                };
                let whole = r.offset == 0 && r.len == v.size;
                Some(SegFrom::Copy {
                    rec: i,
                    bucket,
                    key,
                    version_id: v.version_id.clone(),
                    etag: v.etag.clone(),
                    crc64nvme: whole
                        .then(|| v.crc64nvme.as_deref().and_then(crc_from_base64))
                        .flatten(),
                })
            }),
            _ => None,
        };
        match copy {
            Some(c) => {
                segments.push(Segment {
                    len: r.len,
                    copyable: true,
                });
                seg_start.push(r.out_start);
                from.push(c);
            }
            None => match (segments.last_mut(), from.last()) {
                (Some(s), Some(SegFrom::Upload)) => s.len += r.len,
                _ => {
                    segments.push(Segment {
                        len: r.len,
                        copyable: false,
                    });
                    seg_start.push(r.out_start);
                    from.push(SegFrom::Upload);
                }
            },
        }
    }
    let parts = parts::plan_parts(&segments, &Limits::S3).map_err(|e| match e {
        parts::PartsError::TooLarge { .. } => JobError::TooLarge {
            message: e.to_string(),
        },
    })?;
    Ok(S3Job {
        url: root.url(&key),
        bucket: root.bucket.clone(),
        key,
        recs,
        segments,
        seg_start,
        from,
        parts,
    })
}

/// Bucket and key of an `s3://` URL (the planner already checked it against the policy).
fn s3_object(text: &str) -> Option<(String, String)> {
    let url = url::Url::parse(text).ok()?;
    crate::config::urls::bucket_and_key(&url)
}

/// A CRC64NVME as S3 writes it: base64 of its 8 big-endian bytes.
pub fn crc_to_base64(crc: u64) -> String {
    base64(&crc.to_be_bytes())
}

fn crc_from_base64(text: &str) -> Option<u64> {
    let raw = unbase64(text)?;
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(raw: &[u8]) -> String {
    let mut out = String::new();
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.trim_end_matches('=').bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Some(out)
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

/// How one part failed.
enum PartFailure {
    /// The store's answer (retried when transient).
    Store(StoreFailure),
    /// Reading a source failed (the job's error, not retried).
    Job(JobError),
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
    let clients = sources
        .clients(&job.url)
        .map_err(|source| JobError::Sources { source })?;
    let s3 = clients
        .s3(&job.url)
        .map_err(|source| JobError::Sources { source })?;
    let out = Arc::new(S3Output::new(s3.sdk().clone(), &job.bucket, &job.key));
    let rt = clients.rt().clone();
    let store = |f: StoreFailure, action| JobError::Output(f.into_output(&job.url, action));
    let total = plan.total;
    let want_hash = rule.verify == Verify::ReadBack
        || manifest.expect.blake3.is_some()
        || job.parts.uploaded_bytes == total;
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
                put_sidecar(rule, job, &out, &rt, &up)?;
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
        // Early refusal; the conditional completion is what holds against a racing writer.
        let head = rt
            .block_on(out.head(&job.key))
            .map_err(|f| store(f, "HEAD"))?;
        let sidecar = if rule.checksum_file && want_hash {
            rt.block_on(out.head(&sidecar_key))
                .map_err(|f| store(f, "HEAD"))?
        } else {
            None
        };
        if head.is_some() || sidecar.is_some() {
            let what = if head.is_some() {
                &job.url
            } else {
                &format!("{}.b3", job.url)
            };
            return Err(OutputError::Exists { path: what.into() }.into());
        }
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
            put_sidecar(rule, job, &out, &rt, &up)?;
            up.url = job.url.clone();
            tracing::info!(job_id = %ctx.job_id, output = %job.url, etag = %up.etag, "upload completed");
            Ok(up)
        }
        Err(e) => {
            // No failure leaves an upload billing: abort it (and forget it, so a rerun starts
            // afresh rather than resuming an aborted upload).
            match rt.block_on(out.abort(&id)) {
                Ok(()) => tracing::info!(job_id = %ctx.job_id, upload_id = %id, "upload aborted"),
                Err(f) => tracing::warn!(job_id = %ctx.job_id, upload_id = %id, error = %f.text, "could not abort the upload; the orphan sweep will"),
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
/// would publish both at once, so a reader may see the object a moment before its `.b3`.
fn put_sidecar(
    rule: &crate::config::Rule,
    job: &S3Job,
    out: &S3Output,
    rt: &tokio::runtime::Handle,
    up: &Uploaded,
) -> Result<(), JobError> {
    let (true, Some(hash)) = (rule.checksum_file, &up.blake3) else {
        return Ok(());
    };
    let name = job.key.rsplit('/').next().unwrap_or(&job.key);
    let line = crate::checksum::sidecar_line(hash, name);
    rt.block_on(out.put_small(&format!("{}.b3", job.key), line.into_bytes()))
        .map_err(|f| JobError::Output(f.into_output(&job.url, "PutObject of the .b3")))
}

#[derive(Clone, Copy)]
struct Flags {
    want_hash: bool,
    crc_wanted: bool,
    overwrite: bool,
}

#[allow(clippy::too_many_arguments)]
fn parts_then_complete(
    ctx: &JobContext,
    job: &S3Job,
    manifest: &Manifest,
    sources: &Sources,
    out: &Arc<S3Output>,
    rt: &tokio::runtime::Handle,
    id: &str,
    done: &mut [Option<DonePart>],
    mut journal: Option<&mut Journal>,
    flags: Flags,
) -> Result<Uploaded, JobError> {
    let rule = ctx.rule;
    let total_parts = job.parts.parts.len();
    let settings = rule.remote.clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(settings.parallel.max(1)));
    let (tx, results) = std::sync::mpsc::channel::<(usize, Result<DonePart, PartFailure>)>();
    let progress = ctx.progress;
    let total_bytes = job.parts.copied_bytes + job.parts.uploaded_bytes;
    let moved = std::sync::atomic::AtomicU64::new(0);
    let mut in_flight = 0usize;
    let mut hasher = flags.want_hash.then(blake3::Hasher::new);
    let mut part_crcs: Vec<Option<u64>> = vec![None; total_parts];
    let mut failure: Option<JobError> = None;

    // Copy parts first: they cost this host nothing and run while uploaded parts stream.
    for (i, p) in job.parts.parts.iter().enumerate() {
        let PartKind::Copy { segment, offset } = p.kind else {
            continue;
        };
        if done[i].is_some() {
            continue;
        }
        let SegFrom::Copy {
            bucket,
            key,
            version_id,
            etag,
            ..
        } = &job.from[segment]
        else {
            return Err(JobError::Internal(format!(
                "part {} copies from segment {segment}, which is not an S3 object",
                p.number
            )));
        };
        let rec = &job.recs[match &job.from[segment] {
            SegFrom::Copy { rec, .. } => *rec,
            SegFrom::Upload => unreachable!(),
        }];
        let start = rec.offset + offset;
        let (out, sem, tx) = (out.clone(), sem.clone(), tx.clone());
        let (id, bucket, key) = (id.to_owned(), bucket.clone(), key.clone());
        let (version_id, etag, settings) = (version_id.clone(), etag.clone(), settings.clone());
        let (number, len, source_number) = (p.number, p.len, rec.number);
        let what = rec.location.to_string();
        in_flight += 1;
        rt.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut failures = 0;
            let r = loop {
                let r = out
                    .upload_part_copy(
                        &id,
                        number,
                        &bucket,
                        &key,
                        version_id.as_deref(),
                        start..start + len,
                        etag.as_deref(),
                    )
                    .await;
                match r {
                    Err(f) if f.transient() && failures + 1 < settings.attempts => {
                        failures += 1;
                        tokio::time::sleep(crate::source::remote::backoff(
                            settings.backoff,
                            failures,
                        ))
                        .await;
                    }
                    Err(f) if f.status == Some(412) => {
                        break Err(PartFailure::Job(JobError::Source {
                            number: source_number,
                            source: crate::source::SourceError::Changed {
                                what,
                                reason: "UploadPartCopy: the object no longer matches the \
                                         ETag seen at planning (HTTP 412)"
                                    .into(),
                            },
                        }));
                    }
                    r => break r.map_err(PartFailure::Store),
                }
            };
            let _ = tx.send((i, r));
        });
    }

    let mut finished = done.iter().filter(|d| d.is_some()).count();
    let mut collect = |r: (usize, Result<DonePart, PartFailure>),
                       done: &mut [Option<DonePart>],
                       journal: &mut Option<&mut Journal>,
                       failure: &mut Option<JobError>,
                       redo: &mut Vec<usize>|
     -> Result<(), JobError> {
        let (i, r) = r;
        let p = job.parts.parts[i];
        match r {
            Ok(d) => {
                if let Some(j) = journal.as_deref_mut() {
                    j.part(&d).map_err(JobError::Journal)?;
                }
                if matches!(p.kind, PartKind::Copy { .. }) {
                    if let Some(pr) = progress {
                        pr.done.fetch_add(p.len, Ordering::Relaxed);
                    }
                    moved.fetch_add(p.len, Ordering::Relaxed);
                }
                done[i] = Some(d);
                finished += 1;
                let step = (total_parts / 20).max(1);
                if finished % step == 0 || finished == total_parts {
                    tracing::info!(job_id = %ctx.job_id, parts_done = finished, parts = total_parts, "parts finished");
                }
                crate::crash::fraction(
                    "s3-parts",
                    moved.load(Ordering::Relaxed),
                    total_bytes,
                );
            }
            Err(PartFailure::Job(e)) => {
                failure.get_or_insert(e);
            }
            Err(PartFailure::Store(f))
                if f.transient() && matches!(p.kind, PartKind::Upload) && failure.is_none() =>
            {
                tracing::warn!(job_id = %ctx.job_id, part = p.number, error = %f.text, "a part failed; it is sent again");
                redo.push(i);
            }
            Err(PartFailure::Store(f)) => {
                failure.get_or_insert(JobError::Output(f.into_output(
                    &job.url,
                    if matches!(p.kind, PartKind::Copy { .. }) {
                        "UploadPartCopy"
                    } else {
                        "UploadPart"
                    },
                )));
            }
        }
        Ok(())
    };

    // Uploaded parts (and, for the hash, copied bytes read back), in output order. `stream`
    // reads part `i` from its sources and, with `send`, uploads it; `hash` feeds the BLAKE3 too.
    let in_flight = std::cell::Cell::new(in_flight);
    let stream = |i: usize,
                  send: bool,
                  hash: Option<&mut blake3::Hasher>|
     -> Result<Option<u64>, JobError> {
        let p = job.parts.parts[i];
        let upload = matches!(p.kind, PartKind::Upload);
        let mut hash = hash;
        let mut crc = crc_fast::Digest::new(CrcAlgorithm::Crc64Nvme);
        let body_tx = if send {
            let permit = rt
                .block_on(sem.clone().acquire_owned())
                .map_err(|e| JobError::Internal(e.to_string()))?;
            let (btx, brx) = tokio::sync::mpsc::channel(BODY_CHUNKS);
            let body = ByteStream::from_body_1_x(body::ChannelBody::new(brx, p.len));
            let (out, tx, id) = (out.clone(), tx.clone(), id.to_owned());
            let (number, len, crc_on) = (p.number, p.len, flags.crc_wanted);
            in_flight.set(in_flight.get() + 1);
            rt.spawn(async move {
                let r = out.upload_part(&id, number, len, body, crc_on).await;
                drop(permit);
                let _ = tx.send((i, r.map_err(PartFailure::Store)));
            });
            Some(btx)
        } else {
            None
        };
        let read = read_range(ctx, job, sources, p.start, p.len, &mut |chunk: Bytes| {
            if let Some(h) = hash.as_deref_mut() {
                h.update(&chunk);
            }
            if upload {
                crc.update(&chunk);
            }
            if let Some(btx) = &body_tx {
                if let Some(pr) = progress {
                    pr.done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                moved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                crate::crash::fraction("s3-parts", moved.load(Ordering::Relaxed), total_bytes);
                // A closed body: the upload already failed; its error arrives on `results`.
                return btx.blocking_send(Ok(chunk)).is_ok();
            }
            true
        });
        if let Err(e) = read {
            if let Some(btx) = &body_tx {
                let _ = btx.blocking_send(Err(std::io::Error::other("source failed")));
            }
            return Err(e);
        }
        Ok(upload.then(|| crc.finalize()))
    };
    let mut redo: Vec<usize> = Vec::new();
    let mut retries = vec![0u32; total_parts];
    for (i, p) in job.parts.parts.iter().enumerate() {
        while let Ok(r) = results.try_recv() {
            in_flight.set(in_flight.get() - 1);
            collect(r, done, &mut journal, &mut failure, &mut redo)?;
        }
        if failure.is_some() {
            break;
        }
        if ctx.cancelled() {
            failure = Some(JobError::Cancelled);
            break;
        }
        let upload = matches!(p.kind, PartKind::Upload);
        if !upload && hasher.is_none() {
            continue;
        }
        match stream(i, upload && done[i].is_none(), hasher.as_mut()) {
            Ok(crc) => part_crcs[i] = crc,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // Every part launched reports back, failed or not, before the upload is completed or
    // aborted; an uploaded part that failed on the way is read and sent again (its bytes were
    // hashed the first time).
    loop {
        while in_flight.get() > 0 {
            match results.recv() {
                Ok(r) => {
                    in_flight.set(in_flight.get() - 1);
                    collect(r, done, &mut journal, &mut failure, &mut redo)?;
                }
                Err(_) => break,
            }
        }
        if failure.is_some() || redo.is_empty() {
            break;
        }
        for i in std::mem::take(&mut redo) {
            retries[i] += 1;
            if retries[i] >= settings.attempts {
                failure.get_or_insert(JobError::Output(OutputError::Store {
                    url: job.url.clone(),
                    action: "UploadPart",
                    reason: format!(
                        "part {} failed {} time(s)",
                        job.parts.parts[i].number, retries[i]
                    ),
                }));
                break;
            }
            std::thread::sleep(crate::source::remote::backoff(settings.backoff, retries[i]));
            tracing::info!(job_id = %ctx.job_id, part = job.parts.parts[i].number, attempt = retries[i] + 1, "uploading a part again");
            if let Err(e) = stream(i, true, None) {
                failure.get_or_insert(e);
                break;
            }
        }
    }
    drop(tx);
    if let Some(e) = failure {
        return Err(e);
    }
    let parts: Vec<DonePart> = done
        .iter()
        .map(|d| d.clone().ok_or_else(|| JobError::Internal("a part did not finish".into())))
        .collect::<Result<_, _>>()?;
    let blake3 = hasher.map(|h| h.finalize());
    if let (Some(want), Some(got)) = (manifest.expect.blake3, blake3)
        && want != got
    {
        // Checked before the completion: nothing was published.
        return Err(JobError::ChecksumMismatch {
            number: None,
            message: format!(
                "expect.blake3 is {}, the output hashes to {}",
                want.to_hex(),
                got.to_hex()
            ),
        });
    }
    let crc = if flags.crc_wanted {
        job.full_crc(&|i| part_crcs[i]).map(crc_to_base64)
    } else {
        None
    };
    if let Some(j) = journal.as_deref_mut() {
        j.completing(
            &parts,
            crc.as_deref(),
            blake3.map(|h| h.to_hex().to_string()).as_deref(),
        )
        .map_err(JobError::Journal)?;
    }
    if ctx.cancelled() {
        return Err(JobError::Cancelled);
    }
    crate::crash::point("s3-before-complete");
    let etag = rt
        .block_on(out.complete(id, &parts, flags.overwrite, crc.as_deref()))
        .map_err(|f| {
            if f.status == Some(412) {
                JobError::Output(OutputError::Exists {
                    path: job.url.clone().into(),
                })
            } else {
                JobError::Output(f.into_output(&job.url, "CompleteMultipartUpload"))
            }
        })?;
    crate::crash::point("s3-after-complete");
    let etag = if etag.is_empty() {
        multipart_etag(&parts).unwrap_or_default()
    } else {
        etag
    };
    Ok(Uploaded {
        url: job.url.clone(),
        etag,
        crc64nvme: crc,
        blake3,
        copied_bytes: job.parts.copied_bytes,
        uploaded_bytes: job.parts.uploaded_bytes,
    })
}

/// Read the output range `[start, start + len)` from its sources, in order, in chunks of at most
/// [`CHUNK`] bytes handed to `sink` (which returns false to stop early).
fn read_range(
    ctx: &JobContext,
    job: &S3Job,
    sources: &Sources,
    start: u64,
    len: u64,
    sink: &mut dyn FnMut(Bytes) -> bool,
) -> Result<(), JobError> {
    for (i, offset, take) in job.sources_in(start, len) {
        let rec = &job.recs[i];
        let err = |source| JobError::Source {
            number: rec.number,
            source,
        };
        let reader = sources
            .open(&rec.location, rec.pin, offset..offset + take)
            .map_err(err)?;
        let what = rec.location.to_string();
        let mut at = offset;
        let end = offset + take;
        while at < end {
            if ctx.cancelled() {
                return Err(JobError::Cancelled);
            }
            let want = ((end - at) as usize).min(CHUNK);
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                let n = reader
                    .read_at(&mut buf[filled..], at + filled as u64, &what)
                    .map_err(err)?;
                if n == 0 {
                    return Err(JobError::SizeMismatch {
                        number: Some(rec.number),
                        message: format!(
                            "source {} ({what}) ended at byte {} while the plan takes {end}",
                            rec.number,
                            at + filled as u64
                        ),
                    });
                }
                filled += n;
            }
            reader.recheck().map_err(err)?;
            at += want as u64;
            if !sink(Bytes::from(buf)) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_s3s_form() {
        // CRC64NVME of "123456789" is 0xae8b14860a799888 (the check value of the algorithm).
        let crc = crc_fast::checksum(CrcAlgorithm::Crc64Nvme, b"123456789");
        assert_eq!(crc, 0xae8b_1486_0a79_9888);
        let b = crc_to_base64(crc);
        assert_eq!(b, "rosUhgp5mIg=");
        assert_eq!(crc_from_base64(&b), Some(crc));
        for raw in [&b""[..], b"a", b"ab", b"abc", b"abcd"] {
            assert_eq!(unbase64(&base64(raw)).unwrap(), raw);
        }
    }
}
