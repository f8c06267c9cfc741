//! The planner's dynamic programme over kept segments (see the parent module for the model).

use super::{Limits, Run, Segment};

/// The price of a plan: `byte` per uploaded byte, `part` per part starting before offset `cut`,
/// `part_after` per part from there on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Weights {
    pub(super) byte: u128,
    pub(super) part: u128,
    pub(super) part_after: u128,
    pub(super) cut: u64,
}

impl Weights {
    pub(super) fn flat(byte: u128, part: u128) -> Self {
        Weights {
            byte,
            part,
            part_after: part,
            cut: u64::MAX,
        }
    }

    /// The price of `n` parts of a run starting at `at`.
    fn parts(&self, at: u64, n: u64) -> u128 {
        let each = if at < self.cut {
            self.part
        } else {
            self.part_after
        };
        each * u128::from(n)
    }

    fn bytes(&self, n: u64) -> u128 {
        self.byte * u128::from(n)
    }
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
    /// Bytes uploaded before the node's copy run, and parts used up to its end (as if it lent
    /// nothing there), and their price.
    uploaded: u64,
    parts: u64,
    price: u128,
    from: From,
}

/// A way a kept node's copy run ends: state `state`, lending its last `tail` bytes to the upload
/// run after it, so that run starts at `end`. `uploaded`/`parts`/`price` count everything before
/// `end`.
#[derive(Debug, Clone, Copy)]
struct Close {
    state: usize,
    tail: u64,
    end: u64,
    uploaded: u64,
    parts: u64,
    price: u128,
}

/// A solved plan, as runs.
pub(super) struct Solved {
    pub(super) runs: Vec<Run>,
    pub(super) uploaded: u64,
    pub(super) parts: u64,
}

/// States kept per node; past this the frontier is thinned (never reached by inputs with fewer
/// nodes: small inputs are planned exactly).
const FRONTIER_CAP: usize = 16;

/// The dynamic programme over kept segments. Between two kept segments everything is uploaded; a
/// gap shorter than `min_part` borrows the missing bytes from its two neighbours. Only the nearest
/// earlier kept segment can be within `min_part` of the next one (any kept segment but the last is
/// at least `min_part` long), so each node has one "borrowing" predecessor and a running best over
/// the far ones: linear time, with a small frontier of (price, bytes lent at the head) per node.
pub(super) struct Planner<'a> {
    segments: &'a [Segment],
    limits: Limits,
    total: u64,
    nodes: Vec<Node>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(segments: &'a [Segment], limits: &Limits, total: u64) -> Self {
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

    /// Kept-segment candidates (copyable segments that could be copy runs).
    pub(super) fn kept_candidates(&self) -> usize {
        self.nodes.len()
    }

    /// Output offset of candidate `i`.
    pub(super) fn candidate_start(&self, i: usize) -> u64 {
        self.nodes[i].start
    }

    /// The cheapest plan at prices `w`.
    pub(super) fn solve(&self, w: Weights) -> Solved {
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
            let per_part = w.parts(c.end, 1);
            (c.price * max) as i128 - ((w.byte * max + per_part) * u128::from(c.end)) as i128
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
            let own_price = |head: u64| w.parts(node.start + head, own(head));
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
                    price: w.bytes(run) + w.parts(0, self.parts_of(run)) + own_price(head),
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
                        price: c.price
                            + w.bytes(gap)
                            + w.parts(c.end, self.parts_of(gap))
                            + own_price(head),
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
                            price: c.price + own_price(0),
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
                    for (s, &st) in states.iter().enumerate().take(hi).skip(lo) {
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
                        let p_from = p.start + st.head;
                        let p_was = self.parts_of(p_len - st.head);
                        for &tail in &tails {
                            let head = need - tail;
                            let p_parts = self.parts_of(p_len - st.head - tail);
                            cands.push(State {
                                node: j,
                                head,
                                uploaded: st.uploaded + min,
                                parts: st.parts - p_was + p_parts + 1 + own(head),
                                price: st.price - w.parts(p_from, p_was)
                                    + w.parts(p_from, p_parts)
                                    + w.bytes(min)
                                    + w.parts(p.end - tail, 1)
                                    + own_price(head),
                                from: From::After { state: s, tail },
                            });
                        }
                    }
                }
            }
            // The frontier, by head ascending. A state lending more at its head has a shorter
            // copy run, which may save one part later: it stays unless a state lending less is
            // cheaper by a whole part.
            cands.sort_by(|a, b| a.head.cmp(&b.head).then(a.price.cmp(&b.price)));
            let lo = states.len();
            let mut best: Option<u128> = None;
            let one_part = w.part.max(w.part_after);
            for c in &cands {
                if best.is_none_or(|b| c.price < b + one_part) {
                    best = Some(best.map_or(c.price, |b| b.min(c.price)));
                    states.push(*c);
                }
            }
            thin(&mut states, lo);
            ranges.push((lo, states.len()));
            // Its closes: the cheapest state lending nothing at its end, and each state lending
            // the bytes past a whole number of `max_part` to the upload run after it (one part
            // fewer).
            let c_lo = closes.len();
            if let Some(s) = (lo..states.len()).min_by_key(|&s| states[s].price) {
                let st = states[s];
                closes.push(Close {
                    state: s,
                    tail: 0,
                    end: node.end,
                    uploaded: st.uploaded,
                    parts: st.parts,
                    price: st.price,
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
                        price: st.price - w.parts(node.start + st.head, 1),
                    });
                }
            }
            close_ranges.push((c_lo, closes.len()));
        }
        // The end: everything uploaded, or a last kept node and an upload run after it.
        let all = self.parts_of(self.total);
        let mut end = (w.bytes(self.total) + w.parts(0, all), self.total, all, None);
        for c in &closes {
            let rest = self.total - c.end;
            let n = self.parts_of(rest);
            let price = c.price + w.bytes(rest) + w.parts(c.end, n);
            if price < end.0 {
                end = (price, c.uploaded + rest, c.parts + n, Some(*c));
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

/// Keeps about [`FRONTIER_CAP`] of the states from `lo` on: the two ends (least lent, most
/// lent), the cheapest, and evenly spread ones between.
fn thin(states: &mut Vec<State>, lo: usize) {
    let n = states.len() - lo;
    if n <= FRONTIER_CAP {
        return;
    }
    let cheapest = (lo..states.len())
        .min_by_key(|&s| states[s].price)
        .expect("n > 0");
    let mut keep: Vec<usize> = (0..FRONTIER_CAP)
        .map(|k| lo + k * (n - 1) / (FRONTIER_CAP - 1))
        .collect();
    keep.push(cheapest);
    keep.sort_unstable();
    keep.dedup();
    let kept: Vec<State> = keep.iter().map(|&s| states[s]).collect();
    states.truncate(lo);
    states.extend(kept);
}
