//! The local file target: where it may go, the temporary file it is built in, and its atomic publish.
//!
//! Invariant: the output path shows either nothing (or the earlier file, untouched) or the
//! complete, verified bytes. The bytes are built in a hidden temporary file in the output's own
//! folder, created new (`O_EXCL`, never an existing file truncated) and allocated up front with
//! `fallocate`, so a full disk is [`OutputError::NoSpace`] before any byte is written and a write
//! through a memory map can never hit SIGBUS for want of blocks — except where the filesystem
//! shares extents and the job will share them ([`Allocate::UnlessShared`]): then the file is only
//! sized, and the copy allocates each range it writes just before writing it. Publishing is
//! `fsync` of the file, `renameat2` (with `RENAME_NOREPLACE` unless overwriting, so a file that
//! appeared meanwhile is never clobbered), then `fsync` of the folder. The `.b3` sidecar is
//! written to its own temporary file *before* the output is renamed, so a full disk cannot leave
//! an output without its sidecar.
//! Dropping a [`TempOutput`] removes its temporary names: its own bytes when unpublished, the
//! earlier file an overwrite exchanged out when published.
//!
//! Output and sidecar are one unit: both renames (and recovery's look at them) happen under an
//! exclusive `flock` of the output's folder, so no other job's publish falls between them, and
//! the caller records the inodes about to be renamed ([`PublishStep::Publishing`]) before the
//! first, so that recovery can tell which side of each rename a crash fell on.
//!
//! Beside this file: [`name`] (the output names that can be published, checked before any byte)
//! and [`recover`] (finishing or undoing a publish a crash interrupted).
//!
//! Temporary names are `.concatd-<job id>.tmp` (and `.concatd-<job id>.b3.tmp`), so whoever knows a
//! job's id — the daemon recovering after a crash — can find and remove them.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FallocateFlags, FileType, FlockOperation, Mode, OFlags, RenameFlags, ResolveFlags,
};
use rustix::io::Errno;

mod name;
mod recover;

use super::{OutputError, io_error};

use name::{SIDECAR_EXT, check};

/// The temporary file name of a job's output in the output's folder.
pub fn temp_name(job_id: &str) -> String {
    format!(".concatd-{job_id}.tmp")
}

/// The temporary name of a job's `.b3` sidecar (renamed into place just after the output).
pub fn sidecar_temp_name(job_id: &str) -> String {
    format!(".concatd-{job_id}.b3.tmp")
}

fn sidecar_name(name: &OsStr) -> OsString {
    let mut b3 = name.to_owned();
    b3.push(SIDECAR_EXT);
    b3
}

/// A checked output location: its folder is open, and lies beneath the rule's `output_root`.
pub struct OutputTarget {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
    /// Folders holding a folder this target created: their new entries must be made durable
    /// along with the output.
    created_in: Vec<OwnedFd>,
}

impl OutputTarget {
    /// Check `output` (see [`check`]) and create its parent folders beneath `root`, refusing any
    /// symlink on the way.
    pub fn new(root: &Path, output: &str) -> Result<Self, OutputError> {
        Self::open(root, output, true)?.ok_or_else(|| OutputError::NotAllowed {
            output: output.to_owned(),
            reason: "its folder cannot be created".into(),
        })
    }

    /// The target of an output whose folders already exist (recovery: nothing is created);
    /// `Ok(None)` when a folder on the way is missing.
    pub fn existing_folder(root: &Path, output: &str) -> Result<Option<Self>, OutputError> {
        Self::open(root, output, false)
    }

    /// Walk from `root` to the output's folder one component at a time (so no path the kernel
    /// sees is longer than one name), creating missing folders when `create`.
    fn open(root: &Path, output: &str, create: bool) -> Result<Option<Self>, OutputError> {
        let (parts, name) = check(root, output)?;
        let io = |action, e: Errno| OutputError::Io {
            path: root.to_owned(),
            action,
            source: e.into(),
        };
        let mut dir = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io("opening output_root", e))?;
        let mut path = root.to_path_buf();
        let mut created_in = Vec::new();
        for part in parts {
            path.push(part);
            let created = create
                && match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
                    Ok(()) => true,
                    Err(Errno::EXIST) => false,
                    Err(e) => return Err(io("creating parent folder", e)),
                };
            let child = match rustix::fs::openat2(
                &dir,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            ) {
                Ok(child) => child,
                Err(Errno::NOENT) if !create => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV) => {
                    return Err(OutputError::NotAllowed {
                        output: output.to_owned(),
                        reason: format!("{} is a symlink or not a folder", path.display()),
                    });
                }
                Err(e) => return Err(io("opening parent folder", e)),
            };
            let parent = std::mem::replace(&mut dir, child);
            if created {
                created_in.push(parent);
            }
        }
        path.push(name);
        Ok(Some(Self {
            dir,
            name: name.to_owned(),
            path,
            created_in,
        }))
    }

    /// Take the publish lock of the output's folder, waiting for it: an exclusive `flock` on a
    /// descriptor of the folder opened for this lock alone, so it excludes every other holder —
    /// another job's thread in this daemon as much as another daemon. Held across an output's
    /// and its sidecar's renames (and by recovery while it finishes or undoes them), it makes
    /// the two one unit: no other job's rename falls between them.
    fn lock(&self) -> Result<OwnedFd, OutputError> {
        let fd = rustix::fs::openat(
            &self.dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.fail("opening the output folder to lock it", e))?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive)
            .map_err(|e| self.fail("locking the output folder", e))?;
        Ok(fd)
    }

    /// Device and inode of what is at `name` in the output folder, if anything.
    fn inode_at(&self, name: &OsStr) -> Option<(u64, u64)> {
        rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    }

    /// Remove job `job_id`'s temporary names in the output folder — its unpublished bytes, or
    /// the earlier files an overwrite exchanged out. The one place temporary files go.
    pub fn remove_temps(&self, job_id: &str) -> usize {
        [temp_name(job_id), sidecar_temp_name(job_id)]
            .into_iter()
            .filter(|n| rustix::fs::unlinkat(&self.dir, n.as_str(), AtFlags::empty()).is_ok())
            .count()
    }

    /// Remove job `job_id`'s temporary sidecar only (its temporary output is kept to resume in);
    /// how many files went.
    pub fn remove_sidecar_temp(&self, job_id: &str) -> usize {
        usize::from(
            rustix::fs::unlinkat(
                &self.dir,
                sidecar_temp_name(job_id).as_str(),
                AtFlags::empty(),
            )
            .is_ok(),
        )
    }

    /// The absolute path the output is published at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is already at the output path, or at its `.b3` sidecar's path when `sidecar`
    /// (anything: file, symlink, folder), if something is.
    pub fn existing(&self, sidecar: bool) -> Option<PathBuf> {
        let taken =
            |name: &OsStr| rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok();
        if taken(&self.name) {
            return Some(self.path.clone());
        }
        let b3 = sidecar_name(&self.name);
        (sidecar && taken(&b3)).then(|| self.path.with_file_name(b3))
    }

    /// A folder at the output path: no rename can replace it, so even an overwrite must be
    /// refused before the copy. (A folder at the sidecar's path still fails late, at its rename,
    /// and the earlier output is restored: tests/engine/failures.rs uses it to reach that path.)
    pub fn folder_in_the_way(&self) -> Option<PathBuf> {
        rustix::fs::statat(&self.dir, &self.name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .then(|| self.path.clone())
    }

    /// Create the temporary file for job `job_id` and allocate `size` bytes for it.
    pub fn create_temp(&self, job_id: &str, size: u64) -> Result<TempOutput<'_>, OutputError> {
        self.create_temp_with(job_id, size, Allocate::Full)
    }

    /// Create the temporary file for job `job_id`, `size` bytes long, allocated as `how` says.
    pub fn create_temp_with(
        &self,
        job_id: &str,
        size: u64,
        how: Allocate,
    ) -> Result<TempOutput<'_>, OutputError> {
        let name = temp_name(job_id);
        let fd = rustix::fs::openat(
            &self.dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| self.fail("creating temporary file", e))?;
        let temp = self.temp_of(job_id, fd);
        temp.allocate(size, how)
    }

    /// Job `job_id`'s temporary file open at `fd`, not yet allocated; removed when dropped.
    fn temp_of(&self, job_id: &str, fd: OwnedFd) -> TempOutput<'_> {
        TempOutput {
            target: self,
            job_id: job_id.to_owned(),
            file: File::from(fd),
            allocated: false,
            reflinks: false,
            keep: false,
        }
    }

    /// The temporary file an earlier run of job `job_id` left (a crash, or a shutdown that kept
    /// it for resuming), opened again and allocated to `size`; `None` when there is none. The
    /// caller checks it is the very file it recorded (its inode) before trusting its bytes, and
    /// drops it (which removes it) otherwise.
    pub fn reopen_temp(
        &self,
        job_id: &str,
        size: u64,
        how: Allocate,
    ) -> Result<Option<TempOutput<'_>>, OutputError> {
        let fd = match rustix::fs::openat(
            &self.dir,
            temp_name(job_id).as_str(),
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.fail("opening temporary file", e)),
        };
        let temp = self.temp_of(job_id, fd);
        let st =
            rustix::fs::fstat(&temp.file).map_err(|e| self.fail("opening temporary file", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != size
        {
            return Ok(None); // dropped: removed
        }
        temp.allocate(size, how).map(Some)
    }
}

/// How much of a new temporary output to allocate up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocate {
    /// All of it, so a full disk is `no_space` before the first byte (and a memory map can never
    /// fault for want of blocks).
    Full,
    /// All of it, unless the filesystem shares extents (XFS with reflink, Btrfs): then the file
    /// is only sized, since the ranges that will be shared with sources need no blocks of their
    /// own; the copy allocates each range it writes itself just before writing it, so a full
    /// disk is still `no_space` (at that range, for the bytes really written).
    UnlessShared,
}

/// Whether the filesystem of `file` can share extents between files (`FICLONE`, which is what
/// `copy_file_range` tries first on the same filesystem). Cloning a file onto itself changes
/// nothing: an empty file answers `Ok`, a non-empty one `EINVAL` (overlapping ranges), where a
/// filesystem without extent sharing answers `EOPNOTSUPP` (ext4, tmpfs, XFS without reflink).
fn shares_extents(file: &File) -> bool {
    matches!(
        rustix::fs::ioctl_ficlone(file, file),
        Ok(()) | Err(Errno::INVAL)
    )
}

impl<'a> TempOutput<'a> {
    fn allocate(self, size: u64, how: Allocate) -> Result<TempOutput<'a>, OutputError> {
        let mut temp = self;
        let target = temp.target;
        temp.reflinks = shares_extents(&temp.file);
        if size > 0 {
            if how == Allocate::UnlessShared && temp.reflinks {
                if temp.file.metadata().map(|m| m.len()).ok() != Some(size) {
                    temp.file
                        .set_len(size)
                        .map_err(|e| target.fail_io("sizing temporary file", e))?;
                }
                return Ok(temp);
            }
            match rustix::fs::fallocate(&temp.file, FallocateFlags::empty(), 0, size) {
                Ok(()) => temp.allocated = true,
                // Filesystems without fallocate: size the file sparsely; writes may then meet
                // ENOSPC (still an error, not a signal: memory-mapped writes are refused then).
                Err(Errno::OPNOTSUPP) => temp
                    .file
                    .set_len(size)
                    .map_err(|e| target.fail_io("sizing temporary file", e))?,
                Err(e) => return Err(target.fail("allocating temporary file", e)),
            }
        }
        Ok(temp)
    }
}

impl OutputTarget {
    /// Rename `from` to `to` in the output folder, never over an existing file unless
    /// `overwrite`; then it is *exchanged*, so the earlier file stays under `from` until the
    /// publish is complete (and can be put back if it is not). True when something was replaced.
    fn place(&self, from: &str, to: &OsStr, overwrite: bool) -> Result<bool, Errno> {
        match rustix::fs::renameat_with(&self.dir, from, &self.dir, to, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(false),
            Err(Errno::EXIST) if overwrite => {
                // Replace files only, as rename(2) would: never swap a folder into our temp name.
                let st = rustix::fs::statat(&self.dir, to, AtFlags::SYMLINK_NOFOLLOW)?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Err(Errno::ISDIR);
                }
                match rustix::fs::renameat_with(
                    &self.dir,
                    from,
                    &self.dir,
                    to,
                    RenameFlags::EXCHANGE,
                ) {
                    Ok(()) => Ok(true),
                    // A filesystem without RENAME_EXCHANGE: replace outright (no way back).
                    Err(Errno::INVAL) => {
                        rustix::fs::renameat(&self.dir, from, &self.dir, to).map(|()| false)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Undo [`Self::place`]: swap the earlier file back, or remove what was placed.
    fn unplace(&self, from: &str, to: &OsStr, replaced: bool) {
        let _ = if replaced {
            rustix::fs::renameat_with(&self.dir, from, &self.dir, to, RenameFlags::EXCHANGE)
        } else {
            rustix::fs::unlinkat(&self.dir, to, AtFlags::empty())
        };
    }

    fn fail(&self, action: &'static str, e: Errno) -> OutputError {
        self.fail_io(action, e.into())
    }

    fn fail_io(&self, action: &'static str, e: std::io::Error) -> OutputError {
        io_error(&self.path, action, e)
    }
}

/// How to publish.
#[derive(Debug, Clone, Copy)]
pub struct Publish {
    pub overwrite: bool,
    pub fsync: bool,
    /// Also publish `<output>.b3`.
    pub sidecar: bool,
}

/// The inodes a publish is about to rename into place: recorded (durably) before the first
/// rename, they tell recovery which side of each rename a crash fell on, since a rename keeps
/// the inode and an exchange moves the earlier file's inode to our temporary name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renames {
    pub dev: u64,
    /// The finished temporary output.
    pub output_ino: u64,
    /// The sidecar's temporary file (`None`: no sidecar, or a journal of an older daemon that
    /// did not record it).
    pub sidecar_ino: Option<u64>,
}

/// A step of the publish the caller must make durable before it returns (see
/// `daemon::recover` for the state machine these steps are transitions of).
#[derive(Debug, Clone, Copy)]
pub enum PublishStep {
    /// About to rename: output and sidecar are complete (and synced) under temporary names.
    Publishing(Renames),
    /// Both renamed into place and the folder synced; the earlier files an overwrite exchanged
    /// out are still under our temporary names (removed next).
    Published,
}

/// The output being built. Its temporary names are removed on drop.
pub struct TempOutput<'a> {
    target: &'a OutputTarget,
    job_id: String,
    file: File,
    allocated: bool,
    /// The filesystem shares extents (see [`Allocate::UnlessShared`]).
    reflinks: bool,
    /// Leave the temporary output behind when dropped (see [`TempOutput::keep`]).
    keep: bool,
}

impl TempOutput<'_> {
    /// The open temporary file, for the copy workers.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Leave the unpublished temporary output in place when this is dropped, for a later run of
    /// the same job to resume (its pieces journal says which bytes are done).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Whether every byte is allocated (so memory-mapped writes cannot fault for space).
    pub fn allocated(&self) -> bool {
        self.allocated
    }

    /// Whether the output's filesystem shares extents between files (XFS with reflink, Btrfs).
    pub fn reflinks(&self) -> bool {
        self.reflinks
    }

    /// Make the output durable and visible at its path, with its sidecar, as one unit: under the
    /// output folder's lock, `journal` records [`PublishStep::Publishing`], the output and then
    /// the sidecar are renamed (exchanged when overwriting), the folder is synced, and `journal`
    /// records [`PublishStep::Published`]. An error of `journal` fails the publish and puts
    /// everything back as it was.
    pub fn publish<E: From<OutputError>>(
        self,
        hash: &blake3::Hash,
        how: Publish,
        mut journal: impl FnMut(PublishStep) -> Result<(), E>,
    ) -> Result<PathBuf, E> {
        let t = self.target;
        if how.fsync {
            self.file
                .sync_all()
                .map_err(|e| t.fail_io("syncing temporary file", e))?;
        }
        crate::crash::point("after-fsync");
        let sidecar_temp = sidecar_temp_name(&self.job_id);
        let sidecar_ino = if how.sidecar {
            Some(t.write_sidecar_temp(&sidecar_temp, hash, how.fsync)?)
        } else {
            None
        };
        crate::crash::point("after-sidecar-temp");
        let st =
            rustix::fs::fstat(&self.file).map_err(|e| t.fail("inspecting temporary file", e))?;
        let _lock = t.lock()?;
        journal(PublishStep::Publishing(Renames {
            dev: st.st_dev,
            output_ino: st.st_ino,
            sidecar_ino,
        }))?;
        let output_temp = temp_name(&self.job_id);
        let replaced = match t.place(&output_temp, &t.name, how.overwrite) {
            Ok(replaced) => replaced,
            Err(Errno::EXIST) => {
                return Err(OutputError::Exists {
                    path: t.path.clone(),
                }
                .into());
            }
            Err(e) => return Err(t.fail("publishing (rename)", e).into()),
        };
        crate::crash::point("after-output-rename");
        // Past the rename the output is visible. Should the rest fail, everything is put back as
        // it was — the earlier file (kept under the temporary name by the exchange) returns, or
        // the new output goes — so a failed job never leaves an output behind nor loses one.
        let b3 = sidecar_name(&t.name);
        let mut sidecar = None; // Some(whether an earlier .b3 was replaced)
        let mut finish = || -> Result<(), E> {
            if how.sidecar {
                match t.place(&sidecar_temp, &b3, how.overwrite) {
                    Ok(replaced) => sidecar = Some(replaced),
                    Err(Errno::EXIST) => {
                        return Err(OutputError::Exists {
                            path: t.path.with_file_name(&b3),
                        }
                        .into());
                    }
                    Err(e) => return Err(t.fail("publishing the .b3 sidecar", e).into()),
                }
                crate::crash::point("after-sidecar-rename");
            }
            if how.fsync {
                t.sync_folders(true)?;
            }
            crate::crash::point("after-dir-fsync");
            journal(PublishStep::Published)
        };
        if let Err(e) = finish() {
            if let Some(replaced) = sidecar {
                t.unplace(&sidecar_temp, &b3, replaced);
            }
            t.unplace(&output_temp, &t.name, replaced);
            return Err(e);
        }
        // The earlier files an overwrite exchanged out go now, under the lock (see Drop).
        drop(self);
        Ok(t.path.clone())
    }
}

impl OutputTarget {
    /// `fsync` the output's folder, and (`created`) every folder this target created on the
    /// way to it.
    fn sync_folders(&self, created: bool) -> Result<(), OutputError> {
        let created = self.created_in.iter().rev().filter(|_| created);
        for dir in std::iter::once(&self.dir).chain(created) {
            rustix::fs::fsync(dir).map_err(|e| self.fail("syncing the output folder", e))?;
        }
        Ok(())
    }

    /// Write the `.b3` line for `hash` to the temporary file `name`; its inode.
    fn write_sidecar_temp(
        &self,
        name: &str,
        hash: &blake3::Hash,
        fsync: bool,
    ) -> Result<u64, OutputError> {
        let line = crate::checksum::sidecar_line(hash, &self.name.to_string_lossy());
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| self.fail("creating the .b3 sidecar", e))?;
        let file = File::from(fd);
        std::io::Write::write_all(&mut &file, line.as_bytes())
            .map_err(|e| self.fail_io("writing the .b3 sidecar", e))?;
        if fsync {
            file.sync_all()
                .map_err(|e| self.fail_io("syncing the .b3 sidecar", e))?;
        }
        let st =
            rustix::fs::fstat(&file).map_err(|e| self.fail("inspecting the .b3 sidecar", e))?;
        Ok(st.st_ino)
    }
}

impl Drop for TempOutput<'_> {
    fn drop(&mut self) {
        // Unpublished: our bytes. Published over an earlier file: that file, exchanged out.
        // Published without replacing anything: nothing (the unlink fails harmlessly).
        if self.keep {
            self.target.remove_sidecar_temp(&self.job_id);
        } else {
            self.target.remove_temps(&self.job_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_that_leave_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "",
            "dir/",
            ".concatd-1.tmp",
            "x\0y",
            "a\0/b",
            &"n".repeat(256),
            &"s".repeat(253),
            &format!("{}/x", "d".repeat(256)),
            &format!("{}/x", vec!["d".repeat(250); 17].join("/")),
        ] {
            assert!(
                matches!(
                    OutputTarget::new(dir.path(), bad),
                    Err(OutputError::NotAllowed { .. })
                ),
                "{bad}"
            );
        }
        std::os::unix::fs::symlink("/tmp", dir.path().join("link")).unwrap();
        assert!(matches!(
            OutputTarget::new(dir.path(), "link/x"),
            Err(OutputError::NotAllowed { .. })
        ));
        assert!(OutputTarget::new(dir.path(), &"n".repeat(252)).is_ok());
    }
}
