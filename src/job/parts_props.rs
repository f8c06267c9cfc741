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

fn segments(max_len: u64, max_count: usize) -> impl Strategy<Value = Vec<Segment>> {
    prop::collection::vec(
        (0..=max_len, any::<bool>()).prop_map(|(len, copyable)| Segment { len, copyable }),
        0..=max_count,
    )
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
