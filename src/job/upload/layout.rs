//! An S3 output's layout: its sources kept from planning, the segments the part planner sees
//! (one per `s3://` source, one per run of other sources), where each segment's bytes come from,
//! and what can be known of the output's checksums before a byte moves.

use crate::checksum::crc64;

use super::super::parts::{self, Limits, PartKind, PartPlan, Segment};
use super::super::{JobError, Plan};
use crate::config::S3Root;
use crate::manifest::Location;
use crate::output::s3::key_for;
use crate::source::{Pin, PinDetail, Sources};

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
        /// The whole object is taken (no range).
        whole: bool,
        /// The object's stored full-object CRC64NVME, when it is copied whole and known.
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
    pub(super) fn full_crc(&self, uploaded: &dyn Fn(usize) -> Option<u64>) -> Option<u64> {
        let mut acc: Option<u64> = None; // the CRC so far
        let mut push = |crc: u64, len: u64| {
            acc = Some(acc.map_or(crc, |a| crc64::combine(a, crc, len)));
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
        Some(acc.unwrap_or_else(|| crc64::checksum(b"")))
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
                Some(SegFrom::Copy {
                    rec: i,
                    bucket,
                    key,
                    version_id: v.version_id.clone(),
                    etag: v.etag.clone(),
                    whole: r.offset == 0 && r.len == v.size,
                    crc64nvme: None,
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
                from.push(c);
            }
            None => match (segments.last_mut(), from.last()) {
                (Some(s), Some(SegFrom::Upload)) => s.len += r.len,
                _ => {
                    segments.push(Segment {
                        len: r.len,
                        copyable: false,
                    });
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
    let mut job = S3Job {
        url: root.url(&key),
        bucket: root.bucket.clone(),
        key,
        recs,
        segments,
        from,
        parts,
    };
    stored_checksums(&mut job, sources);
    Ok(job)
}

/// Learn the stored full-object CRC64NVME of every object copied whole, when each copied byte
/// belongs to one (else no CRC of the output is knowable without reading copied bytes, and no
/// request is made). Asked by a HEAD with checksum mode here, not when the source is probed: on
/// AWS that mode needs `kms:Decrypt` for SSE-KMS objects, which a rule with local outputs must
/// not start to require. A HEAD that fails, or finds another ETag than the pinned one, leaves
/// the CRC unknown (the copy itself is pinned by `x-amz-copy-source-if-match`).
fn stored_checksums(job: &mut S3Job, sources: &Sources) {
    let mut copied = vec![0u64; job.segments.len()];
    for p in &job.parts.parts {
        if let PartKind::Copy { segment, .. } = p.kind {
            copied[segment] += p.len;
        }
    }
    let wanted: Vec<usize> = (0..job.segments.len()).filter(|&s| copied[s] > 0).collect();
    let qualifies = |s: usize| {
        matches!(&job.from[s], SegFrom::Copy { whole: true, .. })
            && copied[s] == job.segments[s].len
    };
    if !wanted.iter().all(|&s| qualifies(s)) {
        return;
    }
    let Ok((clients, s3)) = super::store_clients(job, sources) else {
        return;
    };
    for s in wanted {
        let SegFrom::Copy {
            bucket,
            key,
            version_id,
            etag,
            crc64nvme,
            ..
        } = &mut job.from[s]
        else {
            continue;
        };
        let head = clients.rt().block_on(crate::output::s3::head_object(
            s3.sdk(),
            bucket,
            key,
            version_id.as_deref(),
        ));
        match head {
            Ok(Some(h)) if h.etag == *etag => {
                *crc64nvme = h.crc64nvme.as_deref().and_then(crc64::from_base64);
            }
            other => {
                tracing::debug!(source = %key, answer = ?other.map(|h| h.map(|h| h.etag)).map_err(|f| f.text), "no stored CRC64NVME");
                return;
            }
        }
        if crc64nvme.is_none() {
            return;
        }
    }
}

/// Bucket and key of an `s3://` URL (the planner already checked it against the policy).
fn s3_object(text: &str) -> Option<(String, String)> {
    let url = url::Url::parse(text).ok()?;
    crate::config::urls::bucket_and_key(&url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crcs_round_trip_in_s3s_base64_form() {
        // CRC64NVME of "123456789" is 0xae8b14860a799888 (the check value of the algorithm).
        let crc = crc64::checksum(b"123456789");
        assert_eq!(crc, 0xae8b_1486_0a79_9888);
        let b = crc64::to_base64(crc);
        assert_eq!(b, "rosUhgp5mIg=");
        assert_eq!(crc64::from_base64(&b), Some(crc));
    }
}
