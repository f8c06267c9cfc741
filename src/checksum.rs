//! BLAKE3 of an output written in parallel.
//!
//! The output is cut into [`Piece`]s that are nodes of BLAKE3's own tree (a left subtree always
//! holds the largest power-of-two number of 1 KiB chunks smaller than its parent), so each worker
//! hashes its pieces independently — right after copying them, while the bytes are in cache — and
//! [`TreeMerger`] joins the chaining values into the root hash exactly as `b3sum` would compute it.
//! Pieces may finish in any order; the merger keeps only the few that arrive early, plus one
//! chaining value per tree level, so memory does not grow with the output.

pub mod crc64;

use std::collections::BTreeMap;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

/// BLAKE3's chunk length.
pub const CHUNK_LEN: u64 = blake3::CHUNK_LEN as u64;

/// One node of the output's BLAKE3 tree, copied and hashed as a unit by one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Position in output order, from 0.
    pub index: u64,
    /// Output offset.
    pub start: u64,
    pub len: u64,
    /// True when the piece is the whole output (then it carries the root hash itself).
    pub root: bool,
}

impl Piece {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Cuts an output of `total` bytes into tree-aligned pieces of at most `max_len` bytes, splitting
/// further while `too_busy(start, len)` says a piece would hold too many sources (never below one
/// chunk). Lazy: a 50 TiB output does not materialize its millions of pieces.
pub struct Pieces<F> {
    total: u64,
    max_len: u64,
    too_busy: F,
    stack: Vec<(u64, u64)>,
    next_index: u64,
}

impl<F: FnMut(u64, u64) -> bool> Pieces<F> {
    pub fn new(total: u64, max_len: u64, too_busy: F) -> Self {
        let stack = if total == 0 { vec![] } else { vec![(0, total)] };
        Self {
            total,
            max_len: max_len.max(CHUNK_LEN),
            too_busy,
            stack,
            next_index: 0,
        }
    }
}

impl<F: FnMut(u64, u64) -> bool> Iterator for Pieces<F> {
    type Item = Piece;
    fn next(&mut self) -> Option<Piece> {
        loop {
            let (start, len) = self.stack.pop()?;
            let leaf = len <= CHUNK_LEN || (len <= self.max_len && !(self.too_busy)(start, len));
            if leaf {
                let index = self.next_index;
                self.next_index += 1;
                return Some(Piece {
                    index,
                    start,
                    len,
                    root: start == 0 && len == self.total,
                });
            }
            let left = hazmat::left_subtree_len(len);
            self.stack.push((start + left, len - left));
            self.stack.push((start, left));
        }
    }
}

/// The hash of one piece: the root hash when the piece is the whole output, else its chaining value.
#[derive(Debug, Clone, Copy)]
pub enum NodeHash {
    Root(blake3::Hash),
    Chaining(ChainingValue),
}

/// Hashes the bytes of one piece, fed in order.
pub struct PieceHasher {
    hasher: blake3::Hasher,
    root: bool,
}

impl PieceHasher {
    pub fn new(piece: &Piece) -> Self {
        let mut hasher = blake3::Hasher::new();
        if !piece.root {
            hasher.set_input_offset(piece.start);
        }
        Self {
            hasher,
            root: piece.root,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    pub fn finish(&self) -> NodeHash {
        if self.root {
            NodeHash::Root(self.hasher.finalize())
        } else {
            NodeHash::Chaining(self.hasher.finalize_non_root())
        }
    }
}

/// Joins piece hashes, arriving in any order, into the root hash.
#[derive(Default)]
pub struct TreeMerger {
    next: u64,
    early: BTreeMap<u64, (u64, NodeHash)>,
    /// Chaining values of complete subtrees of the prefix hashed so far, one per set bit of the
    /// prefix's chunk count (the same stack BLAKE3's incremental hasher keeps).
    stack: Vec<ChainingValue>,
    root: Option<blake3::Hash>,
}

impl TreeMerger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record the hash of `piece`.
    pub fn add(&mut self, piece: &Piece, hash: NodeHash) {
        self.early.insert(piece.index, (piece.start, hash));
        while let Some((start, hash)) = self.early.remove(&self.next) {
            self.next += 1;
            match hash {
                NodeHash::Root(h) => self.root = Some(h),
                NodeHash::Chaining(cv) => {
                    // Every piece starts on a boundary of its own size, so the subtrees before it
                    // merge down to one per set bit of its chunk index; merging is deferred until
                    // now because the last merge of all must be flagged as the root.
                    let chunks = start / CHUNK_LEN;
                    while self.stack.len() > chunks.count_ones() as usize {
                        let right = self.stack.pop().expect("stack has two entries");
                        let left = self.stack.pop().expect("stack has two entries");
                        self.stack
                            .push(hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash));
                    }
                    self.stack.push(cv);
                }
            }
        }
    }

    /// The root hash, once every piece has been added. `None` if pieces are missing.
    pub fn finish(mut self, total: u64) -> Option<blake3::Hash> {
        if total == 0 {
            return Some(blake3::hash(b""));
        }
        if !self.early.is_empty() {
            return None;
        }
        if let Some(root) = self.root {
            return Some(root);
        }
        let mut right = self.stack.pop()?;
        loop {
            let left = self.stack.pop()?;
            if self.stack.is_empty() {
                return Some(hazmat::merge_subtrees_root(&left, &right, Mode::Hash));
            }
            right = hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
    }
}

/// One line of a `b3sum`-format checksum file for `name`; `b3sum -c` accepts it. Like b3sum, a
/// name with a backslash or newline is escaped and the line marked with a leading backslash.
pub fn sidecar_line(hash: &blake3::Hash, name: &str) -> String {
    if name.contains(['\\', '\n']) {
        let escaped = name.replace('\\', "\\\\").replace('\n', "\\n");
        format!("\\{}  {escaped}\n", hash.to_hex())
    } else {
        format!("{}  {name}\n", hash.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    /// Hash through pieces, finishing them in a scrambled order.
    fn piecewise(bytes: &[u8], max_len: u64, busy_below: u64) -> blake3::Hash {
        let pieces: Vec<Piece> =
            Pieces::new(bytes.len() as u64, max_len, |start, _| start < busy_below).collect();
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.reverse();
        order.rotate_left(pieces.len() / 3);
        let mut merger = TreeMerger::new();
        for i in order {
            let p = pieces[i];
            let mut h = PieceHasher::new(&p);
            h.update(&bytes[p.start as usize..p.end() as usize]);
            merger.add(&p, h.finish());
        }
        merger.finish(bytes.len() as u64).unwrap()
    }

    #[test]
    fn pieces_cover_the_output_in_order() {
        let total = 10 * 1024 * 1024 + 12345;
        let mut at = 0;
        for (i, p) in Pieces::new(total, 1 << 20, |_, _| false).enumerate() {
            assert_eq!(p.index, i as u64);
            assert_eq!(p.start, at);
            assert!(p.len <= 1 << 20);
            at = p.end();
        }
        assert_eq!(at, total);
    }

    #[test]
    fn merged_hash_equals_blake3_of_the_whole() {
        for len in [
            0usize,
            1,
            1023,
            1024,
            1025,
            2048,
            3 * 1024 + 5,
            65536,
            65537,
            200_000,
            1 << 20,
            (1 << 20) + 1,
            3 * (1 << 20) + 777,
        ] {
            let bytes = data(len);
            let want = blake3::hash(&bytes);
            for max in [1024, 4096, 65536, 1 << 20] {
                assert_eq!(piecewise(&bytes, max, 0), want, "len {len} max {max}");
                // Adaptive splitting of a busy region still yields valid tree nodes.
                assert_eq!(
                    piecewise(&bytes, max, len as u64 / 2),
                    want,
                    "len {len} busy"
                );
            }
        }
    }

    #[test]
    fn sidecar_lines_match_b3sum() {
        let h = blake3::hash(b"");
        assert_eq!(
            sidecar_line(&h, "a.bin"),
            format!("{}  a.bin\n", h.to_hex())
        );
        assert!(sidecar_line(&h, "a\\b").starts_with('\\'));
    }
}
