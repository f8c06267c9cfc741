//! The S3 part planner: which stretches of an output become server-side `UploadPartCopy` parts and
//! which are read through this host and uploaded. Pure: no I/O, no SDK types.

/// Limits of the store's multipart upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Smallest part but the last.
    pub min_part: u64,
    /// Largest part.
    pub max_part: u64,
    /// Most parts in one upload.
    pub max_parts: u32,
}

impl Limits {
    /// AWS S3's limits (5 MiB, 5 GiB, 10,000 parts), which S3-compatible stores copy.
    pub const S3: Limits = Limits {
        min_part: 5 << 20,
        max_part: 5 << 30,
        max_parts: 10_000,
    };

    /// The largest output these limits can hold.
    pub fn max_total(&self) -> u64 {
        self.max_part.saturating_mul(u64::from(self.max_parts))
    }
}

/// One contiguous stretch of the output, in output order, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Its length in bytes.
    pub len: u64,
    /// Its bytes can be a server-side `UploadPartCopy` (an S3 source in the output's store: a whole
    /// object or a byte range of one).
    pub copyable: bool,
}

/// How one part gets its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// `UploadPartCopy` of bytes `[offset, offset+len)` of segment `segment`.
    Copy { segment: usize, offset: u64 },
    /// Bytes read through this host and uploaded.
    Upload,
}

/// One part of the multipart upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Part number, 1-based.
    pub number: u32,
    /// Offset of its first byte in the output.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    pub kind: PartKind,
}

/// The parts of one output, in output order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartPlan {
    pub parts: Vec<Part>,
    /// Bytes the store copies server-side (never through this host).
    pub copied_bytes: u64,
    /// Bytes read through this host and uploaded.
    pub uploaded_bytes: u64,
}

/// Why an output cannot be planned as one multipart upload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartsError {
    #[error("an output of {total} bytes cannot be one multipart upload: {reason}")]
    TooLarge { total: u64, reason: String },
}

/// A stretch of the output given to one kind of part: copied from one segment, or uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    /// `Some((segment, offset in it))` for a copy run.
    copy: Option<(usize, u64)>,
}

/// Plans the parts of an output made of `segments`, in order.
pub fn plan_parts(segments: &[Segment], limits: &Limits) -> Result<PartPlan, PartsError> {
    let total = segments
        .iter()
        .try_fold(0u64, |sum, s| sum.checked_add(s.len))
        .ok_or_else(|| PartsError::TooLarge {
            total: u64::MAX,
            reason: "the sources' sizes add up past 2^64 bytes".into(),
        })?;
    if total > limits.max_total() {
        return Err(too_large(total, limits));
    }
    if total == 0 {
        return Ok(PartPlan {
            parts: vec![Part {
                number: 1,
                start: 0,
                len: 0,
                kind: PartKind::Upload,
            }],
            copied_bytes: 0,
            uploaded_bytes: 0,
        });
    }
    let runs = simple_runs(segments, limits);
    let plan = emit(&runs, limits);
    if plan.parts.len() <= limits.max_parts as usize {
        return Ok(plan);
    }
    Ok(emit(
        &[Run {
            start: 0,
            len: total,
            copy: None,
        }],
        limits,
    ))
}

fn too_large(total: u64, limits: &Limits) -> PartsError {
    PartsError::TooLarge {
        total,
        reason: format!(
            "the limit is {} parts of at most {} bytes, {} bytes in all",
            limits.max_parts,
            limits.max_part,
            limits.max_total()
        ),
    }
}

/// Copyable segments of at least a part become copy runs, the rest upload runs; a short upload
/// run borrows from a neighbour or swallows it.
fn simple_runs(segments: &[Segment], limits: &Limits) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut at = 0u64;
    for (i, s) in segments.iter().enumerate() {
        if s.len == 0 {
            continue;
        }
        if s.copyable && s.len >= limits.min_part {
            runs.push(Run {
                start: at,
                len: s.len,
                copy: Some((i, 0)),
            });
        } else if let Some(last) = runs.last_mut().filter(|r| r.copy.is_none()) {
            last.len += s.len;
        } else {
            runs.push(Run {
                start: at,
                len: s.len,
                copy: None,
            });
        }
        at += s.len;
    }
    let min = limits.min_part;
    let mut k = 0;
    while k < runs.len() {
        let short = runs[k].copy.is_none() && runs[k].len < min && k + 1 < runs.len();
        if !short {
            k += 1;
            continue;
        }
        let need = min - runs[k].len;
        let right = runs[k + 1];
        let right_ok = right.len - need >= min || (k + 2 == runs.len() && right.len > need);
        if right_ok {
            let (seg, off) = right.copy.expect("runs alternate");
            runs[k].len += need;
            runs[k + 1] = Run {
                start: right.start + need,
                len: right.len - need,
                copy: Some((seg, off + need)),
            };
            k += 1;
            continue;
        }
        if k > 0 && runs[k - 1].len >= need + min {
            runs[k - 1].len -= need;
            runs[k].start -= need;
            runs[k].len += need;
            k += 1;
            continue;
        }
        // Swallow the right neighbour, and the upload run after it.
        runs[k].len += right.len;
        runs.remove(k + 1);
        if k + 1 < runs.len() && runs[k + 1].copy.is_none() {
            runs[k].len += runs[k + 1].len;
            runs.remove(k + 1);
        }
    }
    runs
}

/// Splits each run into as few parts as fit `max_part`, as equal as possible.
fn emit(runs: &[Run], limits: &Limits) -> PartPlan {
    let mut plan = PartPlan::default();
    for run in runs {
        let count = run.len.div_ceil(limits.max_part).max(1);
        let (base, extra) = (run.len / count, run.len % count);
        let mut off = 0;
        for p in 0..count {
            let len = base + u64::from(p < extra);
            let kind = match run.copy {
                Some((segment, offset)) => PartKind::Copy {
                    segment,
                    offset: offset + off,
                },
                None => PartKind::Upload,
            };
            plan.parts.push(Part {
                number: plan.parts.len() as u32 + 1,
                start: run.start + off,
                len,
                kind,
            });
            off += len;
        }
        match run.copy {
            Some(_) => plan.copied_bytes += run.len,
            None => plan.uploaded_bytes += run.len,
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn copy(len: u64) -> Segment {
        Segment {
            len,
            copyable: true,
        }
    }
    fn local(len: u64) -> Segment {
        Segment {
            len,
            copyable: false,
        }
    }

    #[test]
    fn three_copyable_objects_are_three_copy_parts() {
        let plan = plan_parts(&[copy(6 * MIB); 3], &Limits::S3).unwrap();
        assert_eq!(plan.parts.len(), 3);
        assert_eq!(plan.uploaded_bytes, 0);
        assert_eq!(plan.copied_bytes, 18 * MIB);
        for (i, p) in plan.parts.iter().enumerate() {
            assert_eq!(
                p.kind,
                PartKind::Copy {
                    segment: i,
                    offset: 0
                }
            );
            assert_eq!(p.start, i as u64 * 6 * MIB);
        }
    }

    #[test]
    fn empty_output_is_one_empty_upload_part() {
        let plan = plan_parts(&[], &Limits::S3).unwrap();
        assert_eq!(plan.parts.len(), 1);
        assert_eq!(plan.parts[0].len, 0);
        assert_eq!(plan.parts[0].kind, PartKind::Upload);
    }

    #[test]
    fn one_byte_past_the_top_is_too_large() {
        let mut segs = vec![copy(5 * GIB); 10_000];
        assert!(plan_parts(&segs, &Limits::S3).is_ok());
        segs.push(local(1));
        let err = plan_parts(&segs, &Limits::S3).unwrap_err();
        assert!(matches!(err, PartsError::TooLarge { total, .. } if total == 10_000 * 5 * GIB + 1));
    }
}
