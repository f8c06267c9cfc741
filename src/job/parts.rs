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

/// Plans the parts of an output made of `segments`, in order: fewest bytes through this host, then
/// fewest parts. Requires `2 × min_part ≤ max_part` (so any run of at least `min_part` splits into
/// parts within the limits), as every S3-compatible store has.
pub fn plan_parts(segments: &[Segment], limits: &Limits) -> Result<PartPlan, PartsError> {
    debug_assert!(limits.min_part.saturating_mul(2) <= limits.max_part && limits.max_parts > 0);
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
    let best = planner.solve(Weights {
        byte: 1 << 32,
        part: 1,
    });
    if best.parts <= max_parts {
        return Ok(emit(&best.runs, limits));
    }
    // Too many parts (many copyable segments, each its own part): price a part at `λ` bytes and
    // find the cheapest price whose plan fits; a dearer part trades bytes for fewer parts.
    let (mut lo, mut hi) = (0u64, total + 1);
    let mut fit = planner.solve(Weights {
        byte: 1,
        part: u128::from(hi),
    });
    if fit.parts > max_parts {
        return Ok(emit(
            &[Run {
                start: 0,
                len: total,
                copy: None,
            }],
            limits,
        ));
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let plan = planner.solve(Weights {
            byte: 1,
            part: u128::from(mid),
        });
        if plan.parts <= max_parts {
            if plan.uploaded <= fit.uploaded {
                fit = plan;
            }
            hi = mid;
        } else {
            lo = mid;
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

/// The price of a plan: `byte × uploaded bytes + part × parts`.
#[derive(Debug, Clone, Copy)]
struct Weights {
    byte: u128,
    part: u128,
}

/// One segment that can be a copy run of its own ("kept"): copyable and at least `min_part` long,
/// or the output's last segment.
#[derive(Debug, Clone, Copy)]
struct Node {
    segment: usize,
    start: u64,
    end: u64,
    /// Bytes it can lend to the upload runs either side and still be a copy run.
    capacity: u64,
}

/// How a state was reached.
#[derive(Debug, Clone, Copy)]
enum From {
    /// Everything before the node's copy run is one upload run (maybe empty).
    Start,
    /// After state `state` of an earlier node, whose copy run gave its last `tail` bytes to the
    /// upload run between the two (maybe empty).
    After { state: usize, tail: u64 },
}

/// A node kept, having lent its first `head` bytes to the upload run before it.
#[derive(Debug, Clone, Copy)]
struct State {
    node: usize,
    head: u64,
    /// Bytes uploaded and parts used before the node's copy run.
    uploaded: u64,
    parts: u64,
    from: From,
}

/// A way a kept node's copy run ends: state `state`, lending its last `tail` bytes to the upload
/// run after it, so that run starts at `end`. `uploaded`/`parts` count everything before `end`.
#[derive(Debug, Clone, Copy)]
struct Close {
    state: usize,
    tail: u64,
    end: u64,
    uploaded: u64,
    parts: u64,
}

/// A solved plan, as runs.
struct Solved {
    runs: Vec<Run>,
    uploaded: u64,
    parts: u64,
}

/// States kept per node; past this the frontier is thinned (never reached by inputs with fewer
/// nodes: small inputs are planned exactly).
const FRONTIER_CAP: usize = 16;

/// The dynamic programme over kept segments. Between two kept segments everything is uploaded; a
/// gap shorter than `min_part` borrows the missing bytes from its two neighbours. Only the nearest
/// earlier kept segment can be within `min_part` of the next one (any kept segment but the last is
/// at least `min_part` long), so each node has one "borrowing" predecessor and a running best over
/// the far ones: linear time, with a small frontier of (price, bytes lent at the head) per node.
struct Planner<'a> {
    segments: &'a [Segment],
    limits: Limits,
    total: u64,
    nodes: Vec<Node>,
}

impl<'a> Planner<'a> {
    fn new(segments: &'a [Segment], limits: &Limits, total: u64) -> Self {
        let min = limits.min_part.max(1);
        let last = segments.iter().rposition(|s| s.len > 0);
        let mut nodes = Vec::new();
        let mut at = 0u64;
        for (i, s) in segments.iter().enumerate() {
            let is_last = Some(i) == last;
            if s.copyable && s.len > 0 && (s.len >= min || is_last) {
                // The last part may be short, so the last segment keeps at least one byte.
                let keep = if is_last { 1 } else { min };
                nodes.push(Node {
                    segment: i,
                    start: at,
                    end: at + s.len,
                    capacity: s.len - keep,
                });
            }
            at += s.len;
        }
        Planner {
            segments,
            limits: Limits {
                min_part: min,
                ..*limits
            },
            total,
            nodes,
        }
    }

    fn parts_of(&self, len: u64) -> u64 {
        len.div_ceil(self.limits.max_part)
    }

    fn solve(&self, w: Weights) -> Solved {
        let price =
            |uploaded: u64, parts: u64| w.byte * u128::from(uploaded) + w.part * u128::from(parts);
        let min = self.limits.min_part;
        let max_part = self.limits.max_part;
        let mut states: Vec<State> = Vec::new();
        // Per node: its states' range, and the ways its copy run can end (`closes`).
        let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(self.nodes.len());
        let mut closes: Vec<Close> = Vec::new();
        let mut close_ranges: Vec<(usize, usize)> = Vec::with_capacity(self.nodes.len());
        // The running cheapest close over nodes ending at least `min_part` before the current
        // start, keyed by price minus what the gap up to a later start costs (its parts counted as
        // gap / max_part), scaled by max_part to stay integral.
        let max = u128::from(max_part);
        let key = |c: &Close| {
            (price(c.uploaded, c.parts) * max) as i128
                - ((w.byte * max + w.part) * u128::from(c.end)) as i128
        };
        let mut far: Option<(i128, Close)> = None;
        let mut next_far = 0;
        let mut cands: Vec<State> = Vec::new();
        let mut tails: Vec<u64> = Vec::new();
        for (j, node) in self.nodes.iter().enumerate() {
            while next_far < j && self.nodes[next_far].end + min <= node.start {
                let (lo, hi) = close_ranges[next_far];
                for c in &closes[lo..hi] {
                    let k = key(c);
                    if far.is_none_or(|(best, _)| k <= best) {
                        far = Some((k, *c));
                    }
                }
                next_far += 1;
            }
            cands.clear();
            let len = node.end - node.start;
            // Every state counts the parts of its own copy run as if it lent nothing at its end.
            let own = |head: u64| self.parts_of(len - head);
            // Heads to try after an upload run that needs `need` bytes from this node: that, and
            // more leaving the copy run a whole number of `max_part` (one part fewer).
            let heads = |need: u64| {
                let fewer = (need <= node.capacity).then(|| need + (len - need) % max_part);
                [
                    (need <= node.capacity).then_some(need),
                    fewer.filter(|&f| f > need && f <= node.capacity),
                ]
                .into_iter()
                .flatten()
            };
            let before = node.start;
            let need = if before == 0 || before >= min {
                0
            } else {
                min - before
            };
            for head in heads(need) {
                if before == 0 && head > 0 && head < min {
                    continue;
                }
                let run = before + head;
                cands.push(State {
                    node: j,
                    head,
                    uploaded: run,
                    parts: self.parts_of(run) + own(head),
                    from: From::Start,
                });
            }
            if let Some((_, c)) = far {
                for head in heads(0) {
                    let gap = node.start + head - c.end;
                    cands.push(State {
                        node: j,
                        head,
                        uploaded: c.uploaded + gap,
                        parts: c.parts + self.parts_of(gap) + own(head),
                        from: From::After {
                            state: c.state,
                            tail: c.tail,
                        },
                    });
                }
            }
            if j > 0 {
                let p = self.nodes[j - 1];
                let gap = node.start - p.end;
                if gap == 0 {
                    let (lo, hi) = close_ranges[j - 1];
                    for c in closes[lo..hi].iter().filter(|c| c.tail == 0) {
                        cands.push(State {
                            node: j,
                            head: 0,
                            uploaded: c.uploaded,
                            parts: c.parts + own(0),
                            from: From::After {
                                state: c.state,
                                tail: 0,
                            },
                        });
                    }
                } else if gap < min {
                    // The gap borrows `need` bytes: `tail` from the end of the node before, the
                    // rest from the head of this one. Lending most at the tail leaves this node
                    // the most to lend on; the other splits can save a part either side.
                    let need = min - gap;
                    let (lo, hi) = ranges[j - 1];
                    let p_len = p.end - p.start;
                    for s in lo..hi {
                        let st = states[s];
                        let tail_hi = need.min(p.capacity - st.head);
                        let tail_lo = need - need.min(node.capacity);
                        if tail_lo > tail_hi {
                            continue;
                        }
                        tails.clear();
                        tails.extend([tail_hi, tail_lo]);
                        tails.push((p_len - st.head) % max_part);
                        tails.push(need.wrapping_sub(len % max_part));
                        tails.retain(|t| (tail_lo..=tail_hi).contains(t));
                        tails.sort_unstable();
                        tails.dedup();
                        for &tail in &tails {
                            let head = need - tail;
                            let p_parts = self.parts_of(p_len - st.head - tail);
                            cands.push(State {
                                node: j,
                                head,
                                uploaded: st.uploaded + min,
                                parts: st.parts - self.parts_of(p_len - st.head)
                                    + p_parts
                                    + 1
                                    + own(head),
                                from: From::After { state: s, tail },
                            });
                        }
                    }
                }
            }
            // The frontier, by head ascending. A state lending more at its head has a shorter
            // copy run, which may save one part later: it stays unless a state lending less is
            // cheaper by a whole part.
            cands.sort_by(|a, b| {
                a.head
                    .cmp(&b.head)
                    .then(price(a.uploaded, a.parts).cmp(&price(b.uploaded, b.parts)))
            });
            let lo = states.len();
            let mut best: Option<u128> = None;
            for c in &cands {
                let pc = price(c.uploaded, c.parts);
                if best.is_none_or(|b| pc < b + w.part) {
                    best = Some(best.map_or(pc, |b| b.min(pc)));
                    states.push(*c);
                }
            }
            thin(&mut states, lo);
            ranges.push((lo, states.len()));
            // Its closes: the cheapest state lending nothing at its end, and each state lending
            // the bytes past a whole number of `max_part` to the upload run after it (one part
            // fewer).
            let c_lo = closes.len();
            if let Some(s) =
                (lo..states.len()).min_by_key(|&s| price(states[s].uploaded, states[s].parts))
            {
                let st = states[s];
                closes.push(Close {
                    state: s,
                    tail: 0,
                    end: node.end,
                    uploaded: st.uploaded,
                    parts: st.parts,
                });
            }
            for (s, st) in states.iter().enumerate().skip(lo) {
                let run = len - st.head;
                let tail = run % max_part;
                if tail > 0 && run > tail && tail <= node.capacity - st.head {
                    closes.push(Close {
                        state: s,
                        tail,
                        end: node.end - tail,
                        uploaded: st.uploaded,
                        parts: st.parts - 1,
                    });
                }
            }
            close_ranges.push((c_lo, closes.len()));
        }
        // The end: everything uploaded, or a last kept node and an upload run after it.
        let mut end: (u128, u64, u64, Option<Close>) = (
            price(self.total, self.parts_of(self.total)),
            self.total,
            self.parts_of(self.total),
            None,
        );
        for c in &closes {
            let rest = self.total - c.end;
            let (up, parts) = (c.uploaded + rest, c.parts + self.parts_of(rest));
            let pc = price(up, parts);
            if pc < end.0 {
                end = (pc, up, parts, Some(*c));
            }
        }
        let (_, uploaded, parts, last) = end;
        Solved {
            runs: self.runs(&states, last),
            uploaded,
            parts,
        }
    }

    /// The runs of the plan whose last copy run ends as `last` says, in order.
    fn runs(&self, states: &[State], last: Option<Close>) -> Vec<Run> {
        let Some(last) = last else {
            return vec![Run {
                start: 0,
                len: self.total,
                copy: None,
            }];
        };
        let mut runs = Vec::new();
        if last.end < self.total {
            runs.push(Run {
                start: last.end,
                len: self.total - last.end,
                copy: None,
            });
        }
        let (mut s, mut tail) = (last.state, last.tail);
        loop {
            let st = states[s];
            let node = self.nodes[st.node];
            let from = node.start + st.head;
            runs.push(Run {
                start: from,
                len: node.end - tail - from,
                copy: Some((node.segment, st.head)),
            });
            let (upload_from, next) = match st.from {
                From::Start => (0, None),
                From::After { state, tail } => (
                    self.nodes[states[state].node].end - tail,
                    Some((state, tail)),
                ),
            };
            if upload_from < from {
                runs.push(Run {
                    start: upload_from,
                    len: from - upload_from,
                    copy: None,
                });
            }
            match next {
                Some((state, t)) => {
                    s = state;
                    tail = t;
                }
                None => break,
            }
        }
        runs.reverse();
        debug_assert!(self.segments.len() >= self.nodes.len());
        runs
    }
}

/// Keeps at most [`FRONTIER_CAP`] of the states from `lo` on: the two ends (least lent, cheapest)
/// and evenly spread ones between.
fn thin(states: &mut Vec<State>, lo: usize) {
    let n = states.len() - lo;
    if n <= FRONTIER_CAP {
        return;
    }
    let kept: Vec<State> = (0..FRONTIER_CAP)
        .map(|k| states[lo + k * (n - 1) / (FRONTIER_CAP - 1)])
        .collect();
    states.truncate(lo);
    states.extend(kept);
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
