//! Properties of the S3 part planner (src/job/parts.rs): whatever the segments and limits, the
//! plan obeys every rule of a multipart upload and covers the output exactly once, in order.

use proptest::prelude::*;

use super::parts::{Limits, PartKind, PartPlan, Segment, plan_parts};

/// Panics, naming the rule, unless `plan` is a valid plan of `segments` under `limits`.
pub(super) fn check_valid(segments: &[Segment], limits: &Limits, plan: &PartPlan) {
    let total: u64 = segments.iter().map(|s| s.len).sum();
    let mut starts = Vec::with_capacity(segments.len());
    let mut at = 0;
    for s in segments {
        starts.push(at);
        at += s.len;
    }
    assert!(!plan.parts.is_empty(), "no parts");
    assert!(
        plan.parts.len() <= limits.max_parts as usize,
        "too many parts"
    );
    let (mut at, mut copied, mut uploaded) = (0u64, 0u64, 0u64);
    let last = plan.parts.len() - 1;
    for (i, p) in plan.parts.iter().enumerate() {
        assert_eq!(p.number as usize, i + 1, "part numbers");
        assert_eq!(p.start, at, "part {} not contiguous", p.number);
        assert!(p.len <= limits.max_part, "part {} over max", p.number);
        if i < last {
            assert!(p.len >= limits.min_part, "part {} under min", p.number);
        }
        if total > 0 {
            assert!(p.len > 0, "empty part {}", p.number);
        }
        match p.kind {
            PartKind::Copy { segment, offset } => {
                let s = segments[segment];
                assert!(s.copyable, "part {} copies an uncopyable segment", p.number);
                assert!(
                    offset + p.len <= s.len,
                    "part {} past its segment",
                    p.number
                );
                assert_eq!(
                    starts[segment] + offset,
                    p.start,
                    "part {} copies the wrong bytes",
                    p.number
                );
                copied += p.len;
            }
            PartKind::Upload => uploaded += p.len,
        }
        at += p.len;
    }
    assert_eq!(at, total, "parts do not cover the output");
    assert_eq!(plan.copied_bytes, copied, "copied_bytes");
    assert_eq!(plan.uploaded_bytes, uploaded, "uploaded_bytes");
}

/// The true optimum by exhaustive search over every byte position a part could end at: the least
/// bytes uploaded, then the fewest parts, over all plans within `limits`; `None` when none fits.
fn brute_force(segments: &[Segment], limits: &Limits) -> Option<(u64, u64)> {
    let total: u64 = segments.iter().map(|s| s.len).sum();
    if total == 0 {
        return Some((0, 1));
    }
    let n = total as usize;
    // Which copyable segment, if any, holds output byte `b`, and where that segment ends.
    let mut holder = vec![None; n];
    let mut at = 0usize;
    for s in segments {
        let end = at + s.len as usize;
        if s.copyable {
            holder[at..end].fill(Some(end));
        }
        at = end;
    }
    let p = limits.max_parts as usize;
    // best[pos][k]: least bytes uploaded covering [0, pos) with k parts.
    let mut best = vec![vec![u64::MAX; p + 1]; n + 1];
    best[0][0] = 0;
    for a in 0..n {
        for k in 0..p {
            let here = best[a][k];
            if here == u64::MAX {
                continue;
            }
            let top = n.min(a + limits.max_part as usize);
            for (b, row) in best.iter_mut().enumerate().take(top + 1).skip(a + 1) {
                let len = (b - a) as u64;
                if len < limits.min_part && b != n {
                    continue;
                }
                let copy = holder[a].is_some_and(|end| b <= end);
                let cost = here + if copy { 0 } else { len };
                row[k + 1] = row[k + 1].min(cost);
            }
        }
    }
    (1..=p)
        .filter(|&k| best[n][k] != u64::MAX)
        .map(|k| (best[n][k], k as u64))
        .min()
}

fn segments(max_len: u64, max_count: usize) -> impl Strategy<Value = Vec<Segment>> {
    prop::collection::vec(
        (0..=max_len, any::<bool>()).prop_map(|(len, copyable)| Segment { len, copyable }),
        0..=max_count,
    )
}

fn limits() -> impl Strategy<Value = Limits> {
    (1u64..=8, 0u64..=8, 1u32..=12).prop_map(|(min, extra, max_parts)| Limits {
        min_part: min,
        max_part: 2 * min + extra,
        max_parts,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Where the fewest-bytes plan fits in `max_parts`, the planner finds it: the least bytes
    /// through the host of all plans, and then the fewest parts.
    /// `max_parts` is raised to what that plan needs, when short, so the plan may need every part.
    #[test]
    fn plans_are_optimal(segs in segments(30, 9), limits in limits()) {
        let unbounded = Limits { max_parts: 400, ..limits };
        let (uploaded, parts) = brute_force(&segs, &unbounded).expect("at most 270 bytes");
        let limits = Limits { max_parts: limits.max_parts.max(parts as u32), ..limits };
        let plan = plan_parts(&segs, &limits).unwrap();
        check_valid(&segs, &limits, &plan);
        prop_assert_eq!(plan.uploaded_bytes, uploaded, "bytes through the host: {:?}", plan);
        prop_assert_eq!(plan.parts.len() as u64, parts, "parts: {:?}", plan);
    }

    /// Where it does not, the plan is still valid, and `too_large` comes exactly when no plan fits.
    #[test]
    fn plans_under_max_parts_are_valid(segs in segments(30, 9), limits in limits()) {
        match (plan_parts(&segs, &limits), brute_force(&segs, &limits)) {
            (Ok(plan), Some((uploaded, _))) => {
                check_valid(&segs, &limits, &plan);
                prop_assert!(plan.uploaded_bytes >= uploaded);
            }
            (Err(_), None) => {}
            (got, truth) => prop_assert!(false, "planner {:?}, exhaustive search {:?}", got, truth),
        }
    }
}

proptest! {

    #[test]
    fn plans_obey_every_limit(segs in segments(70, 12)) {
        let limits = Limits { min_part: 5, max_part: 20, max_parts: 8 };
        let total: u64 = segs.iter().map(|s| s.len).sum();
        match plan_parts(&segs, &limits) {
            Ok(plan) => check_valid(&segs, &limits, &plan),
            Err(_) => prop_assert!(total > limits.max_total()),
        }
    }
}
