//! The S3 part planner: which stretches of an output become server-side `UploadPartCopy` parts and
//! which are read through this host and uploaded. Pure: no I/O, no SDK types.
//!
//! **The model.** The output is a row of segments in order, each copyable (an S3 source in the
//! output's store: a whole object or a byte range of one) or not (local, HTTP, another store). A
//! multipart upload is a row of parts: every part but the last within `[min_part, max_part]` (S3:
//! 5 MiB to 5 GiB), the last at most `max_part`, at most `max_parts` (10,000) of them. A copy part
//! must lie inside one copyable segment; an upload part may span anything. So the largest output
//! is `max_parts × max_part` (48.8 TiB); past it, [`PartsError::TooLarge`].
//!
//! **The goal**: fewest bytes through this host, then fewest parts. Bytes through the host are
//! what the job costs (time, bandwidth, egress); parts are only requests.
//!
//! **The shape of a plan.** Some copyable segments are *kept*: a middle stretch of each is copied
//! (split into equal copy parts when over `max_part`); everything else is uploaded, adjacent
//! bytes joined into upload runs (each split into equal parts). A kept segment must keep at least
//! `min_part` (any length if it ends the output), so smaller copyable segments are uploaded with
//! their neighbours. An upload run shorter than `min_part` between two kept segments *borrows*
//! the missing bytes from the ends of its neighbours, which stay ranged copies: a 1 MiB local file
//! between two 100 MiB objects costs 5 MiB through the host, not 101. Which neighbour lends does
//! not change the bytes, only what each has left to lend and how many parts remain, so the planner
//! tries every useful split: the most from the left (leaving the right the most for its own next
//! gap), the most from the right, and the splits that leave either copy run a whole number of
//! `max_part` (one part fewer).
//!
//! **Why the dynamic programme is exact.** A kept segment other than the last is at least
//! `min_part` long, so only the nearest kept segment before another can be within `min_part` of
//! it: each kept segment has one predecessor it may borrow with, and all further ones are reached
//! through an upload gap of at least `min_part`, priced by a running minimum. The state per kept
//! segment is how much it lent at its head (a short frontier of cheapest-per-head states). So one
//! linear pass finds the fewest-bytes plan; the property tests (`parts_props.rs`) compare it with
//! an exhaustive search over every byte position on small inputs and find the same bytes and the
//! same number of parts.
//!
//! **More parts than allowed** (more than 10,000 copyable objects, or a total near the top): some
//! stretches must be uploaded as fewer, larger parts. A part is then priced at `λ` bytes and the
//! pass rerun: the least `λ` whose plan fits is found by doubling and halving, then the price is
//! raised only before a cut point, moved to the first kept segment where the plan fits, so that
//! only as many bytes as needed are traded for parts (20,000 objects of 6 MiB: 60 GiB
//! uploaded, 5 GiB parts, the rest copied). This regime is not proven optimal: on small inputs
//! the exhaustive search is a few per cent better in about 3% of cases.
//!
//! Time: linear per pass (tens of passes past `max_parts`), memory linear in the segments.

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

mod solve;

use solve::{Planner, Solved, Weights};

/// A stretch of the output given to one kind of part: copied from one segment, or uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    /// `Some((segment, offset in it))` for a copy run.
    copy: Option<(usize, u64)>,
}

/// Plans the parts of an output made of `segments`, in order: fewest bytes through this host, then
/// fewest parts.
///
/// # Panics
/// On limits no store has: unless `1 ≤ min_part`, `2 × min_part ≤ max_part ≤ 2^36` and
/// `1 ≤ max_parts ≤ 2^16` (S3: 5 MiB, 5 GiB, 10,000). The factor 2 lets any run of at least
/// `min_part` split into parts within the limits; the caps keep the planner's prices (`u128`)
/// from overflowing.
pub fn plan_parts(segments: &[Segment], limits: &Limits) -> Result<PartPlan, PartsError> {
    assert!(
        limits.min_part >= 1
            && limits.min_part.saturating_mul(2) <= limits.max_part
            && limits.max_part <= 1 << 36
            && (1..=1 << 16).contains(&limits.max_parts),
        "unsupported multipart limits {limits:?}"
    );
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
    let planner = Planner::new(segments, limits, total);
    let max_parts = u64::from(limits.max_parts);
    // Bytes first, parts to break ties.
    let best = planner.solve(Weights::flat(1 << 32, 1));
    if best.parts <= max_parts {
        return Ok(emit(&best.runs, limits));
    }
    // Too many parts (many copyable segments, each its own part): price a part at `λ` bytes and
    // find a price whose plan fits; a dearer part trades bytes for fewer parts. Doubling from
    // `min_part` (a part is worth about that much), then halving the interval to 1/1024 of it.
    let fits = |plan: &Solved| plan.parts <= max_parts;
    let all = || {
        emit(
            &[Run {
                start: 0,
                len: total,
                copy: None,
            }],
            limits,
        )
    };
    let (mut lo, mut hi) = (0u64, limits.min_part.max(1));
    let mut fit = loop {
        let plan = planner.solve(Weights::flat(1, u128::from(hi)));
        if fits(&plan) {
            break plan;
        }
        if hi > total {
            return Ok(all());
        }
        (lo, hi) = (hi, hi.saturating_mul(2));
    };
    while hi - lo > (hi / 1024).max(1) {
        let mid = lo + (hi - lo) / 2;
        let plan = planner.solve(Weights::flat(1, u128::from(mid)));
        if fits(&plan) {
            if plan.uploaded <= fit.uploaded {
                fit = plan;
            }
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // Between the prices `lo` (too many parts) and `hi` (fits), the plan found at `hi` may use far
    // fewer parts than allowed (every run that just pays is uploaded, not just enough of them).
    // Price parts at `hi` before a kept segment and at `lo` from it on, and find the first such
    // segment whose plan fits: only as much of the output as needed trades bytes for parts.
    let (mut before, mut after) = (0usize, planner.kept_candidates());
    while after - before > 1 {
        let mid = before + (after - before) / 2;
        let plan = planner.solve(Weights {
            byte: 1,
            part: u128::from(hi),
            part_after: u128::from(lo),
            cut: planner.candidate_start(mid),
        });
        if fits(&plan) {
            if plan.uploaded < fit.uploaded {
                fit = plan;
            }
            after = mid;
        } else {
            before = mid;
        }
    }
    Ok(emit(&fit.runs, limits))
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

    /// The plan's runs, as (copy?, length) with adjacent parts of one kind and segment merged.
    fn shape(plan: &PartPlan) -> Vec<(bool, u64)> {
        let mut out: Vec<(bool, u64)> = Vec::new();
        let mut last_seg = None;
        for p in &plan.parts {
            let (copy, seg) = match p.kind {
                PartKind::Copy { segment, .. } => (true, Some(segment)),
                PartKind::Upload => (false, None),
            };
            match out.last_mut() {
                Some(l) if l.0 == copy && seg == last_seg => l.1 += p.len,
                _ => out.push((copy, p.len)),
            }
            last_seg = seg;
        }
        out
    }

    fn check(segs: &[Segment], limits: &Limits) -> PartPlan {
        let plan = plan_parts(segs, limits).unwrap();
        super::super::parts_props::check_valid(segs, limits, &plan);
        plan
    }

    #[test]
    fn small_objects_are_coalesced_into_one_upload() {
        // 1 MiB objects are copyable but too small to be parts: one uploaded part, but for the
        // last object, which as the last part may be short.
        let plan = check(&[copy(MIB); 100], &Limits::S3);
        assert_eq!(shape(&plan), [(false, 99 * MIB), (true, MIB)]);
        let mut segs = vec![copy(MIB); 100];
        segs.push(local(10));
        let plan = check(&segs, &Limits::S3);
        assert_eq!(shape(&plan), [(false, 100 * MIB + 10)]);
        // Between big objects they are uploaded together, and the big ones copied.
        let mut segs = vec![copy(100 * MIB)];
        segs.extend([copy(MIB); 10]);
        segs.push(copy(100 * MIB));
        let plan = check(&segs, &Limits::S3);
        assert_eq!(
            shape(&plan),
            [(true, 100 * MIB), (false, 10 * MIB), (true, 100 * MIB)]
        );
        assert_eq!(plan.copied_bytes, 200 * MIB);
    }

    #[test]
    fn a_12_gib_object_is_split_into_equal_copy_parts() {
        let plan = check(&[copy(12 * GIB)], &Limits::S3);
        assert_eq!(plan.parts.len(), 3);
        assert_eq!(plan.uploaded_bytes, 0);
        for (i, p) in plan.parts.iter().enumerate() {
            assert_eq!(p.len, 4 * GIB);
            assert_eq!(
                p.kind,
                PartKind::Copy {
                    segment: 0,
                    offset: i as u64 * 4 * GIB
                }
            );
        }
    }

    #[test]
    fn local_and_copyable_mixed() {
        // local 10 MiB | S3 100 MiB | local 2 MiB | S3 50 MiB | local 3 MiB (last, may be short).
        let segs = [
            local(10 * MIB),
            copy(100 * MIB),
            local(2 * MIB),
            copy(50 * MIB),
            local(3 * MIB),
        ];
        let plan = check(&segs, &Limits::S3);
        // The 2 MiB run borrows 3 MiB from a neighbour; nothing else passes through the host.
        assert_eq!(plan.uploaded_bytes, 10 * MIB + 5 * MIB + 3 * MIB);
        assert_eq!(plan.parts.len(), 5);
        assert_eq!(
            plan.parts
                .iter()
                .map(|p| matches!(p.kind, PartKind::Copy { .. }))
                .collect::<Vec<_>>(),
            [false, true, false, true, false]
        );
    }

    #[test]
    fn a_short_run_borrows_from_a_neighbour() {
        let plan = check(&[copy(100 * MIB), local(MIB), copy(100 * MIB)], &Limits::S3);
        // 1 MiB + 4 MiB borrowed: 5 MiB through the host instead of 201 MiB or 101 MiB.
        assert_eq!(plan.uploaded_bytes, 5 * MIB);
        assert_eq!(plan.copied_bytes, 196 * MIB);
        assert_eq!(plan.parts.len(), 3);
        assert_eq!(plan.parts[1].len, 5 * MIB);
        assert_eq!(plan.parts[1].kind, PartKind::Upload);
        // The neighbour lent the end of its range: still a ranged copy of it.
        assert_eq!(plan.parts[0].len + plan.parts[2].len, 196 * MIB);
    }

    #[test]
    fn a_neighbour_too_small_to_lend_is_skipped_for_the_other() {
        // The left object has 1 MiB to spare, the right one plenty: borrow from the right.
        let plan = check(&[copy(6 * MIB), local(MIB), copy(100 * MIB)], &Limits::S3);
        assert_eq!(plan.uploaded_bytes, 5 * MIB);
        assert_eq!(
            plan.parts.iter().map(|p| p.len).collect::<Vec<_>>(),
            [5 * MIB, 5 * MIB, 97 * MIB]
        );
    }

    #[test]
    fn the_top_is_10000_parts_of_5_gib() {
        let plan = check(&[copy(5 * GIB); 10_000], &Limits::S3);
        assert_eq!(plan.parts.len(), 10_000);
        assert_eq!(plan.uploaded_bytes, 0);
        assert!(plan.parts.iter().all(|p| p.len == 5 * GIB));
        // The same total from half-size objects: no copy part can be 5 GiB, so all is uploaded.
        let plan = check(&[copy(5 * GIB / 2); 20_000], &Limits::S3);
        assert_eq!(plan.parts.len(), 10_000);
        assert_eq!(plan.uploaded_bytes, 10_000 * 5 * GIB);
    }

    #[test]
    fn more_objects_than_parts_upload_the_fewest_bytes_that_fit() {
        // 20,000 objects of 6 MiB, each its own copy part, are twice too many parts: some runs of
        // them are uploaded as 5 GiB parts. Each such run saves ~853 parts, so 12 of them must go
        // (about 60 GiB); more than 61 GiB would be a poor plan.
        let plan = check(&[copy(6 * MIB); 20_000], &Limits::S3);
        eprintln!(
            "{} bytes uploaded, {} parts",
            plan.uploaded_bytes,
            plan.parts.len()
        );
        assert!(plan.parts.len() <= 10_000);
        assert!(
            plan.uploaded_bytes <= 61 * GIB,
            "{} bytes uploaded",
            plan.uploaded_bytes
        );
        assert!(plan.uploaded_bytes >= 58 * GIB);
    }

    #[test]
    fn a_million_tiny_segments_plan_fast() {
        // A list job of small local files with a big copyable object every 1,000 of them.
        let segs: Vec<Segment> = (0..1_000_000)
            .map(|i| {
                if i % 1000 == 999 {
                    copy(6 * MIB)
                } else {
                    local(8192)
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let plan = check(&segs, &Limits::S3);
        let took = started.elapsed();
        assert_eq!(plan.copied_bytes, 1000 * 6 * MIB);
        assert_eq!(plan.parts.len(), 2000);
        assert!(took.as_secs_f64() < 5.0, "{took:?}");
    }

    /// Objects just over a part with 1-byte gaps between: no gap can borrow enough, and 50,000
    /// copy parts are 5 × too many, so the search over part prices runs (tens of passes).
    /// `cargo test --release --lib parts -- --ignored` runs it with 1,000,000 segments.
    fn adversarial(n: usize) -> std::time::Duration {
        let segs: Vec<Segment> = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    copy(5 * MIB + 3)
                } else {
                    local(1)
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let plan = check(&segs, &Limits::S3);
        let took = started.elapsed();
        assert!(plan.parts.len() <= 10_000);
        eprintln!(
            "{n} segments: {took:?}, {} bytes uploaded",
            plan.uploaded_bytes
        );
        took
    }

    #[test]
    fn too_many_parts_plan_in_linear_passes() {
        let took = adversarial(100_000);
        assert!(took.as_secs_f64() < 30.0, "{took:?}");
    }

    #[test]
    #[ignore = "a second in release, a minute unoptimised"]
    fn too_many_parts_plan_in_linear_passes_1m() {
        let took = adversarial(1_000_000);
        assert!(took.as_secs_f64() < 10.0, "{took:?}");
    }

    #[test]
    fn one_byte_past_the_top_is_too_large() {
        let mut segs = vec![copy(5 * GIB); 10_000];
        assert!(plan_parts(&segs, &Limits::S3).is_ok());
        segs.push(local(1));
        let err = plan_parts(&segs, &Limits::S3).unwrap_err();
        assert!(matches!(err, PartsError::TooLarge { total, .. } if total == 10_000 * 5 * GIB + 1));
        let text = err.to_string();
        assert!(
            text.contains("53687091200001") && text.contains("10000 parts"),
            "{text}"
        );
    }
}
