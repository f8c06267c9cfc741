//! The plan's table of sources — where each ends in the output and the [`Pin`] it was seen with —
//! kept on the heap while small and spilled to an unlinked file once large.
//!
//! A job of 1,000,000 parts needs 16 MB of this table, and one of 100,000,000 parts 1.6 GB: held
//! on the heap, a daemon's memory would grow with the largest manifest it was handed. Spilled,
//! the table is written once, in order, into an anonymous temporary file (`O_TMPFILE`, never
//! linked into a folder) on the output's filesystem and read back through a read-only map: its
//! pages are page cache, which the kernel reclaims under pressure and rereads on demand, so the
//! process's own memory stays flat whatever the number of parts. The copy pass walks the table in
//! order, so the reads are sequential and the kernel's readahead serves them.
//!
//! Spilling is a means, never a reason to fail: a filesystem without `O_TMPFILE`, or a failing
//! write, keeps the rest of the table on the heap.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::source::Pin;

/// Entries kept on the heap before the table spills (1 MiB), and written per spill write.
const SPILL_FROM: usize = if cfg!(test) { 3 } else { 1 << 16 };
/// Bytes per entry in the spill file: the end offset, then the pin (little-endian).
const ENTRY: u64 = 16;

/// An append-only table of `(end, pin)` per source; see the module documentation.
#[derive(Debug, Default)]
pub(super) struct SourceTable {
    /// Entries after the spilled ones (all of them while nothing is spilled).
    heap: Vec<(u64, Pin)>,
    /// Where the spill file is to be made, until it is tried: most tables never reach
    /// [`SPILL_FROM`], and their jobs should not pay for a file they do not need.
    dir: Option<PathBuf>,
    spill: Option<Spill>,
}

#[derive(Debug)]
struct Spill {
    file: File,
    /// Entries written to `file`, all before those on the heap.
    entries: u64,
    /// `file`'s first `entries` entries, mapped by [`SourceTable::seal`].
    map: Option<memmap2::Mmap>,
    /// A write failed: no more spilling, the rest stays on the heap.
    stopped: bool,
}

impl SourceTable {
    /// A table that spills into an unlinked file in `dir` once large (or never, with `None`).
    pub fn new(dir: Option<&Path>) -> SourceTable {
        SourceTable {
            heap: Vec::new(),
            dir: dir.map(Path::to_path_buf),
            spill: None,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.spilled() + self.heap.len() as u64
    }

    fn spilled(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.entries)
    }

    /// Append an entry; once [`SPILL_FROM`] are on the heap, write them to the spill file.
    pub fn push(&mut self, end: u64, pin: Pin) {
        self.heap.push((end, pin));
        if self.heap.len() >= SPILL_FROM {
            self.write_heap();
        }
    }

    fn write_heap(&mut self) {
        if self.spill.is_none() {
            // Made on first need, and tried once.
            let Some(dir) = self.dir.take() else {
                return;
            };
            match tempfile::tempfile_in(&dir) {
                Ok(file) => {
                    self.spill = Some(Spill {
                        file,
                        entries: 0,
                        map: None,
                        stopped: false,
                    })
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "plan table: cannot spill here; kept in memory");
                    return;
                }
            }
        }
        let Some(spill) = self
            .spill
            .as_mut()
            .filter(|s| !s.stopped && s.map.is_none())
        else {
            return;
        };
        let mut bytes = Vec::with_capacity(self.heap.len() * ENTRY as usize);
        for (end, pin) in &self.heap {
            bytes.extend_from_slice(&end.to_le_bytes());
            bytes.extend_from_slice(&pin.0.to_le_bytes());
        }
        match spill.file.write_all_at(&bytes, spill.entries * ENTRY) {
            Ok(()) => {
                spill.entries += self.heap.len() as u64;
                self.heap.clear();
            }
            Err(e) => {
                // Bytes past `entries` may be half written: cut them off, or they would hold
                // space on the output's filesystem (full, likely) that the output needs.
                let _ = spill.file.set_len(spill.entries * ENTRY);
                tracing::debug!(error = %e, "plan table: cannot spill; the rest is kept in memory");
                spill.stopped = true;
            }
        }
    }

    /// Done appending: write what is left and map the spill file for reading. Entries cannot be
    /// read back before this.
    pub fn seal(&mut self) -> std::io::Result<()> {
        // A table that never spilled stays on the heap (a spill file whose first write failed is
        // closed).
        if self.spilled() == 0 {
            self.spill = None;
            return Ok(());
        }
        self.write_heap();
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let len = spill.entries * ENTRY;
        // SAFETY: the file is our own anonymous temporary file (`tempfile_in` opens it with
        // O_TMPFILE, or unlinks it at once where that is not supported): no path leads to it, so
        // no other process can truncate or write it, and we never do after this point. Its first
        // `len` bytes were written in full above, so every mapped page is inside the file and no
        // access can fault; the map is read-only.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(usize::try_from(len).map_err(std::io::Error::other)?)
                .map(&spill.file)
        }?;
        // Read in order by the copy pass.
        let _ = map.advise(memmap2::Advice::Sequential);
        spill.map = Some(map);
        Ok(())
    }

    /// Give the spill file's space back to its filesystem: read the spilled entries onto the
    /// heap and close the file. For when the output's filesystem turns out too full for the
    /// output beside the table (spilling is never a reason to fail). False when nothing was
    /// spilled.
    pub fn unspill(&mut self) -> bool {
        let spilled = self.spilled();
        if spilled == 0 || self.spill.as_ref().is_none_or(|s| s.map.is_none()) {
            return false;
        }
        let mut all = Vec::with_capacity((spilled as usize).saturating_add(self.heap.len()));
        for i in 0..spilled {
            all.push(self.get(i));
        }
        all.append(&mut self.heap);
        self.heap = all;
        self.spill = None;
        true
    }

    /// Entry `i` (0-based).
    pub fn get(&self, i: u64) -> (u64, Pin) {
        let spilled = self.spilled();
        if i >= spilled {
            return self.heap[(i - spilled) as usize];
        }
        let map = self
            .spill
            .as_ref()
            .and_then(|s| s.map.as_ref())
            .expect("the plan table is read only once sealed");
        let at = (i * ENTRY) as usize;
        let word = |k: usize| u64::from_le_bytes(map[k..k + 8].try_into().expect("8 bytes"));
        (word(at), Pin(word(at + 8)))
    }

    /// End offset of entry `i`.
    pub fn end(&self, i: u64) -> u64 {
        self.get(i).0
    }

    /// The number of leading entries whose end satisfies `pred` (ends never decrease, so `pred`
    /// holds for a prefix): as [`slice::partition_point`].
    pub fn partition_point(&self, pred: impl Fn(u64) -> bool) -> u64 {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.end(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Whether the table lives (partly) in a spill file: for tests.
    #[cfg(test)]
    pub fn is_spilled(&self) -> bool {
        self.spilled() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(dir: Option<&Path>, n: u64) -> SourceTable {
        let mut t = SourceTable::new(dir);
        for i in 0..n {
            t.push(i * 10, Pin(i ^ 0xabcd));
        }
        t.seal().unwrap();
        t
    }

    #[test]
    fn spilled_and_heap_tables_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, 2, 3, 4, 7, 100] {
            let spilled = filled(Some(dir.path()), n);
            let heap = filled(None, n);
            assert_eq!(spilled.is_spilled(), n >= SPILL_FROM as u64, "{n}");
            assert!(!heap.is_spilled());
            for t in [&spilled, &heap] {
                assert_eq!(t.len(), n);
                for i in 0..n {
                    assert_eq!(t.get(i), (i * 10, Pin(i ^ 0xabcd)));
                }
                assert_eq!(t.partition_point(|e| e <= 35), n.min(4));
                assert_eq!(t.partition_point(|e| e < 1_000_000), n);
            }
        }
        // The spill file is anonymous: nothing is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_unspilled_table_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = filled(Some(dir.path()), 8);
        assert!(t.is_spilled());
        assert!(t.unspill());
        assert!(!t.is_spilled() && !t.unspill());
        assert_eq!(t.len(), 8);
        for i in 0..8 {
            assert_eq!(t.get(i), (i * 10, Pin(i ^ 0xabcd)));
        }
    }

    #[test]
    fn a_folder_that_cannot_hold_the_spill_keeps_the_table_in_memory() {
        let t = filled(Some(Path::new("/nonexistent/concatd")), 10);
        assert!(!t.is_spilled());
        assert_eq!(t.get(9), (90, Pin(9 ^ 0xabcd)));
    }
}
