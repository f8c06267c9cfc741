//! Running the parts of an S3 output and completing it: copy parts as server-side calls in
//! parallel, uploaded parts streamed from the sources in output order (BLAKE3 and CRC64NVME
//! computed as the bytes pass), each finished part recorded, then the conditional completion.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::super::parts::PartKind;
use super::super::{JobContext, JobError};
use super::journal::Journal;
use super::layout::{S3Job, SegFrom};
use super::{BODY_CHUNKS, CHUNK, Uploaded, body};
use crate::manifest::Manifest;
use crate::output::OutputError;
use crate::output::s3::{DonePart, S3Output, StoreFailure, multipart_etag};
use crate::source::Sources;

/// How one part failed.
enum PartFailure {
    /// The store's answer (retried when transient).
    Store(StoreFailure),
    /// Reading a source failed (the job's error, not retried).
    Job(JobError),
}

#[derive(Clone, Copy)]
pub(super) struct Flags {
    pub want_hash: bool,
    pub crc_wanted: bool,
    pub overwrite: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn parts_then_complete(
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
            rec,
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
        let rec = &job.recs[*rec];
        let start = rec.offset + offset;
        let (out, sem, tx) = (out.clone(), sem.clone(), tx.clone());
        let (id, bucket, key) = (id.to_owned(), bucket.clone(), key.clone());
        let (version_id, etag, settings) = (version_id.clone(), etag.clone(), settings.clone());
        let (number, len, source_number) = (p.number, p.len, rec.number);
        let what = rec.location.to_string();
        // The task runs outside the job's span: it names the rule for the retry metric itself.
        let rule_name = ctx.rule.name.clone();
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
                        crate::metrics::remote_retry(&rule_name);
                        tracing::warn!(rule = %rule_name, part = number, attempt = failures, error = %f.text, "UploadPartCopy failed; retrying");
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
                crate::crash::fraction("s3-parts", moved.load(Ordering::Relaxed), total_bytes);
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
        let mut crc = crate::checksum::crc64::Crc64::new();
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
        // Cleared when the body is closed: the upload of this part already failed, and its
        // error arrives on `results`. The part is still read to its end, because its bytes
        // are hashed (and its CRC taken) only this once; the resend only uploads them.
        let mut body_open = body_tx.is_some();
        let read = read_range(ctx, job, sources, p.start, p.len, &mut |chunk: Bytes| {
            if let Some(h) = hash.as_deref_mut() {
                h.update(&chunk);
            }
            if upload {
                crc.update(&chunk);
            }
            if let Some(btx) = body_tx.as_ref().filter(|_| body_open) {
                if let Some(pr) = progress {
                    pr.done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                moved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                crate::crash::fraction("s3-parts", moved.load(Ordering::Relaxed), total_bytes);
                body_open = btx.blocking_send(Ok(chunk)).is_ok();
            }
            true
        });
        if let Err(e) = read {
            if let Some(btx) = &body_tx {
                let _ = btx.blocking_send(Err(std::io::Error::other("source failed")));
            }
            return Err(e);
        }
        Ok(upload.then(|| crc.finish()))
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
        // Read only for what reading gives: an upload, the BLAKE3, or a finished part's CRC.
        let needed = hasher.is_some() || (upload && (done[i].is_none() || flags.crc_wanted));
        if !needed {
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
            crate::metrics::remote_retry(&ctx.rule.name);
            tracing::warn!(job_id = %ctx.job_id, part = job.parts.parts[i].number, attempt = retries[i] + 1, "UploadPart failed; uploading the part again");
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
        .map(|d| {
            d.clone()
                .ok_or_else(|| JobError::Internal("a part did not finish".into()))
        })
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
        job.full_crc(&|i| part_crcs[i])
            .map(crate::checksum::crc64::to_base64)
    } else {
        None
    };
    if let Some(j) = journal {
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
        let mut buf = vec![0u8; CHUNK.min(take as usize)];
        while at < end {
            if ctx.cancelled() {
                return Err(JobError::Cancelled);
            }
            let want = ((end - at) as usize).min(buf.len());
            // Whatever a read returns goes on at once: a slow source keeps the part's body
            // moving instead of stalling it until a whole chunk is filled.
            let n = reader.read_at(&mut buf[..want], at, &what).map_err(err)?;
            if n == 0 {
                return Err(JobError::SizeMismatch {
                    number: Some(rec.number),
                    message: format!(
                        "source {} ({what}) ended at byte {at} while the plan takes {end}",
                        rec.number
                    ),
                });
            }
            reader.recheck().map_err(err)?;
            at += n as u64;
            if !sink(Bytes::copy_from_slice(&buf[..n])) {
                return Ok(());
            }
        }
    }
    Ok(())
}
