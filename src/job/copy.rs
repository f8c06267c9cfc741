//! The copy pass: sources to their output offsets on every core, hashed while in cache.
//!
//! One producer walks the manifest's sources again (streaming the lists) and cuts the output into
//! [`Piece`]s — nodes of the BLAKE3 tree of at most [`MAX_PIECE`] bytes and about
//! [`MAX_SEGMENTS`] sources — each carrying the source ranges that fill it. Workers, one per core,
//! take whole pieces: many small sources travel together, so no source pays a thread hop of its
//! own, and each worker hashes its piece right after writing it. Sources are opened by the worker
//! that copies them and closed when its piece is done, so at most a few files are open at once
//! whatever the number of sources.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::pieces::{Done, Journal};
use super::plan::Plan;
use super::{JobContext, JobError};
use crate::checksum::{NodeHash, Piece, PieceHasher, Pieces, TreeMerger};
use crate::config::WriteMode;
use crate::manifest::{Location, Manifest};
use crate::output::{io_error, is_no_space};
use crate::source::{Pin, Reader, SourceError, Sources};

/// Largest piece of output one worker copies and hashes as a unit (local sources).
pub(super) const MAX_PIECE: u64 = 4 << 20;
/// Pieces holding more sources than this are split (down to one 1 KiB chunk).
const MAX_SEGMENTS: u64 = 1024;
/// Bytes read, hashed and written at a time: small enough to stay in the CPU cache between the
/// read and the hash (256 KiB measured fastest; see the README).
const BLOCK: usize = 256 << 10;
/// With `fsync`, how many finished pieces each worker leaves in writeback before it waits for its
/// oldest: the disk writes behind the copy instead of all at the final `fsync`, and dirty pages
/// stay bounded (about 2 × this × [`MAX_PIECE`] per worker).
const WRITE_BEHIND: usize = 4;
/// Shorter aligned runs are copied rather than shared: remapping costs a filesystem transaction
/// per call, so only runs worth a transaction are shared. Measured on XFS (64 MiB of equal
/// sources, page cache warm, fsync off): 4,096 sources of 16 KiB took 46 ms shared and 40 ms
/// copied, 1,024 of 64 KiB 23 ms shared and 26 ms copied (256 KiB: 17 and 22 ms).
const SHARE_FROM: u64 = 64 << 10;
/// In `copy_file_range` mode (and so `auto`), local source ranges at least this long are copied in
/// the kernel block by block, each block hashed right after from a read-only map of the output,
/// which the copy has just put in the page cache: the bytes are copied once (source page to
/// output page) instead of twice (into the buffer, out of it). Shorter ranges are packed into the
/// buffer as in `pwrite` mode: a system call each would cost more than the copy it saves. L (16 x
/// 64 MiB, ext4, warm): see the README, "Write modes".
const KERNEL_COPY_FROM: u64 = 64 << 10;
/// Finished pieces are journaled at least this often (and every 1/32 of the output, see
/// [`Copy::journal`]), so a crash loses at most about this much copying.
const JOURNAL_EVERY: Duration = Duration::from_secs(1);

/// A range of one source, bound for a known output offset.
struct Segment {
    number: u64,
    location: Arc<Location>,
    src_offset: u64,
    len: u64,
    pin: Pin,
}

struct Work {
    piece: Piece,
    segments: Vec<Segment>,
}

/// How [`Copy::place`] places the bytes of local sources that lie well for it.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Everything through the buffer (`pwrite` mode).
    Buffer,
    /// Long ranges copied in the kernel and hashed from the output (see [`KERNEL_COPY_FROM`]).
    KernelCopy,
    /// Long block-aligned ranges shared with the output (reflink filesystems; the filesystem's
    /// block size).
    Share { align: u64 },
}

/// The copy pass of one job.
pub(super) struct Copy<'a> {
    pub plan: &'a Plan,
    /// Worker threads (each holds at most one source open, so for remote sources this is the
    /// number of requests in flight).
    pub workers: usize,
    /// Largest piece; for remote sources, the bytes of one ranged request.
    pub max_piece: u64,
    pub manifest: &'a Manifest,
    pub sources: &'a Sources<'a>,
    pub out: &'a File,
    pub out_path: &'a Path,
    pub mode: WriteMode,
    /// The output's filesystem shares extents and the mode allows it: block-aligned runs of local
    /// sources are shared with the output instead of copied (see [`Copy::place`]).
    pub share: bool,
    pub ctx: &'a JobContext<'a>,
    /// Where finished pieces are recorded, for a rerun to resume from (daemon jobs).
    pub journal: Mutex<Option<Journal>>,
    /// Pieces an earlier run finished (sorted by index): not copied again.
    pub resumed: Vec<Done>,
}

/// Everything the output's bytes follow from besides the plan: a pieces journal written under
/// another fingerprint describes other bytes.
pub(super) fn fingerprint(plan: &Plan, max_piece: u64, mode: WriteMode) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"concatd copy pass 1\0");
    h.update(plan.fingerprint().as_bytes());
    h.update(&max_piece.to_le_bytes());
    h.update(&MAX_SEGMENTS.to_le_bytes());
    h.update(mode.as_str().as_bytes());
    h.finalize()
}

/// What the workers share.
struct Shared {
    merger: Mutex<TreeMerger>,
    failure: Mutex<Option<JobError>>,
    stop: AtomicBool,
    /// Bytes of the output finished (copied, or reused from an earlier run).
    done: AtomicU64,
    /// Bytes reused from an earlier run.
    reused: AtomicU64,
}

impl Shared {
    /// Keep the first failure; everyone stops at the next piece.
    fn fail(&self, e: JobError) {
        let mut slot = self.failure.lock().expect("failure lock");
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How many pieces [`Copy::run`] cuts `plan`'s output into, with pieces of at most `max_piece`.
pub(super) fn piece_count(plan: &Plan, max_piece: u64) -> u64 {
    pieces(plan, max_piece).count() as u64
}

/// The pieces of `plan`'s output: at most `max_piece` long, and cut shorter where they would
/// span more than [`MAX_SEGMENTS`] sources.
fn pieces(plan: &Plan, max_piece: u64) -> Pieces<impl FnMut(u64, u64) -> bool + '_> {
    Pieces::new(plan.total, max_piece, |start, len| {
        plan.sources_in(start, len) > MAX_SEGMENTS
    })
}

/// Workers for local sources: one per core.
pub(super) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 16)
}

impl Copy<'_> {
    /// Copy every source into the output; return the output's BLAKE3.
    pub fn run(&self) -> Result<blake3::Hash, JobError> {
        let total = self.plan.total;
        if total == 0 {
            return Ok(blake3::hash(b""));
        }
        let workers = self.workers.max(1);
        let (tx, rx) = sync_channel::<Work>(workers * 2);
        let rx = Mutex::new(rx);
        let shared = Shared {
            merger: Mutex::new(TreeMerger::new()),
            failure: Mutex::new(None),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        };
        // Workers log into the job's span, so their lines reach the rule's log too.
        let span = tracing::Span::current();
        let journal = self.journal.lock().expect("journal lock").take();
        std::thread::scope(|s| {
            let (rx, shared, span) = (&rx, &shared, &span);
            let journal = journal.as_ref();
            let journal_tx = journal.map(|journal| {
                let (jtx, jrx) = channel();
                s.spawn(move || span.in_scope(|| self.journal(journal, jrx)));
                jtx
            });
            for _ in 0..workers {
                let journal = journal.zip(journal_tx.clone());
                s.spawn(move || span.in_scope(|| self.worker(rx, shared, journal)));
            }
            // The journal thread ends once the last worker drops its sender.
            drop(journal_tx);
            if let Err(e) = self.produce(tx, shared) {
                shared.fail(e);
            }
        });
        let reused = shared.reused.load(Ordering::Relaxed);
        if !self.resumed.is_empty() || self.journal_was_used() {
            tracing::info!(
                job_id = %self.ctx.job_id, copied = shared.done.load(Ordering::Relaxed) - reused,
                reused, total, "copy pass: bytes copied, and reused from an earlier run"
            );
        }
        if let Some(e) = shared.failure.into_inner().expect("failure lock") {
            return Err(e);
        }
        shared
            .merger
            .into_inner()
            .expect("merger lock")
            .finish(total)
            .ok_or_else(|| JobError::Internal("a piece of the output was never hashed".into()))
    }

    fn journal_was_used(&self) -> bool {
        self.ctx.pieces.is_some()
    }

    /// Record finished pieces in the journal in batches — every 1/32 of the output (1 MiB to
    /// 1 GiB) or [`JOURNAL_EVERY`], whichever comes first — each batch made durable in the output
    /// before it is recorded (see [`Journal::append`]; the workers have recorded each piece as
    /// volatile already). A failing journal is given up, not the job.
    fn journal(&self, journal: &Journal, rx: Receiver<Done>) {
        let batch = (self.plan.total / 32).clamp(1 << 20, 1 << 30);
        let (mut pending, mut pending_bytes) = (Vec::new(), 0u64);
        let mut last = Instant::now();
        let (mut flushes, mut records, mut syncing) = (0u64, 0u64, Duration::ZERO);
        loop {
            let got = if pending.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(JOURNAL_EVERY.saturating_sub(last.elapsed()))
            };
            let closed = match got {
                Ok(done) => {
                    // Take whatever else finished meanwhile (while the last batch synced, say):
                    // one sync covers them all.
                    for done in std::iter::once(done).chain(rx.try_iter()) {
                        pending_bytes += done.len;
                        pending.push(done);
                    }
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let due = pending_bytes >= batch || last.elapsed() >= JOURNAL_EVERY;
            if !pending.is_empty() && (closed || due) {
                let clock = Instant::now();
                if let Err(e) = journal.append(self.out, &pending) {
                    tracing::warn!(
                        job_id = %self.ctx.job_id, error = %e,
                        "pieces journal: cannot record finished pieces; this job will not resume"
                    );
                    return;
                }
                syncing += clock.elapsed();
                flushes += 1;
                records += pending.len() as u64;
                pending.clear();
                pending_bytes = 0;
                last = Instant::now();
            }
            if closed {
                tracing::debug!(
                    job_id = %self.ctx.job_id, flushes, records,
                    ms = syncing.as_millis() as u64, "pieces journal: batches recorded"
                );
                return;
            }
        }
    }

    fn stopped(&self, shared: &Shared) -> bool {
        shared.stop.load(Ordering::Relaxed) || self.ctx.cancelled()
    }

    /// Walk the sources again and hand out pieces with the ranges that fill them.
    fn produce(&self, tx: SyncSender<Work>, shared: &Shared) -> Result<(), JobError> {
        let plan = self.plan;
        let mut pieces = pieces(plan, self.max_piece);
        let mut current = pieces.next();
        let mut segments = Vec::new();
        let mut resumed = self.resumed.iter().peekable();
        let count = self
            .manifest
            .for_each_source(plan.reopen_lists(self.sources), |n, spec| {
                if n > plan.count() {
                    return Err(changed_lists());
                }
                let len = plan.len(n);
                if len == 0 {
                    return Ok(());
                }
                if self.stopped(shared) {
                    return Err(JobError::Cancelled);
                }
                let location = Arc::new(spec.location.clone());
                let (start, end) = (plan.start(n), plan.start(n) + len);
                let base = spec.offset.unwrap_or(0);
                let mut pos = start;
                while pos < end {
                    let piece = current.ok_or_else(changed_lists)?;
                    let take = end.min(piece.end()) - pos;
                    segments.push(Segment {
                        number: n,
                        location: location.clone(),
                        src_offset: base + (pos - start),
                        len: take,
                        pin: plan.pin(n),
                    });
                    pos += take;
                    if pos == piece.end() {
                        while resumed.next_if(|d| d.index < piece.index).is_some() {}
                        if let Some(done) = resumed.next_if(|d| {
                            (d.index, d.start, d.len) == (piece.index, piece.start, piece.len)
                        }) {
                            // Finished by an earlier run: its bytes are in the output already,
                            // and its hash in the journal.
                            shared
                                .merger
                                .lock()
                                .expect("merger lock")
                                .add(&piece, done.hash);
                            shared.done.fetch_add(piece.len, Ordering::Relaxed);
                            shared.reused.fetch_add(piece.len, Ordering::Relaxed);
                            self.progress(piece.len as usize);
                            segments.clear();
                            current = pieces.next();
                            continue;
                        }
                        let work = Work {
                            piece,
                            segments: std::mem::take(&mut segments),
                        };
                        // Fails only when every worker is gone, which they are not before us.
                        tx.send(work).map_err(|_| JobError::Cancelled)?;
                        current = pieces.next();
                    }
                }
                Ok(())
            })?;
        if count != plan.count() || current.is_some() {
            return Err(changed_lists());
        }
        Ok(())
    }

    fn worker(
        &self,
        rx: &Mutex<Receiver<Work>>,
        shared: &Shared,
        journal: Option<(&Journal, Sender<Done>)>,
    ) {
        let mut block = vec![0u8; BLOCK];
        let mut behind = std::collections::VecDeque::new();
        // Shared ranges must start on a block of the output's filesystem.
        let align = rustix::fs::fstat(self.out).map_or(0, |st| st.st_blksize.max(0) as u64);
        loop {
            let work = rx.lock().expect("receiver lock").recv();
            let Ok(work) = work else { return };
            // After a failure or a cancel, drain: the producer must never block on a full channel.
            if shared.stop.load(Ordering::Relaxed) {
                continue;
            }
            if self.ctx.cancelled() {
                shared.fail(JobError::Cancelled);
                continue;
            }
            let filled = match self.mode {
                WriteMode::CopyFileRange if self.share && align > 0 => {
                    self.place(&work, &mut block, Placement::Share { align })
                }
                WriteMode::CopyFileRange | WriteMode::Auto => {
                    self.place(&work, &mut block, Placement::KernelCopy)
                }
                WriteMode::Mmap => self.mmap(&work),
                WriteMode::Pwrite => self.place(&work, &mut block, Placement::Buffer),
            };
            match filled {
                Ok(hash) => {
                    if self.ctx.rule.fsync
                        && let Err(e) = self.write_behind(&work.piece, &mut behind)
                    {
                        shared.fail(e);
                        continue;
                    }
                    shared
                        .merger
                        .lock()
                        .expect("merger lock")
                        .add(&work.piece, hash);
                    if let Some((journal, tx)) = &journal {
                        let done = Done::of(&work.piece, hash);
                        // At once, before the bytes are durable: a rerun in this boot may trust
                        // it (the page cache outlives a crashed process). Best effort: the
                        // durable batch follows.
                        if journal.syncs() {
                            let _ = journal.append_volatile(&[done]);
                        }
                        // Gone only when the journal gave up: the job goes on without it.
                        let _ = tx.send(done);
                    }
                    let len = work.piece.len;
                    let done = shared.done.fetch_add(len, Ordering::Relaxed) + len;
                    crate::crash::fraction("mid-copy", done, self.plan.total);
                }
                Err(e) => shared.fail(e),
            }
        }
    }

    /// Open `seg`'s source for reading. No readahead advice: the kernel's own readahead (8 MiB on
    /// this VM's disk) serves each piece's sequential reads best. `POSIX_FADV_WILLNEED` on each
    /// piece as it is opened made cold copies slower, not faster (L, 16 x 64 MiB with caches
    /// dropped: 0.85 s with it, 0.64 s without; issuing it a few pieces ahead was no better, and
    /// neither were more workers or one reader thread feeding the others); `POSIX_FADV_SEQUENTIAL`
    /// doubles the window for a descriptor that reads one 4 MiB piece, so both workers request
    /// each other's pieces.
    fn open(&self, seg: &Segment) -> Result<Reader<'_>, JobError> {
        self.sources
            .open(
                &seg.location,
                seg.pin,
                seg.src_offset..seg.src_offset + seg.len,
            )
            .map_err(|source| JobError::Source {
                number: seg.number,
                source,
            })
    }

    /// Start writeback of a finished piece (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), and wait
    /// for the oldest of this worker's pieces still in writeback once more than [`WRITE_BEHIND`]
    /// are, so the final `fsync` finds little left to write. An error here is the output's: a
    /// write-back error reported to this call would no longer be reported to the final `fsync`
    /// (the file's error cursor has moved past it), so it must fail the job now.
    fn write_behind(
        &self,
        piece: &Piece,
        behind: &mut std::collections::VecDeque<(u64, u64)>,
    ) -> Result<(), JobError> {
        sync_range(self.out, piece.start, piece.len, false).map_err(|e| self.write_failed(e))?;
        behind.push_back((piece.start, piece.len));
        while behind.len() > WRITE_BEHIND {
            let (start, len) = behind.pop_front().expect("not empty");
            sync_range(self.out, start, len, true).map_err(|e| self.write_failed(e))?;
        }
        Ok(())
    }

    fn progress(&self, bytes: usize) {
        if let Some(p) = self.ctx.progress {
            let done = p.done.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
            crate::crash::fraction("mid-copy", done, p.total.load(Ordering::Relaxed));
        }
    }

    /// Fill one piece of the output and hash it, as `how` says. The base path: `pread` sources
    /// into a block, hash it while it is in cache, `pwrite` it; small sources are packed into one
    /// block, so they cost one write per block, not one each.
    ///
    /// With [`Placement::KernelCopy`], a local source's range of [`KERNEL_COPY_FROM`] bytes or
    /// more is copied by `copy_file_range` a block at a time instead, each block hashed right
    /// after from a read-only map of this piece of the output (where the copy just put it).
    ///
    /// With [`Placement::Share`] (the filesystem's block size `align`), where a local source's
    /// range lies block-aligned in the output (both offsets multiples of `align`), its whole
    /// blocks are shared with the output by `copy_file_range` — which on XFS (reflink) and Btrfs
    /// remaps extents instead of copying — and hashed by reading the source (from the page cache
    /// when warm; the output's own page cache holds none of them). The rest — sub-block tails,
    /// and everything an unaligned source pushes off the block grid — goes through the block,
    /// each write allocated just before it, since in this mode the temporary file is not
    /// allocated up front (see `Allocate::UnlessShared`).
    ///
    /// Where the kernel cannot copy between the two files (`EXDEV` and the like), the rest of the
    /// range goes through the buffer.
    fn place(&self, work: &Work, block: &mut [u8], how: Placement) -> Result<NodeHash, JobError> {
        let share = match how {
            Placement::Share { align } => Some(align),
            _ => None,
        };
        let mut hasher = PieceHasher::new(&work.piece);
        let mut window: Option<OutputWindow> = None;
        let mut fill = 0;
        let mut out_at = work.piece.start;
        for seg in &work.segments {
            let reader = self.open(seg)?;
            let mut done = 0;
            let seg_at = out_at + fill as u64;
            if let Some(align) = share
                && seg.len / align * align >= SHARE_FROM
                && seg_at.is_multiple_of(align)
                && seg.src_offset.is_multiple_of(align)
                && let Some(fd) = reader.fd()
            {
                self.flush(&mut hasher, &block[..fill], &mut out_at, share)?;
                fill = 0;
                done = self.remap(fd, seg, 0, seg_at, seg.len / align * align)?;
                // Hash what the output now holds by reading the source, which shares it.
                let mut at = 0;
                while at < done {
                    let want = (done - at).min(block.len() as u64) as usize;
                    let n = read_some(&reader, seg, &mut block[..want], at)?;
                    hasher.update(&block[..n]);
                    at += n as u64;
                }
                out_at += done;
            } else if matches!(how, Placement::KernelCopy)
                && seg.len >= KERNEL_COPY_FROM
                && let Some(fd) = reader.fd()
            {
                self.flush(&mut hasher, &block[..fill], &mut out_at, share)?;
                fill = 0;
                while done < seg.len {
                    let want = (seg.len - done).min(block.len() as u64);
                    let n = self.remap(fd, seg, done, out_at, want)?;
                    if n > 0 {
                        let window = match &mut window {
                            Some(w) => w,
                            None => window.insert(self.window(&work.piece)?),
                        };
                        hasher.update(window.bytes(out_at, n));
                    }
                    done += n;
                    out_at += n;
                    if n < want {
                        break;
                    }
                }
            }
            while done < seg.len {
                let want = (seg.len - done).min((block.len() - fill) as u64) as usize;
                let n = read_some(&reader, seg, &mut block[fill..fill + want], done)?;
                fill += n;
                done += n as u64;
                if fill == block.len() {
                    self.flush(&mut hasher, block, &mut out_at, share)?;
                    fill = 0;
                }
            }
            recheck(&reader, seg)?;
        }
        self.flush(&mut hasher, &block[..fill], &mut out_at, share)?;
        Ok(hasher.finish())
    }

    /// A read-only map of `piece`'s range of the output, for hashing what the kernel copied.
    fn window(&self, piece: &Piece) -> Result<OutputWindow, JobError> {
        let page = rustix::param::page_size() as u64;
        let start = piece.start / page * page;
        let len = usize::try_from(piece.end() - start)
            .map_err(|_| JobError::Internal("a piece larger than memory".into()))?;
        // SAFETY: the map is read-only and covers only our own temporary file, created new
        // (O_EXCL) under a hidden name and sized to the whole output before the copy began (it
        // is never truncated while the job runs), so every mapped page lies inside the file and
        // reading it cannot fault past its end. Only bytes the kernel has reported copied are
        // read, and no process has a reason to open the file, let alone shrink it (the same
        // argument as for `mmap` mode).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(len)
                .map(self.out)
        }
        .map_err(|e| self.write_failed(e))?;
        Ok(OutputWindow { map, start })
    }

    /// Hash and write the filled part of [`Copy::place`]'s block at `out_at`, and move past it;
    /// in sharing mode allocating it first (see [`Copy::write_unshared`]).
    fn flush(
        &self,
        hasher: &mut PieceHasher,
        bytes: &[u8],
        out_at: &mut u64,
        share: Option<u64>,
    ) -> Result<(), JobError> {
        if bytes.is_empty() {
            return Ok(());
        }
        hasher.update(bytes);
        if share.is_some() {
            self.write_unshared(bytes, *out_at)?;
        } else {
            self.write_all(bytes, *out_at)?;
        }
        *out_at += bytes.len() as u64;
        Ok(())
    }

    /// `copy_file_range` `len` bytes of `seg`, `from` bytes into it, to output offset `at`; how
    /// many bytes went (fewer when the kernel cannot copy between these two files, or the source
    /// ends early: the caller copies the rest through its buffer, which tells a truncated source
    /// from a filesystem whose files do not copy this way).
    fn remap(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        seg: &Segment,
        from: u64,
        at: u64,
        len: u64,
    ) -> Result<u64, JobError> {
        let mut done = 0;
        while done < len {
            let mut src = seg.src_offset + from + done;
            let mut dst = at + done;
            let left = (len - done).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(fd, Some(&mut src), self.out, Some(&mut dst), left) {
                Ok(0) => break,
                Ok(n) => {
                    done += n as u64;
                    self.progress(n);
                }
                // Not possible between these two files: the caller copies the rest.
                Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => break,
                // Either side may fail: a full disk is the output's, the rest the source's.
                Err(e) if is_no_space(&e.into()) => return Err(self.write_failed(e.into())),
                Err(e) => {
                    return Err(JobError::Source {
                        number: seg.number,
                        source: SourceError::ReadFailed {
                            what: seg.location.to_string(),
                            source: e.into(),
                        },
                    });
                }
            }
        }
        Ok(done)
    }

    /// Allocate `bytes`' range of the output, then write them: in sharing mode nothing was
    /// allocated up front, and a full disk must be `no_space` before the write, not a short one.
    fn write_unshared(&self, bytes: &[u8], at: u64) -> Result<(), JobError> {
        match rustix::fs::fallocate(
            self.out,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            at,
            bytes.len() as u64,
        ) {
            Ok(()) | Err(Errno::OPNOTSUPP) => {}
            Err(e) => return Err(self.write_failed(e.into())),
        }
        self.write_all(bytes, at)
    }

    /// `pread` sources straight into a memory map of this piece of the output (a bounded window,
    /// never the whole file), hashing each block right after it lands.
    fn mmap(&self, work: &Work) -> Result<NodeHash, JobError> {
        let piece = &work.piece;
        let page = rustix::param::page_size() as u64;
        let map_start = piece.start / page * page;
        let skew = (piece.start - map_start) as usize;
        // SAFETY: the map covers only our own temporary file, created new (O_EXCL) under a hidden
        // name and fully allocated with fallocate before any mapping (the job falls back to pwrite
        // when it cannot be), so no page is past EOF and no write can fault for want of space.
        // Workers map disjoint byte ranges; no other process has a reason to open the file, and
        // sources are never mapped (they are read with pread), so a truncated source is a short
        // read, not a SIGBUS.
        let mut map = unsafe {
            memmap2::MmapOptions::new()
                .offset(map_start)
                .len(skew + piece.len as usize)
                .map_mut(self.out)
        }
        .map_err(|e| self.write_failed(e))?;
        // Pre-fault the window's pages in one call instead of one fault per 4 KiB (Linux ≥ 5.14;
        // older kernels just fault as they go).
        let _ = map.advise(memmap2::Advice::PopulateWrite);
        let window = &mut map[skew..];
        let mut hasher = PieceHasher::new(piece);
        let mut at = 0usize;
        for seg in &work.segments {
            let reader = self.open(seg)?;
            let mut done = 0;
            while done < seg.len {
                let want = (seg.len - done).min(BLOCK as u64) as usize;
                let n = read_some(&reader, seg, &mut window[at..at + want], done)?;
                hasher.update(&window[at..at + n]);
                self.progress(n);
                at += n;
                done += n as u64;
            }
            recheck(&reader, seg)?;
        }
        Ok(hasher.finish())
    }

    fn write_all(&self, bytes: &[u8], at: u64) -> Result<(), JobError> {
        self.out
            .write_all_at(bytes, at)
            .map_err(|e| self.write_failed(e))?;
        self.progress(bytes.len());
        Ok(())
    }

    fn write_failed(&self, e: std::io::Error) -> JobError {
        JobError::Output(io_error(self.out_path, "writing", e))
    }
}

/// A read-only map of a piece's range of the output (from the page boundary below it).
struct OutputWindow {
    map: memmap2::Mmap,
    /// Output offset of the map's first byte.
    start: u64,
}

impl OutputWindow {
    /// The `len` bytes of the output at offset `at` (inside the piece).
    fn bytes(&self, at: u64, len: u64) -> &[u8] {
        let (from, len) = ((at - self.start) as usize, len as usize);
        // Map the range's pages (in the page cache: the copy just wrote them) in one call rather
        // than a fault per few pages. Advice only: without it the pages fault in as read.
        let _ = self
            .map
            .advise_range(memmap2::Advice::PopulateRead, from, len);
        &self.map[from..from + len]
    }
}

/// `sync_file_range` over `len` bytes of `file` at `start`: start writeback, or (`wait`) wait for
/// writeback already under way, write what is still dirty, and wait for that too.
fn sync_range(file: &File, start: u64, len: u64, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: sync_file_range takes a descriptor and integers only, no memory; `file` stays open
    // for the call (rustix has no wrapper for this system call).
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), start, len, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Read at most `buf.len()` bytes of `seg`, `done` bytes into it; at least one byte or an error.
fn read_some(reader: &Reader, seg: &Segment, buf: &mut [u8], done: u64) -> Result<usize, JobError> {
    match reader.read_at(buf, seg.src_offset + done, &*seg.location) {
        Ok(0) => Err(ended_early(seg, done)),
        Ok(n) => Ok(n),
        Err(source) => Err(JobError::Source {
            number: seg.number,
            source,
        }),
    }
}

/// Once a segment is read: fail `source_changed` if its source moved while it was read, so
/// bytes of two versions of a file rewritten in place are never published as one.
fn recheck(reader: &Reader, seg: &Segment) -> Result<(), JobError> {
    reader.recheck().map_err(|source| JobError::Source {
        number: seg.number,
        source,
    })
}

fn ended_early(seg: &Segment, done: u64) -> JobError {
    JobError::Source {
        number: seg.number,
        source: SourceError::Changed {
            what: seg.location.to_string(),
            reason: format!(
                "it ended at byte {}, inside the planned range (was it truncated?)",
                seg.src_offset + done
            ),
        },
    }
}

pub(super) fn changed_lists() -> JobError {
    JobError::Internal("the source lists yielded other sources than were planned".into())
}
